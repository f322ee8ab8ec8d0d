"""Correctness of the prefix KV cache (server/cache.py) with the real default model.

The key check (mlx-lm's own idea): a request served from a warm fetch produces the same greedy
tokens and allclose logits as the same request run cold. Each test drives the engine's flow
itself: fetch -> prefill tokens[reused:-1] -> store(tokens[:-1], kv, [prefix_len]) -> last
token -> greedy generation mutating kv (which must not touch the stored entries).
"""

from __future__ import annotations

import logging
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from warmturn.server.cache import PrefixCache, common_prefix_len, kv_bytes_per_token, prefill

pytestmark = pytest.mark.model

N_GEN = 6
SYSTEM = (
    "You are a careful coding assistant working in a terminal. Answer briefly. "
    "Tools: read_file(path) reads a file; write_file(path, text) writes one; "
    "run(cmd) runs a shell command and returns its output. "
) * 3
SUBAGENT_SYSTEM = "You are a search subagent. Find files matching a pattern and list them, one per line. " * 6


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def render(tok, messages, system=SYSTEM) -> list[int]:
    return list(tok.apply_chat_template([{"role": "system", "content": system}, *messages], add_generation_prompt=True))


def prefix_len(tok, system=SYSTEM) -> int:
    """End of the system prefix, found as the renderer does: two probe user messages, shared prefix."""
    a = np.array(render(tok, [{"role": "user", "content": "alpha probe"}], system))
    b = np.array(render(tok, [{"role": "user", "content": "zulu other"}], system))
    return common_prefix_len(a, b)


def greedy(model, kv, last_logits, n=N_GEN):
    out, logits = [], last_logits
    for _ in range(n):
        t = int(mx.argmax(logits).item())
        out.append(t)
        logits = prefill(model, kv, [t])
    return out


_COLD: dict[tuple[int, ...], tuple] = {}


def cold(model, tokens):
    """The reference: (last logits, greedy tokens) of `tokens` prefilled from nothing. Computed once per
    prompt for the module (the one model, deterministic): the warm side is computed in every test."""
    key = tuple(tokens)
    if key not in _COLD:
        kv = make_prompt_cache(model)
        logits = prefill(model, kv, tokens)
        _COLD[key] = (logits, greedy(model, kv, logits))
    return _COLD[key]


def turn(model, store, tokens, plen, gen=N_GEN, store_generated=False):
    """One request through the store exactly as the engine does it."""
    kv, reused = store.fetch(tokens)
    assert 0 <= reused <= len(tokens) - 1
    assert kv[0].size() == reused
    if reused < len(tokens) - 1:
        prefill(model, kv, tokens[reused:-1])
    created = store.store(tokens[:-1], kv, checkpoints=[plen])
    logits = prefill(model, kv, tokens[-1:])
    out = greedy(model, kv, logits, gen)
    if store_generated:  # greedy() fed every generated token back: kv holds tokens + out
        store.store((list(tokens) + out)[: kv[0].size()], kv)
    return reused, created, logits, out


def assert_same(warm, ref):
    logits_w, out_w = warm
    logits_c, out_c = ref
    assert out_w == out_c
    np.testing.assert_allclose(np.array(logits_w), np.array(logits_c), rtol=1e-3, atol=2e-3)


@pytest.fixture(scope="module")
def mt(model_and_tokenizer):
    return model_and_tokenizer


@pytest.fixture(scope="module")
def convo(mt):
    """A three-turn conversation's prompts (user turns with fixed assistant replies)."""
    _, tok = mt
    msgs = [{"role": "user", "content": "List the files in the src directory."}]
    p1 = render(tok, msgs)
    msgs += [
        {"role": "assistant", "content": "I will run ls src to see them."},
        {"role": "user", "content": "The output was: main.py util.py test_util.py. Which one has the tests?"},
    ]
    p2 = render(tok, msgs)
    msgs += [
        {"role": "assistant", "content": "test_util.py holds the tests."},
        {"role": "user", "content": "Read it and tell me what it checks."},
    ]
    p3 = render(tok, msgs)
    return p1, p2, p3


# ---------------------------------------------------------------------------------------------
# warm == cold
# ---------------------------------------------------------------------------------------------


def test_kv_bytes_per_token(mt):
    model, _ = mt
    # SmolLM2-135M: 30 layers x (K+V) x 3 kv heads x 64 dims x 4 bytes (float32)
    assert kv_bytes_per_token(model) == 30 * 2 * 3 * 64 * 4


