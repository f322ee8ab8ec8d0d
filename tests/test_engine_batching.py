"""Continuous batching (server/engine.py on mlx-lm's BatchGenerator) with the tiny random llama:
greedy output alone == inside a batch, usage accounting, in-flight dedup, cancellation,
fairness as an order of events (never as a timing), the bounded queue."""

from __future__ import annotations

import random
import threading

import pytest

from tests.engine_recorder import Recorder, serve, started_engines
from tests.tiny import VOCAB, tiny_model, tiny_tokenizer
from warmturn.server.cache import PrefixCache
from warmturn.server.engine import (
    Done,
    Engine,
    GenerationRequest,
    Overloaded,
    Piece,
    Prefilled,
    prompt_usage,
)


@pytest.fixture(scope="module")
def parts():
    return tiny_model(), tiny_tokenizer()


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, VOCAB) for _ in range(n)]  # never EOS (1) or unk (0)


def at_piece(req: GenerationRequest, n: int, action) -> None:
    """Run ``action`` (in the engine's emit) on every piece ``req`` hands out from its ``n``-th
    output token on (n=1: any piece); the actions used are idempotent."""
    inner = req.emit

    def emit(item):
        inner(item)
        if isinstance(item, Piece) and item.output_tokens >= n:
            action()

    req.emit = emit


@pytest.fixture()
def make_engine(parts):
    with started_engines() as start:
        yield lambda store=None, **kw: start(*parts, store, **{"prefill_step_size": 16, **kw})


def test_greedy_alone_equals_inside_a_batch_of_four(parts, make_engine):
    model, _ = parts
    rng = random.Random(7)
    system = words(rng, 40)
    prompts = {
        "short": system[:8] + words(rng, 3),
        "long": words(rng, 90),
        "warm": system + words(rng, 12),  # its system part is cached before the batch
        "warm2": system + words(rng, 30),
    }
    alone = {}
    for name, p in prompts.items():  # alone, no store: every prompt computed from scratch
        rec = serve(make_engine(), {name: (p, {})})
        alone[name] = rec.text(name)
        assert alone[name] and isinstance(rec.last(name), Done)
    store = PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4)
    eng = make_engine(store)
    serve(eng, {"seed": (system + words(rng, 5), {"prefix_len": len(system)})})
    rec = serve(eng, {name: (p, {"prefix_len": len(system) if name.startswith("warm") else 0})
                      for name, p in prompts.items()})
    for name in prompts:
        assert rec.text(name) == alone[name], name
    assert rec.first("warm").reused >= len(system) and rec.first("warm2").reused >= len(system)
    assert rec.first("long").reused == 0
    # they ran together: several of them were generating in the same batch at one moment
    assert max_generating(rec) >= 3


def max_generating(rec: Recorder) -> int:
    """The most requests that were between their Prefilled and their Done at one moment."""
    now = most = 0
    for _, item in rec.log:
        if isinstance(item, Prefilled):
            now += 1
        elif isinstance(item, (Done, Exception)):
            now -= 1
        most = max(most, now)
    return most


def test_usage_is_exact_under_concurrency(parts, make_engine):
    model, _ = parts
    rng = random.Random(3)
    shared = words(rng, 48)
    store = PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4)
    eng = make_engine(store, dedup_min_tokens=1 << 30)  # no dedup: both compute the shared part
    reqs = {f"r{i}": (shared + words(rng, 5 + 7 * i), {"prefix_len": 48}) for i in range(4)}
    rec = serve(eng, reqs)
    for name, (tokens, _) in reqs.items():
        f = rec.first(name)
        u = f.usage
        assert f.prompt_tokens == len(tokens)
        assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == len(tokens)
        assert u.input_tokens >= 1 and min(u.cache_read_input_tokens, u.cache_creation_input_tokens) >= 0
        assert u.cache_read_input_tokens == f.reused
    # a second round: each prompt again, now fully cached except its last token
    again = serve(eng, reqs)
    for name, (tokens, _) in reqs.items():
        assert again.first(name).usage == prompt_usage(len(tokens), len(tokens) - 1, 0)
        assert again.text(name) == rec.text(name)


