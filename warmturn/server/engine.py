"""The MLX worker: one thread runs every prefill and decode step, for many requests at once.

Continuous batching is mlx-lm's own: :class:`mlx_lm.generate.BatchGenerator` keeps a prompt
batch (chunked prefill, ``prefill_step_size`` tokens per sequence per step) and a decode batch;
each ``next()`` call runs one decode step for every generating sequence and one prefill chunk
for the sequences still reading their prompt. This module adds what a server needs around it:

- a bounded wait queue in front of the batch (full: :class:`Overloaded`, a 529); a request
  is admitted between two steps as soon as fewer than ``decode_concurrency`` run;
- the choice of who reads its prompt in each step (``_schedule``): shortest remaining prompt
  first, several short prompts in one step, a title request after the turns, ageing against
  starvation; a prompt that loses its place leaves the batch with its KV state and resumes;
- requests that arrive together (being read and tokenized at the same moment, see
  :meth:`Engine.arriving`) start together;
- per-request cancellation and deadlines, checked between steps (so within one token), and a
  queued request can be withdrawn at once (:meth:`Engine.withdraw`);
- the cross-request prefix store (``server/cache.py``) reached only through
  :class:`PromptCacheStore`: fetch before a request joins, store its system+tools checkpoint
  when prefill reaches it, store prompt + answer when it ends;
- in-flight dedup: a request sharing a not-yet-cached prefix with one being prefilled waits
  ("parks") until that one has computed the shared part, which is then stored, and fetches it
  from the store instead of computing it again; requests released from a park together are
  deduplicated against each other the same way (the one sharing the longest prefix with
  another goes first, the others park on it), so a fan-out that first waits for a short shared
  part (the tools) still computes the longer part its members share (a subagent prompt) once;
- a request that runs alone is served outside the batch, the way mlx-lm's ``generate_step``
  serves one, and moves into the batch when another arrives (why: see ``_start_solo``);
- results back through the request's ``emit`` callback as :class:`Admitted` (cache lookup
  done), :class:`Prefilled`, :class:`Piece` and :class:`Done` items, or as the exception that ended it. A failing step fails the
  requests in the batch; the worker itself goes on.

KV state is never shared mutably: the store hands out private caches (``fetch``), the batch
copies them into its own buffers (``BatchKVCache.merge``), and everything stored is either an
extracted copy the batch no longer touches or the lone request's cache, handed over when it ends.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

from warmturn.server.metrics import Metrics

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
              *, owned: bool = False, marks: dict[int, Any] | None = None) -> int:
        """Keep the KV state of `tokens` (the tokens fed into kv; full-attention kv may hold more
        positions, only len(tokens) count), plus a separate, pinned entry at each length in
        `checkpoints` (the end of the system+tools prefix; a checkpoint equal to len(tokens)
        marks the entry itself). ``marks``: :meth:`mark` results taken at earlier positions.
        ``owned=True``: the caller hands kv over and never touches it again, so the store may
        keep kv's buffers instead of copying them. Returns the number of tokens newly covered."""
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


@dataclass
class Arrival:
    """A request being read and tokenized, not submitted yet (see Engine.arriving)."""

    done: bool = False


class Overloaded(RuntimeError):
    """The wait queue is full: becomes a 529 ``overloaded_error`` with a ``retry-after``."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(RuntimeError):
    """The request's time limit passed before its first token."""


class WorkerDead(RuntimeError):
    """The MLX worker thread is gone: nothing can be generated until a restart."""


class ShuttingDown(WorkerDead):
    """The engine is stopping (the server got SIGTERM): a 503 the client may retry elsewhere."""


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
class Admitted:
    """The request left the queue and its cache lookup ended: ``reused`` prompt tokens come from
    the store; its prefill starts now or when the scheduler gives it its turn."""

    reused: int
    prompt_tokens: int
    queued_ms: float


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
    background: bool = False  # a side request (a conversation title): its prefill yields to turns
    history_len: int = 0  # end of the last message, before the generation prompt (render.Rendered)

    def mark_points(self) -> list[int]:
        """Prompt positions a later request may resume at, besides the whole prompt + answer: the
        end of system+tools, of the history, and of the prompt but its last token. Models whose
        cache cannot be cut back keep their state there (PromptCacheStore.mark)."""
        end = len(self.tokens) - 1
        return sorted({p for p in (self.prefix_len, self.history_len, end) if 0 < p <= end})

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
    base: int = 0  # in_cache when it joined the batch (BatchGenerator counts progress from there)
    shared: int = 0  # prompt tokens stored for others (checkpoint or dedup)
    prefilled_at: float | None = None
    first_token_at: float | None = None
    output_tokens: int = 0
    last_log: float = 0.0
    sampler: Any = None
    marks: dict[int, Any] = field(default_factory=dict)  # position -> store.mark() taken there

    @property
    def tokens(self) -> list[int]:
        return self.req.tokens

    @property
    def covered(self) -> int:
        """Prompt tokens the store has of it already (fetched, or stored for others)."""
        return max(self.reused, self.shared)

    @property
    def progress(self) -> int:
        """Prompt tokens it will not have to compute again."""
        return self.in_cache

    def copy_state(self) -> _Active:
        """Its state as a batch member: every :class:`_Active` field carried over (from a
        :class:`_Solo`, which moves in; the uid is set when it joins the batch)."""
        return _Active(**{f.name: getattr(self, f.name) for f in fields(_Active)})


