"""Hostile input, round two (issue 21, part 2): the live server with the real default model on
loopback, driven by httpx and the anthropic SDK. Each test here failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from tests import procs
from tests.test_server_http import live_server, run_engine, sse_events

pytestmark = pytest.mark.model

KEY = "k1-hostile"
JSON = {"content-type": "application/json", "x-api-key": KEY}
HELLO = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "Say hi."}]}


@pytest.fixture(scope="module")
def live(model_and_tokenizer):
    from warmturn.server.render import Renderer

    with live_server(model_and_tokenizer, Renderer(model_and_tokenizer[1]), KEY, max_queue=8) as live:
        yield live


def post(live, body, path="/v1/messages", **kw):
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(live["base"] + path, content=content, headers=JSON, timeout=120, **kw)


def requests_total(live, status: str) -> float:
    text = httpx.get(live["base"] + "/metrics", headers=JSON, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("warmturn_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- 1. sampler parameters


def test_vocab_size_is_the_logits_width(live, model_and_tokenizer):
    import mlx.core as mx

    model, _ = model_and_tokenizer
    logits = model(mx.array([[1, 2]]))
    assert live["state"].vocab_size == logits.shape[-1] > 0


@pytest.mark.parametrize("top_k", ["vocab", "vocab+1", 10**12])
def test_top_k_at_or_above_the_vocabulary_keeps_every_token_and_sampling_keeps_working(live, top_k):
    vocab = live["state"].vocab_size
    k = {"vocab": vocab, "vocab+1": vocab + 1}.get(top_k, top_k)
    r = post(live, {**HELLO, "temperature": 1.0, "top_k": k})
    assert r.status_code == 200, r.text
    # before the fix: the first request was a 500, and every sampled one after it too
    for body in ({**HELLO, "temperature": 1.0}, {**HELLO, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
                 {**HELLO, "temperature": 1.0, "stream": True}):
        r = post(live, body)
        assert r.status_code == 200, r.text
        if body.get("stream"):
            assert sse_events(r.text)[-1]["type"] == "message_stop"


def test_a_sampler_that_fails_fails_only_its_request(model_and_tokenizer):
    """Past the boundary (a top_k the engine gets unclamped): that request gets its error; the
    process-wide random state is not left broken for the next sampled request."""
    from warmturn.server.engine import Done, Engine
    from warmturn.server.sampling import vocab_size

    model, tokenizer = model_and_tokenizer
    tokens = tokenizer.encode("Once upon a time")
    eng = Engine(model, tokenizer, None, max_queue=2)
    eng.start()
    try:
        items = run_engine(eng, tokens, temperature=1.0, top_k=vocab_size(model), max_tokens=2)
        assert isinstance(items[-1], ValueError) and "top_k" in str(items[-1])
        for _ in range(2):
            items = run_engine(eng, tokens, temperature=1.0, max_tokens=2)
            assert isinstance(items[-1], Done), items[-1]
    finally:
        eng.stop()


def test_clamp_top_k():
    from warmturn.server.sampling import clamp_top_k

    assert [clamp_top_k(k, 100) for k in (None, 0, 1, 99, 100, 101, 10**18)] == [0, 0, 1, 99, 0, 0, 0]
    assert clamp_top_k(10**6, 0) == 10**6  # unknown width: unchanged (the sampler guard still holds)


# --------------------------------------------------------------------------- 2. SIGTERM mid-answer

LONG_ANSWER = {"model": "m", "max_tokens": 160, "temperature": 0.0,
               "messages": [{"role": "user", "content": "Write a long story about a dragon and a knight."}]}


def start_server(model_dir, log, *extra):
    return procs.start_server("--model", str(model_dir), "--api-key", KEY, "--no-cache", *extra, log=log,
                              env=dict(os.environ))


def answer_text(events: list[dict]) -> str:
    return "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")


def sigterm_at(proc, base: str, body: dict, event: str) -> list[dict]:
    """Stream `body`, SIGTERM the server when the first `event` arrives, read the stream to its end: its events."""
    lines = []
    with httpx.stream("POST", base + "/v1/messages", json=body, headers=JSON, timeout=300) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        for line in it:
            lines.append(line)
            if line.startswith("data: ") and f'"{event}"' in line:
                proc.send_signal(signal.SIGTERM)
                break
        lines.extend(it)
    return sse_events("\n".join(lines) + "\n")


def test_sigterm_mid_answer_ends_it_with_an_error_never_a_short_end_turn(model_dir, tmp_path):
    proc, base = start_server(model_dir, tmp_path / "server.out")
    try:
        full = httpx.post(base + "/v1/messages", json={**LONG_ANSWER, "stream": True}, headers=JSON, timeout=300)
        reference = answer_text(sse_events(full.text))
        assert len(reference) > 300  # long enough that a SIGTERM right after its first token cuts it
        events = sigterm_at(proc, base, {**LONG_ANSWER, "stream": True}, "content_block_delta")  # the answer has begun
        last = events[-1]
        if last["type"] == "message_stop":  # it finished before the signal reached it: then it is whole
            assert answer_text(events) == reference
        else:
            assert last == {"type": "error", "error": {"type": "overloaded_error", "message": last["error"]["message"]}}
            assert "shutting down" in last["error"]["message"]
            assert not any(e["type"] in ("message_delta", "message_stop") for e in events)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_a_non_streaming_answer_is_a_retryable_error_or_the_whole_answer(model_dir, tmp_path):
    proc, base = start_server(model_dir, tmp_path / "server.out")
    try:
        reference = httpx.post(base + "/v1/messages", json=LONG_ANSWER, headers=JSON, timeout=300).json()
        got: dict = {}

        def call():
            got["r"] = httpx.post(base + "/v1/messages", json=LONG_ANSWER, headers=JSON, timeout=300)

        t = threading.Thread(target=call)
        t.start()
        while httpx.get(base + "/health", timeout=10).json()["running"] < 1:  # in the engine
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        r = got["r"]
        if r.status_code == 200:  # finished before the signal reached it: then it is whole
            assert r.json()["content"] == reference["content"]
        else:
            assert r.status_code in (503, 529), r.text
            assert r.json()["error"]["type"] in ("overloaded_error", "api_error")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



# --------------------------------------------------------------------------- 6. disconnect timing


def metric(live, name: str, **labels: str) -> float:
    text = httpx.get(live["base"] + "/metrics", headers=JSON, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 + f"x-api-key: {KEY}\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_until(cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def decoding(engine) -> bool:
    """Whether a request in the engine has produced a token (the engine's own records of it)."""
    return any(f.output_tokens > 0 for f in engine.flights())


def test_a_non_streaming_client_leaving_mid_decode_is_a_499_not_a_500(live, caplog):
    before_499 = metric(live, "warmturn_requests_total", endpoint="messages", status="499")
    before_500 = metric(live, "warmturn_requests_total", status="500")
    # a JSON-schema answer is held back until its end, so no item reaches the handler while it
    # decodes: the disconnect is seen while the next step is still pending (as on a loaded machine)
    sock = raw_request(live["port"], {**LONG_ANSWER, "max_tokens": 400,
                                      "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    wait_until(lambda: decoding(live["state"].engine), "never started decoding")
    sock.close()
    wait_until(lambda: metric(live, "warmturn_requests_total", endpoint="messages", status="499")
               + metric(live, "warmturn_requests_total", status="500") > before_499 + before_500, "never answered")
    assert metric(live, "warmturn_requests_total", status="500") == before_500
    assert metric(live, "warmturn_requests_total", endpoint="messages", status="499") == before_499 + 1
    assert "already running" not in caplog.text
    r = post(live, HELLO)
    assert r.status_code == 200


# --------------------------------------------------------------------------- 7. UTF-8 at cut points

EMOJI = {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": "Reply with three emoji."}]}


def streamed_text(r: httpx.Response) -> str:
    return answer_text(sse_events(r.text))


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cutting_a_multibyte_character_drops_it_not_a_replacement_char(live, stream):
    full = post(live, {**EMOJI, "max_tokens": 20}).json()["content"][0]["text"].rstrip("\ufffd")
    assert sum(ord(c) > 0xFFFF for c in full) >= 3  # emoji: 4 UTF-8 bytes, more than one token each
    for k in range(1, 10):
        r = post(live, {**EMOJI, "max_tokens": k, "stream": stream})
        assert r.status_code == 200, r.text
        text = streamed_text(r) if stream else "".join(b.get("text", "") for b in r.json()["content"])
        assert "\ufffd" not in text and full.startswith(text), (k, text, full)


def test_hold_replacement_tail_over_the_real_detokenizer_at_every_cut(model_and_tokenizer, capsys):
    """hypothesis: any text of mixed scripts, tokenized by the real tokenizer and cut after any
    token, streamed through the real streaming detokenizer as the engine does: what the server
    sends never holds U+FFFD and is always a prefix of the whole text."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from warmturn.server.http import hold_replacement_tail

    _, tokenizer = model_and_tokenizer
    alphabet = st.sampled_from("aZ 1.é中文日本語😀🌟👍🏽ßΩж\n")

    def stream(ids):
        detok = tokenizer.detokenizer
        detok.reset()
        pieces = []
        for i in ids:
            detok.add_token(i)
            pieces.append(detok.last_segment)
        detok.finalize()
        return pieces + [detok.last_segment]

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(alphabet, min_size=1, max_size=20), cut=st.integers(1, 60))
    def check(text, cut):
        ids = tokenizer.encode(text, add_special_tokens=False)
        whole = "".join(stream(ids))  # the uncut answer, as the detokenizer spells it
        sent, held = "", ""
        for p in stream(ids[:cut]):
            ready, held = hold_replacement_tail(held + p)
            sent += ready
        assert "\ufffd" not in sent and whole.startswith(sent), (text, ids, sent, whole)
        tried.append(cut < len(ids) and "\ufffd" in "".join(stream(ids[:cut])))

    tried: list[bool] = []
    check()
    with capsys.disabled():
        print(f"\nUTF-8 cut points: {len(tried)} tried ({sum(tried)} ending inside a character), all handled right")


# --------------------------------------------------------------------------- 8. smaller points

TOOL = {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {}}}


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("extra,fragment", [
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "Write"}}, "tool_choice.name: no tool named 'Write'"),
    ({"tool_choice": {"type": "tool", "name": "Read"}}, "tool_choice.name: no tool named 'Read'"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok",
                                                 "is_error": "false"}]}]}, "messages.0.content.0.is_error: expected a boolean"),
])
def test_requests_the_api_refuses_are_400s(live, path, extra, fragment):
    r = post(live, {**HELLO, **extra}, path=path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and fragment in r.json()["error"]["message"]


def test_tool_choice_naming_a_tool_that_exists_is_served(live):
    r = post(live, {**HELLO, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "Read"}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_incomplete_body_is_given_up_on_not_waited_for_forever(live, framing):
    """A Content-Length larger than the body, or a chunked body without its last chunk: the
    server answers 408 once no byte came for its body_idle_timeout, and keeps serving."""
    state = live["state"]
    before, state.body_idle_timeout = state.body_idle_timeout, 0.5
    try:
        sock = socket.create_connection(("127.0.0.1", live["port"]), timeout=60)
        head = f"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-api-key: {KEY}\r\n"
        if framing == "content-length":
            sock.sendall((head + "content-length: 1000\r\n\r\n" + '{"model": "m"').encode())
        else:
            sock.sendall((head + "transfer-encoding: chunked\r\n\r\n" + 'd\r\n{"model": "m"\r\n').encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)  # the socket's 60 s timeout fails the test if the server waits on
            if not data:
                break
            answer += data
        sock.close()
    finally:
        state.body_idle_timeout = before
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "invalid_request_error" and "stopped arriving after 13 bytes" in body["error"]["message"]
    assert post(live, HELLO).status_code == 200


# --------------------------------------------------------------------------- fuzz: sampler parameters, disconnect timing


def sampler_values(vocab: int):
    from hypothesis import strategies as st

    def edge_or(lo, hi):
        return st.one_of(st.sampled_from([lo, hi]), st.floats(lo, hi, allow_nan=False))

    valid = st.fixed_dictionaries({
        "temperature": st.one_of(st.just(1.0), edge_or(0.0, 2.0)),
        "top_k": st.one_of(st.sampled_from([0, 1, 2, vocab - 1, vocab, vocab + 1, 2**63 - 1]),
                           st.integers(0, 4 * vocab)),
    }, optional={"top_p": edge_or(0.0, 1.0)}).map(lambda d: (d, 200))
    invalid = st.one_of(
        st.fixed_dictionaries({"temperature": st.one_of(st.floats(2.0001, 1e300), st.floats(-1e300, -1e-9))}),
        st.fixed_dictionaries({"top_p": st.one_of(st.floats(1.0001, 1e300), st.floats(-1e300, -1e-9))}),
        st.fixed_dictionaries({"top_k": st.one_of(st.integers(max_value=-1), st.just(2**63),
                                                  st.sampled_from(["5", 1.5, True, None, [], {}]))}),
    ).map(lambda d: (d, 200 if d.get("top_k", 0) is None else 400))
    # valid ones three times as often: they are the ones that reach the sampler
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else invalid)


def test_fuzz_sampler_parameters_never_break_sampling(live, capsys):
    """hypothesis: sampler values at and past every edge, either way of answering: valid ones are
    served, invalid ones are 400s, and a sampled request afterwards is always served."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(params=sampler_values(live["state"].vocab_size), stream=st.booleans())
    def check(params, stream):
        values, status = params
        r = post(live, {**HELLO, "max_tokens": 2, "stream": stream, **values})
        assert r.status_code == status, (values, r.text[:300])
        if status == 400:
            assert r.json()["error"]["type"] == "invalid_request_error"
        elif stream:
            assert sse_events(r.text)[-1]["type"] == "message_stop"
        after = post(live, {**HELLO, "max_tokens": 2, "temperature": 1.0})
        assert after.status_code == 200, after.text[:300]
        tried.append(status)

    tried: list[int] = []
    check()
    with capsys.disabled():
        print(f"\nsampler parameters: {len(tried)} tried ({tried.count(200)} served, {tried.count(400)} refused "
              f"as 400), all handled right, each followed by a served sampled request")


def test_fuzz_disconnect_timing(live, caplog, capsys):
    """hypothesis: a client that leaves after n events of a stream, or after the engine made n
    tokens of an answer it waits for whole (held back or not): never a 500, the engine empties,
    the next request is served."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    engine = live["state"].engine

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stream=st.booleans(), n=st.integers(0, 12), held=st.booleans())
    def check(stream, n, held):
        before_500 = metric(live, "warmturn_requests_total", status="500")
        body = {**LONG_ANSWER, "max_tokens": 200, "stream": stream}
        if held:
            body["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
        sock = raw_request(live["port"], body)
        if stream:
            seen = b""
            while seen.count(b"\n\n") < n:
                data = sock.recv(4096)
                if not data:
                    break
                seen += data
        else:
            wait_until(lambda: decoding(engine) or n == 0, "never started decoding")
            if n:
                runs = engine.flights()
                wait_until(lambda: not runs or all(r.output_tokens >= n or r.req.cancel.is_set() for r in runs)
                           or not engine.busy, "too few tokens")
        sock.close()
        wait_until(lambda: not engine.busy, "the engine kept working for a client that left")
        assert metric(live, "warmturn_requests_total", status="500") == before_500
        assert post(live, HELLO).status_code == 200
        tried.append(stream)

    tried: list[bool] = []
    check()
    with capsys.disabled():
        print(f"\ndisconnect timing: {len(tried)} tried ({sum(tried)} streams), all handled right")
    assert "already running" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-5])
def test_a_temperature_too_small_to_divide_by_is_greedy_not_random(live, temperature):
    """mlx-lm samples from logprobs * (1 / temp): a tiny temperature overflowed float32 into NaNs
    and tokens picked at random."""
    body = {**LONG_ANSWER, "max_tokens": 8}
    greedy = post(live, body).json()["content"]
    assert post(live, {**body, "temperature": temperature}).json()["content"] == greedy


def test_sigterm_while_a_started_stream_still_reads_its_prompt_is_a_retryable_error(model_dir, tmp_path):
    """A stream that began before its prefill ended (pings: --ping-interval) and is stopped by
    SIGTERM ends with the same retryable overloaded_error as one cut mid-answer."""
    proc, base = start_server(model_dir, tmp_path / "server.out", "--ping-interval", "0.001")
    try:
        body = {"model": "m", "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": "word " * 1500}]}
        last = sigterm_at(proc, base, body, "message_start")[-1]  # the stream has begun
        if last["type"] != "message_stop":  # (unless it was whole before the signal reached it)
            assert last["type"] == "error" and last["error"]["type"] == "overloaded_error", last
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_one_sampler_per_parameter_set_so_a_batch_samples_in_one_call():
    """mlx-lm's BatchGenerator samples the whole batch in one call only when every row has the
    same sampler object: equal parameters must give the same object, others a different one."""
    from warmturn.server.sampling import make_sampler

    assert make_sampler(1.0) is make_sampler(1.0)
    assert make_sampler(0.7, 0.9, 5) is make_sampler(0.7, 0.9, 5)
    assert len({id(make_sampler(*p)) for p in [(1.0, 0.0, 0), (0.7, 0.0, 0), (1.0, 0.9, 0), (1.0, 0.0, 5)]}) == 4


@pytest.mark.parametrize("params", [(1.0, 0.0, 0), (1.0, 0.9, 0), (1.0, 0.0, 5), (0.7, 0.9, 5)])
def test_a_shared_sampler_samples_each_row_of_a_batch_from_its_own_distribution(params):
    """Sampled together, each row still draws from its own logits: rows that put (nearly) all
    their mass on different tokens get those tokens, in order."""
    import mlx.core as mx

    from warmturn.server.sampling import make_sampler

    vocab, picks = 1000, [3, 997, 500, 42]
    logits = mx.full((len(picks), vocab), -60.0)
    for row, tok in enumerate(picks):
        logits[row, tok] = 0.0
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampler = make_sampler(*params)
    for _ in range(5):
        assert sampler(logprobs).tolist() == picks
