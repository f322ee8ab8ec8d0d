"""The embedded backend: `python -m warmturn.server` from the project's virtualenv, supervised.

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
PROJECT_DIR = ADDON_DIR.parents[1]


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


class EmbeddedServer:
    """One supervised `python -m warmturn.server` child (or a reused running server)."""

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
        self.gave_up = False  # a crash loop: no more restarts until the backend option changes
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # set on every state change (ready, failed), then replaced
        self._failed = False  # the current child exited (or timed out) before getting healthy
        self._stopping = False
        self._timed_out = False
        self._task: asyncio.Task | None = None
        self._lifeline: int | None = None  # write end of the child's --parent-fd pipe
        self._reaper: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Schedule supervision on the running event loop (returns at once)."""
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_ready(self, timeout: float) -> bool:
        """True once the server answers /health; False at once when the current child failed to
        start (its exit code and last log lines are in ``last_error``) or the supervisor gave up,
        else after `timeout` seconds. A server that served and then died is being restarted:
        this waits for the new one."""
        deadline = time.monotonic() + timeout
        while True:
            if self.is_ready():
                return True
            if self._failed or self.gave_up or (self._stopping and self.proc is None):
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            self._ready.clear()  # died since the last supervision tick (restarted by _supervise)
        return self._ready.is_set()

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of the server's log (what it said before exiting)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("=== ")]
        return "\n".join(kept[-lines:])

    async def _supervise(self) -> None:
        if self.configured_port and await http_status(self.host, self.configured_port, "/health") == 200:
            self.reused = True
            logger.info("warmturn: reusing the server already answering at %s", self.base_url)
            self._ready.set()
            return
        backoff = 1.0
        early_exits = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._spawn()
            except OSError as e:
                self.last_error = f"cannot start the embedded server ({self.python}): {e}"
                logger.error("warmturn: %s", self.last_error)
                self.gave_up = True
                self._signal()
                return
            self._failed = False
            self._timed_out = False
            self._signal()
            healthy = await self._await_health()
            if healthy:
                early_exits = 0
                self._ready.set()
                self._signal()
                logger.info("warmturn: embedded server ready at %s (log: %s)", self.base_url, self.log_path)
            while self.proc is not None and self.proc.poll() is None and not self._stopping:
                await asyncio.sleep(0.5)
            self._ready.clear()
            if self._stopping:
                return
            rc = self.proc.returncode if self.proc else None
            if not self._timed_out:  # after a health timeout the message is already set
                tail = self.log_tail()
                self.last_error = (f"embedded server exited with code {rc}"
                                   + (f"; its last log lines:\n{tail}" if tail else f"; see {self.log_path}"))
            # A child that never got healthy failed to start: waiting requests are answered at once.
            # One that served and then died is restarted, and requests wait for the new one.
            self._failed = not healthy
            early_exits = 0 if healthy else early_exits + 1
            # Exit code 2 is a usage error (bad flag, unsafe --cache-dir, empty key): restarting
            # cannot help. Three exits in a row before ever getting healthy: a crash loop.
            if not healthy and (rc == 2 or early_exits >= 3):
                self.gave_up = True
                self.last_error = f"{self.last_error}\n(not restarted: fix the cause, then restart mitmdump)"
                logger.error("warmturn: %s", self.last_error)
                self._signal()
                return
            self._signal()
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
        self._failed = True
        self._signal()
        self._terminate()
        return False

    def _spawn(self) -> None:
        self.port = self.configured_port or free_port()
        self._close_lifeline()
        read_end, self._lifeline = os.pipe()  # only this process holds the write end (not inheritable)
        cmd = [self.python, "-m", "warmturn.server", "--host", self.host, "--port", str(self.port),
               "--parent-fd", str(read_end), *self.args]
        env = openblas_env()  # the server would re-exec itself to get it; this saves the round
        parent = os.path.dirname(self.log_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=str(PROJECT_DIR), env=env, pass_fds=(read_end,))
            finally:
                os.close(read_end)
            log.write(f"=== pid {self.proc.pid}\n".encode())
        logger.info("warmturn: started embedded server pid %d on %s", self.proc.pid, self.base_url)

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def _terminate(self) -> None:
        """SIGTERM now, SIGKILL 10 s later if still alive; never blocks the event loop. The
        child also watches its lifeline pipe, so it stops when mitmdump is gone, however."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (interpreter shutdown): wait here
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return
        self._reaper = loop.create_task(self._reap(proc))

    @staticmethod
    async def _reap(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if proc.poll() is None:
            logger.warning("warmturn: embedded server pid %d ignored SIGTERM for %.0f s: killing it", proc.pid, grace_s)
            proc.kill()
            while proc.poll() is None:
                await asyncio.sleep(0.05)

    async def stopped(self, timeout: float = 15.0) -> bool:
        """Wait (without blocking the loop) until the child has exited after :meth:`stop`."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        """Stop supervising and terminate the child; returns at once (safe to call twice)."""
        self._stopping = True
        self._ready.clear()
        if self._task is not None:
            self._task.cancel()
        self._close_lifeline()
        self._terminate()
        self._signal()
