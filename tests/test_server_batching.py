"""Continuous batching with the real default model: in process (engine + prefix cache) and
through HTTP (`python -m warmturn.server` on loopback, the official anthropic SDK, concurrent clients)."""

from __future__ import annotations

import json
import re
import threading
import time

import anthropic
import httpx
import pytest

from tests.procs import server as server_process

pytestmark = pytest.mark.model

SYSTEM = ("You are a careful coding assistant working in a terminal. Answer briefly and precisely. "
          "Prefer standard tools; explain nothing unless asked. ") * 4
SUB_SYSTEM = ("You are a search subagent. Find files that match the pattern you are given and list "
              "their paths, one per line, with nothing else. ") * 40
TOOLS = [{"name": "read_file", "description": "Read a file from the working directory and return its text.",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]


# --------------------------------------------------------------------------- in process


def test_greedy_alone_equals_inside_a_batch_of_four(model_and_tokenizer):
    """Four prompts of different lengths, two with cache hits: the same greedy tokens as each
    alone (no store, one request at a time)."""
    from tests.engine_recorder import serve
    from warmturn.server.cache import PrefixCache
    from warmturn.server.engine import Engine, Prefilled
    from warmturn.server.render import Renderer
    from warmturn.server.wire import parse_messages_request

    model, tokenizer = model_and_tokenizer
    renderer = Renderer(tokenizer, prefix_order="tools-first")

    def rendered(system, text):
        return renderer.render(parse_messages_request({"model": "m", "max_tokens": 8, "system": system,
                                                       "messages": [{"role": "user", "content": text}]}))

    prompts = {
        "short": rendered("Be terse.", "Say hi."),
        "warm": rendered(SYSTEM, "Which command lists files?"),
        "warm_long": rendered(SYSTEM, "I have a Python project with a src folder and a tests folder. "
                                      "Which command runs the tests, and how do I see coverage?"),
        "cold_long": rendered("You write short poems about the sea, four lines each. " * 6, "A poem, please."),
    }
    alone = {}
    for name, r in prompts.items():
        eng = Engine(model, tokenizer, None)
        eng.start()
        try:
            alone[name] = serve(eng, {name: (r.tokens, {"max_tokens": 12})}).text(name)
        finally:
            eng.stop()
    store = PrefixCache(model, max_bytes=256 << 20)
    eng = Engine(model, tokenizer, store, prefill_step_size=64)
    eng.start()
    try:
        seed = rendered(SYSTEM, "Hello.")
        serve(eng, {"seed": (seed.tokens, {"prefix_len": seed.prefix_len, "max_tokens": 2})})
        rec = serve(eng, {n: (r.tokens, {"prefix_len": r.prefix_len, "max_tokens": 12}) for n, r in prompts.items()})
    finally:
        eng.stop()
    for name in prompts:
        assert rec.text(name) == alone[name] != "", name
    assert rec.first("warm").reused >= prompts["warm"].prefix_len > 50
    assert rec.first("warm_long").reused >= prompts["warm_long"].prefix_len
    assert rec.first("cold_long").reused < 10  # the chat template's opening tokens only
    order = [type(i).__name__ for _, i in rec.log if isinstance(i, (Prefilled,)) or type(i).__name__ == "Done"]
    assert order[:4] == ["Prefilled"] * 4  # they really ran together


# --------------------------------------------------------------------------- through HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    log = tmp_path_factory.mktemp("batching") / "server.log"
    with server_process("--model", str(model_dir), "--cache-bytes", str(512 << 20), "--log-file", str(log),
                        "--prefill-progress-seconds", "0", log=log.with_suffix(".out")) as (_, base):
        yield {"base": base, "log": log}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server["base"], api_key="unused", max_retries=0, timeout=600)


