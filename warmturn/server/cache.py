"""Cross-request prefix KV cache: the one stateful structure between requests.

The engine (server/engine.py) talks to this module only through its ``PromptCacheStore``
protocol: ``fetch(tokens) -> (kv, reused)``, ``store(tokens, kv, checkpoints, owned=) ->
created`` and ``stats()``. The engine's batch works on its own copies of the KV state
(mlx-lm's ``BatchKVCache``); what it stores is a cache extracted from the batch that it hands
over (``owned=True``), so the store keeps those buffers as they are.

Why not mlx-lm's ``LRUPromptCache`` as is (models/cache.py)? It is the right idea and this
class keeps its rules (longest-prefix match, trim a longer entry back to the shared length,
drop an entry that a newer one extends, LRU under a byte budget), but it falls short here:

- ``insert_cache`` removes every stored prefix of a new entry, so a system+tools checkpoint
  cannot live as its own entry: once the conversation entry that contains it is evicted, a
  new session finds nothing. Checkpoints here are separate, pinned against that pruning.
- It deep-copies the whole stored buffer on every fetch. Here fetch hands out fresh array
  objects that are slices of the stored buffers (MLX copies on write, so a writer never
  touches the stored data, see ``test_fetched_kv_is_private``) and costs no copy up front.
  Entries keep the buffers the caller handed over (``owned=True``: counted at their full
  size) or a compact copy of exactly ``len(tokens)`` positions (checkpoints, and callers
  that keep using their cache).
- An exact repeat returns an entry with nothing left to compute; the engine needs at least
  the last token to produce logits, so fetch here caps reuse at ``len(tokens) - 1``.
- No counters (hits, misses, evictions) and no persistence.

The match itself is a linear scan with a vectorised numpy comparison per entry. With the
tens of entries a byte budget allows, that costs microseconds, so a trie (mlx-lm's
``PromptTrie``) would add code without saving time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from warmturn.prefix import branch_points, common_prefix_len
from warmturn.server import kvfamily
from warmturn.server.cache_disk import DiskCache, token_hash

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def default_cache_bytes() -> int:
    """A byte budget for the KV store: a third of the memory available now, clamped to
    [512 MiB, 64 GiB]. Falls back to 2 GiB when the available memory cannot be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 2 << 30
    return int(min(max(avail // 3, 512 << 20), 64 << 30))


def model_identity(model: Any) -> str:
    """A 16-hex fingerprint of a loaded model: parameter names, shapes and dtypes plus a few
    values of each of the first and of the last parameters. Two different checkpoints of one architecture
    get different identities, so a KV file of one model is never loaded into another (a fine-tune of the top
    layers only, like the default model's Read adapter, differs in the last ones)."""
    h = hashlib.sha256()
    params = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))  # (mlx's annotation allows a dict)
    for i, (name, arr) in enumerate(params):
        h.update(f"{name}:{tuple(arr.shape)}:{arr.dtype};".encode())
        if i < 8 or i >= len(params) - 8:
            sample = arr.reshape(-1)[:64].astype(mx.float32)
            h.update(np.array(sample).tobytes())
    return h.hexdigest()[:16]


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token costs for this model, measured by a one-token forward pass: the
    attention leaves' bytes for one position (46,080 for SmolLM2-135M in float32). State leaves
    (Mamba, linear attention) cost the same at any length and are not counted; a window costs
    this per token up to its window."""
    kv = make_prompt_cache(model)
    model(mx.array([[0]]), cache=kv)
    total = 0.0
    for c in kvfamily.leaves(kv):
        if isinstance(getattr(c, "offset", None), int):  # attention leaves: [B, heads, positions, dim]
            total += sum(a.nbytes / a.shape[2] for _, a in cast(list[tuple[str, Any]], tree_flatten(c.state))
                         if isinstance(a, mx.array) and a.ndim >= 3 and a.shape[2] > 0)
    return round(total)


def prefill(model: Any, kv: list[Any], tokens: Sequence[int], chunk: int = 512) -> mx.array:
    """Run `tokens` through the model into `kv` in chunks; return the last position's logits
    (float32, shape [vocab]). A reference prefill for tests and benchmarks; the server's own
    loop lives in engine.py."""
    toks = list(tokens)
    if not toks:
        raise ValueError("prefill needs at least one token")
    logits: mx.array | None = None
    for i in range(0, len(toks), chunk):
        out = model(mx.array([toks[i : i + chunk]]), cache=kv)
        logits = out[0, -1].astype(mx.float32)
        mx.eval(logits, [c.state for c in kv])
    assert logits is not None  # (at least one chunk ran)
    return logits


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------

MAX_MARKS = 8  # resumable points kept per entry besides its full length (stateful families)
MIN_SPILL = 64  # an evicted entry shorter than this is not worth a file
# take() hands a conversation's entry over when the prompt continues it to within this many tokens
# of its end (the answer's end-of-turn token, a re-tokenized last word): its tail is stale then
LEND_SLACK = 64


def _sized(kv: list[Any]) -> tuple[list[Any], int]:
    return kv, kvfamily.nbytes(kv)


@dataclass
class _Entry:
    tokens: np.ndarray
    kv: list[Any]  # holds exactly len(tokens) tokens (sliceable leaves may hold more buffer)
    nbytes: int
    checkpoint: bool
    stateful: bool  # some leaf cannot be cut back: resume only at len(tokens) or a mark
    marks: dict[int, list[Any | None]] = field(default_factory=dict)  # position -> stateful leaves there
    kv_bytes: int = 0  # of kv alone (nbytes adds the marks')
    last_used: float = field(default_factory=time.monotonic)
    prompt_len: int = 0  # tokens[:prompt_len] were a request's prompt, the rest its answer (0: all prompt)

    def continued_by(self, n: int) -> bool:
        """Whether a prompt sharing ``n`` tokens with this entry holds all of its prompt part: it
        is the conversation's next turn, not a sibling branching inside the prompt (take())."""
        return n >= (self.prompt_len or len(self.tokens))

    def resumable(self, cp: int) -> int:
        """The longest position <= cp at which this entry can hand out a cache."""
        n = len(self.tokens)
        if cp >= n:
            return n
        if not self.stateful:
            return cp
        return max((p for p in self.marks if p <= cp), default=0)

    def view(self, p: int) -> list[Any]:
        return kvfamily.view(self.kv, p, None if p == len(self.tokens) else self.marks.get(p))

    def snapshot(self, p: int) -> list[Any]:
        """A compact private copy of this entry at position p (p must be resumable)."""
        return kvfamily.compact(self.view(p), p)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class PrefixCache:
    """Multi-entry longest-prefix KV store with LRU eviction under a byte budget, separate
    checkpoint entries (end of system+tools) and optional on-disk persistence of checkpoints.

    Thread-safe: the engine's worker thread calls fetch/store, /metrics calls stats()."""

    def __init__(
        self,
        model: Any,
        max_bytes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        model_id: str | None = None,
        min_checkpoint: int = 16,
        max_disk_bytes: int | None = None,
        spill: bool = True,
    ):
        self.model = model
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_cache_bytes()
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.model_id = model_id or model_identity(model)
        self.min_checkpoint = min_checkpoint
        # Disk budget for checkpoint files (one per distinct system+tools prefix seen) and the
        # conversations spilled there when memory is full: by default four times the memory
        # budget; the least recently used files go first.
        self.max_disk_bytes = int(max_disk_bytes) if max_disk_bytes is not None else 4 * self.max_bytes
        self.spill = spill  # evicted conversations go to disk (with a cache_dir)
        self.bytes_per_token = kv_bytes_per_token(model)
        self.family = kvfamily.family_of(make_prompt_cache(model))
        self.stateful = self.family.name != "attention"
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self._lock = threading.RLock()
        self._counters = dict.fromkeys(
            (
                "hits", "misses", "evictions", "tokens_requested", "tokens_reused", "tokens_stored",
                "stores", "rejected", "spills", "handed_over",
            ),
            0,
        )
        # on-disk checkpoints (server/cache_disk.py): a private directory, digest-checked files
        self._disk = DiskCache(cache_dir, model, self.model_id, self.max_disk_bytes) if cache_dir else None
        self.cache_dir = self._disk.directory if self._disk is not None else None
        log.info(
            "prefix cache: budget %.1f MiB, %d KV bytes/token (%d tokens fit), model %s, disk %s (%d files)",
            self.max_bytes / 2**20, self.bytes_per_token, self.max_bytes // max(self.bytes_per_token, 1),
            self.model_id, self.cache_dir or "off", len(self._disk or ()),
        )

    # -- protocol ---------------------------------------------------------------------------

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any], int]:
        """Return (kv, reused): a private cache already holding tokens[:reused], reused being
        the longest prefix shared with any entry (memory, then disk) at which that entry can
        resume (any length for full attention; the entry's end or a mark for window and state
        caches), capped at len(tokens)-1."""
        kv, reused, _kept = self._lookup(tokens, lend=False)
        return kv, reused

    def take(self, tokens: Sequence[int]) -> tuple[list[Any], int, int]:
        """:meth:`fetch`, except that when the best entry is a conversation (not a checkpoint) of a
        full-attention model that ``tokens`` continue (to within LEND_SLACK tokens of its end: the
        rest is the previous answer's stale tail), the store hands that entry over and forgets
        it, instead of handing out a view: the view's first write would copy the whole prefix
        (MLX copies an array shared with the store on write), a few hundred milliseconds per warm
        turn at Claude Code's size on a CPU. The caller stores it back with what it adds (the
        engine does when a request ends or is stopped). Returns (kv, reused, kept): kept of the
        reused tokens are still in the store (a checkpoint's, say).

        Only the conversation's next turn takes the entry: ``tokens`` must hold the entry's whole
        prompt part (``store(prompt_len=)``), so a divergence lies in the previous answer. A
        sibling that parts inside the prompt (subagents sent together share most of it) reads a
        view, and the entry stays for the others."""
        return self._lookup(tokens, lend=True)

    def _lookup(self, tokens: Sequence[int], lend: bool) -> tuple[list[Any], int, int]:
        q = np.asarray(tokens, dtype=np.int64)
        limit = len(q) - 1
        with self._lock:
            self._counters["tokens_requested"] += len(q)
            best, best_n = None, 0
            now = time.monotonic()
            for e in self._entries.values():
                cp = common_prefix_len(e.tokens, q)
                if cp == len(e.tokens) and cp <= limit:
                    e.last_used = now  # fully contained entries (checkpoints) stay warm
                usable = e.resumable(min(cp, limit))
                if usable > best_n or (usable == best_n and best is not None and len(e.tokens) < len(best.tokens)):
                    best, best_n = e, usable
            if self._disk:
                loaded = self._maybe_load_from_disk(q, best_n, limit)
                if loaded is not None:
                    best, best_n = loaded
            if best is None or best_n == 0:
                self._counters["misses"] += 1
                return make_prompt_cache(self.model), 0, 0
            best.last_used = time.monotonic()
            self._counters["hits"] += 1
            self._counters["tokens_reused"] += best_n
            key = token_hash(best.tokens)
            if (lend and not best.checkpoint and not self.stateful and len(best.tokens) - best_n <= LEND_SLACK
                    and best.continued_by(best_n) and self._entries.get(key) is best):
                self._drop(key)
                self._counters["handed_over"] += 1
                return kvfamily.owned(best.kv, best_n), best_n, self._covered(q, limit)
            return best.view(best_n), best_n, best_n

    def peek(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` a fetch would reuse from memory now (no copy, no counters;
        disk files are not looked at): the engine's estimate of the prompt left to compute."""
        q = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            return self._covered(q, max(len(q) - 1, 0))

    def mark(self, kv: list[Any]) -> list[Any | None] | None:
        """What :meth:`store` needs (``marks=``) to resume later at the position ``kv`` holds
        now: a private copy of its window and state leaves, or None for full-attention models,
        which need none (a stored prompt is cut back to any length)."""
        return kvfamily.take_mark(kv) if self.stateful else None

    def admits(self, n_tokens: int) -> bool:
        """Whether an entry of ``n_tokens`` tokens fits the byte budget at all."""
        return n_tokens * self.bytes_per_token <= self.max_bytes

    def store(self, tokens: Sequence[int], kv: list[Any], checkpoints: Sequence[int] = (),
              *, owned: bool = False, marks: dict[int, Any] | None = None, prompt_len: int | None = None) -> int:
        """Keep `kv` (holding exactly `tokens`: the count the caller fed; full-attention leaves
        may hold more and are cut back) as an entry, plus one checkpoint entry per length in
        `checkpoints` (a checkpoint at len(tokens) marks the entry itself as one). ``marks``
        maps positions below len(tokens) to :meth:`mark` results taken there: for window and
        state caches they are the only earlier points the entry can resume at, and a
        checkpoint needs one at its position (a checkpoint without is skipped, not an error).
        Returns the number of tokens not covered by the store before this call that are now.

        ``owned=True``: the caller hands `kv` over and never uses it again (the engine's
        extracted caches), so the entry keeps kv's own buffers (full-attention leaves as slices);
        otherwise it keeps a compact copy. Shorter checkpoints are always compact copies.
        ``prompt_len``: of `tokens`, those that were the request's prompt (the rest is its answer);
        None: all of them (see :meth:`take`)."""
        q = np.asarray(tokens, dtype=np.int64)
        n = len(q)
        if n == 0:
            return 0
        fed = kvfamily.fed_tokens(kv)
        if fed is not None and (fed < n or (fed > n and self.stateful)):
            raise ValueError(f"kv holds {fed} tokens but {n} were given")
        marks = {int(p): m for p, m in (marks or {}).items() if 0 < int(p) < n and m is not None}
        cps = {int(c) for c in checkpoints if self.min_checkpoint <= int(c) < n}
        whole_is_checkpoint = any(int(c) == n for c in checkpoints) and n >= self.min_checkpoint
        with self._lock:
            covered = self._covered(q, n)
            cps |= self._branch_points(q, cps | ({n} if whole_is_checkpoint else set()))
            if self.stateful:
                skipped = sorted(p for p in cps if p not in marks)
                if skipped:
                    log.debug("prefix cache: no mark at %s: those checkpoints are skipped", skipped)
                cps -= set(skipped)
            whole = _Entry(q.copy(), kv, 0, whole_is_checkpoint, self.stateful, marks)
            # Snapshot everything first, then commit: an exception (or a cancelled caller) never
            # leaves some of this call's entries behind without the others.
            snaps = [(q[:p], True, self._prepare(q[:p], lambda p=p: _sized(whole.snapshot(p)))) for p in sorted(cps)]
            snaps.append((q, whole_is_checkpoint, self._prepare(q, lambda: self._whole(whole, owned))))
            for t, ck, (entry_kv, nbytes) in snaps:
                self._commit(t, entry_kv, ck, nbytes, marks if t is q else None,
                             min(prompt_len, n) if prompt_len is not None and t is q else 0)
            self._counters["stores"] += 1
            created = max(self._covered(q, n) - covered, 0)
            self._counters["tokens_stored"] += created
            return created

    def stats(self) -> dict[str, float]:
        """Counters for /metrics and the log."""
        with self._lock:
            s: dict[str, float] = dict(self._counters)
            s.update(
                entries=len(self._entries),
                checkpoints=sum(e.checkpoint for e in self._entries.values()),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                kv_bytes_per_token=self.bytes_per_token,
                tokens_cached=int(sum(len(e.tokens) for e in self._entries.values())),
            )
            s.update(self._disk.stats() if self._disk is not None else
                     dict.fromkeys(("disk_loads", "disk_writes", "disk_errors", "disk_evictions", "disk_files"), 0))
            req = self._counters["tokens_requested"]
            s["reuse_ratio"] = self._counters["tokens_reused"] / req if req else 0.0
            return s

    # -- internals --------------------------------------------------------------------------

    def _branch_points(self, q: np.ndarray, cps: set[int]) -> set[int]:
        """Where a new checkpoint parts from a stored one (warmturn.prefix.branch_points)."""
        return branch_points(q, cps, (e.tokens for e in self._entries.values() if e.checkpoint), self.min_checkpoint)

    def _covered(self, q: np.ndarray, limit: int | None = None) -> int:
        """Tokens of ``q`` (up to ``limit``) some entry can resume at."""
        limit = len(q) if limit is None else limit
        best = 0
        for e in self._entries.values():
            best = max(best, e.resumable(min(common_prefix_len(e.tokens, q), limit)))
        return best

    def _whole(self, whole: _Entry, owned: bool) -> tuple[list[Any], int]:
        """(cache to keep for a whole entry, its bytes)."""
        n = len(whole.tokens)
        if owned:  # kv's own buffers, whole (room to grow for take()): counted at their full size
            return kvfamily.owned(whole.kv, n) if not self.stateful else whole.kv, kvfamily.nbytes(whole.kv)
        snap = kvfamily.compact(whole.kv, n)
        return snap, kvfamily.nbytes(snap)

    def _prepare(self, q: np.ndarray, make: Any) -> tuple[list[Any] | None, int]:
        """(cache to store for `q`, its bytes) from ``make()``, or (None, 0) when nothing needs
        storing (already stored, or over budget)."""
        existing = self._entries.get(token_hash(q))
        if existing is not None and np.array_equal(existing.tokens, q):
            return None, 0
        if not self.admits(len(q)):
            return None, 0
        snap, nbytes = make()
        mx.eval([a for c in kvfamily.leaves(snap) if kvfamily.is_sliceable(c) and c.keys is not None
                 for a in (c.keys, c.values)])
        return snap, nbytes

    def _commit(self, q: np.ndarray, snap: list[Any] | None, checkpoint: bool, nbytes: int = 0,
                marks: dict[int, Any] | None = None, prompt_len: int = 0) -> None:
        key = token_hash(q)
        n = len(q)
        if snap is None:
            existing = self._entries.get(key)
            if existing is None:
                self._counters["rejected"] += 1
                log.warning("prefix cache: %d tokens (%.1f MiB) exceed the budget, not stored",
                            n, n * self.bytes_per_token / 2**20)
                return
            existing.last_used = time.monotonic()
            existing.checkpoint = existing.checkpoint or checkpoint
            for p, m in (marks or {}).items():
                existing.marks.setdefault(p, m)
            self._bytes += self._bound_marks(existing)
            if checkpoint:
                self._maybe_save(existing)
            return
        entry = _Entry(tokens=q.copy(), kv=snap, nbytes=nbytes, checkpoint=checkpoint, stateful=self.stateful,
                       marks=dict(marks or {}), kv_bytes=nbytes, prompt_len=prompt_len)
        self._absorb_superseded(entry)
        self._bound_marks(entry)
        if key in self._entries:  # same hash, other tokens: the newer entry wins
            self._drop(key)
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict(keep=key)
        if checkpoint:
            self._maybe_save(entry)

    def _absorb_superseded(self, entry: _Entry) -> None:
        """A non-checkpoint entry that ``entry`` extends is redundant: the new one resumes wherever
        it could (full attention: any length; window and state caches: its marks, and its own
        end, which becomes a mark of the new entry)."""
        q, n = entry.tokens, len(entry.tokens)
        for k, e in list(self._entries.items()):
            if not e.checkpoint and len(e.tokens) < n and np.array_equal(e.tokens, q[: len(e.tokens)]):
                if self.stateful:
                    for p, m in e.marks.items():
                        entry.marks.setdefault(p, m)
                    if (mark := kvfamily.take_mark(e.kv)) is not None:  # (never None for a stateful cache)
                        entry.marks.setdefault(len(e.tokens), mark)
                self._drop(k)

    @staticmethod
    def _bound_marks(e: _Entry) -> int:
        """Keep at most MAX_MARKS marks (the earliest, where other conversations branch off, and
        the latest ones) and count their bytes in the entry's; returns the change in bytes."""
        if len(e.marks) > MAX_MARKS:
            ps = sorted(e.marks)
            for p in ps[1 : len(ps) - MAX_MARKS + 1]:
                del e.marks[p]
        before = e.nbytes
        e.nbytes = e.kv_bytes + sum(kvfamily.mark_nbytes(m) for m in e.marks.values())
        return e.nbytes - before

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key)
        self._bytes -= e.nbytes

    def _evict(self, keep: str) -> None:
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            victim = min((k for k in self._entries if k != keep), key=lambda k: self._entries[k].last_used)
            e = self._entries[victim]
            if self._disk is not None and self.spill and not e.checkpoint and len(e.tokens) >= MIN_SPILL:
                self._spill(e)
            self._drop(victim)
            self._counters["evictions"] += 1

    # -- disk (the files themselves: server/cache_disk.py) -------------------------------------

    def _spill(self, e: _Entry) -> None:
        """A conversation pushed out of memory goes to disk, so that its next turn reads it back.
        A window or state model also writes its last mark (its prompt's end), since the next turn
        usually parts from the answer as generated and cannot resume inside it."""
        disk = self._disk
        assert disk is not None  # (only called with a disk)
        if disk.save(e.tokens, e.kv, kind="spill"):
            self._counters["spills"] += 1
        last = max((p for p in e.marks if p >= MIN_SPILL), default=None) if e.stateful else None
        if last is not None:
            disk.save(e.tokens[:last], e.view(last), kind="spill")

    def _maybe_save(self, e: _Entry) -> None:
        if self._disk is not None:
            self._disk.save(e.tokens, e.kv)

    def _maybe_load_from_disk(self, q: np.ndarray, best_n: int, limit: int) -> tuple[_Entry, int] | None:
        """(entry read from disk, tokens of q it covers) when a file covers more than ``best_n``:
        a file of a prefix of q (a checkpoint, a spilled conversation, a spilled mark), or, for
        full-attention models, the file sharing the longest prefix with q, cut back to it (a
        spilled conversation whose answer the next turn renders differently)."""
        assert self._disk is not None
        for n in self._disk.lengths(best_n, limit):
            entry = self._load_file(q[:n])
            if entry is not None:
                return entry, n
        if not self.stateful:
            near = self._disk.nearest(q, best_n + 16, limit)  # a disk read for 16 tokens more at least
            if near is not None:
                entry = self._load_file(near[0])
                if entry is not None:
                    return entry, near[1]
        return None

    def _load_file(self, tokens: np.ndarray) -> _Entry | None:
        assert self._disk is not None  # (only called with a disk)
        loaded = self._disk.load(tokens)
        if loaded is None:
            return None
        kv, kind = loaded
        nb = kvfamily.nbytes(kv)
        entry = _Entry(tokens=tokens.copy(), kv=kv, nbytes=nb, checkpoint=kind == "checkpoint",
                       stateful=self.stateful, kv_bytes=nb)
        key = token_hash(entry.tokens)
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict(keep=key)
        log.info("prefix cache: loaded %d-token %s from disk", len(tokens), "checkpoint" if entry.checkpoint else
                 "conversation (spilled when memory was full)")
        return entry
