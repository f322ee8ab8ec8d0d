"""End to end: the real Claude Code CLI -> mitmdump -s addons/normalize.py -> the embedded MLX server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.procs import ROOT, mitmdump, read_capture
from tests.conftest import free_port

CLAUDE = Path(os.environ.get("WARMTURN_CACHE", Path.home() / ".cache" / "warmturn")) / "npm" / "node_modules" / ".bin" / "claude"
SYSTEM = "You are a terse assistant. Answer in one short sentence."
# Questions the small default model answers briefly and then stops. Claude Code sends no
# temperature; the embedded server is told to decode greedily then, so the answers are the
# model's deterministic short ones rather than an occasional temperature-1 ramble.
FIRST, SECOND = "What is the capital of France?", "And the capital of Italy?"
GREEDY = "--default-temperature 0"
MAX_OUTPUT = 64

pytestmark = [pytest.mark.e2e, pytest.mark.model]


def claude(args: list[str], home: Path, port: int, ca: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI against mitmdump: as its base URL, or (with `ca`) through it as HTTPS proxy."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_")) and k.lower() not in ("https_proxy", "http_proxy", "no_proxy")}
    env.update(HOME=str(home), ANTHROPIC_API_KEY="x", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(MAX_OUTPUT))
    if ca is None:
        env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    else:
        env.update(HTTPS_PROXY=f"http://127.0.0.1:{port}", NODE_EXTRA_CA_CERTS=str(ca))
    env.pop("LD_PRELOAD", None)
    for _ in range(3):
        run = subprocess.run([str(CLAUDE), *args], cwd=home / "work", env=env, capture_output=True, text=True,
                             timeout=300)
        # The default model samples at temperature 1 (Claude Code sends none) and now and then rambles; Claude Code
        # then stops at MAX_OUTPUT with this error. Retrying bounds the test's time; the addon is not at stake.
        if "output token maximum" not in run.stdout + run.stderr:
            break
    return run


def require_claude() -> None:
    """make setup installs the CLI; in CI its absence is a failure, never a silent skip."""
    if not CLAUDE.exists():
        msg = f"Claude Code CLI not installed at {CLAUDE} (make setup installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def test_two_turns_through_the_addon(tmp_path):
    require_claude()
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    port = free_port()
    cap = tmp_path / "cap.jsonl"
    with mitmdump(port, tmp_path / "mitm.log", capture_file=cap, embedded_log=tmp_path / "server.log", embedded_args=GREEDY):
        first = claude(["-p", FIRST, "--system-prompt", SYSTEM, "--tools", ""], home, port)
        assert first.returncode == 0, first.stderr + first.stdout
        second = claude(["-p", SECOND, "--continue", "--system-prompt", SYSTEM, "--tools", ""], home, port)
        assert second.returncode == 0, second.stderr + second.stdout
    assert first.stdout.strip() and second.stdout.strip()
    lines = read_capture(cap)
    turns = [x for x in lines if x["kind"] == "messages" and x["stop_reason"] != "max_tokens"]
    assert len(turns) == 2, [(x["kind"], x["status"], x["stop_reason"]) for x in lines]
    for t in turns:
        assert t["status"] == 200 and t["error"] is None and t["stream"] is True
        blocks = [e for e in t["stripped"] if e["kind"] == "system_block"]
        assert len(blocks) == 1 and blocks[0]["block"]["text"].startswith("x-anthropic-billing-header:")
        forwarded = json.dumps(t["request"]["body"])
        assert "x-anthropic-billing-header" not in forwarded  # what mitmdump sent to the backend
        assert t["session_id"] and t["usage"]["output_tokens"] > 0 and t["ttft_ms"] is not None
    assert turns[0]["prefix_hash"] == turns[1]["prefix_hash"]
    assert turns[1]["usage"].get("cache_read_input_tokens", 0) > 0, turns[1]["usage"]  # the prefix cache hit


def test_interception_of_api_anthropic_com(tmp_path):
    """HTTPS_PROXY + mitmproxy's CA: requests to api.anthropic.com (with a per-request cch=) are rerouted."""
    require_claude()
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    port = free_port()
    cap, confdir = tmp_path / "cap.jsonl", tmp_path / "mitmconf"
    with mitmdump(port, tmp_path / "mitm.log", capture_file=cap, embedded_log=tmp_path / "server.log", embedded_args=GREEDY,
                  confdir=confdir):
        run = claude(["-p", FIRST, "--system-prompt", SYSTEM, "--tools", ""], home, port,
                     ca=confdir / "mitmproxy-ca-cert.pem")
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.strip()
    turns = [x for x in read_capture(cap) if x["kind"] == "messages"]
    assert turns and all(t["status"] == 200 for t in turns)
    assert len({t["stripped"][0]["block"]["text"] for t in turns}) == len(turns), "cch= differs per request"
    t = turns[0]
    assert t["upstream"].startswith("http://127.0.0.1:") and t["mode"] == "regular"
    billing = [e["block"]["text"] for e in t["stripped"] if e["kind"] == "system_block"]
    assert len(billing) == 1 and "cch=" in billing[0]
    assert "x-anthropic-billing-header" not in json.dumps(t["request"]["body"])
