"""Bookkeeping of the prefix cache (LRU, budget, pruning, disk validation) on a tiny random
llama: the same mlx-lm code paths as the real model, in milliseconds."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache

from tests.tiny import tiny_model
from warmturn.server.cache import PrefixCache, common_prefix_len, kv_bytes_per_token, prefill


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def put(store, model, tokens, checkpoints=()):
    """The engine's flow for one request, without generation."""
    kv, reused = store.fetch(tokens)
    if reused < len(tokens) - 1:
        prefill(model, kv, tokens[reused:-1])
    return reused, store.store(tokens[:-1], kv, checkpoints)


def cold_keys(model, tokens):
    kv = make_prompt_cache(model)
    prefill(model, kv, tokens)
    return kv


def test_kv_bytes_per_token_tiny(model):
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 8 * 4  # layers x K,V x kv heads x head dim x f32


def test_lru_keeps_the_recently_used_entry(model):
    bpt = kv_bytes_per_token(model)
    store = PrefixCache(model, max_bytes=65 * bpt, min_checkpoint=1)
    a, b, c = ([k] + list(range(10, 40)) for k in (1, 2, 3))  # 31 tokens, 30 stored each
    put(store, model, a)
    put(store, model, b)
    assert store.fetch(a)[1] == 30  # touches a
    put(store, model, c)  # over budget: b, the least recently used, goes
    assert store.stats()["evictions"] == 1
    assert store.fetch(a)[1] == 30 and store.fetch(c)[1] == 30
    assert store.fetch(b)[1] == 0


def test_entry_larger_than_budget_is_rejected(model, caplog):
    bpt = kv_bytes_per_token(model)
    store = PrefixCache(model, max_bytes=20 * bpt)
    with caplog.at_level(logging.WARNING, logger="warmturn.server.cache"):
        _reused, created = put(store, model, list(range(1, 40)))
    # nothing was kept, so nothing counts as created (usage reports cache_creation 0)
    assert created == 0 and store.stats()["rejected"] == 1
    assert store.stats()["entries"] == 0 and store.stats()["bytes"] == 0
    assert "exceed the budget" in caplog.text


def test_extension_drops_the_superseded_entry_but_keeps_the_checkpoint(model):
    store = PrefixCache(model, max_bytes=1 << 24, min_checkpoint=4)
    base = list(range(1, 21))
    put(store, model, base + [30, 31, 32], checkpoints=[20])
    put(store, model, base + [30, 31, 32, 33, 34, 35], checkpoints=[20])
    s = store.stats()
    assert (s["entries"], s["checkpoints"]) == (2, 1)
    assert s["tokens_cached"] == 20 + 25
    # a request sharing only the checkpoint's 20 tokens reuses exactly them
    assert store.fetch(base + [40, 41])[1] == 20


def test_created_counts_only_new_tokens(model):
    store = PrefixCache(model, max_bytes=1 << 24)
    assert put(store, model, list(range(1, 31))) == (0, 29)
    assert put(store, model, list(range(1, 31)) + [5, 6, 7]) == (29, 3)
    assert put(store, model, list(range(1, 31)) + [5, 6, 7]) == (32, 0)


