"""The MLX worker: one thread runs every prefill and decode step, for many requests at once.

Continuous batching is mlx-lm's own: :class:`mlx_lm.generate.BatchGenerator` keeps a prompt
batch (chunked prefill, ``prefill_step_size`` tokens per sequence per step) and a decode batch;
each ``next()`` call runs one decode step for every generating sequence and one prefill chunk
for the sequences still reading their prompt. This module adds what a server needs around it:

- a bounded wait queue in front of the batch (full: :class:`Overloaded`, a 529); a request
  joins the batch between two steps as soon as fewer than ``decode_concurrency`` run;
- per-request cancellation and deadlines, checked between steps (so within one token), and a
  queued request can be withdrawn at once (:meth:`Engine.withdraw`);
- the cross-request prefix store (``server/cache.py``) reached only through
  :class:`PromptCacheStore`: fetch before a request joins, store its system+tools checkpoint
  when prefill reaches it, store prompt + answer when it ends;
- in-flight dedup: a request sharing a not-yet-cached prefix with one being prefilled waits
  ("parks") until that one has computed the shared part, which is then stored, and fetches it
  from the store instead of computing it again;
- results back through the request's ``emit`` callback as :class:`Prefilled`, :class:`Piece`
  and :class:`Done` items, or as the exception that ended it. A failing step fails the
  requests in the batch; the worker itself goes on.

KV state is never shared mutably: the store hands out private caches (``fetch``), the batch
copies them into its own buffers (``BatchKVCache.merge``), and everything stored is an
extracted copy that the batch no longer touches.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from server.metrics import Metrics

log = logging.getLogger(__name__)


class PromptCacheStore(Protocol):
    """Everything the engine calls on the cross-request KV store (``server.cache.PrefixCache``)."""

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any], int]:
        """Return (kv, reused): a per-layer mlx-lm KV cache list that the caller now owns and may
        mutate (never an object the store still writes to), already holding the KV state of
        tokens[:reused]. Always reused <= len(tokens) - 1, so at least the last token is
        computed (an exact repeat is a full hit that recomputes only the last token)."""
        ...

    def store(self, tokens: Sequence[int], kv: list[Any], checkpoints: Sequence[int] = (),
              *, owned: bool = False) -> int:
        """Keep the KV state of `tokens` (kv may hold more positions; only len(tokens) count),
        plus a separate, pinned entry at each length in `checkpoints` (the end of the
        system+tools prefix; a checkpoint equal to len(tokens) marks the entry itself).
        ``owned=True``: the caller hands kv over and never touches it again, so the store may
        keep kv's buffers instead of copying them. Returns the number of tokens newly covered."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for /metrics and the log: hits, misses, evictions, bytes, entries, ..."""
        ...


class Overloaded(RuntimeError):
    """The wait queue is full: becomes a 529 ``overloaded_error`` with a ``retry-after``."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(RuntimeError):
    """The request's time limit passed before its first token."""


class WorkerDead(RuntimeError):
    """The MLX worker thread is gone: nothing can be generated until a restart."""


@dataclass(frozen=True)
class PromptUsage:
    """Anthropic's accounting of one prompt: three disjoint counts that add up to it."""

    input_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


def prompt_usage(prompt_tokens: int, reused: int, created: int) -> PromptUsage:
    """``reused`` tokens came from the store (cache_read); of the ones computed, ``created``
    were stored (cache_creation); input_tokens is the rest, at least the last prompt token,
    which is always computed and never stored, so it is never 0 for a non-empty prompt."""
    reused = max(0, min(reused, prompt_tokens))
    created = max(0, min(created, prompt_tokens - reused - 1))
    return PromptUsage(prompt_tokens - reused - created, reused, created)


@dataclass(frozen=True)
class Prefilled:
    reused: int  # tokens whose KV came from the store
    created: int  # tokens computed here and stored (cache_creation_input_tokens)
    prefill_ms: float  # from joining the batch to the end of prefill
    queued_ms: float  # from submission to joining the batch (parked time included)
    prompt_tokens: int = 0
    parked_ms: float = 0.0  # of queued_ms: waiting for another request's prefill (dedup)

    @property
    def usage(self) -> PromptUsage:
        return prompt_usage(self.prompt_tokens, self.reused, self.created)


@dataclass(frozen=True)
class Piece:
    text: str
    output_tokens: int  # generated tokens so far


