"""Process supervision for the benchmark: start servers in their own process groups, wait
until they answer, and make sure every one of them is gone when the bench ends.

Every process started through `start()` is registered; `stop_all()` runs at exit, on
SIGINT/SIGTERM (installed by `install_signal_handlers()`), and may be called any time.
Stopping is SIGTERM to the whole process group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from warmturn.machine import openblas_env

log = logging.getLogger(__name__)

def mlx_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess running MLX: OpenBLAS preloaded on Linux when installed
    (see warmturn.machine), unbuffered output."""
    env = openblas_env()
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Proc:
    name: str
    cmd: list[str]
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


_RUNNING: dict[int, Proc] = {}


def start(name: str, cmd: Sequence[str], log_dir: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Proc:
    """Start `cmd` in a new session (its own process group), output to `log_dir/name.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    out = log_path.open("ab")
    popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=cwd, start_new_session=True)
    out.close()
    proc = Proc(name, list(cmd), popen, log_path)
    _RUNNING[popen.pid] = proc
    log.debug("started %s pid %d: %s", name, popen.pid, " ".join(cmd))
    return proc


def stop(proc: Proc, grace: float = 10.0) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL it."""
    _RUNNING.pop(proc.pid, None)
    if proc.popen.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # children may outlive the leader (e.g. a server started by an addon): always sweep the group
    _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not exit after SIGKILL", proc.name, proc.pid)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """Stop every process this module started and that is still registered."""
    for proc in list(_RUNNING.values()):
        stop(proc, grace=5.0)


def install_signal_handlers() -> None:
    """Stop all children on SIGINT/SIGTERM and at interpreter exit."""
    atexit.register(stop_all)

    def handler(signum, frame):
        stop_all()
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def wait_http(proc: Proc, url: str, timeout: float, ok=lambda r: r.status_code < 500) -> None:
    """Poll `url` until it answers (per `ok`), the process dies, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            r = httpx.get(url, timeout=2.0)
            if ok(r):
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.3)
    raise TimeoutError(f"{proc.name} not ready at {url} after {timeout:.0f}s ({last}):\n{proc.tail()}")
