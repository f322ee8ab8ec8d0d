"""Never silent on the wire: a stream that waits (in the queue, or reading a long prompt) gets its
headers and ``message_start`` after one ping interval and a ``ping`` every interval after that, on
the server and through the addon; its timings still reach the capture (in ``message_delta``)."""

from __future__ import annotations

import time
from itertools import pairwise

import anthropic
import httpx
import pytest

from tests.conftest import free_port
from tests.procs import mitmdump, read_capture
from tests.test_server_http import serve_in_thread
from warmturn.protocol import SSEDecoder

pytestmark = pytest.mark.model

# a prompt the default model reads in a second or more on a CPU: many ping intervals of 50 ms
LONG_PROMPT = [{"role": "user", "content": "Count the words: " + " ".join(f"word{i}" for i in range(150))}]


def make_state(model_and_tokenizer, *, started: bool, **kw):
    from warmturn.server.cache import PrefixCache
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, PrefixCache(model, max_bytes=256 << 20) if started else None)
    if started:
        engine.start()
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="x", context_length=8192,
                        tool_format=HERMES, default_temperature=0.0, **kw)
    return state


def timed_events(resp: httpx.Response) -> list[tuple[float, dict]]:
    """(arrival time, event) of every SSE event of a streamed response, as they arrive."""
    dec, out = SSEDecoder(), []
    give_up = time.monotonic() + 300  # pings never end a stream that is stuck for good: this does
    for chunk in resp.iter_bytes():
        now = time.monotonic()
        assert now < give_up, f"the stream never ended: {[ev.json() for ev in dec.feed(chunk)]}"
        out += [(now, ev.json()) for ev in dec.feed(chunk)]
    return out + [(time.monotonic(), ev.json()) for ev in dec.flush()]


def test_a_stream_stuck_in_the_queue_gets_message_start_pings_and_a_timeout_event(model_and_tokenizer):
    """An engine that never starts: the request can only wait in the queue until its time limit."""
    state = make_state(model_and_tokenizer, started=False, ping_interval=0.05, request_timeout=0.5)
    with serve_in_thread(state) as port, httpx.stream("POST", f"http://127.0.0.1:{port}/v1/messages", timeout=60,
                      json={"model": "m", "max_tokens": 4, "stream": True, "messages": LONG_PROMPT}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ev for _, ev in timed_events(r)]
    types = [e["type"] for e in events]
    assert types[0] == "message_start" and types[-1] == "error", types
    assert events[-1]["error"]["type"] == "timeout_error", events[-1]
    # 0.5 s + the 1 s grace of a queued deadline at 50 ms a ping: at least a few, whatever the machine
    assert types.count("ping") >= 5 and set(types[1:-1]) == {"ping"}, types
    usage = events[0]["message"]["usage"]
    assert usage["input_tokens"] > 150 and usage["cache_read_input_tokens"] == 0  # the whole prompt, for now
    assert state.engine.depth == 0  # withdrawn: its queue slot is free


def test_a_stream_whose_client_leaves_while_queued_frees_its_slot(model_and_tokenizer):
    state = make_state(model_and_tokenizer, started=False, ping_interval=0.05)
    with serve_in_thread(state) as port:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/messages", timeout=60,
                          json={"model": "m", "max_tokens": 4, "stream": True, "messages": LONG_PROMPT}) as r:
            dec = SSEDecoder()
            for chunk in r.iter_bytes():
                if any(ev.event == "ping" for ev in dec.feed(chunk)):
                    break  # pings arrive while it waits: leave now
        deadline = time.monotonic() + 30
        while state.engine.depth:
            assert time.monotonic() < deadline, "the queue slot was never freed"
            time.sleep(0.05)


def test_a_long_prefill_pings_through_the_addon_and_the_capture_keeps_its_timings(model_and_tokenizer, tmp_path):
    """A real prefill of a few hundred tokens, 50 ms ping interval, client -> mitmdump -> server: pings cross
    the proxy while the prompt is read, the SDK gets the right usage, the capture the server's timings."""
    interval = 0.05
    state = make_state(model_and_tokenizer, started=True, ping_interval=interval)
    mitm_port, cap = free_port(), tmp_path / "cap.jsonl"
    try:
        with serve_in_thread(state) as port, \
                mitmdump(mitm_port, tmp_path / "mitm.log", backend=f"http://127.0.0.1:{port}", capture_file=cap):
            base = f"http://127.0.0.1:{mitm_port}"
            t0 = time.monotonic()
            with httpx.stream("POST", base + "/v1/messages", timeout=300, headers={"x-api-key": "x"},
                              json={"model": "m", "max_tokens": 4, "stream": True, "messages": LONG_PROMPT}) as r:
                assert r.status_code == 200
                timed = timed_events(r)
            # the same prompt with the SDK: now warm, maybe fast enough for no ping; the usage is the point
            client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
            with client.messages.stream(model="m", max_tokens=4, messages=LONG_PROMPT) as s:
                final = s.get_final_message()
    finally:
        state.engine.stop()
    types = [e["type"] for _, e in timed]
    first_delta = types.index("content_block_delta")
    pings = types[:first_delta].count("ping")
    delta = next(e for _, e in timed if e["type"] == "message_delta")
    waited_s = (delta["warmturn"]["queue_ms"] + delta["warmturn"]["prefill_ms"]) / 1000
    # one interval passes before the stream starts, then one ping per interval (the loop is no metronome:
    # ask for half of them)
    assert waited_s > 4 * interval, f"the prefill was too quick to test pings: {waited_s:.3f} s"
    assert types[0] == "message_start" and pings >= int(0.5 * waited_s / interval) - 1, (waited_s, types)
    gaps = [b - a for (a, _), (b, _) in pairwise(timed[:first_delta + 1])]
    assert timed[0][0] - t0 < waited_s  # message_start came before the prompt was read
    assert max(gaps) < waited_s / 2, gaps  # no silence as long as the wait itself
    # message_start had the whole prompt as input; message_delta has the split the clients keep
    start_usage, final_usage = timed[0][1]["message"]["usage"], delta["usage"]
    assert start_usage["input_tokens"] == sum(final_usage[k] for k in (
        "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    # the SDK (which skips pings) folds message_delta's usage over message_start's: warm now
    assert final.usage.cache_read_input_tokens > 0.9 * start_usage["input_tokens"], final.usage
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens \
        + (final.usage.cache_creation_input_tokens or 0) == start_usage["input_tokens"]
    records = [x for x in read_capture(cap) if x["kind"] == "messages"]
    assert len(records) == 2
    rec = records[0]
    assert rec["queue_ms"] == delta["warmturn"]["queue_ms"] and rec["prefill_ms"] == delta["warmturn"]["prefill_ms"]
    assert rec["t"]["first_byte"] < rec["t"]["first_content"]  # TTFT is still the first token, not the first ping
    assert rec["usage"]["cache_read_input_tokens"] == final_usage["cache_read_input_tokens"]