@dataclass(frozen=True)
class Done:
    reason: Literal["stop", "length", "cancelled", "timeout"]
    output_tokens: int
    decode_tps: float = 0.0


@dataclass
class GenerationRequest:
    tokens: list[int]
    max_tokens: int
    emit: Callable[[object], None]
    prefix_len: int = 0
    temperature: float = 1.0
    top_p: float = 0.0
    top_k: int = 0
    deadline: float = float("inf")  # time.monotonic() value
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    request_id: str = ""

    def stopped(self) -> Literal["cancelled", "timeout"] | None:
        if self.cancel.is_set():
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Active:
    """A request inside the BatchGenerator (worker-thread state)."""

    req: GenerationRequest
    uid: int
    reused: int
    joined: float
    queued_ms: float
    parked_ms: float
    detok: Any
    in_cache: int = 0  # prompt tokens whose KV the batch holds
    shared: int = 0  # prompt tokens stored for others (checkpoint or dedup)
    prefilled_at: float | None = None
    first_token_at: float | None = None
    output_tokens: int = 0
    waiters: int = 0
    last_log: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.req.tokens


@dataclass
class _Parked:
    """A request waiting for `leader` to compute the `shared` tokens it will fetch (dedup)."""

    req: GenerationRequest
    leader: int
    shared: int
    since: float