def test_file_from_another_model_is_ignored(tmp_path, caplog):
    a, b = tiny_model(1), tiny_model(2)
    writer = PrefixCache(a, max_bytes=1 << 24, cache_dir=tmp_path)
    reader = PrefixCache(b, max_bytes=1 << 24, cache_dir=tmp_path)
    assert writer.model_id != reader.model_id
    toks = list(range(1, 40))
    put(writer, a, toks, checkpoints=[20])
    (f,) = tmp_path.glob("*.safetensors")
    # rename it as if the other model had written it: the metadata still tells the truth
    f.rename(tmp_path / f.name.replace(writer.model_id, reader.model_id))
    reader2 = PrefixCache(b, max_bytes=1 << 24, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="warmturn.server.cache"):
        assert reader2.fetch(toks)[1] == 0
    assert "written for model" in caplog.text and reader2.stats()["disk_errors"] == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(1, 4), min_size=2, max_size=12), st.integers(0, 12)),
    min_size=1, max_size=8,
))
def test_random_sessions_keep_the_invariants(model, ops):
    """Random requests over 4 shared stems: the budget holds, the byte count is exact, reuse
    is capped, and every fetched KV equals a cold computation of the same tokens."""
    bpt = kv_bytes_per_token(model)
    stems = [[s + 5] * 3 + list(range(20, 30)) for s in range(4)]
    store = PrefixCache(model, max_bytes=40 * bpt, min_checkpoint=4)
    for stem, tail, ck in ops:
        tokens = stems[stem] + tail
        kv, reused = store.fetch(tokens)
        assert 0 <= reused <= len(tokens) - 1 and kv[0].size() == reused
        if reused:
            ref = cold_keys(model, tokens[:reused])
            for got, want in zip(kv, ref, strict=True):
                np.testing.assert_allclose(np.array(got.keys[..., :reused, :]),
                                           np.array(want.keys[..., :reused, :]), rtol=1e-4, atol=1e-5)
        if reused < len(tokens) - 1:
            prefill(model, kv, tokens[reused:-1])
        store.store(tokens[:-1], kv, checkpoints=[ck])
        s = store.stats()
        assert s["bytes"] <= s["max_bytes"]
        assert s["bytes"] == sum(e.nbytes for e in store._entries.values())
        assert s["bytes"] == s["tokens_cached"] * bpt
    # what is stored is found again: the longest stored prefix of any stem is reused
    for e in list(store._entries.values()):
        probe = list(e.tokens) + [49]
        assert store.fetch(probe)[1] >= min(len(e.tokens), len(probe) - 1)
        assert common_prefix_len(e.tokens, np.array(probe)) == len(e.tokens)


def test_sessions_parting_inside_the_prefix_get_a_shared_checkpoint(model, tmp_path):
    """Two sessions whose system turn differs only at its end (cwd, git status): the shared
    part becomes a checkpoint, persisted, so a third session after a restart reuses it."""
    shared = list(range(1, 25))
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    put(store, model, shared + [30, 31] + [40, 41, 42], checkpoints=[26])
    put(store, model, shared + [32, 33] + [40, 41, 42], checkpoints=[26])
    assert store.stats()["checkpoints"] == 3
    assert sorted(int(f.name.split("-")[1]) for f in tmp_path.glob("*.safetensors")) == [24, 26, 26]
    restarted = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    third = shared + [34, 35] + [40, 41, 42]
    kv, reused = restarted.fetch(third)
    assert reused == 24 and restarted.stats()["disk_loads"] == 1
    for got, want in zip(kv, cold_keys(model, shared), strict=True):
        np.testing.assert_allclose(np.array(got.keys), np.array(want.keys[..., :24, :]), rtol=1e-4, atol=1e-5)


def test_disk_budget_removes_the_least_recently_used_files(model, tmp_path):
    import os
    import time

    bpt = kv_bytes_per_token(model)
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4, max_disk_bytes=45 * bpt)
    firsts = []
    for k in range(3):  # three unrelated 20-token checkpoints; files hold 20 tokens + a header
        toks = [k + 1] * 20 + [40, 41, 42]
        put(store, model, toks, checkpoints=[20])
        firsts.append(toks)
        newest = max(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        os.utime(newest, (time.time() - 100 + k, time.time() - 100 + k))  # distinct ages
    files = list(tmp_path.glob("*.safetensors"))
    assert store.stats()["disk_evictions"] >= 1
    assert sum(f.stat().st_size for f in files) <= 45 * bpt
    restarted = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    assert restarted.fetch(firsts[-1] + [7])[1] >= 20  # the newest survived
    assert restarted.fetch(firsts[0] + [7])[1] == 0  # the oldest went
