"""Every cache family mlx-lm has, warm and correct: tiny random-weight models built from mlx-lm's own
model classes (warmturn/server/tinymodels.py, seconds each, no download) with the default model's
tokenizer.

- store level: a warm cache fetched at the end of a stored prompt, at a mark, at a checkpoint and
  after a restart from disk gives logits allclose to a cold prefill (random models repeat tokens,
  so equal text alone would prove little);
- engine level: a 3-turn conversation on the solo path and 4 concurrent conversations on the
  batched path read >= 99% of the previous turn's prompt and answer exactly as a cache-less
  engine does (greedy); a request that shares only the system prompt reads the system prompt;
- a chat template that drops earlier reasoning (as Qwen3's and gpt-oss's do) stays warm up to
  the end of the history;
- preemption of a prompt being read keeps its state right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from tests.engine_recorder import Handle, Recorder, started_engines
from warmturn.server import kvfamily, wire
from warmturn.server.cache import PrefixCache, prefill
from warmturn.server.engine import Engine, Prefilled
from warmturn.server.render import Renderer
from warmturn.server.tinymodels import FAMILIES, WINDOW, build_tiny

STATEFUL = [f for f in FAMILIES if f not in ("llama", "qwen3", "qwen3_moe")]
SYSTEM = " ".join(f"rule {i}: keep the code tidy and the tests honest." for i in range(40))  # ~560 tokens


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str, **kw) -> Path:
        key = family + json.dumps(kw, sort_keys=True)
        if key not in built:
            built[key] = build_tiny(family, root / f"{family}-{len(built)}", **kw)
        return built[key]

    return get


@pytest.fixture(scope="module")
def loaded(family_dir):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load(str(family_dir(family)))
        return cache[family]

    return get


def request(msgs: list[dict], system: str = SYSTEM) -> wire.MessagesRequest:
    return wire.parse_messages_request({"model": "m", "max_tokens": 6, "system": system, "messages": msgs})


def renderer(tok) -> Renderer:
    r = Renderer(tok)
    r.history_marks = True
    return r


def cold_logits(model, tokens: list[int]) -> np.ndarray:
    return np.array(prefill(model, make_prompt_cache(model), tokens))


def warm_logits(model, kv, tokens: list[int], reused: int) -> np.ndarray:
    return np.array(prefill(model, kv, tokens[reused:]))


def fill(model, store: PrefixCache, tokens: list[int], points: list[int], checkpoints=()) -> None:
    """The engine's solo path in miniature: prefill in chunks that end at each point, take a
    mark there, store the whole prompt (all its tokens fed) with the marks."""
    kv, start = store.fetch(tokens)
    marks = {}
    for p in [*points, len(tokens)]:
        if p > start:
            prefill(model, kv, tokens[start:p])
            start = p
            m = store.mark(kv)
            if p < len(tokens) and m is not None:
                marks[p] = m
    store.store(tokens, kv, checkpoints=checkpoints, marks=marks)


# --------------------------------------------------------------------------- store level


@pytest.mark.parametrize("family", list(FAMILIES))
def test_store_resumes_where_it_can_and_matches_cold(family, loaded, tmp_path):
    model, tok = loaded(family)
    r = renderer(tok)
    one = r.render(request([{"role": "user", "content": "Write a function that adds two numbers."}]))
    tokens = one.tokens
    assert one.prefix_len > 2 * WINDOW and 0 < one.prefix_len < one.history_len < len(tokens) - 1
    store = PrefixCache(model, max_bytes=1 << 30, cache_dir=tmp_path / "kv")
    assert store.stateful == (family in STATEFUL)
    fill(model, store, tokens, [one.prefix_len, one.history_len, len(tokens) - 1], checkpoints=[one.prefix_len])

    answer = tok.encode(" sure, here it is", add_special_tokens=False)
    cases = {
        "extends the whole entry": tokens + answer,
        "parts after the history": tokens[: one.history_len] + answer,
        "parts inside system+tools, after the checkpoint": tokens[: one.prefix_len] + answer,
        "parts early in the system prompt": tokens[: one.prefix_len - 40] + answer,
    }
    expected = {
        "extends the whole entry": len(tokens),
        "parts after the history": one.history_len,
        "parts inside system+tools, after the checkpoint": one.prefix_len,
        # full attention cuts back anywhere; window and state caches have no state there
        "parts early in the system prompt": 0 if store.stateful else one.prefix_len - 40,
    }
    for name, q in cases.items():
        kv, reused = store.fetch(q)
        assert reused == expected[name], name
        np.testing.assert_allclose(warm_logits(model, kv, q, reused), cold_logits(model, q), atol=2e-4, rtol=1e-3,
                                   err_msg=name)

    # the checkpoint went to disk: a new store (a restart) reads system+tools from it
    again = PrefixCache(model, max_bytes=1 << 30, cache_dir=tmp_path / "kv")
    q = tokens[: one.prefix_len] + answer
    kv, reused = again.fetch(q)
    assert reused == one.prefix_len and again.stats()["disk_loads"] == 1
    np.testing.assert_allclose(warm_logits(model, kv, q, reused), cold_logits(model, q), atol=2e-4, rtol=1e-3)


def test_marks_are_small_and_counted(loaded):
    """A hybrid's marks hold only its state leaves: far smaller than the KV of the prompt."""
    model, tok = loaded("qwen3_next")
    store = PrefixCache(model, max_bytes=1 << 30)
    tokens = renderer(tok).render(request([{"role": "user", "content": "hello"}])).tokens
    kv = make_prompt_cache(model)
    prefill(model, kv, tokens)
    mark = store.mark(kv)
    assert [m is None for m in mark] == [kvfamily.is_sliceable(c) for c in kvfamily.leaves(kv)]
    assert 0 < kvfamily.mark_nbytes(mark) < kvfamily.nbytes(kv) / 4
    fill(model, store, tokens, [len(tokens) - 8])
    entry = next(iter(store._entries.values()))
    assert entry.nbytes == entry.kv_bytes + kvfamily.mark_nbytes(entry.marks[len(tokens) - 8])
    assert store.stats()["bytes"] == entry.nbytes


