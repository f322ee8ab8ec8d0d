"""The embedded backend: `python -m server` from the project's virtualenv, supervised.

Started as a child on a loopback port, health-checked with asyncio (mitmproxy's event loop is
never blocked), restarted when it dies, stopped when mitmproxy exits. A server already
answering /health at a configured port is reused instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from pathlib import Path

from warmturn.plumbing import free_port, openblas_env

logger = logging.getLogger(__name__)

ADDON_DIR = Path(__file__).resolve().parent
PROJECT_DIR = ADDON_DIR.parent


def default_python() -> str:
    return str(PROJECT_DIR / ".venv" / "bin" / "python")


async def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status code of a GET (stdlib asyncio, no client library); None when unreachable."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        writer.close()


async def can_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


class EmbeddedServer:
    """One supervised `python -m server` child (or a reused running server)."""

    def __init__(self, python: str, args: list[str], port: int, log_path: str,
                 start_timeout_s: float = 300.0, host: str = "127.0.0.1") -> None:
        self.python = python
        self.args = args
        self.host = host
        self.configured_port = port
        self.port = port
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.reused = False
        self.restarts = 0
        self.last_error: str | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._timed_out = False
        self._task: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Schedule supervision on the running event loop (returns at once)."""
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_ready(self, timeout: float) -> bool:
        if self.is_ready():
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            self._ready.clear()  # died since the last supervision tick
        return self._ready.is_set()

    async def _supervise(self) -> None:
        if self.configured_port and await http_status(self.host, self.configured_port, "/health") == 200:
            self.reused = True
            logger.info("warmturn: reusing the server already answering at %s", self.base_url)
            self._ready.set()
            return
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._spawn()
            except OSError as e:
                self.last_error = f"cannot start the embedded server ({self.python}): {e}"
                logger.error("warmturn: %s", self.last_error)
                return
            self._timed_out = False
            healthy = await self._await_health()
            if healthy:
                self._ready.set()
                logger.info("warmturn: embedded server ready at %s (log: %s)", self.base_url, self.log_path)
            while self.proc is not None and self.proc.poll() is None and not self._stopping:
                await asyncio.sleep(0.5)
            self._ready.clear()
            if self._stopping:
                return
            rc = self.proc.returncode if self.proc else None
            if not self._timed_out:  # after a health timeout the message is already set
                self.last_error = f"embedded server exited with code {rc}; see {self.log_path}"
            logger.warning("warmturn: %s; restarting", self.last_error)
            self.restarts += 1
            if time.monotonic() - started > 60:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _await_health(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self._stopping:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if await http_status(self.host, self.port, "/health") == 200:
                return True
            await asyncio.sleep(0.25)
        self.last_error = f"embedded server not healthy after {self.start_timeout_s:.0f} s; see {self.log_path}"
        logger.error("warmturn: %s", self.last_error)
        self._timed_out = True
        self._terminate()
        return False

    def _spawn(self) -> None:
        self.port = self.configured_port or free_port()
        cmd = [self.python, "-m", "server", "--host", self.host, "--port", str(self.port), *self.args]
        env = openblas_env()  # the server would re-exec itself to get it; this saves the round
        parent = os.path.dirname(self.log_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(PROJECT_DIR), env=env)
            log.write(f"=== pid {self.proc.pid}\n".encode())
        logger.info("warmturn: started embedded server pid %d on %s", self.proc.pid, self.base_url)

    def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop supervising and terminate the child (synchronous; safe to call twice)."""
        self._stopping = True
        self._ready.clear()
        if self._task is not None:
            self._task.cancel()
        self._terminate()