def test_siblings_sharing_an_uncached_prefix_compute_it_once(parts, make_engine):
    """Three requests with the same 160-token system+tools arrive together: one prefills it,
    the other two wait for that and read it from the cache."""
    model, _ = parts
    rng = random.Random(5)
    shared = words(rng, 160)
    suffixes = [words(rng, 6 + i) for i in range(3)]
    alone = {}
    for i, s in enumerate(suffixes):
        alone[f"s{i}"] = serve(make_engine(), {f"s{i}": (shared + s, {})}).text(f"s{i}")
    store = PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4)
    eng = make_engine(store, dedup_min_tokens=32)
    rec = serve(eng, {f"s{i}": (shared + s, {"prefix_len": 160}) for i, s in enumerate(suffixes)})
    prefilled = [rec.first(f"s{i}") for i in range(3)]
    computed = sum(len(shared) + len(s) - f.reused for s, f in zip(suffixes, prefilled, strict=True))
    m = eng.metrics
    assert m.prefill_tokens._value.get() == computed
    assert computed == len(shared) + sum(len(s) for s in suffixes)  # the shared part once
    assert m.dedup_waits._value.get() == 2 and m.dedup_tokens._value.get() == 2 * len(shared)
    assert sorted(f.reused for f in prefilled) == [0, 160, 160]
    assert sum(f.usage.cache_creation_input_tokens for f in prefilled) == computed - 3  # last tokens aside
    for i in range(3):
        assert rec.text(f"s{i}") == alone[f"s{i}"]


def test_fan_out_parked_on_a_short_prefix_computes_the_longer_shared_part_once(parts):
    """Issue 13 (fan-out, tools first): a main turn and three subagents share the tools; the
    subagents also share their own system prompt. All four are queued before the worker starts,
    so the main turn joins first and the subagents all park on it for the tools part. When that
    is released they must not each prefill the subagent prompt: one does, the others park on it
    and read it. Prefill counter == each shared part once; usage adds up; greedy text unchanged."""
    model, tok = parts
    rng = random.Random(41)
    tools, sub_system = words(rng, 48), words(rng, 160)
    prompts = {"main": (tools + words(rng, 40) + words(rng, 7), 88)}
    for i in range(3):
        prompts[f"sub{i}"] = (tools + sub_system + [2 + i] + words(rng, 5 + i), 208)  # tasks differ at once
    alone = {}
    for name, (p, _) in prompts.items():
        eng = Engine(model, tok, None, prefill_step_size=16)
        alone[name] = serve_stopped(eng, {name: (p, {})}).text(name)
    store = PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4)
    eng = Engine(model, tok, store, prefill_step_size=16, dedup_min_tokens=32)
    rec = serve_stopped(eng, {name: (p, {"prefix_len": plen}) for name, (p, plen) in prompts.items()})
    f = {name: rec.first(name) for name in prompts}
    assert f["main"].reused == 0
    reads = sorted(f[f"sub{i}"].reused for i in range(3))
    assert reads == [len(tools), len(tools) + len(sub_system), len(tools) + len(sub_system)]
    computed = sum(len(p) - f[name].reused for name, (p, _) in prompts.items())
    assert eng.metrics.prefill_tokens._value.get() == computed
    assert computed == sum(len(p) for p, _ in prompts.values()) - 3 * len(tools) - 2 * len(sub_system)
    assert eng.metrics.dedup_waits._value.get() == 5  # three on the main turn, two again on the first subagent
    assert eng.metrics.dedup_tokens._value.get() == 3 * len(tools) + 2 * len(sub_system)
    for name, (p, _) in prompts.items():
        u = f[name].usage
        assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == len(p)
        assert u.input_tokens >= 1 and u.cache_read_input_tokens == f[name].reused
        assert rec.text(name) == alone[name], name
    assert sum(f[n].usage.cache_creation_input_tokens for n in prompts) == computed - len(prompts)