def test_window_cache_is_never_reused_past_its_window(loaded):
    """A sliding-window entry holding more than its window cannot be cut back: a request that
    shares only part of it gets a mark or nothing, never the window cache of a longer prompt."""
    model, _tok = loaded("gemma3_text")
    store = PrefixCache(model, max_bytes=1 << 30)
    tokens = list(range(100, 100 + 3 * WINDOW))
    fill(model, store, tokens, [])
    q = tokens[: 2 * WINDOW] + [7, 8, 9]
    kv, reused = store.fetch(q)
    assert reused == 0
    assert kvfamily.fed_tokens(kv) in (None, 0)


# --------------------------------------------------------------------------- engine level


def run(engine: Engine, rendered, name: str, max_tokens: int = 6) -> Handle:
    """One engine request for a rendered prompt (greedy), recorded."""
    return Recorder().submit(engine, name, rendered.tokens, max_tokens=max_tokens, prefix_len=rendered.prefix_len,
                             history_len=rendered.history_len, request_id=name)


@pytest.fixture
def engines(loaded):
    with started_engines() as start:
        def make(family: str, store: bool = True, **kw) -> Engine:
            model, tok = loaded(family)
            return start(model, tok, PrefixCache(model, max_bytes=1 << 30) if store else None, **kw)

        yield make


