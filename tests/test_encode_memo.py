"""server/encode_memo.py: a prompt that starts with an earlier one is tokenized from where the
earlier one's last special token ends, and the tokens are exactly the whole-text tokens.

Real parts: the default model's tokenizer and the bench's Claude-Code-shaped session (its
requests grow by appending, as Claude Code's do)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmturn.server import wire
from warmturn.server.encode_memo import MIN_CHARS, EncodeMemo, MemoEncoder
from warmturn.server.render import Renderer


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model_dir)


def _session(model_dir):
    from warmturn.bench import workload

    return workload.build_session(workload.load_fixture(), 1200, workload.make_counter(model_dir), main_turns=4)


def test_session_renders_the_same_tokens_and_reuses_the_previous_prompt(tokenizer, model_dir):
    memo = EncodeMemo()
    fast = Renderer(tokenizer, "tools-first", memo=memo)
    whole = Renderer(tokenizer, "tools-first")
    whole.encoder.enabled = False
    assert fast.encoder.enabled, "the default tokenizer passes the self-test"
    reused_before = 0
    for i, br in enumerate(_session(model_dir).requests):
        req = wire.parse_messages_request(wire.decode_json(json.dumps(br.body).encode()))
        got, want = fast.render(req), whole.render(req)
        assert got.tokens == want.tokens, br.name
        assert got.prefix_len == want.prefix_len > 0, br.name
        if i:  # every later request starts with an earlier one: most of it is reused
            assert memo.reused_tokens - reused_before >= len(want.tokens) // 2, br.name
        reused_before = memo.reused_tokens


def test_renderer_copies_share_the_memo(tokenizer, model_dir):
    from warmturn.server.state import RendererPool

    base = Renderer(tokenizer, "tools-first")
    pool = RendererPool(base, size=2)
    reqs = [wire.parse_messages_request(wire.decode_json(json.dumps(br.body).encode()))
            for br in _session(model_dir).requests[:2]]
    r1 = pool._take()  # the base renderer, held: the next request gets a new copy
    try:
        pool.render(reqs[0])
    finally:
        pool._free.put(r1)
    hits = base.memo.hits
    r1.render(reqs[1])
    assert base.memo.hits > hits


def test_renderer_pool_fills_at_start(tokenizer, model_dir):
    """fill() makes every tokenizer copy up front (the first concurrent requests then take one
    instead of copying), and no more than the pool's size."""
    from warmturn.server.state import RendererPool

    base = Renderer(tokenizer, "tools-first")
    base.history_marks = True
    pool = RendererPool(base, size=3)
    pool.fill()
    held = [pool._take() for _ in range(3)]
    assert len({id(r.tokenizer) for r in held}) == 3 and base in held
    assert all(r.history_marks and r.memo is base.memo for r in held)
    assert pool._grow() is None  # full: a fourth request waits for a free one
    req = wire.parse_messages_request(wire.decode_json(json.dumps(_session(model_dir).requests[0].body).encode()))
    assert held[1].render(req).tokens == held[2].render(req).tokens == base.render(req).tokens


BLOCK = "You are a coding assistant.\n" * (MIN_CHARS // 20)
pieces = st.text(alphabet=st.sampled_from(list("ab \n\t1é✓<|>_")), max_size=12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(pieces, st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", ""])),
                min_size=1, max_size=6))
def test_growing_texts_compose_exactly(tokenizer, parts):
    """Texts that grow by appending, with special tokens anywhere (or none): memo == whole."""
    enc = MemoEncoder(tokenizer, EncodeMemo())
    assert enc.enabled
    text = BLOCK + "<|im_start|>"
    for piece, special in parts:
        text += piece + special
        assert enc.encode(text) == list(tokenizer.encode(text, add_special_tokens=False)), repr(text[-40:])


def test_a_tokenizer_without_clean_special_tokens_tokenizes_whole(tokenizer):
    class Slow:  # what a tokenizer without a fast backend looks like to the memo
        is_fast = False

        def encode(self, text, add_special_tokens=False):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    enc = MemoEncoder(Slow(), EncodeMemo())
    assert not enc.enabled
    text = BLOCK + "<|im_end|>x"
    assert enc.encode(text) == list(tokenizer.encode(text, add_special_tokens=False))
    assert enc.memo.hits == 0 and not enc.memo._entries
