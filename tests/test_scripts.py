"""`make run` and `make server` for real (make, the scripts, mitmdump, the embedded server): values with
spaces and quotes in ARGS and PORT, a port already in use, a failed start-up.

make is run with `-o setup` (setup is taken as done: the venv and model exist when tests run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.procs import ROOT, port_open, read_capture

BANNER = "Point Claude Code at it"


@contextmanager
def make(target: str, log: Path, **variables: str):
    """`make -o setup TARGET VAR=value...` in its own process group; Ctrl-C (SIGINT to the group) at the end."""
    cmd = ["make", "-s", "-o", "setup", target, *(f"{k}={v}" for k, v in variables.items())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def wait_until(pred, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.3)


def finished(cmd_log: Path, target: str, timeout: float = 120, **variables: str) -> tuple[int, str]:
    with make(target, cmd_log, **variables) as proc:
        proc.wait(timeout)
    return proc.returncode, cmd_log.read_text()


@pytest.mark.model
def test_make_run_args_with_spaces_and_quotes(tmp_path):
    port = free_port()
    cap = tmp_path / "cap dir" / "cap.jsonl"  # a path with a space, quoted inside ARGS
    args = (f"--set embedded_args='--served-model-name \"my model\"' --set \"capture_file={cap}\" "
            f"--set embedded_log={tmp_path}/server.log --set 'volatile_fragments=Today.s date is [^\\n]*$'")
    log = tmp_path / "make.log"
    with make("run", log, PORT=str(port), ARGS=args) as proc:
        wait_until(lambda: BANNER in log.read_text(), proc, log, 60)
        banner = log.read_text()  # what the addons say of their own options (DescribeHook)
        assert f"its log: {tmp_path}/server.log)" in banner and f"captures: {cap} " in banner
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=600).json()  # through the proxy
        assert health["model"] == "my model"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=600, json={
            "model": "claude-opus-5-5", "max_tokens": 1,
            "system": "Be brief.\nToday's date is 2026-11-30.", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        too_long = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=600, json={
            "model": "claude-opus-5-5", "max_tokens": 1, "messages": [{"role": "user", "content": "word " * 9000}]})
        assert too_long.status_code == 400 and "README.md, section 'Prompt is too long'" in too_long.text
    assert "indexing errors" not in (tmp_path / "server.log").read_text()  # no misleading transformers warning
    assert proc.returncode is not None and not port_open(port)  # Ctrl-C stopped it
    rec = next(x for x in read_capture(cap) if x["kind"] == "messages")
    assert rec["request"]["body"]["system"] == "Be brief.\n"  # the fragment pattern arrived with its $ and \n
    assert [e["pattern"] for e in rec["stripped"] if e["kind"] == "fragment"] == ["Today.s date is [^\\n]*$"]


def test_make_run_port_in_use_hints_another_port_and_prints_no_banner(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out = finished(tmp_path / "make.log", "run", PORT=str(port))
    assert rc != 0
    assert f"make run PORT={port + 2}" in out and BANNER not in out


def test_make_run_failed_start_up_prints_no_banner(tmp_path):
    rc, out = finished(tmp_path / "make.log", "run", PORT=str(free_port()), ARGS="--set backend=bogus")
    assert rc != 0 and "backend must be" in out and BANNER not in out


@pytest.mark.parametrize("variables, message", [
    ({"PORT": "80 80"}, "PORT must be a TCP port number"),
    ({"PORT": "8080", "ARGS": "--set 'unbalanced"}, "cannot parse ARGS"),
])
def test_make_run_bad_values_are_named(tmp_path, variables, message):
    rc, out = finished(tmp_path / "make.log", "run", **variables)
    assert rc == 2 and message in out and BANNER not in out


@pytest.mark.model
def test_make_server_args_with_spaces_and_quotes(tmp_path):
    port = free_port()
    log = tmp_path / "make.log"
    args = f"--port {port} --served-model-name 'my \"quoted\" model' --log-file '{tmp_path}/server log.txt'"
    with make("server", log, ARGS=args) as proc:
        wait_until(lambda: port_open(port), proc, log)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
    assert health["model"] == 'my "quoted" model'
    assert json.dumps(health["context_length"]) == "8192"
    assert (tmp_path / "server log.txt").read_text().count("listening on") == 1