def conversation(r: Renderer, turns: list[str], answers: list[str], system: str = SYSTEM):
    msgs: list[dict] = []
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": answers[i] or "ok"})
    return r.render(request(msgs, system))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_turns_and_concurrency_warm_and_equal_to_cold(family, engines, loaded):
    _, tok = loaded(family)
    r = renderer(tok)
    warm, cold = engines(family), engines(family, store=False)
    turns = ["Write a function that adds two numbers.", "Now make it handle floats.", "Add a test."]
    answers: list[str] = []
    prev = None
    for n in range(1, 4):  # solo path: one request at a time
        rendered = conversation(r, turns[:n], answers)
        w, c = run(warm, rendered, f"w{n}").wait(), run(cold, rendered, f"c{n}").wait()
        assert w.text == c.text, n
        if prev is not None:
            assert w.reused >= 0.99 * len(prev.tokens), (n, w.reused, len(prev.tokens))
        answers.append(w.text)
        prev = rendered
    # a new conversation sharing only the system prompt reads the system prompt
    other = conversation(r, ["Something else entirely."], [])
    assert run(warm, other, "other").wait().reused >= other.prefix_len

    # batched path: four conversations at once, then their second turns at once
    firsts = [conversation(r, [f"Task {i}: explain recursion."], []) for i in range(4)]
    ws = [run(warm, x, f"b{i}") for i, x in enumerate(firsts)]
    ws = [w.wait() for w in ws]
    cs = [run(cold, x, f"cb{i}").wait() for i, x in enumerate(firsts)]
    assert [w.text for w in ws] == [c.text for c in cs]
    assert all(w.reused >= firsts[0].prefix_len for w in ws)  # the shared system prompt, computed once
    seconds = [conversation(r, [f"Task {i}: explain recursion.", "More."], [ws[i].text]) for i in range(4)]
    ws2 = [run(warm, x, f"b2{i}") for i, x in enumerate(seconds)]
    ws2 = [w.wait() for w in ws2]
    cs2 = [run(cold, x, f"cb2{i}").wait() for i, x in enumerate(seconds)]
    assert [w.text for w in ws2] == [c.text for c in cs2]
    for w, first in zip(ws2, firsts, strict=True):
        assert w.reused >= 0.99 * len(first.tokens), (w.reused, len(first.tokens))


REASONING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] | trim }}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next", "llama"])
def test_template_that_drops_reasoning_stays_warm_to_the_history(family, family_dir, engines):
    """Qwen3's and gpt-oss's templates render earlier answers without their reasoning, so the next
    prompt parts from the generated tokens right after the assistant header: it still reads the
    whole history before it (the mark at the end of the history)."""
    d = family_dir(family, seed=1)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = REASONING_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    model, tok = load(str(d))
    r = renderer(tok)
    warm = Engine(model, tok, PrefixCache(model, max_bytes=1 << 30))
    cold = Engine(model, tok, None)
    for e in (warm, cold):
        e.start()
    try:
        one = conversation(r, ["Write a function."], [])
        w1 = run(warm, one, "w1").wait()
        two = conversation(r, ["Write a function.", "Again."], ["<think>I should write it.</think>" + w1.text])
        assert "I should write it" not in two.text and two.text.startswith(one.text[: -len("<think>\n")])
        w2, c2 = run(warm, two, "w2").wait(), run(cold, two, "c2").wait()
        assert w2.text == c2.text
        assert w2.reused >= one.history_len
    finally:
        warm.stop()
        cold.stop()


@pytest.mark.parametrize("family", ["gemma3_text", "nemotron_h"])
def test_preempted_prompt_resumes_right(family, engines, loaded):
    """A long prompt taken out of the batch for a short one keeps its window/state cache and
    resumes from it: its answer equals the cold one."""
    _, tok = loaded(family)
    r = renderer(tok)
    warm = engines(family, prefill_step_size=64, solo=False)
    cold = engines(family, store=False)
    long = conversation(r, ["A long task."], [], system=SYSTEM + " " + SYSTEM)
    short = conversation(r, ["Short."], [], system="Be brief.")
    a = run(warm, long, "long")
    while not any(isinstance(i, Prefilled) for i in a.items) and not a.done.is_set():
        if warm.batch_sizes()[1]:  # the long prompt is being read: now the short one arrives
            break
    b = run(warm, short, "short")
    a.wait(), b.wait()
    assert a.text == run(cold, long, "cl").wait().text
    assert b.text == run(cold, short, "cs").wait().text
    assert warm.metrics.preemptions._value.get() >= 1


def test_family_is_reported(loaded, engines):
    e = engines("lfm2")
    info = e.cache_info()
    assert info["family"] == "hybrid" and info["layers"] == {"ArraysCache": 1, "KVCache": 1}
    assert "marked points" in info["policy"]
    assert engines("llama").cache_info()["family"] == "attention"