def serve_stopped(engine: Engine, requests: dict[str, tuple[list[int], dict]]) -> Recorder:
    """Like serve, but every request is queued before the worker starts: the first loop takes
    them all at once, in order (no timing involved)."""
    rec = Recorder()
    for name, (tokens, kw) in requests.items():
        engine.submit(rec.request(name, tokens, **kw))
    engine.start()
    try:
        rec.wait()
    finally:
        engine.stop()
    return rec


def test_a_sibling_arriving_during_generation_reads_the_prompt_at_once(parts, make_engine):
    model, _ = parts
    rng = random.Random(11)
    shared = words(rng, 64)
    store = PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4)
    eng = make_engine(store)
    rec = Recorder()
    started = threading.Event()
    first = rec.request("a", shared + words(rng, 4), max_tokens=200)
    at_piece(first, 1, started.set)
    eng.submit(first)
    assert started.wait(60)
    eng.submit(rec.request("b", shared + words(rng, 9)))
    assert rec.done["b"].wait(60)
    first.cancel.set()
    rec.wait()
    assert rec.first("b").reused >= len(shared)


def test_short_request_is_served_while_a_long_prompt_is_read(parts, make_engine):
    """Fairness as an order of events: with 16-token prefill steps, a short request that
    arrives while a 400-token prompt is being read gets its first tokens before that prompt
    is done, and a stream already generating keeps emitting tokens meanwhile."""
    rng = random.Random(13)
    eng = make_engine(prefill_step_size=16)
    rec = Recorder()
    generating = threading.Event()
    gen = rec.request("gen", words(rng, 10), max_tokens=400)
    at_piece(gen, 1, generating.set)
    eng.submit(gen)
    assert generating.wait(60)
    eng.submit(rec.request("long", words(rng, 400), max_tokens=2))
    eng.submit(rec.request("short", words(rng, 12), max_tokens=3))
    assert rec.done["long"].wait(120) and rec.done["short"].wait(120)
    gen.cancel.set()
    rec.wait()
    names = [(n, type(i).__name__) for n, i in rec.log]
    long_start = names.index(("long", "Prefilled"))
    assert names.index(("short", "Done")) < long_start
    before = names[: long_start]
    assert ("gen", "Piece") in before[before.index(("short", "Prefilled")):]  # decode kept going


def test_cancel_one_leaves_the_others_untouched(parts, make_engine):
    rng = random.Random(17)
    prompts = {f"r{i}": words(rng, 10 + 5 * i) for i in range(3)}
    alone = {n: serve(make_engine(), {n: (p, {"max_tokens": 12})}).text(n) for n, p in prompts.items()}
    eng = make_engine()
    rec = Recorder()
    victim = rec.request("victim", words(rng, 20), max_tokens=300)
    at_piece(victim, 3, victim.cancel.set)
    eng.submit(victim)
    for n, p in prompts.items():
        eng.submit(rec.request(n, p, max_tokens=12))
    rec.wait()
    assert rec.last("victim") == Done("cancelled", 3)
    for n in prompts:
        assert rec.text(n) == alone[n] and rec.last(n).reason in ("length", "stop")


def test_queue_is_bounded_and_withdraw_frees_a_slot(parts):
    model, tok = parts
    eng = Engine(model, tok, max_queue=1)  # never started: nothing is consumed
    a = GenerationRequest(tokens=[2, 3], max_tokens=1, emit=lambda item: None)
    eng.submit(a)
    with pytest.raises(Overloaded) as e:
        eng.submit(GenerationRequest(tokens=[2, 3], max_tokens=1, emit=lambda item: None))
    assert e.value.retry_after >= 1
    assert eng.withdraw(a) and eng.depth == 0 and a.cancel.is_set()
    eng.submit(GenerationRequest(tokens=[2, 3], max_tokens=1, emit=lambda item: None))
    assert eng.depth == 1


