"""Subprocess helpers (no tests here) for the addon's integration and end-to-end tests: real mitmdump, real servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from warmturn.machine import free_port, openblas_env

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
def child_env(**extra: str) -> dict[str, str]:
    env = openblas_env()
    env.update(extra)
    return env


def wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if port_open(port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not listening after {timeout}s:\n{log.read_text()[-3000:]}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextmanager
def process(cmd: list[str], port: int, log: Path, timeout: float = 60, env: dict | None = None):
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT),
                                env=env or child_env())
    try:
        wait_port(port, proc, timeout, log)
        yield proc
    finally:
        stop(proc)


def start_server(*flags: str, log: Path, timeout: float = 180, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """The real server (`python -m warmturn.server FLAGS`) on a free loopback port, its output in `log`, once its
    /health answers 200: (process, base URL). The caller stops it (`stop`); `server` does that itself."""
    port = free_port()
    cmd = [sys.executable, "-m", "warmturn.server", "--host", "127.0.0.1", "--port", str(port), *flags]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT),
                                env=env or child_env())
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise TimeoutError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def server(*flags: str, log: Path, timeout: float = 180, env: dict | None = None):
    """`start_server` as a context: yields (process, base URL), stops the process on the way out."""
    proc, base = start_server(*flags, log=log, timeout=timeout, env=env)
    try:
        yield proc, base
    finally:
        stop(proc)


def mitmdump(port: int, log: Path, **options) -> contextmanager:
    cmd = [str(VENV_BIN / "mitmdump"), "-s", str(ROOT / "addons" / "normalize.py"),
           "--listen-host", "127.0.0.1", "--listen-port", str(port)]
    for k, v in options.items():
        for item in v if isinstance(v, (list, tuple)) else [v]:  # a list sets a Sequence[str] option
            cmd += ["--set", f"{k}={str(item).lower() if isinstance(item, bool) else item}"]
    return process(cmd, port, log)


def read_capture(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


BILLING = "x-anthropic-billing-header: cc_version=2.1.197.{}; cc_entrypoint=sdk-cli;"


def claude_code_versions() -> tuple[str, str]:
    """(current, older) Claude Code versions that setup installs, read from scripts/versions.sh."""
    text = (ROOT / "scripts" / "versions.sh").read_text()
    found = dict(re.findall(r"^(CLAUDE_CODE_VERSION|CLAUDE_CODE_OLDER_VERSION)=(\S+)", text, re.M))
    return found["CLAUDE_CODE_VERSION"], found["CLAUDE_CODE_OLDER_VERSION"]


def claude_bin(version: str) -> Path:
    """Where setup installed that version: the current one under npm-<version>, the older one under npm."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(os.environ.get("WARMTURN_CACHE") or Path(xdg) / "warmturn")
    current, _ = claude_code_versions()
    return cache / (f"npm-{version}" if version == current else "npm") / "node_modules" / ".bin" / "claude"
