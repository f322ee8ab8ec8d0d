"""A real `mitmdump -s addons/normalize.py` between the anthropic SDK and real backends."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import anthropic
import httpx
import pytest

from tests.conftest import free_port
from tests.procs import BILLING, VENV_BIN, child_env, mitmdump, port_open, process, read_capture

SYSTEM_TEXT = "You are a terse assistant. Answer in one short sentence."


def system(suffix: str) -> list[dict]:
    return [{"type": "text", "text": BILLING.format(suffix)}, {"type": "text", "text": SYSTEM_TEXT}]


def stream_text(client: anthropic.Anthropic, **kw) -> tuple[str, anthropic.types.Message]:
    with client.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        return text, s.get_final_message()


def test_through_mitmdump_to_a_recording_backend(tmp_path):
    """warmturn.bench.record logs exactly what it receives: the billing block and volatile headers never arrive."""
    rec_port, mitm_port = free_port(), free_port()
    received, cap = tmp_path / "received.jsonl", tmp_path / "cap.jsonl"
    with process([str(VENV_BIN / "python"), "-m", "warmturn.bench.record", "--port", str(rec_port), "--out", str(received)],
                 rec_port, tmp_path / "rec.log"), \
         mitmdump(mitm_port, tmp_path / "mitm.log", backend=f"http://127.0.0.1:{rec_port}", capture_file=cap):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{mitm_port}", api_key="sk-client-secret",
                                     max_retries=0, default_headers={"X-Claude-Code-Session-Id": "sess-1"})
        text, msg = stream_text(client, model="claude-opus-4-8", max_tokens=16, system=system("3f2"),
                                messages=[{"role": "user", "content": "Say hi."}])
        assert text and msg.stop_reason
        models = client.models.list()
        assert models.data
    got = [r for r in read_capture(received) if r["method"] == "POST"]
    assert len(got) == 1
    assert got[0]["body"]["system"] == [{"type": "text", "text": SYSTEM_TEXT}]
    assert got[0]["body"]["messages"] == [{"role": "user", "content": "Say hi."}]
    assert "x-stainless-retry-count" not in got[0]["headers"]
    assert got[0]["headers"]["x-claude-code-session-id"] == "sess-1"
    lines = read_capture(cap)
    assert [x["kind"] for x in lines] == ["messages", "models"]
    assert lines[0]["stripped"][0]["block"]["text"] == BILLING.format("3f2")
    assert lines[0]["session_id"] == "sess-1" and lines[0]["ttft_ms"] is not None
    assert "sk-client-secret" not in cap.read_text()


@pytest.mark.model
def test_embedded_backend_streams_and_reuses_the_prefix_across_billing_suffixes(tmp_path):
    mitm_port = free_port()
    cap, slog = tmp_path / "cap.jsonl", tmp_path / "server.log"
    with mitmdump(mitm_port, tmp_path / "mitm.log", capture_file=cap, embedded_log=slog):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{mitm_port}", api_key="x", max_retries=0,
                                     timeout=600)
        first = [{"role": "user", "content": "Say hi."}]
        text1, _msg1 = stream_text(client, model="claude-opus-4-8", max_tokens=8, system=system("3f2"), messages=first)
        second = first + [{"role": "assistant", "content": text1 or "Hi."}, {"role": "user", "content": "Now say bye."}]
        # a different session's billing suffix: without stripping, the prefix would differ at token ~5
        text2, msg2 = stream_text(client, model="claude-opus-4-8", max_tokens=8, system=system("a91"), messages=second)
        assert text1 and text2
        lines = read_capture(cap)
        server_port = int(lines[0]["upstream"].split(":")[2].split("/")[0])
        assert port_open(server_port)
        # the supervisor restarts a dead server; the next request waits for it instead of failing
        pid = int(re.findall(r"=== pid (\d+)", slog.read_text())[-1])
        os.kill(pid, signal.SIGKILL)
        while port_open(server_port):
            time.sleep(0.05)
        text3, _ = stream_text(client, model="claude-opus-4-8", max_tokens=4, system=system("77c"), messages=first)
        assert text3
        restarted = read_capture(cap)[-1]
        assert restarted["status"] == 200 and restarted["upstream"] != lines[0]["upstream"]
        server_port = int(restarted["upstream"].split(":")[2].split("/")[0])
    deadline = time.monotonic() + 20
    while port_open(server_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open(server_port), "the embedded server must stop with mitmdump"
    assert "server" in slog.read_text()
    assert len(lines) == 2
    for line in lines:
        assert line["status"] == 200 and line["backend"] == "embedded" and line["stream"] is True
        assert [e["kind"] for e in line["stripped"]] == ["system_block", "header"]  # + x-stainless-retry-count
        assert line["request"]["body"]["system"] == [{"type": "text", "text": SYSTEM_TEXT}]
        t = line["t"]
        assert t["request"] <= t["sent"] <= t["first_byte"] <= t["first_content"] <= t["end"]
        assert line["usage"]["output_tokens"] > 0 and "input_tokens" in line["usage"]
    assert lines[0]["prefix_hash"] == lines[1]["prefix_hash"]
    # the backend saw identical prefixes: the second request reused more than the system prompt
    assert lines[1]["usage"].get("cache_read_input_tokens", 0) > 10
    assert msg2.usage.cache_read_input_tokens == lines[1]["usage"]["cache_read_input_tokens"]


@pytest.mark.model
def test_openai_backend_mlx_lm_server(tmp_path, model_dir):
    mlx_port, mitm_port = free_port(), free_port()
    cap = tmp_path / "cap.jsonl"
    with process([str(VENV_BIN / "python"), "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(mlx_port)],
                 mlx_port, tmp_path / "mlx.log", timeout=180, env=child_env()), \
         mitmdump(mitm_port, tmp_path / "mitm.log", backend=f"http://127.0.0.1:{mlx_port}", backend_api="openai",
                  backend_model="default_model", capture_file=cap):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{mitm_port}", api_key="x", max_retries=0, timeout=600)
        text, msg = stream_text(client, model="claude-opus-4-8", max_tokens=8, system=system("3f2"),
                                messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert text.strip() and msg.model == "claude-opus-4-8" and msg.stop_reason in ("end_turn", "max_tokens")
        plain = client.messages.create(model="claude-opus-4-8", max_tokens=4, system=system("a91"),
                                       messages=[{"role": "user", "content": "Say hi."}])
        assert plain.content[0].type == "text" and plain.usage.output_tokens > 0
        assert next(m.id for m in client.models.list().data).startswith("claude-")
        tokens = client.messages.count_tokens(model="claude-opus-4-8", messages=[{"role": "user", "content": "hi"}])
        assert tokens.input_tokens > 0
    lines = [x for x in read_capture(cap) if x["kind"] == "messages"]
    assert len(lines) == 2
    s = lines[0]
    assert s["backend_api"] == "openai" and s["upstream"].endswith("/v1/chat/completions") and s["status"] == 200
    assert s["request"]["body"]["system"] == [{"type": "text", "text": SYSTEM_TEXT}]
    assert s["usage"]["input_tokens"] > 0 and s["usage"]["output_tokens"] > 0
    assert s["t"]["first_content"] is not None and s["ttft_ms"] <= s["total_ms"]
    assert s["response"]["content"][0]["text"] == text
    assert lines[1]["stream"] is False and lines[1]["usage"]["output_tokens"] == plain.usage.output_tokens


def test_backend_down_gives_an_anthropic_error_not_a_hang(tmp_path):
    mitm_port, dead = free_port(), free_port()
    cap = tmp_path / "cap.jsonl"
    with mitmdump(mitm_port, tmp_path / "mitm.log", backend=f"http://127.0.0.1:{dead}", capture_file=cap):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{mitm_port}", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(anthropic.InternalServerError) as ei:
            client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert ei.value.body["error"]["type"] == "api_error"
        assert f"127.0.0.1:{dead}" in json.dumps(ei.value.body)
        r = httpx.post(f"http://127.0.0.1:{mitm_port}/v1/messages", content=b"{not json", timeout=30)
        assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
    lines = read_capture(cap)
    assert [x["status"] for x in lines] == [502, 502]
    assert lines[0]["error"]["type"] == "api_error" and lines[1]["request"]["body_text"] == "{not json"
