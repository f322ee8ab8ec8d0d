"""The engine's side of the cross-request KV store: every call the solo and batch paths make to
it, with the rules they share written once (server/cache.py is the store itself).

- The store is told the tokens a cache was *fed* (``kvfamily.fed_tokens``: the attention leaves'
  count; the engine's own count where no leaf keeps one), never a layer's ``size()``.
- A store that fails is one warning line: a cache that could not be kept never fails the
  request that computed it.
- Window and state caches (server/kvfamily.py) resume only where a mark was taken: the keeper
  takes one at each of a request's mark points (GenerationRequest.mark_points).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from warmturn.server.kvfamily import fed_tokens, view
from warmturn.server.lifecycle import Flight

log = logging.getLogger("warmturn.server.engine")


class PromptCacheStore(Protocol):
    """Everything the engine calls on the cross-request KV store (``server.cache.PrefixCache``)."""

    #: some cache leaf cannot be cut back (window and state families): a prompt resumes only at an
    #: entry's end or a mark, so the engine takes marks (:meth:`mark`)
    stateful: bool

    def take(self, tokens: Sequence[int]) -> tuple[list[Any], int, int]:
        """Return (kv, reused, kept): a per-layer mlx-lm KV cache list that the caller now owns and
        may mutate (never an object the store still writes to), already holding the KV state of
        tokens[:reused]. Always reused <= len(tokens) - 1, so at least the last token is computed
        (an exact repeat is a full hit that recomputes only the last token). ``kept`` of the
        reused tokens are still in the store: when ``tokens`` continue a stored conversation the
        store may hand that entry over instead of a copy (kept 0), and the caller stores it back
        (with what it adds) when the request ends or is stopped."""
        ...

    def store(self, tokens: Sequence[int], kv: list[Any], checkpoints: Sequence[int] = (),
              *, owned: bool = False, marks: dict[int, Any] | None = None, prompt_len: int | None = None) -> int:
        """Keep the KV state of `tokens` (the tokens fed into kv; full-attention kv may hold more
        positions, only len(tokens) count), plus a separate, pinned entry at each length in
        `checkpoints` (the end of the system+tools prefix; a checkpoint equal to len(tokens)
        marks the entry itself). ``marks``: :meth:`mark` results taken at earlier positions.
        ``owned=True``: the caller hands kv over and never touches it again, so the store may
        keep kv's buffers instead of copying them. ``prompt_len``: of `tokens`, those that were the
        request's prompt (the rest its answer; None: all). Returns the number of tokens newly covered."""
        ...

    def mark(self, kv: list[Any]) -> Any:
        """What ``store(..., marks={position: mark})`` needs to resume later at the position kv
        holds now (window and state leaves), or None when the model needs none."""
        ...

    def admits(self, n_tokens: int) -> bool:
        """Whether an entry of ``n_tokens`` tokens fits the store's budget at all."""
        ...

    def peek(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` a fetch would reuse from memory right now (no copy, no
        counters): the scheduler's estimate of the prompt still to compute."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for /metrics and the log: hits, misses, evictions, bytes, entries, ..."""
        ...


class Keeper:
    """The engine's calls to ``store`` (None: no cross-request cache, ``--no-cache``)."""

    def __init__(self, store: PromptCacheStore | None, make_cache: Callable[[], list[Any]]) -> None:
        self.store = store
        self.make_cache = make_cache
        # window and state caches resume only where a mark was taken
        self.marks = store is not None and store.stateful

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any], int, int]:
        """(kv, reused, kept) from the store's :meth:`~PromptCacheStore.take` (a fresh cache, 0, 0
        without a store); the flight stores a handed-over entry back when it ends, is stopped or
        leaves the batch."""
        if self.store is None:
            return self.make_cache(), 0, 0
        return self.store.take(tokens)

    def peek(self, tokens: Sequence[int]) -> int:
        return self.store.peek(tokens) if self.store is not None else 0

    def created(self, f: Flight) -> int:
        """Prompt tokens ``f`` computed that the store will hold (cache_creation)."""
        if self.store is None or not self.store.admits(len(f.tokens)):
            return 0
        return len(f.tokens) - 1 - f.reused

    def put(self, tokens: Sequence[int], kv: list[Any], **kwargs: Any) -> bool:
        """store() whose failure is logged and skipped."""
        if self.store is None:
            return False
        try:
            self.store.store(tokens, kv, **kwargs)
            return True
        except Exception as e:
            log.warning("prefix cache: %d tokens not stored: %s", len(tokens), e, exc_info=log.isEnabledFor(logging.DEBUG))
            return False

    def hand_over(self, f: Flight, held: Sequence[int], kv: list[Any], checkpoints: Sequence[int] = (),
                  exact: bool = False) -> bool:
        """Give an extracted cache (never used again) to the store, told the tokens it was fed: its
        attention leaves' count, or ``len(held)`` when the caller knows kv holds exactly those
        (``exact``: a prompt being read; an answer's last token may not have been fed yet)."""
        fed = fed_tokens(kv)
        if fed is None and exact:
            fed = len(held)
        if fed is None:
            log.debug("prefix cache: token count of an extracted cache unknown, not stored")
            return False
        return self.put(list(held)[:fed], kv, checkpoints=checkpoints, owned=True, marks=f.marks,
                        prompt_len=len(f.tokens))

    def share(self, f: Flight) -> None:
        """Store what ``f`` holds outside the batch (solo, or waiting with part of its prompt read)
        for others to fetch: a copy, since f goes on with its cache."""
        if f.kv is None or f.in_cache <= f.covered:
            return
        kv, n = f.kv, f.in_cache
        if self.marks and f.fed != n:
            # answering already: its state is past the prompt; resume from the last mark in it
            n = max((p for p in f.marks if p <= f.in_cache), default=0)
            if n <= f.covered:
                return
            kv = view(f.kv, n, f.marks[n])
        if self.put(f.tokens[:n], kv, marks={p: m for p, m in f.marks.items() if p < n}):
            f.shared = n

    def take_mark(self, f: Flight, kv: list[Any] | Callable[[], list[Any]]) -> None:
        """At a point later requests may resume at, keep what a window or state cache needs to
        resume there. ``kv`` may be a function that extracts it (only called when needed)."""
        p = f.in_cache
        if not self.marks or p <= f.reused or p in f.marks or p not in f.req.mark_points():
            return
        try:
            f.marks[p] = self.store.mark(kv() if callable(kv) else kv)
        except Exception as e:  # noqa: BLE001 - a mark that fails only loses that resume point
            log.warning("prefix cache: no resume point at %d tokens: %s", p, e)
