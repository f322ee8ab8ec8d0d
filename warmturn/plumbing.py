"""Environment plumbing shared by the addon, the server, the bench and the tests. Standard library only.

- :func:`find_openblas` / :func:`openblas_env`: the one place that knows where Debian's OpenBLAS
  lives. mlx-cpu's Linux wheel bundles a slow reference BLAS; preloading OpenBLAS made the
  default model's prefill ~13x faster on this project's machine (519-token prompt, ~100 vs ~7
  tokens/s; the measurement and its command are in docs/server.md, "OpenBLAS on Linux").
- :func:`free_port`: a free TCP port on 127.0.0.1 for a child that needs its number up front.
- :func:`is_loopback`: whether a host name or address is this machine's loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Mapping, Sequence

#: Where distributions put an OpenBLAS that MLX can use through ``LD_PRELOAD`` (first found wins).
OPENBLAS_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
#: Set to 1 to keep MLX's bundled BLAS (no preload, no re-exec): the A/B "off" arm of the figure above.
OPENBLAS_OPT_OUT = "WARMTURN_NO_OPENBLAS"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def find_openblas(candidates: Sequence[str] = OPENBLAS_CANDIDATES) -> str | None:
    """The first OpenBLAS library present on this machine, or None."""
    return next((p for p in candidates if os.path.isfile(p)), None)


def openblas_env(env: Mapping[str, str] | None = None, platform: str = sys.platform,
                 library: str | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) with OpenBLAS first in ``LD_PRELOAD`` on Linux,
    when it is installed, not already preloaded and not opted out of (``WARMTURN_NO_OPENBLAS=1``).
    Otherwise the copy is unchanged."""
    out = dict(os.environ if env is None else env)
    lib = library or find_openblas()
    if not platform.startswith("linux") or lib is None or out.get(OPENBLAS_OPT_OUT, "") not in ("", "0"):
        return out
    preload = [p for p in out.get("LD_PRELOAD", "").split(":") if p]
    if lib not in preload and not any("openblas" in p for p in preload):
        out["LD_PRELOAD"] = ":".join([lib, *preload])
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (and its usual aliases), 127.0.0.0/8, ``::1`` and IPv4-mapped loopback.

    Accepts bracketed IPv6 (``[::1]``) and scope ids (``::1%lo``); any other name is not loopback
    (no DNS lookup: a name that resolves to 127.0.0.1 elsewhere is not trusted here).
    """
    h = host.strip().lower().rstrip(".")
    if h in LOOPBACK_NAMES:
        return True
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback
