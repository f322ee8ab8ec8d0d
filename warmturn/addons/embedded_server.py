"""The embedded backend: `python -m warmturn.server` from the project's virtualenv, supervised.

Started as a child on a loopback port, health-checked with asyncio (mitmproxy's event loop is
never blocked), restarted when it dies, stopped when mitmproxy exits. A server already
answering /health at a configured port is reused instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from warmturn.machine import free_port, openblas_env

logger = logging.getLogger(__name__)

# Server log lines shown on mitmproxy's console too (the rest stays in the log file): what a user must see.
CONSOLE_MARKERS = ("repetition guard:",)

ADDON_DIR = Path(__file__).resolve().parent
PROJECT_DIR = ADDON_DIR.parents[1]


def default_python() -> str:
    return str(PROJECT_DIR / ".venv" / "bin" / "python")


async def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status code of a GET (stdlib asyncio, no client library); None when unreachable."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (TimeoutError, OSError, ValueError):
        return None
    finally:
        writer.close()


async def post_json(host: str, port: int, path: str, body: dict, headers: dict[str, str] | None = None,
                    timeout: float = 600.0) -> tuple[int, Any]:
    """POST a JSON body (stdlib asyncio, no client library): (status, parsed JSON answer or None)."""
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)  # Connection: close: the answer ends with EOF
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    if b"transfer-encoding: chunked" in head.lower():
        chunks, rest = [], payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2:]
        payload = b"".join(chunks)
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None


class EmbeddedServer:
    """One supervised `python -m warmturn.server` child (or a reused running server)."""

    def __init__(self, python: str, args: list[str], port: int, log_path: str,
                 start_timeout_s: float = 300.0, host: str = "127.0.0.1",
                 on_give_up: Callable[[str], None] | None = None, warmup: Sequence[dict] = ()) -> None:
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
        # Called instead of the crash-loop handling when the server fails before ever being healthy
        # (make run: end mitmdump at once with one line, not three restarts and a listening proxy).
        self.on_give_up = on_give_up
        # Request bodies sent once the server is ready, to prefill (and with --cache-dir persist) a
        # prefix every client sends (make run: make claude's small-model profile), so its first turn is warm.
        self.warmup = list(warmup)
        self._warming: asyncio.Task | None = None
        self._following: asyncio.Task | None = None
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
            except TimeoutError:
                pass

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            self._ready.clear()  # died since the last supervision tick (restarted by _supervise)
        return self._ready.is_set()

    def failure_line(self) -> str:
        """One line for a server that could not start: its exit and the last line it logged (for a
        traceback, the exception), with where the full log is."""
        last = self.log_tail(1) if not self._timed_out else ""
        rc = self.proc.returncode if self.proc is not None else None
        what = (f"not healthy after {self.start_timeout_s:.0f} s" if self._timed_out
                else f"exited with code {rc}" if rc is not None else "could not start")
        return f"the embedded server {what}" + (f": {last.strip()}" if last else "") + f" (its log: {self.log_path})"

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
                if self.on_give_up is not None:
                    self.on_give_up(self.last_error)
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
                if self.warmup:
                    self._warming = asyncio.get_running_loop().create_task(self._warm())
                if self._following is None:
                    self._following = asyncio.get_running_loop().create_task(self._follow_log())
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
            if not healthy and self.on_give_up is not None:
                self.gave_up = True
                self._signal()
                self.on_give_up(self.failure_line())
                return
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

    async def _follow_log(self, every_s: float = 1.0) -> None:
        """Repeat the server's log lines that carry a CONSOLE_MARKERS text on mitmproxy's console."""
        try:
            offset = os.path.getsize(self.log_path)
        except OSError:
            offset = 0
        while not self._stopping:
            await asyncio.sleep(every_s)
            try:
                if os.path.getsize(self.log_path) < offset:  # truncated or replaced: start over
                    offset = 0
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            data = data[:data.rfind(b"\n") + 1]  # whole lines only; the rest next time
            offset += len(data)
            for line in data.decode("utf-8", "replace").splitlines():
                for marker in CONSOLE_MARKERS:
                    if marker in line:
                        logger.warning("warmturn: %s", line[line.index(marker):])

    async def _warm(self) -> None:
        """Send the warm-up bodies (one output token each) and log what they cost and reused."""
        t0 = time.monotonic()
        read = created = 0
        key = os.environ.get("WARMTURN_API_KEY", "").strip()
        for body in self.warmup:
            try:
                status, answer = await post_json(self.host, self.port, "/v1/messages",
                                                 {**body, "max_tokens": 1, "stream": False},
                                                 {"x-api-key": key} if key else None)
            except (TimeoutError, OSError, ValueError) as e:
                logger.warning("warmturn: warm-up request failed (%s): the first turn will be cold", e)
                return
            usage = answer.get("usage") if isinstance(answer, dict) else None
            if status != 200 or not isinstance(usage, dict):
                logger.warning("warmturn: warm-up request answered %s: the first turn will be cold", status)
                return
            read += int(usage.get("cache_read_input_tokens") or 0)
            created += int(usage.get("cache_creation_input_tokens") or 0) + int(usage.get("input_tokens") or 0)
        logger.info("warmturn: warmed make claude's small-model prompt in %.1f s (%d tokens read from the cache, "
                    "%d computed): the first turn starts warm", time.monotonic() - t0, read, created)

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
        for task in (self._warming, self._following):
            if task is not None:
                task.cancel()
        self._close_lifeline()
        self._terminate()
        self._signal()