def test_exact_repeat_is_full_hit(mt, convo):
    model, tok = mt
    p1 = convo[0]
    store = PrefixCache(model, max_bytes=1 << 30)
    plen = prefix_len(tok)
    r0, c0, *first = turn(model, store, p1, plen)
    assert (r0, c0) == (0, len(p1) - 1)
    r1, c1, *again = turn(model, store, p1, plen)
    assert r1 == len(p1) - 1 and c1 == 0
    ref = cold(model, p1)
    assert_same(first, ref)
    assert_same(again, ref)  # generation after the first store did not corrupt the entry
    s = store.stats()
    assert (s["hits"], s["misses"]) == (1, 1)


def test_extension_by_new_turns(mt, convo):
    model, tok = mt
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    prev = None
    for p in convo:
        reused, created, *warm = turn(model, store, p, plen)
        if prev is not None:
            # the stored entry is prev[:-1] (the engine stores the prompt minus its last token)
            assert reused == min(common_prefix_len(np.array(prev), np.array(p)), len(prev) - 1)
            assert reused > len(prev) - 8
            assert created == len(p) - 1 - reused
        assert_same(warm, cold(model, p))
        prev = p
    # the conversation entry was superseded each turn; only the latest one and the checkpoint remain
    assert store.stats()["entries"] == 2 and store.stats()["checkpoints"] == 1


def test_divergence_in_the_middle_trims(mt, convo):
    model, tok = mt
    _, p2, _ = convo
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    turn(model, store, p2, plen)
    edited = render(tok, [
        {"role": "user", "content": "List the files in the docs directory, please."},
    ])
    shared = common_prefix_len(np.array(p2), np.array(edited))
    assert plen < shared < len(edited) - 1
    reused, created, *warm = turn(model, store, edited, plen)
    assert reused == shared  # the longer entry trimmed back to the shared length
    assert created == len(edited) - 1 - shared
    assert_same(warm, cold(model, edited))
    # the stored entry still serves its own prompt afterwards
    r2, _, *again = turn(model, store, p2, plen)
    assert r2 == len(p2) - 1
    assert_same(again, cold(model, p2))


def test_new_session_reuses_checkpoint_after_eviction(mt, convo):
    model, tok = mt
    p1 = convo[0]
    plen = prefix_len(tok)
    bpt = kv_bytes_per_token(model)
    other = render(tok, [{"role": "user", "content": "Write a haiku about caching in memory."}])
    # room for the checkpoint plus about one conversation entry
    budget = (plen + max(len(p1), len(other)) + 20) * bpt
    store = PrefixCache(model, max_bytes=budget)
    turn(model, store, p1, plen)
    turn(model, store, other, plen)
    s = store.stats()
    assert s["evictions"] >= 1 and s["bytes"] <= budget
    third = render(tok, [{"role": "user", "content": "Explain what a KV cache is in one sentence."}])
    reused, _, *warm = turn(model, store, third, plen)
    assert plen <= reused < len(third) - 1
    assert reused == common_prefix_len(np.array(third), np.array(other))
    assert_same(warm, cold(model, third))


def test_restart_reloads_checkpoint_from_disk(mt, convo, tmp_path):
    model, tok = mt
    p1 = convo[0]
    plen = prefix_len(tok)
    first = PrefixCache(model, max_bytes=1 << 30, cache_dir=tmp_path)
    turn(model, first, p1, plen)
    assert first.stats()["disk_writes"] == 1
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and f"-{plen}-" in files[0].name

    # a "restarted server": a new store on the same directory, nothing in memory
    second = PrefixCache(model, max_bytes=1 << 30, cache_dir=tmp_path)
    fresh = render(tok, [{"role": "user", "content": "What does the run tool do?"}])
    reused, _, *warm = turn(model, second, fresh, plen)
    assert reused == plen
    assert second.stats()["disk_loads"] == 1
    assert_same(warm, cold(model, fresh))


def test_evicted_checkpoint_reloads_from_disk(mt, tmp_path):
    model, tok = mt
    plen_main, plen_sub = prefix_len(tok), prefix_len(tok, SUBAGENT_SYSTEM)
    main = render(tok, [{"role": "user", "content": "Hello there."}])
    sub = render(tok, [{"role": "user", "content": "Find *.py files."}], SUBAGENT_SYSTEM)
    bpt = kv_bytes_per_token(model)
    budget = (max(plen_main + len(main), plen_sub + len(sub)) + 10) * bpt  # one session at a time
    store = PrefixCache(model, max_bytes=budget, cache_dir=tmp_path)
    turn(model, store, main, plen_main)
    turn(model, store, sub, plen_sub)  # evicts everything of the main session
    assert store.stats()["evictions"] >= 2
    again = render(tok, [{"role": "user", "content": "Goodbye now."}])
    reused, _, *warm = turn(model, store, again, plen_main)
    assert reused == plen_main and store.stats()["disk_loads"] == 1
    assert_same(warm, cold(model, again))