@dataclass
class _Ready:
    """A request admitted but not in the batch: :meth:`Engine._schedule` decides when it starts
    (or goes on) reading its prompt. ``state`` and ``kv`` are set when it has read part of it
    already: a lone request that got company mid-prompt, or one taken out of the batch so that
    a shorter prompt could go first."""

    req: GenerationRequest
    was_parked: bool = False
    parked_ms: float = 0.0
    estimate: int = 0  # prompt tokens the store holds (PromptCacheStore.peek) when it has no state
    state: _Active | None = None
    kv: list[Any] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.req.tokens

    @property
    def in_cache(self) -> int:
        return self.state.in_cache if self.state is not None else 0

    @property
    def shared(self) -> int:
        return self.state.shared if self.state is not None else 0

    @property
    def covered(self) -> int:
        return self.state.covered if self.state is not None else self.estimate

    @property
    def progress(self) -> int:
        """Prompt tokens it will not have to compute again."""
        return self.state.in_cache if self.state is not None else self.estimate


@dataclass
class _Parked:
    """A request waiting for `leader` to compute the `shared` tokens it will fetch (dedup)."""

    req: GenerationRequest
    leader: GenerationRequest
    shared: int
    since: float


@dataclass
class _Solo(_Active):
    """The one request running while nothing else does, outside the batch (see Engine._solo_step)."""

    kv: list[Any] = field(default_factory=list)
    y: Any = None  # the next token, sampled but not yet emitted (an mx.array being computed)
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # tokens fed into kv: the count the store is told it holds


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
        solo: bool = True,
        arrival_window: float = 0.1,
        prefill_order: Literal["shortest", "arrival"] = "shortest",
        metrics: Metrics | None = None,
    ) -> None:
        if decode_concurrency < 1 or prompt_concurrency < 1 or prefill_step_size < 1:
            raise ValueError("concurrency limits and the prefill step size must be at least 1")
        if prefill_order not in ("shortest", "arrival"):
            raise ValueError(f"prefill_order must be 'shortest' or 'arrival', not {prefill_order!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.max_queue = max_queue
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.prefill_step_size = prefill_step_size
        self.dedup_min_tokens = dedup_min_tokens
        self.progress_every = progress_every  # seconds between progress lines of a long prefill
        self.solo = solo  # serve a lone request outside the batch (False: for A/B measurements)
        self.arrival_window = arrival_window  # seconds a lone request waits for others being read
        self.prefill_order = prefill_order  # "arrival": every admitted prompt is read at once (A/B)
        self.metrics = metrics or Metrics()
        self.cache_family = getattr(store, "family", None)
        if self.cache_family is None and model is not None:
            from mlx_lm.models.cache import make_prompt_cache

            from warmturn.server.kvfamily import family_of

            self.cache_family = family_of(make_prompt_cache(model))
        # window and state caches resume only where the engine took a mark (see _take_mark)
        self._marks = bool(getattr(store, "stateful", False))
        # mlx-lm batches every cache class but ChunkedKVCache (Llama 4): such a model is served
        # one request at a time, each the way a lone request is (see _start_solo)
        self.batchable = True
        if model is not None:
            from mlx_lm.models.cache import make_prompt_cache

            from warmturn.server.kvfamily import leaves

            unbatchable = sorted({type(c).__name__ for c in leaves(make_prompt_cache(model))
                                  if not hasattr(c, "merge")})
            if unbatchable:
                self.batchable = False
                log.warning("mlx-lm cannot batch %s caches: requests to this model run one at a time",
                            ", ".join(unbatchable))
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._arriving = 0  # requests between their arrival and submit() (see arriving())
        # worker-thread state
        self._bg: Any = None
        self._active: dict[int, _Active] = {}
        self._ready: list[_Ready] = []
        self._parked: list[_Parked] = []
        self._solo: _Solo | None = None
        self._service_s = 5.0  # moving average of request durations, for retry-after
        self._prefill_rate = 200.0  # moving average of prefill tokens/s, for ageing (see _rank)
        self.metrics.bind_engine(self)

    # -- caller side (any thread)

    def cache_info(self) -> dict[str, Any]:
        """The model's cache family and the reuse policy (for /health)."""
        info = self.cache_family.as_dict() if self.cache_family is not None else {}
        if self.store is None:
            info["policy"] = "prefix cache off: every request prefills in full"
        return info

    @property
    def depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests admitted: in the batch (prefilling or decoding), waiting for their turn to
        prefill, or parked for another's prefill."""
        return len(self._active) + len(self._ready) + len(self._parked) + (self._solo is not None)

    @property
    def waiting_prefill(self) -> int:
        """Requests admitted and waiting for their turn to read their prompt (see _schedule)."""
        return len(self._ready)

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def alive(self) -> bool:
        """False once the worker thread has died (a never-started engine is not dead)."""
        return self._thread is None or self._thread.is_alive()

    def batch_sizes(self) -> tuple[int, int]:
        """(decoding, prefilling) sequences in the batch right now."""
        solo = self._solo
        active = list(self._active.values()) + ([solo] if solo is not None else [])
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
            self._thread = threading.Thread(target=self._run_worker, name="mlx-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel everything running and queued, then end the worker thread: it finishes the
        step it is in (and any store that step makes) and leaves. Returns False when it did
        not within ``timeout`` seconds: it is then still inside an MLX call, and the process
        must not finalize around it (see ``server/__main__.py``)."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
        for req in pending:
            req.cancel.set()
            req.emit(ShuttingDown("the server is shutting down"))
        thread = self._thread  # stop() may run in two threads at once (signal handler, exit path)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("MLX worker did not stop within %.0f s", timeout)
                return False
            self._thread = None
        return True

    @contextlib.contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Wrap what happens between a request's arrival and :meth:`submit` (reading, parsing,
        tokenizing), and pass the yielded ticket to ``submit``. A request that would start alone
        waits up to ``arrival_window`` seconds for the others being read at that moment, so
        requests sent together start together instead of one alone and the rest a prefill step
        later."""
        ticket = Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield ticket
        finally:
            with self._cond:
                self._arrived(ticket)

    def _arrived(self, ticket: Arrival) -> None:
        if not ticket.done:  # under self._cond
            ticket.done = True
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, req: GenerationRequest, arrival: Arrival | None = None) -> None:
        """Queue ``req``; raises :class:`Overloaded` at once when the queue is full."""
        if not self.alive:
            raise WorkerDead("the MLX worker thread has died; restart the server")
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"the server is busy: {self.max_queue} requests are already waiting",
                                 self.retry_after())
            self._pending.append(req)
            if arrival is not None:
                self._arrived(arrival)
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

        self._eos_ids = set(self.tokenizer.eos_token_ids)
        self._eos = StopSequences([(t,) for t in self._eos_ids])
        return BatchGenerator(self.model, completion_batch_size=self.decode_concurrency,
                              prefill_batch_size=self.prompt_concurrency,
                              prefill_step_size=self.prefill_step_size)

    def _run_worker(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside any request: the worker is gone, say so everywhere
            log.critical("the MLX worker thread died; /health now reports it", exc_info=True)
            dead = WorkerDead(f"the MLX worker thread has died ({type(e).__name__}); restart the server")
            with self._cond:
                pending, self._pending = list(self._pending), collections.deque()
            running = ([a.req for a in self._active.values()] + [r.req for r in self._ready]
                       + [p.req for p in self._parked])
            if self._solo is not None:
                running.append(self._solo.req)
            self._active.clear()
            self._ready.clear()
            self._parked.clear()
            self._solo = None
            for req in running + pending:  # nobody waits forever for a worker that is gone
                req.emit(dead)

    def _loop(self) -> None:
        self._bg = self._make_batch()
        while True:
            with self._cond:
                while not self._stopping and not self.running and not self._pending:
                    self._cond.wait()
                if self.solo and not self.running and len(self._pending) == 1 and self._arriving:
                    # others are being read right now: let them arrive (see arriving())
                    self._cond.wait_for(lambda: self._stopping or not self._arriving, timeout=self.arrival_window)
                if self._stopping:
                    break
                room = self.decode_concurrency - self.running
                incoming = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                alone = (self.solo or not self.batchable) and not self.running and (
                    not self._pending and len(incoming) == 1 or not self.batchable)
            for req in incoming:
                self._admit(req, solo_ok=alone and self._solo is None)
            try:
                if self._solo is not None and self._solo_yields():
                    self._migrate()  # company it must share the steps with: it joins the others
            except Exception as e:
                log.exception("moving the running request into the batch failed")
                self._solo.req.emit(e)
                self._solo = None
            try:
                self._sweep()
                if self._solo is not None:
                    self._solo_step()
                else:
                    self._schedule()
                    if self._active:
                        self._step()
                self._release_parked()
            except Exception as e:  # a failing step fails the batch, never the worker
                failed = list(self._active.values()) + ([self._solo] if self._solo is not None else [])
                log.exception("batch step failed; failing the %d requests in it", len(failed))
                for a in failed:
                    a.req.emit(e)
                self._active.clear()
                self._solo = None
                self._bg = self._make_batch()
        # stopping: a request still reading its prompt gets a 503 it can retry; an answer under
        # way ends as cancelled
        bye = ShuttingDown("the server is shutting down")
        for a in list(self._active.values()) + ([self._solo] if self._solo is not None else []):
            a.req.emit(Done("cancelled", a.output_tokens) if a.prefilled_at is not None else bye)
        self._solo = None
        for w in self._ready + self._parked:
            w.req.emit(bye)
        self._active.clear()
        self._ready.clear()
        self._parked.clear()
        self._bg = None

    def _admit(self, req: GenerationRequest, solo_ok: bool = False, parked_since: float | None = None) -> None:
        """A request leaves the queue (or a park, ``parked_since`` set): stopped already, parked
        behind a leader, alone (solo), or ready to prefill when its turn comes (_schedule)."""
        why = req.stopped()
        if why:
            req.emit(Done(why, 0))
            return
        try:
            leader = self._leader_for(req)
            if leader is not None:
                x, shared = leader
                if isinstance(x, _Active) and x.prefilled_at is not None:
                    self._share(x)  # its whole prompt is in the batch already: store it now
                else:
                    since = time.monotonic() if parked_since is None else parked_since
                    self._parked.append(_Parked(req, x.req, shared, since))
                    self.metrics.dedup_waits.inc()
                    return
            if solo_ok and parked_since is None:
                self._start_solo(req)
                return
            parked_ms = 0.0 if parked_since is None else (time.monotonic() - parked_since) * 1000
            estimate = self.store.peek(req.tokens) if self.store is not None else 0
            self._ready.append(_Ready(req, parked_since is not None, parked_ms, estimate))
        except Exception as e:  # this request's failure (e.g. the store's), not the batch's
            log.exception("could not start a request")
            req.emit(e)

    def _leader_for(self, req: GenerationRequest) -> tuple[_Active | _Ready, int] | None:
        """The admitted request whose prompt shares the most not-yet-cached tokens with req's,
        if that is at least ``dedup_min_tokens`` more than the store has of it already."""
        if self.store is None:  # nothing to fetch after a wait: waiting would only delay it
            return None
        best: tuple[_Active | _Ready, int] | None = None
        limit = len(req.tokens) - 1
        solo = [self._solo] if self._solo is not None else []
        for x in [*solo, *self._active.values(), *self._ready]:
            s = min(shared_prefix(x.tokens, req.tokens), limit)
            if s - x.covered >= self.dedup_min_tokens and (best is None or s > best[1]):
                best = (x, s)
        return best

    def _find(self, req: GenerationRequest) -> _Active | _Ready | None:
        if self._solo is not None and self._solo.req is req:
            return self._solo
        for a in self._active.values():
            if a.req is req:
                return a
        for r in self._ready:
            if r.req is req:
                return r
        return None

    def _has_waiters(self, req: GenerationRequest) -> bool:
        return any(p.leader is req for p in self._parked)

    # -- who reads its prompt next
    #
    # mlx-lm's BatchGenerator reads a chunk of every prompt in its prompt batch at every step,
    # right-padded to the longest chunk. Left to itself, four prompts that arrive together all
    # finish reading at the end of the four (each request's TTFT is the whole batch's prefill
    # time), and a short prompt beside a long one pays for the padding. So the engine decides
    # who is in the prompt batch, step by step (_schedule): shortest remaining prompt first
    # (the order that minimises the mean wait), several prompts in one step only while the
    # padded step stays within ``prefill_step_size`` tokens (four short prompts read in one
    # step; two long ones one after the other), a prompt others are parked on first (its
    # prefill serves them all), side requests such as a conversation title last (they yield
    # to the turn a user waits for), and ageing so that a long prompt is never starved: a
    # request that has waited t seconds counts as t * (prefill rate) tokens shorter. A prompt
    # that loses its place mid-way leaves the batch with its KV state (_preempt) and goes on
    # later from there. Decoding streams are untouched by all of this: every step decodes them.

    def _rank(self, x: _Active | _Ready, now: float) -> tuple[int, float, float]:
        group = 0 if self._has_waiters(x.req) else 2 if x.req.background else 1
        remaining = len(x.tokens) - x.progress
        return group, remaining - self._prefill_rate * (now - x.req.submitted), x.req.submitted

    def _schedule(self) -> None:
        prefilling = [a for a in self._active.values() if a.prefilled_at is None]
        if not self._ready:
            return
        if not self.batchable:  # one at a time: the best-placed waiting request runs alone
            now = time.monotonic()
            r = min(self._ready, key=lambda x: self._rank(x, now))
            self._ready.remove(r)
            try:
                self._start_solo_from(r)
            except Exception as e:  # this request's failure (e.g. the store's), not the batch's
                log.exception("could not start a request")
                r.req.emit(e)
            return
        if any(a.prefilled_at is not None and a.first_token_at is None for a in self._active.values()):
            return  # a request's first token is due next step: no new prompt chunk delays it
        if self.prefill_order == "arrival":  # as mlx_lm.server: every admitted prompt at once
            for r in list(self._ready):
                self._ready.remove(r)
                self._insert_or_fail(r)
            return
        now = time.monotonic()
        chosen: list[_Active | _Ready] = []
        widest = 0
        for x in sorted([*prefilling, *self._ready], key=lambda x: self._rank(x, now)):
            if len(chosen) >= self.prompt_concurrency:
                break
            chunk = min(max(1, len(x.tokens) - x.progress), self.prefill_step_size)
            if chosen and max(widest, chunk) * (len(chosen) + 1) > self.prefill_step_size:
                continue
            chosen.append(x)
            widest = max(widest, chunk)
        keep = {id(x) for x in chosen}
        for a in prefilling:
            if id(a) not in keep and not self._has_waiters(a.req):
                self._preempt(a)
        if self.solo and not self._active and len(chosen) == 1 and isinstance(chosen[0], _Ready):
            # one prompt to read and nothing in the batch: it runs alone, outside the batch (see
            # _start_solo), while the others wait for their turn
            self._ready.remove(chosen[0])
            try:
                self._start_solo_from(chosen[0])
            except Exception as e:  # this request's failure (e.g. the store's), not the batch's
                log.exception("could not start a request")
                chosen[0].req.emit(e)
            return
        for x in chosen:
            if isinstance(x, _Ready):
                self._ready.remove(x)
                self._insert_or_fail(x)

    def _solo_yields(self) -> bool:
        """Whether the solo request must move in with the others: it is generating and others
        wait to read their prompts (beside its decode steps), or the scheduler puts another
        prompt before it. Otherwise it reads its prompt on alone, which is faster than a batch
        of one, while the others wait for their turn as they would in the batch."""
        s = self._solo
        assert s is not None
        if not self._ready or not self.batchable:
            return False
        if s.prefilled_at is not None:
            return True
        now = time.monotonic()
        return min([s, *self._ready], key=lambda x: self._rank(x, now)) is not s

    def _insert_or_fail(self, r: _Ready) -> None:
        try:
            self._insert(r)
        except Exception as e:  # this request's failure (e.g. the store's), not the batch's
            log.exception("could not start a request")
            r.req.emit(e)

    def _insert(self, r: _Ready) -> _Active:
        """Into the batch: a fresh request fetches its cached prefix now (so it gets whatever
        was stored while it waited), one that read part of its prompt before goes on from there."""
        from mlx_lm.models.cache import make_prompt_cache
        from warmturn.server.sampling import make_sampler  # restores the random state if it raises

        req, tokens = r.req, r.req.tokens
        if r.state is not None and r.kv is not None:
            kv, start, sampler = r.kv, r.state.in_cache, r.state.sampler
        else:
            kv, start = self.store.fetch(tokens) if self.store is not None else (make_prompt_cache(self.model), 0)
            sampler = make_sampler(temp=req.temperature, top_p=req.top_p, top_k=req.top_k)
        # A segment boundary at the end of system+tools: BatchGenerator stops a chunk there,
        # so the checkpoint is stored exactly at that length (see _on_prompt_progress).
        cuts = [p for p in req.mark_points() if start < p < len(tokens) - 1]
        segments = [tokens[a:b] for a, b in zip([start, *cuts], [*cuts, len(tokens)])]
        (uid,) = self._bg.insert_segments([segments], max_tokens=[req.max_tokens], caches=[kv],
                                          all_tokens=[list(tokens[:start])], samplers=[sampler],
                                          stop_sequences=[self._eos])
        now = time.monotonic()
        if r.state is not None:
            a = r.state
            a.uid, a.base = uid, start
        else:
            queued_ms = (now - req.submitted) * 1000
            a = _Active(req, uid, start, now, queued_ms, r.parked_ms, self.tokenizer.detokenizer,
                        in_cache=start, base=start, last_log=now, sampler=sampler)
            self.metrics.queue_wait.observe(queued_ms / 1000)
            req.emit(Admitted(start, len(tokens), queued_ms))
            if r.was_parked:
                self.metrics.dedup_tokens.inc(start)
        self._active[uid] = a
        return a

    def _preempt(self, a: _Active) -> None:
        """Take a request that is reading its prompt out of the batch, with the KV state it has,
        so that another prompt goes first; it goes on from there when its turn comes again."""
        from mlx_lm.models.cache import trim_prompt_cache

        from warmturn.server.kvfamily import fed_tokens

        kv, held = self._bg.remove([a.uid], return_prompt_caches=True)[a.uid]
        del self._active[a.uid]
        fed = fed_tokens(kv)
        fed = len(held) if fed is None else fed
        a.in_cache = min(len(held), fed)
        if fed > a.in_cache and trim_prompt_cache(kv, fed - a.in_cache) != fed - a.in_cache:
            # a window or state cache past the point its tokens say: start again from the store
            self._ready.append(_Ready(a.req, was_parked=False, parked_ms=a.parked_ms))
        else:
            self._ready.append(_Ready(a.req, state=a, kv=kv))
        self.metrics.preemptions.inc()

    def _sweep(self) -> None:
        """Take cancelled and timed-out requests out of the batch (storing what they computed)."""
        solo = self._solo
        if solo is not None and (why := solo.req.stopped()):
            self._solo = None
            if solo.prefilled_at is None and why == "timeout":
                solo.req.emit(RequestTimeout("the request's time limit passed during prefill"))
            else:
                solo.req.emit(Done(why, solo.output_tokens))
            self._store_solo(solo)
        gone = {uid: why for uid, a in self._active.items() if (why := a.req.stopped())}
        if gone:
            caches = self._bg.remove(list(gone), return_prompt_caches=self.store is not None)
            for uid, why in gone.items():
                a = self._active.pop(uid)
                if uid in caches:
                    kv, held = caches[uid]
                    if len(held) > max(a.reused, a.shared):
                        self._store(a, held, kv, exact=a.prefilled_at is None)
                if a.prefilled_at is None and why == "timeout":
                    a.req.emit(RequestTimeout("the request's time limit passed during prefill"))
                else:
                    a.req.emit(Done(why, a.output_tokens))
        for r in list(self._ready):
            why = r.req.stopped()
            if why:
                self._ready.remove(r)
                if r.kv is not None and r.in_cache > r.covered:
                    self._store(r.state, list(r.tokens[: r.in_cache]), r.kv, exact=True)  # what it computed
                r.req.emit(RequestTimeout("the request's time limit passed during prefill") if why == "timeout"
                           else Done(why, 0))
        for p in list(self._parked):
            why = p.req.stopped()
            if why:
                self._parked.remove(p)
                p.req.emit(Done(why, 0))

    def _release_parked(self) -> None:
        """Parked requests whose leader has computed (and stored) their shared part, or is gone.

        Requests released together are admitted again, one by one, so they dedup against each
        other too: several parked on one leader for a short shared part (the tools) may share a
        longer one among themselves (a subagent system prompt). The one sharing the longest
        prefix with another released request goes first; the others then find it running and
        park on it for the longer part (or join at once when nothing more is shared)."""
        released: list[_Parked] = []
        for p in list(self._parked):
            x = self._find(p.leader)
            if x is not None and x.in_cache < p.shared:
                continue
            if x is not None and x.shared < p.shared:
                self._share(x)
            self._parked.remove(p)
            released.append(p)
        if len(released) > 1:
            longest = {id(p): max(shared_prefix(p.req.tokens, q.req.tokens) for q in released if q is not p)
                       for p in released}
            released.sort(key=lambda p: longest[id(p)], reverse=True)  # stable: ties keep arrival order
        for p in released:
            self._admit(p.req, parked_since=p.since)

    def _share(self, x: _Active | _Ready, checkpoint: bool = False) -> None:
        """Store what the batch holds of ``x`` now (an extracted copy), so others can fetch it."""
        if self.store is None:
            return
        if isinstance(x, (_Ready, _Solo)):  # outside the batch, with the KV state it has read: a copy
            state = x if isinstance(x, _Solo) else x.state
            if x.kv is None or x.in_cache <= x.covered or state is None:
                return
            kv, n = x.kv, x.in_cache
            if self._marks and isinstance(x, _Solo) and x.fed != n:
                # answering already: its state is past the prompt; resume from the last mark in it
                from warmturn.server.kvfamily import view

                n = max((p for p in x.marks if p <= x.in_cache), default=0)
                if n <= x.covered:
                    return
                kv = view(x.kv, n, x.marks[n])
            if self._try_store(x.tokens[:n], kv, marks={p: m for p, m in state.marks.items() if p < n}):
                state.shared = n
            return
        a = x
        kv, held = self._bg.extract_cache([a.uid])[a.uid]
        held = list(held)
        if len(held) <= max(a.reused, a.shared):
            return
        self._store(a, held, kv, checkpoints=[len(held)] if checkpoint else (), exact=a.prefilled_at is None)
        a.shared = len(held)

    def _store(self, a: _Active, held: list[int], kv: list[Any], checkpoints: Sequence[int] = (),
               exact: bool = False) -> bool:
        """Hand an extracted cache over to the store, told the tokens it was fed: the count its
        attention leaves keep, or ``len(held)`` when the caller knows kv holds exactly those
        (``exact``: a prompt being read; an answer's last token may not have been fed yet)."""
        from warmturn.server.kvfamily import fed_tokens

        fed = fed_tokens(kv)
        if fed is None and exact:
            fed = len(held)
        if fed is None:
            log.debug("prefix cache: token count of an extracted cache unknown, not stored")
            return False
        return self._try_store(held[:fed], kv, checkpoints=checkpoints, owned=True, marks=a.marks)

    def _try_store(self, tokens: Sequence[int], kv: list[Any], **kwargs: Any) -> bool:
        """store() whose failure is logged and skipped: a cache that could not be kept never
        fails the request that computed it."""
        try:
            self.store.store(tokens, kv, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("prefix cache: %d tokens not stored: %s", len(tokens), e, exc_info=log.isEnabledFor(logging.DEBUG))
            return False

    def _take_mark(self, x: _Active, kv: list[Any] | None) -> None:
        """At a point later requests may resume at (GenerationRequest.mark_points), keep what a
        window or state cache needs to resume there. ``kv`` None: x is in the batch (a copy is
        extracted)."""
        p = x.in_cache
        if not self._marks or p <= x.reused or p in x.marks or p not in x.req.mark_points():
            return
        try:
            if kv is None:
                kv, _ = self._bg.extract_cache([x.uid])[x.uid]
            x.marks[p] = self.store.mark(kv)
        except Exception as e:  # noqa: BLE001 - a mark that fails only loses that resume point
            log.warning("prefix cache: no resume point at %d tokens: %s", p, e)

    def _created(self, x: _Active) -> int:
        """Prompt tokens this request computed that the store will hold (cache_creation)."""
        if self.store is None or not self.store.admits(len(x.tokens)):
            return 0
        return len(x.tokens) - 1 - x.reused

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
        if a.prefilled_at is not None:  # moved in from solo mid-answer: its prompt was done before
            return
        done, total = r.progress
        if r.end_of_prompt:
            a.in_cache = len(a.tokens)
            a.prefilled_at = now
            computed = len(a.tokens) - a.reused
            self._prefill_rate = 0.8 * self._prefill_rate + 0.2 * computed / max(now - a.joined, 1e-3)
            self.metrics.prefill_tokens.inc(computed)
            self.metrics.reused_tokens.inc(a.reused)
            self.metrics.prefill_time.observe(now - a.joined)
            a.req.emit(Prefilled(a.reused, self._created(a), (now - a.joined) * 1000, a.queued_ms, len(a.tokens),
                                 a.parked_ms))
            return
        a.in_cache = a.base + done
        if r.end_of_segment:
            self._take_mark(a, None)
            if a.in_cache == a.req.prefix_len and a.reused < a.in_cache:
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
            self._store(a, list(r.all_tokens), r.prompt_cache, checkpoints=ck)

    # -- one request alone: outside the batch
    #
    # Why not BatchGenerator for a lone request too: for a batch of one, mlx-lm's batch
    # classes copy the whole reused prefix several times before the first token (merging the
    # fetched cache into a BatchKVCache, growing that buffer on the first chunk, deep-copying
    # the prompt batch when the sequence moves to decoding) and empty MLX's buffer cache after
    # every prefill chunk. On a warm turn that is pure overhead above the floor (an mlx-lm
    # prefill of the new tokens on a built cache). So a request that runs alone is served the
    # way mlx-lm's generate_step serves one (plain KVCache, the next token computed while the
    # current one is handed out), step by step like the batch, and the moment another request
    # arrives it moves into the BatchGenerator with its KV state and goes on there (_migrate).

    def _start_solo(self, req: GenerationRequest, parked_ms: float = 0.0, was_parked: bool = False) -> None:
        from mlx_lm.models.cache import make_prompt_cache
        from warmturn.server.sampling import make_sampler  # restores the random state if it raises

        if self.store is not None:
            kv, reused = self.store.fetch(req.tokens)
        else:
            kv, reused = make_prompt_cache(self.model), 0
        now = time.monotonic()
        queued_ms = (now - req.submitted) * 1000
        self._solo = _Solo(req, -1, reused, now, queued_ms, parked_ms, self.tokenizer.detokenizer, in_cache=reused,
                           last_log=now, kv=kv, fed=reused,
                           sampler=make_sampler(temp=req.temperature, top_p=req.top_p, top_k=req.top_k))
        self.metrics.queue_wait.observe(queued_ms / 1000)
        req.emit(Admitted(reused, len(req.tokens), queued_ms))
        if was_parked:
            self.metrics.dedup_tokens.inc(reused)

    def _start_solo_from(self, r: _Ready) -> None:
        """A waiting request's turn came with nothing else in the batch: it runs solo, from
        where it stopped if it has read part of its prompt already."""
        if r.state is None or r.kv is None:
            self._start_solo(r.req, r.parked_ms, r.was_parked)
            return
        self._solo = _Solo(**{f.name: getattr(r.state, f.name) for f in fields(_Active)}, kv=r.kv,
                           fed=r.state.in_cache)
        self._solo.uid = -1  # outside the batch

    def _sample(self, s: _Solo, logits: Any) -> Any:
        import mlx.core as mx

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = s.sampler(logprobs)
        mx.async_eval(y)
        return y

    def _solo_step(self) -> None:
        """One prefill chunk, or the last prompt token, or one decode step of the solo request."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        s = self._solo
        assert s is not None
        tokens = s.tokens
        now = time.monotonic()
        if s.prefilled_at is None:
            end = len(tokens) - 1
            stop = min(s.in_cache + self.prefill_step_size, end)
            for p in s.req.mark_points():
                if s.in_cache < p < stop:
                    stop = p  # a chunk ends at each point a later request may resume at
                    break
            if s.in_cache < stop:
                with mx.stream(generation_stream):
                    self.model(mx.array(tokens[s.in_cache:stop])[None], cache=s.kv)
                    mx.eval([c.state for c in s.kv])
                s.in_cache = s.fed = stop
                self._take_mark(s, s.kv)
                if stop == s.req.prefix_len and s.reused < stop and self.store is not None:
                    # the system+tools checkpoint, as soon as it exists (a copy: kv goes on)
                    if self._try_store(tokens[:stop], s.kv, checkpoints=[stop], marks=s.marks):
                        s.shared = stop
                if now - s.last_log >= self.progress_every:
                    s.last_log = now
                    done, total = stop - s.reused, len(tokens) - s.reused
                    rate = done / max(now - s.joined, 1e-9)
                    log.info("prefill %s: %d/%d tokens, %.0f tok/s, ETA %.0f s", s.req.request_id or "solo",
                             done, total, rate, (total - done) / max(rate, 1e-9))
                if stop < end:
                    return
            with mx.stream(generation_stream):
                s.y = self._sample(s, self.model(mx.array(tokens[-1:])[None], cache=s.kv)[:, -1, :])
            now = time.monotonic()
            s.in_cache = s.fed = len(tokens)
            s.prefilled_at = now
            self._prefill_rate = 0.8 * self._prefill_rate + 0.2 * (len(tokens) - s.reused) / max(now - s.joined, 1e-3)
            self.metrics.prefill_tokens.inc(len(tokens) - s.reused)
            self.metrics.reused_tokens.inc(s.reused)
            self.metrics.prefill_time.observe(now - s.joined)
            s.req.emit(Prefilled(s.reused, self._created(s), (now - s.joined) * 1000, s.queued_ms, len(tokens), 0.0))
            return
        y = s.y
        if s.output_tokens + 1 < s.req.max_tokens:  # compute the next token while this one goes out
            with mx.stream(generation_stream):
                s.y = self._sample(s, self.model(y[None], cache=s.kv)[:, -1, :])
            s.fed += 1
        else:
            s.y = None
        self._solo_token(s, y.item())

    def _solo_token(self, s: _Solo, token: int) -> None:
        """Hand out one generated token of the solo request; end it on EOS or max_tokens."""
        now = time.monotonic()
        s.generated.append(token)
        if token in self._eos_ids:
            self._finish_solo(s, "stop", now)
            return
        s.output_tokens += 1
        s.detok.add_token(token)
        if s.first_token_at is None:
            s.first_token_at = now
        if s.output_tokens >= s.req.max_tokens:
            self._finish_solo(s, "length", now)
            return
        seg = s.detok.last_segment
        if seg:
            s.req.emit(Piece(seg, s.output_tokens))

    def _finish_solo(self, s: _Solo, reason: Literal["stop", "length"], now: float) -> None:
        s.detok.finalize()
        seg = s.detok.last_segment
        if seg:
            s.req.emit(Piece(seg, s.output_tokens))
        self._solo = None
        elapsed = now - (s.first_token_at or now)
        tps = (s.output_tokens - 1) / elapsed if elapsed > 0 and s.output_tokens > 1 else 0.0
        self.metrics.generated_tokens.inc(s.output_tokens)
        s.req.emit(Done(reason, s.output_tokens, tps))
        self._service_s = 0.8 * self._service_s + 0.2 * (now - s.req.submitted)
        self._store_solo(s)

    def _store_solo(self, s: _Solo) -> None:
        """Hand the solo request's KV over to the store: prompt + every token fed back."""
        if self.store is None or s.in_cache <= max(s.reused, s.shared):
            return
        held = (list(s.tokens[: s.in_cache]) + (s.generated if s.prefilled_at is not None else []))
        ck = [s.req.prefix_len] if 0 < s.req.prefix_len < s.in_cache else []
        self._try_store(held[: s.fed], s.kv, checkpoints=ck, owned=True, marks=s.marks)

    def _migrate(self) -> None:
        """Another request arrived: the solo request goes on with the others, with the KV state it
        has, exactly where it is: mid-answer into the BatchGenerator, mid-prompt back to the
        requests waiting for their turn to prefill (_schedule)."""
        s = self._solo
        assert s is not None
        tokens = s.tokens
        if s.prefilled_at is None:  # mid-prompt: its turn to go on comes from _schedule
            self._ready.append(_Ready(s.req, state=s.copy_state(), kv=s.kv))
            self._solo = None
            return
        # the token sampled last is not handed out yet: out with it first (it may end it)
        self._solo_token(s, s.y.item())
        if self._solo is None:
            return
        # kv holds the prompt and every generated token but that last one, which the
        # batch feeds next; it samples the rest (its first answer is the token after it)
        segments = [[s.generated[-1]]]
        held, max_tokens = list(tokens) + s.generated[:-1], s.req.max_tokens - s.output_tokens
        (uid,) = self._bg.insert_segments([segments], max_tokens=[max_tokens], caches=[s.kv], all_tokens=[held],
                                          samplers=[s.sampler], stop_sequences=[self._eos])
        a = s.copy_state()
        a.uid, a.base = uid, s.in_cache
        self._active[uid] = a
        self._solo = None
