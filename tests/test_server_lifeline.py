"""The embedded server never outlives its launcher (issue 12 item 7): a real `python -m warmturn.server`
with `--parent-fd`, started by a real parent process that is then killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.model

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    r, w = os.pipe()  # w stays here only (not inheritable); the server gets r
    cmd = [sys.executable, "-m", "warmturn.server", "--port", sys.argv[1], "--parent-fd", str(r), "--no-cache"]
    child = subprocess.Popen(cmd, pass_fds=(r,), stdout=subprocess.DEVNULL, stderr=open(sys.argv[2], "ab"))
    os.close(r)
    print(child.pid, flush=True)
    time.sleep(3600)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("when", ["while loading", "while serving"])
def test_server_exits_within_seconds_of_a_sigkilled_parent(tmp_path, when):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"PYTHONPATH": str(ROOT)}
    log = tmp_path / "server.log"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(port), str(log)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    try:
        if when == "while serving":
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and alive(server_pid), log.read_text()[-2000:]
                time.sleep(0.3)
        else:
            time.sleep(1.0)
        assert alive(server_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        while alive(server_pid) and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        assert not alive(server_pid), f"server {server_pid} still running 15 s after its parent died"
        assert "parent process is gone" in log.read_text()
    finally:
        if alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