# ---------------------------------------------------------------------------------------------
# isolation: nothing a caller does to its kv reaches the store
# ---------------------------------------------------------------------------------------------


def test_fetched_kv_is_private(mt, convo):
    model, tok = mt
    p1 = convo[0]
    store = PrefixCache(model, max_bytes=1 << 30)
    turn(model, store, p1, prefix_len(tok))
    kv, reused = store.fetch(p1)
    # overwrite the last 20 positions in place with other tokens (a trimmed cache has room)
    trim_prompt_cache(kv, 20)
    prefill(model, kv, [1] * 20)
    kv2, reused2 = store.fetch(p1)
    assert reused2 == reused
    logits = prefill(model, kv2, p1[reused2:])
    assert_same((logits, greedy(model, kv2, logits)), cold(model, p1))


def test_cancelled_prefill_leaves_no_entry(mt, convo):
    model, tok = mt
    p1, p2, _ = convo
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    turn(model, store, p1, plen)
    before = store.stats()
    # request 2 is cancelled halfway through its prefill: the engine never calls store()
    kv, reused = store.fetch(p2)
    half = reused + (len(p2) - reused) // 2
    prefill(model, kv, p2[reused:half])
    del kv
    after = store.stats()
    assert (after["entries"], after["bytes"], after["tokens_stored"]) == (
        before["entries"], before["bytes"], before["tokens_stored"])
    _kv, again = store.fetch(p2)
    assert again == reused  # nothing of the cancelled half was kept


def test_store_that_raises_leaves_no_entry(mt, convo):
    model, tok = mt
    p1, p2, _ = convo
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    turn(model, store, p1, plen)
    before = store.stats()
    kv, reused = store.fetch(p2)
    prefill(model, kv, p2[reused:-10])  # kv is 9 positions short of what store() is told
    with pytest.raises(ValueError):
        store.store(p2[:-1], kv, checkpoints=[plen, len(p2) - 30])
    after = store.stats()
    assert (after["entries"], after["bytes"], after["stores"]) == (
        before["entries"], before["bytes"], before["stores"])


# ---------------------------------------------------------------------------------------------
# several sessions within one budget
# ---------------------------------------------------------------------------------------------


def test_interleaved_main_and_subagent_stay_warm(mt):
    model, tok = mt
    bpt = kv_bytes_per_token(model)
    sessions = {
        "main": (SYSTEM, ["Open the README.", "Now the Makefile.", "Summarize both."]),
        "sub": (SUBAGENT_SYSTEM, ["Pattern: *.md", "Pattern: *.toml", "Pattern: *.cfg"]),
    }
    state = {k: [] for k in sessions}
    budget = 1400 * bpt  # room for both sessions' entries and checkpoints, not much more
    store = PrefixCache(model, max_bytes=budget)
    requested = reused_total = 0
    prev = {}
    for i in range(3):
        for name, (system, users) in sessions.items():
            msgs = state[name]
            msgs.append({"role": "user", "content": users[i]})
            tokens = render(tok, msgs, system)
            reused, _, _, _out = turn(model, store, tokens, prefix_len(tok, system), gen=4)
            if i > 0:
                assert reused == min(common_prefix_len(np.array(prev[name]), np.array(tokens)), len(prev[name]) - 1)
                requested += len(tokens)
                reused_total += reused
            msgs.append({"role": "assistant", "content": f"Done step {i}."})
            prev[name] = tokens
    s = store.stats()
    assert s["evictions"] == 0 and s["bytes"] <= budget
    # every warm request reused all it shared with its session's previous one (the turns here
    # are short next to the prompt, so that is ~88% of the prompt tokens)
    assert reused_total / requested > 0.85


# ---------------------------------------------------------------------------------------------
# generated tokens
# ---------------------------------------------------------------------------------------------