def test_decode_concurrency_limits_the_batch(parts, make_engine):
    rng = random.Random(23)
    eng = make_engine(decode_concurrency=2)
    rec = serve(eng, {f"r{i}": (words(rng, 8), {"max_tokens": 6}) for i in range(4)})
    # r2 and r3 joined only when r0 and r1 had finished
    names = [(n, type(i).__name__) for n, i in rec.log if isinstance(i, (Prefilled, Done))]
    assert names.index(("r2", "Prefilled")) > min(names.index(("r0", "Done")), names.index(("r1", "Done")))
    assert all(rec.last(f"r{i}").output_tokens >= 1 for i in range(4))


@pytest.mark.parametrize("n,reused,created,expected", [
    (10, 0, 9, (1, 0, 9)),
    (10, 9, 0, (1, 9, 0)),
    (10, 4, 9, (1, 4, 5)),  # creation never eats the last token or the cached part
    (10, 0, 0, (10, 0, 0)),
])
def test_prompt_usage_adds_up(n, reused, created, expected):
    u = prompt_usage(n, reused, created)
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == expected


@pytest.mark.parametrize("when", ["mid-prompt", "mid-answer"])
def test_a_lone_request_moves_into_the_batch_unchanged(parts, make_engine, when):
    """A request running alone (outside the batch) moves into it when another arrives,
    mid-prompt or mid-answer, and both answers are what each gives alone."""
    rng = random.Random(29)
    first, second = words(rng, 1500), words(rng, 20)
    alone = {"first": serve(make_engine(), {"first": (first, {"max_tokens": 20})}).text("first"),
             "second": serve(make_engine(), {"second": (second, {"max_tokens": 20})}).text("second")}
    eng = make_engine(prefill_step_size=16)
    rec = Recorder()
    req = rec.request("first", first, max_tokens=20)
    pieces = threading.Event()
    at_piece(req, 3, pieces.set)
    eng.submit(req)
    if when == "mid-prompt":
        while eng.batch_sizes()[1] != 1:  # until it is reading its prompt, alone
            pass
    else:
        assert pieces.wait(60)
    with rec.lock:
        rec.log.append(("second submitted", None))
    eng.submit(rec.request("second", second, max_tokens=20))
    rec.wait()
    order = [n if n != "first" else f"first {type(i).__name__}" for n, i in rec.log]
    moved = order.index("second submitted")
    assert (moved < order.index("first Prefilled")) == (when == "mid-prompt")
    assert rec.text("first") == alone["first"] and rec.text("second") == alone["second"]
    assert rec.last("first").output_tokens == 20 or rec.last("first").reason == "stop"
    assert sum(isinstance(i, Prefilled) for i in rec.items["first"]) == 1


@pytest.mark.parametrize("solo", [False, True])
def test_a_long_prompt_pauses_for_a_short_one_and_resumes_unchanged(parts, make_engine, solo):
    """Shortest prompt first: a short request that arrives while a long prompt is being read
    is prefilled before it; the long one leaves the batch (or its solo run) with its KV state,
    resumes from there (nothing computed twice), and answers exactly as it does alone."""
    model, _ = parts
    rng = random.Random(31)
    long_p, short_p = words(rng, 600), words(rng, 10)
    alone = {"long": serve(make_engine(), {"long": (long_p, {"max_tokens": 12})}).text("long"),
             "short": serve(make_engine(), {"short": (short_p, {"max_tokens": 12})}).text("short")}
    eng = make_engine(PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4), prefill_step_size=16, solo=solo)
    rec = Recorder()
    eng.submit(rec.request("long", long_p, max_tokens=12))
    while eng.batch_sizes()[1] != 1:  # until it is reading its prompt
        pass
    with rec.lock:
        rec.log.append(("short submitted", None))
    eng.submit(rec.request("short", short_p, max_tokens=12))
    rec.wait()
    order = [n if n == "short submitted" else f"{n} {type(i).__name__}" for n, i in rec.log]
    assert order.index("short submitted") < order.index("short Prefilled") < order.index("long Prefilled")
    assert eng.metrics.preemptions._value.get() == (0 if solo else 1)  # solo: it left its solo run instead
    assert rec.text("long") == alone["long"] and rec.text("short") == alone["short"]
    computed = sum(len(p) - rec.first(n).reused for n, p in (("long", long_p), ("short", short_p)))
    assert eng.metrics.prefill_tokens._value.get() == computed == len(long_p) + len(short_p)


