"""What a model's KV cache can do, whatever its family: pure helpers over mlx-lm's cache classes.

``make_prompt_cache(model)`` gives one cache per layer, and the type follows the layer:

- ``KVCache`` (full attention) holds every position: a prefix of it is a slice. These leaves
  are *sliceable*: one stored cache serves every shorter prefix it contains.
- ``RotatingKVCache`` (sliding window) holds only the last window; ``ArraysCache`` (linear
  attention, Mamba, short convolutions) holds one running state; ``ChunkedKVCache`` and
  ``QuantizedKVCache`` are read through their own state. None of them can be cut back to an
  arbitrary earlier position once they have moved past it. These leaves are *stateful*: to
  resume at position p the store needs a copy of their state taken at exactly p (a *mark*).
- ``CacheList`` puts several of the above in one layer (Falcon-H1: Mamba beside attention);
  the helpers here work on its leaves.

So a stored conversation is the sliceable leaves at full length plus, for stateful leaves, their
state at the full length and at a few marked positions (end of system+tools, end of the last
message, end of the prompt). A stateful leaf's state is small (a Mamba state is constant, a
window is bounded by the window), so marks are cheap.

The number of tokens a cache holds is never a layer's ``size()`` (a window reports its window,
an ``ArraysCache`` 0): it is the count of tokens fed, which attention leaves keep as ``offset``
and which the engine keeps itself (see :func:`fed_tokens`).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import CacheList, KVCache


def leaves(kv: list[Any]) -> Iterator[Any]:
    """Every leaf cache of ``kv`` in order (the caches inside a ``CacheList`` in its place)."""
    for c in kv:
        if isinstance(c, CacheList):
            yield from leaves(list(c.caches))
        else:
            yield c


def is_sliceable(c: Any) -> bool:
    """A plain full-attention cache: any prefix of it is a slice of its buffers."""
    return type(c) is KVCache


def has_stateful(kv: list[Any]) -> bool:
    """Whether resuming at an earlier position needs a mark (any leaf is not sliceable)."""
    return any(not is_sliceable(c) for c in leaves(kv))


def fed_tokens(kv: list[Any]) -> int | None:
    """Tokens fed into ``kv`` so far, read from the attention leaves' ``offset`` (a window cache's
    offset counts every token, not the window), or None when no leaf keeps a count (a model of
    state-space layers only: the caller's own count is then the only one)."""
    counts = [c.offset for c in leaves(kv) if isinstance(getattr(c, "offset", None), int)]
    return max(counts) if counts else None


def nbytes(kv: list[Any]) -> int:
    return int(sum(c.nbytes for c in kv))


def _private(c: Any) -> Any:
    """A copy of one stateful leaf that shares no array object with ``c`` (MLX copies on write,
    but in-place updates of a shared array object would reach both), evaluated."""
    out = copy.deepcopy(c)
    mx.eval(list(_arrays(out.state)))
    return out


def _arrays(tree: Any) -> Iterator[mx.array]:
    if isinstance(tree, mx.array):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _arrays(t)


def _slice(c: Any, n: int, contiguous: bool) -> Any:
    s = KVCache()  # type: ignore[no-untyped-call]  # (mlx-lm is untyped)
    if c.keys is not None and n > 0:
        s.keys = c.keys[..., :n, :]
        s.values = c.values[..., :n, :]
        if contiguous:
            s.keys, s.values = mx.contiguous(s.keys), mx.contiguous(s.values)
    s.offset = n
    return s


def _rebuild(kv: list[Any], make_leaf: Callable[[int, Any], Any]) -> list[Any]:
    """A new cache list shaped like ``kv`` whose leaves are ``make_leaf(i, leaf)`` (i counts leaves)."""
    counter = iter(range(1 << 30))

    def one(c: Any) -> Any:
        if isinstance(c, CacheList):
            return CacheList(*(one(x) for x in c.caches))  # type: ignore[no-untyped-call]
        return make_leaf(next(counter), c)

    return [one(c) for c in kv]


def take_mark(kv: list[Any]) -> list[Any | None] | None:
    """The state of ``kv``'s stateful leaves now (private copies; None for sliceable leaves), or
    None when every leaf is sliceable and no mark is needed."""
    ls = list(leaves(kv))
    if all(is_sliceable(c) for c in ls):
        return None
    return [None if is_sliceable(c) else _private(c) for c in ls]


def mark_nbytes(mark: list[Any | None] | None) -> int:
    return int(sum(c.nbytes for c in mark or () if c is not None))


def compact(kv: list[Any], n: int) -> list[Any]:
    """A private copy of ``kv`` holding exactly ``n`` tokens: sliceable leaves cut to ``n`` and
    made contiguous; stateful leaves copied as they are (the caller guarantees they hold ``n``)."""
    out = _rebuild(kv, lambda _i, c: _slice(c, n, True) if is_sliceable(c) else _private(c))
    mx.eval([a for c in leaves(out) if is_sliceable(c) and c.keys is not None for a in (c.keys, c.values)])
    return out


def owned(kv: list[Any], n: int) -> list[Any]:
    """``kv`` (all sliceable leaves) kept as it is, buffers whole, but at position ``n``: new
    KVCache objects over the same arrays, so that a caller it is handed back to writes its next
    tokens into the room left in them, in place."""
    def leaf(_i: int, c: Any) -> Any:
        s = KVCache()  # type: ignore[no-untyped-call]  # (mlx-lm is untyped)
        s.keys, s.values, s.offset = c.keys, c.values, n if c.keys is not None else 0
        return s

    return _rebuild(kv, leaf)


def view(kv: list[Any], n: int, mark: list[Any | None] | None = None) -> list[Any]:
    """A cache for the caller at position ``n`` of a stored ``kv``: sliceable leaves are new array
    objects sliced from the stored buffers (no copy up front); stateful leaves are private copies
    of ``mark`` (their state at ``n``) or, without one, of ``kv``'s own (which must be at ``n``)."""
    src = mark or [None] * len(list(leaves(kv)))
    return _rebuild(kv, lambda i, c: _slice(c, n, False) if is_sliceable(c) else _private(src[i] or c))


# ---------------------------------------------------------------------------------------------
# The family of a model, and the reuse policy that follows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What a model's cache is made of, for the start-up line, /health and the metrics."""

    name: str  # "attention" | "sliding-window" | "hybrid" | "other"
    layers: dict[str, int]  # leaf class name -> count
    policy: str  # one sentence: how the store reuses this cache

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.name, "layers": dict(self.layers), "policy": self.policy}


def family_of(kv: list[Any]) -> Family:
    """Classify a fresh ``make_prompt_cache(model)``."""
    counts = Counter(type(c).__name__ for c in leaves(kv))
    kinds = set(counts)
    if kinds <= {"KVCache"}:
        return Family("attention", dict(counts),
                      "every prefix of a stored prompt is reusable (full-attention KV is cut back to any length)")
    if kinds <= {"KVCache", "RotatingKVCache"}:
        name = "sliding-window"
    elif "ArraysCache" in kinds:
        name = "hybrid"
    else:
        name = "other"
    return Family(name, dict(counts),
                  "window/state layers cannot be cut back: reuse resumes at marked points (end of "
                  "system+tools, end of each request's last message, end of its prompt) or at a "
                  "stored prompt+answer the new prompt contains whole")
