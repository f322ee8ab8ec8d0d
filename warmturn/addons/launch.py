"""`warmturn-proxy`: mitmdump with the warmturn addon loaded, for installed (non-checkout) use.

Equivalent to ``mitmdump -s addons/normalize.py --listen-host 127.0.0.1 ARGS…`` from a checkout:
every mitmdump argument passes through (``--listen-port 8082``, ``--set normalize=false``…).
It listens on loopback unless ``--listen-host`` is given, and the embedded server runs on this
Python unless ``--set embedded_python=…`` is given (an installed package has no ``.venv`` beside
it). Imports only the standard library and mitmproxy, like the addon.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

SCRIPT = Path(__file__).resolve().with_name("normalize.py")


def mitmdump_args(argv: Sequence[str]) -> list[str]:
    """The full mitmdump argument list for the user's ``argv``."""
    args = ["-s", str(SCRIPT)]
    if not any(a == "--listen-host" or a.startswith("--listen-host=") for a in argv):
        args += ["--listen-host", "127.0.0.1"]
    if not any(a.startswith("embedded_python=") for a in argv):
        args += ["--set", f"embedded_python={sys.executable}"]
    return args + list(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from mitmproxy.tools.main import mitmdump

    return mitmdump(mitmdump_args(sys.argv[1:] if argv is None else argv)) or 0


if __name__ == "__main__":
    sys.exit(main())
