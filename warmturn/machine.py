"""This machine: its OpenBLAS, a free port on it, and whether an address is its own. Shared by the
addon, the server, the bench and the tests; standard library only.

- :func:`find_openblas` / :func:`openblas_env`: the one place that knows where Debian's OpenBLAS
  lives. mlx-cpu's Linux wheel bundles a slow reference BLAS; preloading OpenBLAS made the
  default model's prefill ~13x faster on this project's machine (519-token prompt, ~100 vs ~7
  tokens/s; the measurement and its command are in docs/server.md, "OpenBLAS on Linux").
- :func:`free_port`: a free TCP port on 127.0.0.1 for a child that needs its number up front.
- :func:`canonical_ip`: the one reading of a host string as an address, in every spelling a
  socket accepts (:func:`is_loopback`, and the addon's check that a request would loop back to
  the proxy, both use it); :func:`is_local_ip`: an address of this machine's interfaces.
"""

from __future__ import annotations

import functools
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
    """True for ``localhost`` (and its usual aliases) and any spelling of a loopback address
    (:func:`canonical_ip`: ``127.0.0.0/8``, ``::1``, ``[::1]``, ``::1%lo``, IPv4-mapped, ``127.1``).
    No DNS lookup: a name that resolves to 127.0.0.1 elsewhere is not trusted here."""
    if host.strip().lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    ip = canonical_ip(host)
    return ip is not None and ip.is_loopback


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def canonical_ip(host: str) -> IPAddress | None:
    """The address a host string names without DNS, in every spelling a socket accepts:
    ``127.1``, ``2130706433``, ``0x7f.0.0.1`` and ``0177.0.0.1`` (inet_aton's legacy forms),
    ``[::1]``, ``::1%lo``, ``::ffff:127.0.0.1`` (unwrapped to IPv4). None for a name, and for
    anything else inet_aton would accept (it reads ``127.0.0.1 evil.example`` as 127.0.0.1)."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0]
    try:
        ip: IPAddress = ipaddress.ip_address(h)
    except ValueError:
        if not h or h.strip("0123456789abcdefx."):  # inet_aton's forms only: digits, hex, dots
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=256)
def is_local_ip(ip: IPAddress) -> bool:
    """An address of this machine: loopback, unspecified (``0.0.0.0`` reaches local listeners),
    or one a socket can bind to (an interface address)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError:
        return False