def test_store_generated_reuses_the_reply(mt):
    model, tok = mt
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    msgs = [{"role": "user", "content": "Say hello in French."}]
    p1 = render(tok, msgs)
    _, _, _, out = turn(model, store, p1, plen, gen=8, store_generated=True)
    reply = tok.decode(out)
    p2 = render(tok, msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And in Spanish?"}])
    shared = common_prefix_len(np.array(list(p1) + out), np.array(p2))
    assert shared > len(p1)  # the reply re-renders to the same tokens, at least in part
    reused, _, *warm = turn(model, store, p2, plen)
    # greedy() fed every generated token back, so kv held p1 + out
    assert reused == min(shared, len(p1) + len(out), len(p2) - 1)
    assert_same(warm, cold(model, p2))


# ---------------------------------------------------------------------------------------------
# disk files are never trusted
# ---------------------------------------------------------------------------------------------


def test_corrupt_or_mismatched_files_are_ignored(mt, convo, tmp_path, caplog):
    model, tok = mt
    p1 = convo[0]
    plen = prefix_len(tok)
    writer = PrefixCache(model, max_bytes=1 << 30, cache_dir=tmp_path)
    turn(model, writer, p1, plen)
    (good,) = tmp_path.glob("*.safetensors")
    # a second prompt whose checkpoint file we forge: the right name, other content
    other_sys = SYSTEM.replace("careful", "cautious")
    p_other = render(tok, [{"role": "user", "content": "Hi."}], other_sys)
    plen_o = prefix_len(tok, other_sys)
    from warmturn.server.cache import token_hash

    forged = tmp_path / f"{writer.model_id}-{plen_o}-{token_hash(np.array(p_other[:plen_o]))}.safetensors"
    shutil.copy(good, forged)  # valid file, wrong tokens
    good.write_bytes(good.read_bytes()[:1000])  # truncated

    reader = PrefixCache(model, max_bytes=1 << 30, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="warmturn.server.cache"):
        _kv, reused = reader.fetch(p1)
        _kv2, reused2 = reader.fetch(p_other)
    assert (reused, reused2) == (0, 0)
    assert reader.stats()["disk_errors"] == 2 and reader.stats()["disk_loads"] == 0
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(good.name in m for m in msgs) and any("does not match" in m for m in msgs)


# ---------------------------------------------------------------------------------------------
# the engine's deferred store (one owned store after generation)
# ---------------------------------------------------------------------------------------------


def turn_deferred(model, store, tokens, plen, gen=N_GEN):
    """One request as the engine runs it: nothing is stored before generation; generation
    appends to kv; then kv (prompt + fed-back tokens) is handed over to the store."""
    kv, reused = store.fetch(tokens)
    if reused < len(tokens) - 1:
        prefill(model, kv, tokens[reused:-1])
    logits = prefill(model, kv, tokens[-1:])
    out = greedy(model, kv, logits, gen)
    held = (list(tokens) + out)[: kv[0].size()]
    assert len(held) == len(tokens) + gen  # greedy() fed every generated token back
    covered = store._covered(np.array(held))
    created = store.store(held, kv, checkpoints=[plen], owned=True)
    assert created == len(held) - covered  # prompt + answer, minus what was stored already
    return reused, created, logits, out


def test_deferred_owned_store_warm_equals_cold(mt, convo):
    model, tok = mt
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    prev = None
    for p in list(convo) + [convo[-1]]:  # three turns, then an exact repeat
        reused, _, *warm = turn_deferred(model, store, p, plen)
        if prev is not None:
            assert reused == min(common_prefix_len(np.array(prev), np.array(p)), len(p) - 1)
            assert reused > plen
        assert_same(warm, cold(model, p))
        prev = p
    s = store.stats()
    # one entry per turn (prompt + its greedy reply, which the next prompt does not re-render:
    # convo's assistant texts are fixed), the repeat added none, plus the checkpoint; owned
    # entries are counted at the size of the buffers they keep alive
    assert s["entries"] == 4 and s["checkpoints"] == 1
    assert s["bytes"] == sum(e.nbytes for e in store._entries.values())
    assert s["bytes"] >= sum(len(e.tokens) for e in store._entries.values()) * store.bytes_per_token
    # the checkpoint is still a compact copy that serves a new conversation
    other = render(tok, [{"role": "user", "content": "Something unrelated entirely."}])
    reused, _, *warm = turn_deferred(model, store, other, plen)
    assert reused >= plen
    assert_same(warm, cold(model, other))


def test_checkpoint_at_the_full_length_marks_the_entry(mt, convo):
    """The engine stores the system+tools prefix as soon as prefill reaches it: an entry of
    exactly that length, marked as a checkpoint (kept when a longer entry extends it)."""
    model, tok = mt
    p1 = convo[0]
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    kv = make_prompt_cache(model)
    prefill(model, kv, p1[:plen])
    assert store.store(p1[:plen], kv, checkpoints=[plen], owned=True) == plen
    assert store.stats()["checkpoints"] == 1
    turn(model, store, p1, plen)  # extends it: a non-checkpoint entry would be dropped here
    s = store.stats()
    assert (s["entries"], s["checkpoints"]) == (2, 1)
    other = render(tok, [{"role": "user", "content": "Something unrelated entirely."}])
    reused, _, *warm = turn(model, store, other, plen)
    assert reused >= plen
    assert_same(warm, cold(model, other))


# ---------------------------------------------------------------------------------------------
# take(): a conversation's entry handed over to the turn that continues it
# ---------------------------------------------------------------------------------------------


def _address(a) -> int:
    """Where an array's data lives (CPU: numpy reads MLX's buffer without copying)."""
    return np.asarray(a).__array_interface__["data"][0]


def test_take_hands_the_conversation_over_and_the_next_turn_writes_in_place(mt, convo):
    """The turn that continues a stored conversation gets the entry's own buffers (the store
    forgets it) and writes its new tokens into the room left in them, instead of a view whose
    first write copies the whole prefix; warm still equals cold, and the turn stores it back."""
    model, tok = mt
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    p1 = convo[0]
    kv = make_prompt_cache(model)
    prefill(model, kv, p1[:-1])
    room = kv[0].keys.shape[2] - kv[0].offset
    assert room > 8  # mlx-lm grows KV buffers 256 positions at a time
    address = _address(kv[0].keys)
    store.store(p1[:-1], kv, checkpoints=[plen], owned=True)
    del kv
    nxt = p1 + [tok.encode("ok", add_special_tokens=False)[0]] * 6  # continues the entry, fits the room
    kv, reused, kept = store.take(nxt)
    assert (reused, kept) == (len(p1) - 1, plen)  # only the checkpoint is left in the store
    assert store.stats()["handed_over"] == 1 and store.stats()["entries"] == 1
    assert _address(kv[0].keys) == address
    logits = prefill(model, kv, nxt[reused:])
    assert _address(kv[0].keys) == address, "written in place: no copy of the prefix"
    ref_logits, _ = cold(model, nxt)
    np.testing.assert_allclose(np.array(logits), np.array(ref_logits), rtol=1e-3, atol=2e-3)
    store.store(nxt, kv, owned=True)
    assert store.peek(nxt + [1]) == len(nxt)  # back in the store, with what the turn added


def test_take_leaves_checkpoints_and_branches_alone(mt, convo):
    model, tok = mt
    plen = prefix_len(tok)
    store = PrefixCache(model, max_bytes=1 << 30)
    p1, p2 = convo[0], convo[1]
    turn_deferred(model, store, p1, plen, gen=80)  # the conversation: p1 + an 80-token greedy answer
    entries = store.stats()["entries"]
    # a new conversation reads the checkpoint: a view, the checkpoint stays
    other = render(tok, [{"role": "user", "content": "Something unrelated entirely."}])
    _kv, reused, kept = store.take(other)
    assert reused == kept >= plen and store.stats()["entries"] == entries
    # p2 parts from the stored answer at its start (a fixed reply, not the generated one), more
    # than LEND_SLACK tokens before the entry's end: that may be another branch's, so it is
    # read through a view, not handed over
    _kv, reused, kept = store.take(p2)
    assert reused == kept and store.stats()["entries"] == entries and store.stats()["handed_over"] == 0


def test_take_leaves_a_prompt_that_siblings_share_to_all_of_them(mt, convo):
    """Subagents sent together share most of their prompt: the first one released from its
    park must not take the leader's entry (a view, the entry stays) when it parts inside the
    entry's prompt, so the next sibling reuses as much (bench scenario b: 88 tokens recomputed).
    The conversation's next turn, which holds the whole prompt and parts inside the previous
    answer, still takes it."""
    model, tok = mt
    store = PrefixCache(model, max_bytes=1 << 30)
    p = convo[0]
    kv = make_prompt_cache(model)
    prefill(model, kv, p)
    store.store(p, kv, owned=True, prompt_len=len(p))
    del kv
    ok, no = tok.encode("ok", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]
    part = len(p) - 10  # within LEND_SLACK of the entry's end, inside its prompt
    for sibling in (p[:part] + [ok] * 5, p[:part] + [no] * 5):
        _kv, reused, kept = store.take(sibling)
        assert reused == kept == part and store.stats()["handed_over"] == 0
    # the same prompt with an 8-token answer: a next turn that re-renders the answer differently
    answer = [ok] * 8
    kv = make_prompt_cache(model)
    prefill(model, kv, p + answer)
    store.store(p + answer, kv, owned=True, prompt_len=len(p))
    del kv
    _kv, reused, kept = store.take(p + [no] * 3 + [ok] * 4)
    assert reused == len(p) and store.stats()["handed_over"] == 1
