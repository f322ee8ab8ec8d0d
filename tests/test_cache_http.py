"""The prefix cache seen through HTTP: the real server (`python -m warmturn.server`) in a subprocess,
the official anthropic SDK as the client, usage accounting on a second turn."""

from __future__ import annotations

import time

import httpx
import pytest

from tests import procs
from tests.procs import stop

pytestmark = pytest.mark.model

SYSTEM = "You are a terse assistant in a terminal. Answer in one short sentence. " * 6


def start_server(log, *flags: str):
    return procs.start_server("--log-level", "warning", *flags, log=log)


def two_turns(url):
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="test-key", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Which command lists files?"}]
    first = client.messages.create(model="claude-opus-4-8", max_tokens=6, system=SYSTEM, messages=msgs)
    reply = "".join(b.text for b in first.content if b.type == "text") or "ls"
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And which one shows the current directory?"}]
    with client.messages.stream(model="claude-opus-4-8", max_tokens=6, system=SYSTEM, messages=msgs) as s:
        second = s.get_final_message()
    return first.usage, second.usage


@pytest.mark.parametrize("flags", [(), ("--no-cache",)], ids=["cache", "no-cache"])
def test_second_turn_reads_the_cache(flags, tmp_path):
    proc, url = start_server(tmp_path / "server.out", *flags)
    try:
        u1, u2 = two_turns(url)
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        stop(proc)
    assert (u1.cache_read_input_tokens or 0) == 0
    if flags:
        assert (u2.cache_read_input_tokens or 0) == 0
        assert (u2.cache_creation_input_tokens or 0) == 0
        assert u2.input_tokens > u1.input_tokens
    else:
        # Anthropic's accounting: the three counts are disjoint and add up to the prompt.
        # Turn 1 stores all but its last token; turn 2 reads that whole first prompt back.
        total1 = u1.input_tokens + u1.cache_creation_input_tokens
        assert u1.input_tokens == 1 and u1.cache_creation_input_tokens == total1 - 1
        assert u2.cache_read_input_tokens >= total1 - 1
        total2 = u2.input_tokens + u2.cache_read_input_tokens + u2.cache_creation_input_tokens
        assert total2 > total1 and u2.input_tokens == 1
        assert "hits" in metrics


def test_restart_with_cache_dir_is_warm(tmp_path):
    """--cache-dir: the system+tools checkpoint written by the first server is read by the next."""
    import anthropic

    tools = [{"name": "read_file", "description": "Read a file from the working directory.",
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]

    def ask(url, question):
        client = anthropic.Anthropic(base_url=url, api_key="test-key", max_retries=0, timeout=120)
        return client.messages.create(model="claude-opus-4-8", max_tokens=4, system=SYSTEM, tools=tools,
                                      messages=[{"role": "user", "content": question}]).usage

    proc, url = start_server(tmp_path / "server1.out", "--cache-dir", str(tmp_path))
    try:
        first = ask(url, "Which command lists files?")
    finally:
        stop(proc)
    # a finished checkpoint file, not a temp file a killed writer left behind (those start with '.')
    assert [p for p in tmp_path.glob("*.safetensors") if not p.name.startswith(".")]
    proc, url = start_server(tmp_path / "server2.out", "--cache-dir", str(tmp_path))
    try:
        after = ask(url, "Which command prints the date?")
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        stop(proc)
    assert (first.cache_read_input_tokens or 0) == 0
    # the system turn (system text + tool descriptions) came from disk: most of the prompt
    total = after.input_tokens + after.cache_read_input_tokens + after.cache_creation_input_tokens
    assert after.cache_read_input_tokens > 0.7 * total
    assert "warmturn_cache_disk_loads 1" in metrics


def test_sigterm_during_prefill_stops_the_worker_and_exits_cleanly(tmp_path):
    """SIGTERM (what the addon's supervisor and these tests send) while a long prompt is being
    read: the request in flight gets an Anthropic-shaped 503 (or its answer, if prefill won the
    race), the worker is stopped before the interpreter exits (no C++ abort, no re-raised
    signal), and the system+tools checkpoint written before the signal is on disk for the next
    server."""
    log = tmp_path / "server.out"
    proc, url = start_server(log, "--cache-dir", str(tmp_path), "--log-level", "info")
    result: dict = {}

    def ask():
        result["r"] = httpx.post(f"{url}/v1/messages", timeout=300, json={
            "model": "m", "max_tokens": 8, "system": SYSTEM,
            "messages": [{"role": "user", "content": "word " * 2500}]})

    import threading

    t = threading.Thread(target=ask)
    t.start()
    try:
        deadline = time.monotonic() + 300
        # the checkpoint (system) is stored when prefill reaches it, then the long user turn is read
        while not list(tmp_path.glob("[!.]*.safetensors")):
            assert time.monotonic() < deadline and "r" not in result, "prefill never reached the checkpoint"
            time.sleep(0.05)
        proc.terminate()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t.join(60)
    err = log.read_text()
    assert rc == 0, err[-2000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
    r = result["r"]
    if r.status_code != 200:  # 503 if still in prefill; 529 if its answer had begun (never a short 200)
        assert r.status_code in (503, 529), r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] in ("api_error", "overloaded_error")
    assert [p for p in tmp_path.glob("*.safetensors") if not p.name.startswith(".")]