# --------------------------------------------------------------------------- through the real server


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next"])
def test_real_server_turns_and_restart(family, family_dir, tmp_path):
    """`python -m warmturn.server --model DIR --cache-dir D` on a window and a hybrid model, the
    anthropic SDK as the client: turns 2 and 3 read >= 99% of the previous prompt, and after a
    restart a new conversation reads system+tools from disk."""
    import anthropic
    import httpx

    from tests.procs import start_server, stop

    d = family_dir(family)
    flags = ("--model", str(d), "--cache-dir", str(tmp_path / "kv"), "--default-temperature", "0", "--log-level", "warning")
    proc, url = start_server(*flags, log=tmp_path / "server1.out")
    try:
        health = httpx.get(f"{url}/health", timeout=5).json()
        client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=300)
        msgs: list[dict] = []
        prompts = []
        for n, text in enumerate(["Write a function.", "Make it faster.", "Add a test."]):
            msgs.append({"role": "user", "content": text})
            m = client.messages.create(model="claude-opus-5-5", max_tokens=6, system=SYSTEM, messages=msgs)
            u = m.usage
            total = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
            if n:
                assert (u.cache_read_input_tokens or 0) >= 0.99 * prompts[-1], (n, u, prompts)
            prompts.append(total)
            msgs.append({"role": "assistant", "content": "".join(b.text for b in m.content if b.type == "text") or "ok"})
    finally:
        stop(proc)
    assert health["cache"]["family"] == ("sliding-window" if family == "gemma3_text" else "hybrid")
    proc, url = start_server(*flags, log=tmp_path / "server2.out")
    try:
        client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=300)
        m = client.messages.create(model="claude-opus-5-5", max_tokens=4, system=SYSTEM,
                                   messages=[{"role": "user", "content": "Something new."}])
        system_only = client.messages.count_tokens(model="claude-opus-5-5", system=SYSTEM,
                                                   messages=[{"role": "user", "content": "x"}]).input_tokens
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        stop(proc)
    assert (m.usage.cache_read_input_tokens or 0) >= system_only - 12  # the system+tools checkpoint
    assert "warmturn_cache_disk_loads 1.0" in metrics


@pytest.mark.parametrize("family", ["llama", "qwen3_next"])
def test_a_conversation_evicted_from_memory_comes_back_from_disk(family, loaded, tmp_path):
    """Sessions that outgrow the memory budget: the conversation evicted by others is spilled to
    --cache-dir and its next turn reads it back (all of it), logits equal to cold."""
    model, tok = loaded(family)
    r = renderer(tok)
    sessions = [conversation(r, [f"Session {i}: write a parser for format {i}."], [], system=f"Project {i}. " + SYSTEM)
                for i in range(3)]
    budget = int(1.5 * len(sessions[0].tokens) * PrefixCache(model, max_bytes=1 << 30).bytes_per_token)
    store = PrefixCache(model, max_bytes=budget, cache_dir=tmp_path / "kv", min_checkpoint=1 << 20)  # no checkpoints
    for s in sessions:  # each one pushes the previous out of memory
        fill(model, store, s.tokens, [s.history_len, len(s.tokens) - 1])
    assert store.stats()["spills"] >= 2 and store.stats()["entries"] == 1
    nxt = sessions[0].tokens + tok.encode(" done<|im_end|>\n<|im_start|>user\nnext", add_special_tokens=False)
    kv, reused = store.fetch(nxt)
    assert reused == len(sessions[0].tokens) and store.stats()["disk_loads"] == 1
    np.testing.assert_allclose(warm_logits(model, kv, nxt, reused), cold_logits(model, nxt), atol=2e-4, rtol=1e-3)
    assert not next(e for e in store._entries.values() if len(e.tokens) == len(sessions[0].tokens)).checkpoint
    # a turn that parts from the spilled entry before its end (the answer re-rendered otherwise):
    # full attention cuts the spilled file back; a state model resumes at the spilled mark
    for s in sessions[2:]:
        fill(model, store, s.tokens + [7, 8], [])  # push sessions[1] out to disk as well
    other = sessions[1].tokens[:-1] + tok.encode(" parted here", add_special_tokens=False)
    kv, reused = store.fetch(other)
    assert reused == len(sessions[1].tokens) - 1
    np.testing.assert_allclose(warm_logits(model, kv, other, reused), cold_logits(model, other), atol=2e-4, rtol=1e-3)
