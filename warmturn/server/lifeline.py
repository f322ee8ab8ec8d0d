"""Exit when the parent process dies, on Linux and macOS alike (``--parent-fd``).

The addon starts the embedded server with the read end of a pipe whose write end only the
addon's process holds. Nothing is ever written to it: when mitmdump exits, however it exits
(``kill -9`` included), the kernel closes the write end and a blocking ``read`` here returns
end-of-file. A Linux-only ``prctl(PR_SET_PDEATHSIG)`` would miss macOS, and polling
``getppid()`` misses a parent that died before the child looked.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)


def watch_parent(fd: int, grace_s: float = 5.0) -> threading.Thread:
    """Start a daemon thread that waits for EOF on `fd`, then asks this process to stop
    (SIGTERM: uvicorn shuts down gracefully, cancelling generation) and exits hard after
    `grace_s` seconds if it is still alive."""

    def run() -> None:
        try:
            while os.read(fd, 4096):
                pass  # nothing is ever written; data would only be ignored
        except OSError as e:
            log.warning("parent watch: read failed (%s); treating the parent as gone", e)
        log.warning("parent process is gone (pipe closed): shutting down")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        log.error("still running %.0f s after the parent died: exiting now", grace_s)
        os._exit(3)

    t = threading.Thread(target=run, name="parent-watch", daemon=True)
    t.start()
    return t
