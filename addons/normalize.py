"""The documented entry script, `mitmdump -s addons/normalize.py`, from a checkout.

The addon lives in warmturn/addons/ (installed: `warmturn-proxy`). This file puts the repository
root on sys.path, so a standalone mitmproxy with its own Python (Homebrew's) finds the stdlib-only
`warmturn` package, and hands mitmproxy the addon chain. Imports only the standard library.
"""

import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:
    sys.path.insert(0, _root)

from warmturn.addons.normalize import make_addons  # noqa: E402

addons = make_addons()  # fresh instances for every load (mitmproxy reloads scripts)
