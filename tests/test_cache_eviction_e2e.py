"""Sessions that outgrow RAM (issue 19, part 5): a session whose conversation entry other sessions
evicted from the RAM budget comes back warm from disk (``--cache-dir``), reading >= 80% of its prompt.

A real server process on loopback, the anthropic SDK as the client, a tiny random-weight llama built at
test time (warmturn.server.tinymodels: real KV caches, prefill in milliseconds). The budget holds about
one session; four sessions take turns. Each session's prompt is mostly conversation (a short system
prompt, no tools), so the system checkpoint alone cannot reach 80%: only the conversation entry can."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.procs import start_server

pytestmark = pytest.mark.model

KV_BYTES_PER_TOKEN = 512  # the tiny llama: 2 layers x (K + V) x 2 KV heads x 16 dims x 4 bytes
SESSIONS = 4
TURN_WORDS = 300  # ~2K tokens of conversation per turn


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from warmturn.server.tinymodels import build_tiny

    return build_tiny("llama", tmp_path_factory.mktemp("models") / "llama-8k", context=8192)


def serve(model: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    return start_server("--model", str(model), "--log-file", str(log), "--max-output-tokens", "4",
                        "--default-temperature", "0", *extra, log=log.with_suffix(".out"), timeout=120)


def budget(model: Path) -> str:
    """Bytes for about one and a half sessions' conversation entries: each new session evicts the last."""
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(str(model))(user_text(0, 1))["input_ids"]) + 40  # + the template
    return str(int(1.5 * tokens * KV_BYTES_PER_TOKEN))


def user_text(session: int, turn: int) -> str:
    return f"Session {session}, turn {turn}. " + " ".join(f"s{session}t{turn}w{i}" for i in range(TURN_WORDS))


def metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("warmturn_cache_"):
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def run_sessions(base: str) -> tuple[anthropic.types.Usage, dict[str, float]]:
    """Every session's first turn, then session 0's second turn: the usage of that turn."""
    client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
    history: dict[int, list[dict]] = {}
    for s in range(SESSIONS):
        history[s] = [{"role": "user", "content": user_text(s, 1)}]
        reply = client.messages.create(model="m", max_tokens=4, system=f"You are session {s}.",
                                       messages=history[s])
        history[s].append({"role": "assistant", "content": reply.content})
    # the next turn adds a short message, as most turns do: the conversation so far is most of its prompt
    history[0].append({"role": "user", "content": "Session 0, turn 2: go on."})
    back = client.messages.create(model="m", max_tokens=4, system="You are session 0.", messages=history[0])
    return back.usage, metrics(base)


def prompt_of(u) -> int:
    return u.input_tokens + u.cache_read_input_tokens + (u.cache_creation_input_tokens or 0)


def test_a_session_evicted_from_ram_comes_back_warm_from_disk(tiny_dir, tmp_path):
    proc, base = serve(tiny_dir, tmp_path / "server.log", "--cache-bytes", budget(tiny_dir),
                       "--cache-dir", str(tmp_path / "kv"))
    try:
        usage, m = run_sessions(base)
    finally:
        proc.terminate()
        proc.wait(30)
    assert m["warmturn_cache_evictions"] >= SESSIONS - 1, m  # the others pushed session 0 out of RAM
    assert usage.cache_read_input_tokens >= 0.8 * prompt_of(usage), (usage, m)
    assert m["warmturn_cache_disk_loads"] >= 1, m  # it came back from disk


def test_without_a_cache_dir_the_evicted_session_is_cold(tiny_dir, tmp_path):
    """The control: the same sessions with RAM only; session 0's conversation is gone, so the test above
    measures the disk and not a budget that happened to hold everything."""
    proc, base = serve(tiny_dir, tmp_path / "server.log", "--cache-bytes", budget(tiny_dir))
    try:
        usage, m = run_sessions(base)
    finally:
        proc.terminate()
        proc.wait(30)
    assert m["warmturn_cache_evictions"] >= SESSIONS - 1, m
    assert usage.cache_read_input_tokens < 0.5 * prompt_of(usage), (usage, m)
