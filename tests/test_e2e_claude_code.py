"""End to end: the real Claude Code CLI -> mitmdump -s addons/normalize.py -> the embedded MLX server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_addon_procs import ROOT, mitmdump, read_capture
from tests.conftest import free_port

CLAUDE = Path(os.environ.get("WARMTURN_CACHE", Path.home() / ".cache" / "warmturn")) / "npm" / "node_modules" / ".bin" / "claude"
SYSTEM = "You are a terse assistant. Reply in at most five words."

pytestmark = [pytest.mark.e2e, pytest.mark.model]


def claude(args: list[str], home: Path, port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(home), ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}", ANTHROPIC_API_KEY="x",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    env.pop("LD_PRELOAD", None)
    return subprocess.run([str(CLAUDE), *args], cwd=home / "work", env=env, capture_output=True, text=True, timeout=400)


def test_two_turns_through_the_addon(tmp_path):
    if not CLAUDE.exists():
        pytest.skip(f"Claude Code CLI not installed at {CLAUDE} (make setup installs it)")
    if not (ROOT / "server" / "__main__.py").exists():
        pytest.skip("server/ has not landed yet")
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    port = free_port()
    cap = tmp_path / "cap.jsonl"
    with mitmdump(port, tmp_path / "mitm.log", capture_file=cap, embedded_log=tmp_path / "server.log"):
        first = claude(["-p", "Say hi.", "--system-prompt", SYSTEM, "--tools", ""], home, port)
        assert first.returncode == 0, first.stderr + first.stdout
        second = claude(["-p", "Now say bye.", "--continue", "--system-prompt", SYSTEM, "--tools", ""], home, port)
        assert second.returncode == 0, second.stderr + second.stdout
    assert first.stdout.strip() and second.stdout.strip()
    lines = read_capture(cap)
    turns = [x for x in lines if x["kind"] == "messages"]
    assert len(turns) == 2, [(x["kind"], x["status"]) for x in lines]
    for t in turns:
        assert t["status"] == 200 and t["error"] is None and t["stream"] is True
        blocks = [e for e in t["stripped"] if e["kind"] == "system_block"]
        assert len(blocks) == 1 and blocks[0]["block"]["text"].startswith("x-anthropic-billing-header:")
        forwarded = json.dumps(t["request"]["body"])
        assert "x-anthropic-billing-header" not in forwarded  # what mitmdump sent to the backend
        assert t["session_id"] and t["usage"]["output_tokens"] > 0 and t["ttft_ms"] is not None
    assert turns[0]["prefix_hash"] == turns[1]["prefix_hash"]
    if (ROOT / "server" / "cache.py").exists():
        assert turns[1]["usage"].get("cache_read_input_tokens", 0) > 0, turns[1]["usage"]