class Engine:
    """One MLX worker thread over a bounded queue and a BatchGenerator.
    ``start()``, ``submit()``..., ``stop()``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: PromptCacheStore | None = None,
        *,
        max_queue: int = 8,
        decode_concurrency: int = 8,
        prompt_concurrency: int = 4,
        prefill_step_size: int = 256,
        dedup_min_tokens: int = 32,
        progress_every: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        if decode_concurrency < 1 or prompt_concurrency < 1 or prefill_step_size < 1:
            raise ValueError("concurrency limits and the prefill step size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.max_queue = max_queue
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.prefill_step_size = prefill_step_size
        self.dedup_min_tokens = dedup_min_tokens
        self.progress_every = progress_every  # seconds between progress lines of a long prefill
        self.metrics = metrics or Metrics()
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # worker-thread state
        self._bg: Any = None
        self._active: dict[int, _Active] = {}
        self._parked: list[_Parked] = []
        self._service_s = 5.0  # moving average of request durations, for retry-after
        self.metrics.bind_engine(self)

    # -- caller side (any thread)

    @property
    def depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests in the batch (prefilling or decoding) or parked for another's prefill."""
        return len(self._active) + len(self._parked)

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def alive(self) -> bool:
        """False once the worker thread has died (a never-started engine is not dead)."""
        return self._thread is None or self._thread.is_alive()

    def batch_sizes(self) -> tuple[int, int]:
        """(decoding, prefilling) sequences in the batch right now."""
        active = list(self._active.values())
        decoding = sum(a.prefilled_at is not None for a in active)
        return decoding, len(active) - decoding

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it, served
        ``decode_concurrency`` at a time, at the recent mean request duration."""
        waves = (self.depth + 1) / self.decode_concurrency
        return int(min(60, max(1, math.ceil(waves * self._service_s))))

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything running and queued, then end the worker thread."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
        for req in pending:
            req.cancel.set()
            req.emit(Done("cancelled", 0))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("MLX worker did not stop within %.0f s", timeout)
            self._thread = None

    def submit(self, req: GenerationRequest) -> None:
        """Queue ``req``; raises :class:`Overloaded` at once when the queue is full."""
        if not self.alive:
            raise WorkerDead("the MLX worker thread has died; restart the server")
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"the server is busy: {self.max_queue} requests are already waiting",
                                 self.retry_after())
            self._pending.append(req)
            self._cond.notify_all()

    def withdraw(self, req: GenerationRequest) -> bool:
        """Cancel ``req``; if it is still queued, free its slot now. True if it was queued."""
        req.cancel.set()
        with self._cond:
            try:
                self._pending.remove(req)
            except ValueError:
                return False
        return True

    # -- worker thread

    def _make_batch(self) -> Any:
        from mlx_lm.generate import BatchGenerator, StopSequences

        self._eos = StopSequences([(t,) for t in self.tokenizer.eos_token_ids])
        return BatchGenerator(self.model, completion_batch_size=self.decode_concurrency,
                              prefill_batch_size=self.prompt_concurrency,
                              prefill_step_size=self.prefill_step_size)

    def _loop(self) -> None:
        self._bg = self._make_batch()
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active and not self._parked:
                    self._cond.wait()
                if self._stopping:
                    break
                room = self.decode_concurrency - self.running
                incoming = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            for req in incoming:
                self._admit(req)
            try:
                self._sweep()
                if self._active:
                    self._step()
                self._release_parked()
            except Exception as e:  # a failing step fails the batch, never the worker
                log.exception("batch step failed; failing the %d requests in the batch", len(self._active))
                for a in self._active.values():
                    a.req.emit(e)
                self._active.clear()
                self._bg = self._make_batch()
        for a in self._active.values():
            a.req.emit(Done("cancelled", a.output_tokens))
        for p in self._parked:
            p.req.emit(Done("cancelled", 0))
        self._active.clear()
        self._parked.clear()
        self._bg = None

    def _admit(self, req: GenerationRequest) -> None:
        """A request leaves the queue: stopped already, parked behind a leader, or into the batch."""
        why = req.stopped()
        if why:
            req.emit(Done(why, 0))
            return
        try:
            leader = self._leader_for(req)
            if leader is not None:
                a, shared = leader
                if a.prefilled_at is not None:
                    self._share(a)  # its whole prompt is in the batch already: store it now
                else:
                    a.waiters += 1
                    self._parked.append(_Parked(req, a.uid, shared, time.monotonic()))
                    self.metrics.dedup_waits.inc()
                    return
            self._join(req)
        except Exception as e:  # this request's failure (e.g. the store's), not the batch's
            log.exception("could not start a request")
            req.emit(e)

    def _leader_for(self, req: GenerationRequest) -> tuple[_Active, int] | None:
        """The running request whose prompt shares the most not-yet-cached tokens with req's,
        if that is at least ``dedup_min_tokens`` more than it has stored (or fetched) already."""
        best: tuple[_Active, int] | None = None
        limit = len(req.tokens) - 1
        for a in self._active.values():
            s = min(shared_prefix(a.tokens, req.tokens), limit)
            if s - max(a.reused, a.shared) >= self.dedup_min_tokens and (best is None or s > best[1]):
                best = (a, s)
        return best

    def _join(self, req: GenerationRequest, parked_ms: float = 0.0) -> None:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        tokens = req.tokens
        if self.store is not None:
            kv, reused = self.store.fetch(tokens)
        else:
            kv, reused = make_prompt_cache(self.model), 0
        # A segment boundary at the end of system+tools: BatchGenerator stops a chunk there,
        # so the checkpoint is stored exactly at that length (see _on_prompt_progress).
        plen = req.prefix_len
        if reused < plen < len(tokens) - 1:
            segments = [tokens[reused:plen], tokens[plen:]]
        else:
            segments = [tokens[reused:]]
        sampler = make_sampler(temp=req.temperature, top_p=req.top_p, top_k=req.top_k)
        (uid,) = self._bg.insert_segments([segments], max_tokens=[req.max_tokens], caches=[kv],
                                          all_tokens=[list(tokens[:reused])], samplers=[sampler],
                                          stop_sequences=[self._eos])
        now = time.monotonic()
        queued_ms = (now - req.submitted) * 1000
        self._active[uid] = _Active(req, uid, reused, now, queued_ms, parked_ms, self.tokenizer.detokenizer,
                                    in_cache=reused, last_log=now)
        self.metrics.queue_wait.observe(queued_ms / 1000)

    def _sweep(self) -> None:
        """Take cancelled and timed-out requests out of the batch (storing what they computed)."""
        gone = {uid: why for uid, a in self._active.items() if (why := a.req.stopped())}
        if gone:
            caches = self._bg.remove(list(gone), return_prompt_caches=self.store is not None)
            for uid, why in gone.items():
                a = self._active.pop(uid)
                if uid in caches:
                    kv, held = caches[uid]
                    if len(held) > max(a.reused, a.shared):
                        self._store(a, held, kv)
                if a.prefilled_at is None and why == "timeout":
                    a.req.emit(RequestTimeout("the request's time limit passed during prefill"))
                else:
                    a.req.emit(Done(why, a.output_tokens))
        for p in list(self._parked):
            why = p.req.stopped()
            if why:
                self._parked.remove(p)
                p.req.emit(Done(why, 0))

    def _release_parked(self) -> None:
        """Parked requests whose leader has computed (and stored) their shared part, or is gone."""
        for p in list(self._parked):
            a = self._active.get(p.leader)
            if a is not None and a.in_cache < p.shared:
                continue
            if a is not None:
                if a.shared < p.shared:
                    self._share(a)
                a.waiters -= 1
            self._parked.remove(p)
            parked_ms = (time.monotonic() - p.since) * 1000
            try:
                self._join(p.req, parked_ms)
            except Exception as e:
                log.exception("could not start a parked request")
                p.req.emit(e)
                continue
            joined = next(x for x in self._active.values() if x.req is p.req)
            self.metrics.dedup_tokens.inc(joined.reused)

    def _share(self, a: _Active, checkpoint: bool = False) -> None:
        """Store what the batch holds of ``a`` now (an extracted copy), so others can fetch it."""
        if self.store is None:
            return
        kv, held = self._bg.extract_cache([a.uid])[a.uid]
        held = list(held)
        if len(held) <= max(a.reused, a.shared):
            return
        self._store(a, held, kv, checkpoints=[len(held)] if checkpoint else ())
        a.shared = len(held)

    def _store(self, a: _Active, held: list[int], kv: list[Any], checkpoints: Sequence[int] = ()) -> None:
        try:
            n = min(len(held), kv[0].size())
            self.store.store(held[:n], kv, checkpoints=checkpoints, owned=True)
        except Exception:
            log.exception("prefix cache store failed (ignored)")

    def _step(self) -> None:
        prompt_responses, gen_responses = self._bg.next()
        now = time.monotonic()
        for r in prompt_responses:
            a = self._active.get(r.uid)
            if a is not None:
                self._on_prompt_progress(a, r, now)
        for r in gen_responses:
            a = self._active.get(r.uid)
            if a is not None:
                self._on_token(a, r, now)

    def _on_prompt_progress(self, a: _Active, r: Any, now: float) -> None:
        done, total = r.progress
        if r.end_of_prompt:
            a.in_cache = len(a.tokens)
            a.prefilled_at = now
            computed = len(a.tokens) - a.reused
            self.metrics.prefill_tokens.inc(computed)
            self.metrics.reused_tokens.inc(a.reused)
            self.metrics.prefill_time.observe(now - a.joined)
            created = len(a.tokens) - 1 - a.reused if self.store is not None else 0
            a.req.emit(Prefilled(a.reused, created, (now - a.joined) * 1000, a.queued_ms, len(a.tokens),
                                 a.parked_ms))
            return
        a.in_cache = a.reused + done
        if r.end_of_segment and a.in_cache == a.req.prefix_len and a.reused < a.in_cache:
            self._share(a, checkpoint=True)  # the system+tools checkpoint, as soon as it exists
        if now - a.last_log >= self.progress_every:
            a.last_log = now
            rate = done / max(now - a.joined, 1e-9)
            log.info("prefill %s: %d/%d tokens, %.0f tok/s, ETA %.0f s", a.req.request_id or f"uid {a.uid}",
                     done, total, rate, (total - done) / max(rate, 1e-9))

    def _on_token(self, a: _Active, r: Any, now: float) -> None:
        reason = r.finish_reason
        if reason != "stop":  # "stop" is an EOS token: never shown, never counted
            a.output_tokens += 1
            a.detok.add_token(r.token)
            if a.first_token_at is None:
                a.first_token_at = now
            if reason is None:
                seg = a.detok.last_segment
                if seg:
                    a.req.emit(Piece(seg, a.output_tokens))
        if reason is None:
            return
        a.detok.finalize()
        seg = a.detok.last_segment
        if seg:
            a.req.emit(Piece(seg, a.output_tokens))
        del self._active[a.uid]
        elapsed = now - (a.first_token_at or now)
        tps = (a.output_tokens - 1) / elapsed if elapsed > 0 and a.output_tokens > 1 else 0.0
        self.metrics.generated_tokens.inc(a.output_tokens)
        a.req.emit(Done("stop" if reason == "stop" else "length", a.output_tokens, tps))
        self._service_s = 0.8 * self._service_s + 0.2 * (now - a.req.submitted)
        if self.store is not None and r.prompt_cache is not None:
            # the extracted cache holds the prompt and every token fed back (the last one too)
            ck = [a.req.prefix_len] if 0 < a.req.prefix_len < len(a.tokens) else []
            try:
                n = r.prompt_cache[0].size()
                self.store.store(list(r.all_tokens)[:n], r.prompt_cache, checkpoints=ck, owned=True)
            except Exception:
                log.exception("prefix cache store failed (ignored)")