def metric(server, name: str) -> float:
    text = httpx.get(server["base"] + "/metrics", timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def ask(client, system, text, results, key, **kw):
    try:
        results[key] = client.messages.with_raw_response.create(
            model="claude-opus-4-8", max_tokens=kw.pop("max_tokens", 10), system=system, tools=TOOLS,
            messages=[{"role": "user", "content": text}], extra_body={"temperature": 0}, **kw)
    except Exception as e:  # noqa: BLE001 - reported by the assertions in the test's thread
        results[key] = e


def in_threads(*calls):
    threads = [threading.Thread(target=fn, args=args) for fn, *args in calls]
    for t in threads:
        t.start()
    return threads


def test_fan_out_prefills_the_shared_prefix_once_and_accounts_exactly(server, client):
    """A main turn and three subagents: the subagents share a ~1K-token system+tools nobody has
    cached. The first subagent prefills it, the other two wait and read it from the cache.
    Each usage adds up to count_tokens; the greedy text equals the same request served alone."""
    before = metric(server, "warmturn_prefill_tokens_total")
    results: dict = {}
    tasks = {"sub0": "Pattern: *.py", "sub1": "Pattern: *.md", "sub2": "Pattern: *.toml"}
    main = in_threads((ask, client, SYSTEM, "Which command shows the current directory?", results, "main"),
                      (ask, client, SUB_SYSTEM, tasks["sub0"], results, "sub0"))
    deadline = time.monotonic() + 300
    while metric(server, "warmturn_batch_prefilling") < 1:
        assert time.monotonic() < deadline and "sub0" not in results, "the first requests never started"
        time.sleep(0.05)
    # sub0 (or main) is reading its prompt now: its siblings arrive while it does
    siblings = in_threads(*[(ask, client, SUB_SYSTEM, tasks[k], results, k) for k in ("sub1", "sub2")])
    for t in main + siblings:
        t.join(600)
    raws = {k: v for k, v in results.items()}
    for k, v in raws.items():
        assert not isinstance(v, Exception), (k, v)
    msgs = {k: v.parse() for k, v in raws.items()}
    computed = 0
    for k, msg in msgs.items():
        system = SYSTEM if k == "main" else SUB_SYSTEM
        text = "Which command shows the current directory?" if k == "main" else tasks[k]
        counted = client.messages.count_tokens(model="m", system=system, tools=TOOLS,
                                               messages=[{"role": "user", "content": text}]).input_tokens
        u = msg.usage
        assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == counted, k
        assert u.input_tokens >= 1
        computed += counted - u.cache_read_input_tokens
        assert float(raws[k].headers["x-warmturn-queue-ms"]) >= 0  # the engine's queue wait, for the proxy
    assert metric(server, "warmturn_prefill_tokens_total") - before == computed
    reads = sorted(msgs[k].usage.cache_read_input_tokens for k in tasks)
    # the subagent system prompt (~1K tokens) was computed once: by the first subagent, which may
    # itself have read the tools part (tools-first) from the main turn's prefill
    assert reads[1] > 500 and reads[2] > 500 and reads[0] < reads[1] - 500
    assert metric(server, "warmturn_dedup_waits_total") >= 1
    assert metric(server, "warmturn_dedup_tokens_total") > 1000
    # alone (now warm: warm == cold is tested elsewhere), each gives the same greedy text
    for k, msg in msgs.items():
        again: dict = {}
        system = SYSTEM if k == "main" else SUB_SYSTEM
        text = "Which command shows the current directory?" if k == "main" else tasks[k]
        ask(client, system, text, again, k)
        assert again[k].parse().content == msg.content, k
    log = server["log"].read_text()
    assert re.search(r"prefill req_\w+: \d+/\d+ tokens, \d+ tok/s, ETA \d+ s", log)  # progress lines


def test_stop_sequence_and_cancel_inside_a_batch(server, client):
    """One stream is cut by its stop sequence and another is dropped by its client while two
    more run beside them: the others finish normally and the server stays healthy."""
    free = client.messages.create(model="m", max_tokens=12, extra_body={"temperature": 0},
                                  messages=[{"role": "user", "content": "Name five fruits."}])
    words = free.content[0].text.split()
    assert len(words) >= 4, free.content
    stop = words[2]
    results: dict = {}

    def stopped():
        results["stop"] = client.messages.create(model="m", max_tokens=12, extra_body={"temperature": 0},
                                                 stop_sequences=[stop],
                                                 messages=[{"role": "user", "content": "Name five fruits."}])

    def dropped():
        with client.messages.stream(model="m", max_tokens=300, extra_body={"temperature": 0},
                                    messages=[{"role": "user", "content": "Tell a very long story."}]) as s:
            for ev in s:
                if ev.type == "content_block_delta":
                    break
        results["dropped"] = True

    def plain(k):
        results[k] = client.messages.create(model="m", max_tokens=6, extra_body={"temperature": 0},
                                            messages=[{"role": "user", "content": f"Count to {k}."}])

    threads = in_threads((stopped,), (dropped,), (plain, "three"), (plain, "four"))
    for t in threads:
        t.join(600)
    cut = results["stop"]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == free.content[0].text[: free.content[0].text.index(stop)]
    assert results["dropped"] is True
    assert results["three"].usage.output_tokens >= 1 and results["four"].usage.output_tokens >= 1
    deadline = time.monotonic() + 120
    while httpx.get(server["base"] + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the dropped stream kept running"
        time.sleep(0.2)
    recs = [json.loads(line.split("warmturn.requests: ", 1)[1]) for line in server["log"].read_text().splitlines()
            if "warmturn.requests: " in line]
    assert any(r["outcome"] == "cancelled" and r["output_tokens"] < 300 for r in recs)
