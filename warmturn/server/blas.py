"""Make MLX's Linux CPU backend use OpenBLAS instead of its bundled reference BLAS.

mlx-cpu's Linux wheel links a slow reference BLAS (an fp32 1024² matmul at ~5 GFLOP/s);
Debian's OpenBLAS, preloaded, is much faster (the measured figure is in
:mod:`warmturn.machine`, which also knows where OpenBLAS lives). The dynamic loader only
honours ``LD_PRELOAD`` at process start, so :func:`maybe_reexec` re-executes the current command once with it set, before MLX is
imported. Opt out with ``WARMTURN_NO_OPENBLAS=1``. Metal and CUDA builds are left alone.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from collections.abc import Mapping

from warmturn.machine import OPENBLAS_OPT_OUT as OPT_OUT
from warmturn.machine import find_openblas, openblas_env

log = logging.getLogger(__name__)

_REEXEC_MARK = "WARMTURN_BLAS_REEXEC"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def preload_plan(env: Mapping[str, str], platform: str, cpu_backend: bool, library: str | None) -> str | None:
    """The ``LD_PRELOAD`` value to re-exec with, or None when nothing should happen. Pure."""
    if platform != "linux" or not cpu_backend or library is None or env.get(_REEXEC_MARK):
        return None
    planned = openblas_env(env, platform, library).get("LD_PRELOAD")
    return planned if planned != env.get("LD_PRELOAD") else None


def maybe_reexec() -> None:
    """Re-exec this process with OpenBLAS preloaded when that helps (never returns if it does)."""
    cpu = _installed("mlx-cpu") and not _installed("mlx-cuda")
    plan = preload_plan(os.environ, sys.platform, cpu, find_openblas())
    if plan is None:
        return
    env = dict(os.environ, LD_PRELOAD=plan, **{_REEXEC_MARK: "1"})
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:  # keep running with the slow BLAS rather than not at all
        log.warning("could not re-exec with OpenBLAS preloaded: %s", e)


def blas_in_use() -> str:
    """Which BLAS library this process has mapped (reads /proc/self/maps on Linux)."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return "unknown"
    # numpy's wheel bundles libscipy_openblas64_ with prefixed symbols: MLX cannot use it.
    libs = {p for p in libs if "scipy_openblas" not in p}
    openblas = sorted(p for p in libs if "openblas" in p)
    if openblas:
        return f"OpenBLAS ({openblas[0]})"
    other = sorted(p for p in libs if "blas" in os.path.basename(p).lower())
    bundled = [p for p in other if "mlx_cpu.libs" in p]
    if bundled or not other:
        hint = "" if os.environ.get(OPT_OUT) else "; install libopenblas0-pthread"
        return f"MLX's bundled reference BLAS (slow{hint})"
    return f"other BLAS ({other[0]})"