def test_shortest_prompt_first_and_short_prompts_share_a_step(parts):
    """Four prompts queued together: the three short ones are read before the long one,
    together (their padded chunks fit one step), and every answer is the one given alone."""
    model, tok = parts
    rng = random.Random(37)
    prompts = {"long": words(rng, 120), "a": words(rng, 5), "b": words(rng, 4), "c": words(rng, 5)}
    alone = {n: serve_stopped(Engine(model, tok, None, prefill_step_size=16), {n: (p, {})}).text(n)
             for n, p in prompts.items()}
    eng = Engine(model, tok, None, prefill_step_size=16)
    rec = serve_stopped(eng, {n: (p, {}) for n, p in prompts.items()})
    started = [n for n, i in rec.log if isinstance(i, Prefilled)]
    assert started[-1] == "long" and set(started[:3]) == {"a", "b", "c"}
    for n in prompts:
        assert rec.text(n) == alone[n], n


def test_a_title_request_reads_its_prompt_after_the_turn(parts):
    """A background request (Claude Code's title) queued first yields prefill to a turn,
    although its prompt is the shorter one."""
    model, tok = parts
    rng = random.Random(43)
    prompts = {"title": (words(rng, 40), {"background": True}), "turn": (words(rng, 90), {})}
    alone = {n: serve_stopped(Engine(model, tok, None, prefill_step_size=16), {n: p}).text(n)
             for n, p in prompts.items()}
    eng = Engine(model, tok, None, prefill_step_size=16)
    rec = serve_stopped(eng, prompts)
    started = [n for n, i in rec.log if isinstance(i, Prefilled)]
    assert started == ["turn", "title"]
    assert rec.text("turn") == alone["turn"] and rec.text("title") == alone["title"]


def test_requests_being_read_together_start_together(parts, make_engine):
    """A lone request waits (up to arrival_window) for a request still being read and
    tokenized, instead of starting alone: its prefill begins only after the other's submit."""
    rng = random.Random(47)
    eng = make_engine(arrival_window=60.0)
    rec = Recorder()
    with eng.arriving() as first_ticket, eng.arriving() as second_ticket:
        eng.submit(rec.request("first", words(rng, 8)), first_ticket)
        threading.Event().wait(0.3)  # the second is still "being tokenized"
        with rec.lock:
            rec.log.append(("second submitted", None))
        eng.submit(rec.request("second", words(rng, 8)), second_ticket)
    rec.wait()
    order = [n if n == "second submitted" else f"{n} {type(i).__name__}" for n, i in rec.log]
    assert order.index("second submitted") < order.index("first Prefilled")
    assert rec.first("first").queued_ms >= 250


def test_two_submitted_wait_for_a_third_being_read(parts, make_engine):
    """The wait is for an idle engine, not only for a lone request: two submitted together
    still wait for a third being read, and all three read their prompts in one step."""
    rng = random.Random(53)
    eng = make_engine(arrival_window=60.0)
    rec = Recorder()
    with eng.arriving() as t1, eng.arriving() as t2, eng.arriving() as t3:
        eng.submit(rec.request("first", words(rng, 8)), t1)
        eng.submit(rec.request("second", words(rng, 8)), t2)
        threading.Event().wait(0.3)
        with rec.lock:
            rec.log.append(("third submitted", None))
        eng.submit(rec.request("third", words(rng, 8)), t3)
    rec.wait()
    order = [n if n == "third submitted" else f"{n} {type(i).__name__}" for n, i in rec.log]
    assert order.index("third submitted") < min(order.index(f"{n} Prefilled") for n in ("first", "second"))
    assert min(rec.first(n).queued_ms for n in ("first", "second")) >= 250


