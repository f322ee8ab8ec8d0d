"""A model of the server's prefix KV store (``warmturn/server/cache.py``), on token lists only.

The same rules as ``PrefixCache``, without MLX: longest-prefix match, reuse capped at
``len(tokens) - 1`` (the last token is always computed, for its logits), checkpoint entries
pinned against the pruning of entries a newer one extends, a branch point where a new
checkpoint parts from a stored one, LRU eviction under a byte budget, checkpoints written to a
disk budget and loaded back when memory no longer has them. Entry sizes come from
:class:`~warmturn.analysis.kvsize.KVCost`, so a model with window or linear layers costs what
its real cache would.

The family policy decides what a stored entry can give back (docs/cache.md, "The policy"):

* ``trimmable`` (plain KV): any prefix of any entry;
* ``checkpoints`` (sliding-window and linear-attention families, which cannot be cut back): an
  entry resumes only at its full length or at a *mark*, the state of its window/state layers
  kept where a later request may branch off: the end of system+tools (also its own checkpoint
  entry), the end of the history before the generation prompt, the end of the prompt but its
  last token. A mark costs only those layers' state. An entry a newer one extends hands its
  marks and its own end over to it; at most 8 marks per entry (the earliest and the latest).

``slots`` caps the number of conversation entries (checkpoints not counted), like a server
with a fixed number of sequence slots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from warmturn.prefix import branch_points, common_prefix_len

from .kvsize import KVCost

Policy = Literal["trimmable", "checkpoints"]
MIN_CHECKPOINT = 16  # PrefixCache's min_checkpoint
MAX_MARKS = 8  # PrefixCache's MAX_MARKS


def _key(q: np.ndarray) -> str:
    return hashlib.sha256(q.astype(np.int32).tobytes()).hexdigest()[:32]


@dataclass
class _Entry:
    tokens: np.ndarray
    nbytes: int
    checkpoint: bool
    last_used: float
    marks: set[int] = field(default_factory=set)  # resumable positions besides the full length


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_loads: int = 0
    disk_evictions: int = 0
    rejected: int = 0


@dataclass
class CacheModel:
    """The store: ``fetch(tokens, now) -> reused`` and ``store(tokens, checkpoints, now)``."""

    cost: KVCost
    ram_bytes: int
    disk_bytes: int = 0
    policy: Policy = "trimmable"
    slots: int | None = None
    min_checkpoint: int = MIN_CHECKPOINT
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._disk: dict[str, _Entry] = {}
        self._bytes = 0

    @property
    def trimmable(self) -> bool:
        return self.policy == "trimmable"

    # -- lookups

    def _usable(self, e: _Entry, q: np.ndarray, limit: int) -> int:
        usable = min(common_prefix_len(e.tokens, q), limit)
        if self.trimmable or usable >= len(e.tokens):
            return usable
        return max((p for p in e.marks if p <= usable), default=0)

    def _mark_bytes(self, p: int) -> int:
        """A mark keeps the window/state layers only (the full-attention layers are the entry's)."""
        return self.cost.nbytes(p) - int(self.cost.per_token * p)

    def peek(self, tokens: Sequence[int]) -> int:
        """What a fetch would reuse from memory now (no counters, nothing touched)."""
        q = np.asarray(tokens, dtype=np.int64)
        limit = len(q) - 1
        return max((self._usable(e, q, limit) for e in self._entries.values()), default=0)

    def fetch(self, tokens: Sequence[int], now: float) -> int:
        """Tokens of ``tokens`` served from the store (memory, then disk), capped at len - 1."""
        q = np.asarray(tokens, dtype=np.int64)
        limit = len(q) - 1
        best, best_n = None, 0
        for e in self._entries.values():
            cp = common_prefix_len(e.tokens, q)
            if cp == len(e.tokens) and cp <= limit:
                e.last_used = now  # fully contained entries (checkpoints) stay warm
            usable = self._usable(e, q, limit)
            if usable > best_n or (usable == best_n and best is not None and len(e.tokens) < len(best.tokens)):
                best, best_n = e, usable
        if self._disk:
            for e in sorted(self._disk.values(), key=lambda d: -len(d.tokens)):
                n = len(e.tokens)
                if best_n < n <= limit and common_prefix_len(e.tokens, q) == n:
                    e.last_used = now
                    loaded = _Entry(e.tokens, e.nbytes, True, now)
                    self._add(loaded)
                    self.counters.disk_loads += 1
                    best, best_n = loaded, n
                    break
        if best is None or best_n == 0:
            self.counters.misses += 1
            return 0
        best.last_used = now
        self.counters.hits += 1
        return best_n

    # -- storing

    def store(self, tokens: Sequence[int], checkpoints: Sequence[int], now: float,
              marks: Sequence[int] = ()) -> None:
        """Keep ``tokens`` as an entry plus a pinned checkpoint at each length in ``checkpoints``
        (one equal to ``len(tokens)`` marks the entry itself), as ``PrefixCache.store`` does.
        ``marks``: positions where the ``checkpoints`` policy can resume this entry (ignored when
        trimmable); a checkpoint needs a mark there (or to be the whole entry)."""
        q = np.asarray(tokens, dtype=np.int64)
        n = len(q)
        if n == 0:
            return
        own = set() if self.trimmable else {int(p) for p in marks if 0 < int(p) < n}
        cps = {int(c) for c in checkpoints if self.min_checkpoint <= int(c) < n}
        whole = any(int(c) == n for c in checkpoints) and n >= self.min_checkpoint
        cps |= self._branch_points(q, cps | ({n} if whole else set()))
        if not self.trimmable:
            cps &= own  # no state kept there: the checkpoint is skipped, as the server does
        for p in sorted(cps):
            self._commit(q[:p], True, now)
        self._commit(q, whole, now, own)

    def _branch_points(self, q: np.ndarray, cps: set[int]) -> set[int]:
        """Where a new checkpoint parts from a stored one (warmturn.prefix.branch_points)."""
        return branch_points(q, cps, (e.tokens for e in self._entries.values() if e.checkpoint), self.min_checkpoint)

    def _commit(self, q: np.ndarray, checkpoint: bool, now: float, marks: set[int] = frozenset()) -> None:
        key = _key(q)
        existing = self._entries.get(key)
        if existing is not None and np.array_equal(existing.tokens, q):
            existing.last_used = now
            existing.checkpoint = existing.checkpoint or checkpoint
            self._bytes -= existing.nbytes
            existing.marks |= marks
            self._bound_marks(existing)
            self._bytes += existing.nbytes
            if checkpoint:
                self._save(existing)
            return
        if self.cost.nbytes(len(q)) > self.ram_bytes:
            self.counters.rejected += 1
            return
        entry = _Entry(q.copy(), 0, checkpoint, now, set(marks))
        # a non-checkpoint entry this one extends is redundant: the new one resumes wherever it could
        # (trimmable: anywhere; else at its marks and its end, which become marks of the new entry)
        for k, e in list(self._entries.items()):
            if not e.checkpoint and len(e.tokens) < len(q) and np.array_equal(e.tokens, q[: len(e.tokens)]):
                if not self.trimmable:
                    entry.marks |= e.marks | {len(e.tokens)}
                self._drop(k)
        self._bound_marks(entry)
        self._add(entry)
        if checkpoint:
            self._save(entry)

    def _bound_marks(self, e: _Entry) -> None:
        """At most MAX_MARKS marks (the earliest, where other conversations branch off, and the
        latest ones), their bytes counted in the entry's."""
        if len(e.marks) > MAX_MARKS:
            ps = sorted(e.marks)
            e.marks = {ps[0], *ps[len(ps) - MAX_MARKS + 1:]}
        e.nbytes = self.cost.nbytes(len(e.tokens)) + sum(self._mark_bytes(p) for p in e.marks)

    def _add(self, entry: _Entry) -> None:
        key = _key(entry.tokens)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict(keep=key)

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key)
        self._bytes -= e.nbytes

    def _evict(self, keep: str) -> None:
        def over() -> bool:
            if self._bytes > self.ram_bytes:
                return True
            convs = sum(not e.checkpoint for e in self._entries.values())
            return self.slots is not None and convs > self.slots

        while over() and len(self._entries) > 1:
            slots_only = self._bytes <= self.ram_bytes
            pool = [k for k, e in self._entries.items() if k != keep and not (slots_only and e.checkpoint)]
            if not pool:
                break
            victim = min(pool, key=lambda k: self._entries[k].last_used)
            self._drop(victim)
            self.counters.evictions += 1

    def _save(self, e: _Entry) -> None:
        if self.disk_bytes <= 0 or e.nbytes > self.disk_bytes:
            return
        key = _key(e.tokens)
        self._disk[key] = _Entry(e.tokens, e.nbytes, True, e.last_used)
        while sum(d.nbytes for d in self._disk.values()) > self.disk_bytes and len(self._disk) > 1:
            victim = min((k for k in self._disk if k != key), key=lambda k: self._disk[k].last_used)
            del self._disk[victim]
            self.counters.disk_evictions += 1

    # -- state

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