def test_a_lone_request_waits_out_the_grace_for_one_sent_with_it(parts, make_engine):
    """A proxy passes requests sent together on a few ms apart, so the second may not be
    arriving yet when the first is submitted: an idle engine starts its first request only
    once it is arrival_grace old, and one submitted within that reads its prompt in the same step."""
    rng = random.Random(59)
    eng = make_engine(arrival_grace=60.0)
    rec = Recorder()
    eng.submit(rec.request("first", words(rng, 8)))
    threading.Event().wait(0.3)  # no ticket: the second is not even being read yet
    with rec.lock:
        rec.log.append(("second submitted", None))
    eng.submit(rec.request("second", words(rng, 8)))
    rec.wait()
    order = [n if n == "second submitted" else f"{n} {type(i).__name__}" for n, i in rec.log]
    assert order.index("second submitted") < order.index("first Prefilled")
    assert rec.first("first").queued_ms >= 250


def test_the_grace_counts_from_arrival_not_submit(parts, make_engine):
    """Reading and rendering a request count towards its grace: one that took longer than the
    grace to arrive is not held again after its submit."""
    rng = random.Random(61)
    eng = make_engine(arrival_grace=1.0)
    rec = Recorder()
    with eng.arriving() as ticket:
        threading.Event().wait(1.2)  # "reading and rendering" outlasts the grace
        eng.submit(rec.request("late", words(rng, 8)), ticket)
    rec.wait()
    assert rec.first("late").queued_ms < 900  # a wait from submit would be >= 1000


def test_a_continued_conversation_is_handed_over_and_stored_back(model_and_tokenizer):
    """Claude Code's turns re-send the answer as generated: each turn takes the previous turn's
    entry (no copy of the prefix), answers as a cache-less engine does, and leaves prompt +
    answer in the store for the next; a turn stopped right after its lookup, before it computes
    anything, still puts the conversation back."""
    import threading as _threading

    from warmturn.server.cache import PrefixCache
    from warmturn.server.engine import Admitted, Done, Engine, GenerationRequest, Piece

    model, tok = model_and_tokenizer
    prompt = list(tok.apply_chat_template([{"role": "system", "content": "You answer in one short line. " * 20},
                                           {"role": "user", "content": "Name a colour."}], add_generation_prompt=True))

    def run(engine, tokens, cancel_on_admission=False):
        text, done = [], _threading.Event()
        req = GenerationRequest(tokens=list(tokens), max_tokens=6, emit=lambda item: None, temperature=0.0,
                                prefix_len=40)

        def emit(item):
            if isinstance(item, Admitted) and cancel_on_admission:
                req.cancel.set()
            if isinstance(item, Piece):
                text.append(item.text)
            if isinstance(item, (Done, Exception)):
                done.set()
        req.emit = emit
        engine.submit(req)
        assert done.wait(300)
        return "".join(text)

    def held(store, tokens):  # prompt + the answer tokens fed back, as the store keeps them
        return max((e.tokens.tolist() for e in store._entries.values() if e.tokens.tolist()[: len(tokens)] == tokens),
                   key=len)

    store = PrefixCache(model, max_bytes=1 << 30)
    warm, cold = Engine(model, tok, store), Engine(model, tok, None)
    warm.start()
    cold.start()
    try:
        tokens = prompt
        for _ in range(3):
            assert run(warm, tokens) == run(cold, tokens)
            tokens = held(store, tokens) + tok.encode(" And another?", add_special_tokens=False)
        assert store.stats()["handed_over"] >= 2
        before = store.peek(tokens)
        assert before > len(prompt)
        run(warm, tokens, cancel_on_admission=True)
        assert store.stats()["handed_over"] >= 3 and store.peek(tokens) == before
    finally:
        warm.stop()
        cold.stop()
