"""The MLX worker: one thread runs every prefill and decode step, for many requests at once.

Around mlx-lm's continuous batching (server/batch.py) this module adds what a server needs:

- a bounded wait queue in front of the batch (full: :class:`Overloaded`, a 529); a request
  is admitted between two steps as soon as fewer than ``decode_concurrency`` run;
- the choice of who reads its prompt in each step (server/scheduler.py: shortest remaining
  prompt first, several short prompts in one step, a title request after the turns, ageing);
  a prompt that loses its place leaves the batch with its KV state and resumes;
- requests that arrive together (being read and tokenized at the same moment, see
  :meth:`Engine.arriving`) start together;
- per-request cancellation and deadlines, checked between steps (so within one token), and a
  queued request can be withdrawn at once (:meth:`Engine.withdraw`);
- the cross-request prefix store (server/cache.py), reached through server/keeper.py: fetch
  when a request starts, store its system+tools checkpoint when prefill reaches it, marks for
  window and state caches, prompt + answer when it ends;
- in-flight dedup: a request sharing a not-yet-cached prefix with one being prefilled waits
  ("parks") until that one has computed the shared part, which is then stored, and fetches it
  from the store instead of computing it again; requests released from a park together are
  deduplicated against each other the same way;
- a request that runs alone is served outside the batch, the way mlx-lm's ``generate_step``
  serves one (server/solo.py), and moves into the batch when another arrives.

Each admitted request is one :class:`~warmturn.server.lifecycle.Flight`; its transitions
(admitted, prefilled, a token, done, stopped, failed) and their bookkeeping live there. Results
go back through the request's ``emit`` callback. A failing step fails the requests in the batch;
the worker itself goes on.

KV state is never shared mutably: the store hands out private caches (``fetch``), the batch
copies them into its own buffers (``BatchKVCache.merge``), and everything stored is either an
extracted copy the batch no longer touches or the lone request's cache, handed over when it ends.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

from warmturn.server import scheduler
from warmturn.server.batch import BatchPath
from warmturn.server.keeper import Keeper, PromptCacheStore
from warmturn.server.lifecycle import (
    Admitted,
    Arrival,
    Done,
    Flight,
    GenerationRequest,
    Overloaded,
    Phase,
    Piece,
    Prefilled,
    Rates,
    RequestTimeout,
    ShuttingDown,
    Where,
    WorkerDead,
    prompt_usage,
)
from warmturn.server.metrics import Metrics
from warmturn.server.solo import SoloPath

__all__ = [
    "Admitted", "Arrival", "Done", "Engine", "GenerationRequest", "Overloaded", "Piece", "Prefilled",
    "PromptCacheStore", "RequestTimeout", "ShuttingDown", "WorkerDead", "prompt_usage",
]

log = logging.getLogger(__name__)


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
        arrival_grace: float = 0.0,
        prefill_order: Literal["shortest", "arrival"] = "shortest",
        metrics: Metrics | None = None,
    ) -> None:
        if decode_concurrency < 1 or prompt_concurrency < 1 or prefill_step_size < 1:
            raise ValueError("concurrency limits and the prefill step size must be at least 1")
        if prefill_order not in ("shortest", "arrival"):
            raise ValueError(f"prefill_order must be 'shortest' or 'arrival', not {prefill_order!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.prefill_step_size = prefill_step_size
        self.dedup_min_tokens = dedup_min_tokens
        self.progress_every = progress_every  # seconds between progress lines of a long prefill
        self.solo = solo  # serve a lone request outside the batch (False: for A/B measurements)
        self.arrival_window = arrival_window  # seconds a lone request waits for others being read
        self.arrival_grace = arrival_grace  # an idle engine's first request is at least this old when it starts
        self.prefill_order = prefill_order  # "arrival": every admitted prompt is read at once (A/B)
        self.metrics = metrics or Metrics()
        self.rates = Rates(self.metrics)
        self._batch: BatchPath | None = None
        self.keeper = Keeper(store, self._make_cache)
        self._solo_path = SoloPath(model, self.keeper, self.rates, prefill_step_size=prefill_step_size,
                                   progress_every=progress_every)
        self.cache_family = getattr(store, "family", None)
        # mlx-lm batches every cache class but ChunkedKVCache (Llama 4): such a model is served
        # one request at a time, each the way a lone request is
        self.batchable = True
        if model is not None:
            from warmturn.server.kvfamily import family_of, leaves

            fresh = self._make_cache()
            self.cache_family = self.cache_family or family_of(fresh)
            unbatchable = sorted({type(c).__name__ for c in leaves(fresh) if not hasattr(c, "merge")})
            if unbatchable:
                self.batchable = False
                log.warning("mlx-lm cannot batch %s caches: requests to this model run one at a time",
                            ", ".join(unbatchable))
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._arriving = 0  # requests between their arrival and submit() (see arriving())
        # worker-thread state: every admitted request, and the batch
        self._flights: list[Flight] = []
        self.metrics.bind_engine(self)

    @property
    def store(self) -> PromptCacheStore | None:
        """The cross-request KV store (None: --no-cache)."""
        return self.keeper.store

    @store.setter
    def store(self, store: PromptCacheStore | None) -> None:
        self.keeper = Keeper(store, self._make_cache)
        self._solo_path.keeper = self.keeper
        if self._batch is not None:
            self._batch.keeper = self.keeper

    def _make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    # -- caller side (any thread)

    def cache_info(self) -> dict[str, Any]:
        """The model's cache family and the reuse policy (for /health)."""
        info = self.cache_family.as_dict() if self.cache_family is not None else {}
        if self.store is None:
            info["policy"] = "prefix cache off: every request prefills in full"
        return info

    def flights(self) -> list[Flight]:
        """The admitted requests, in admission order (a snapshot, for tests and gauges)."""
        return list(self._flights)

    def _where(self, where: Where) -> list[Flight]:
        return [f for f in self._flights if f.where is where and f.phase is not Phase.DONE]

    @property
    def depth(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests admitted: in the batch or alone (prefilling or decoding), waiting for their
        turn to prefill, or parked for another's prefill."""
        return sum(f.phase is not Phase.DONE for f in self._flights)

    @property
    def waiting_prefill(self) -> int:
        """Requests admitted and waiting for their turn to read their prompt."""
        return len(self._where(Where.READY))

    @property
    def parked(self) -> int:
        """Requests waiting for another request's prefill of a prefix they share (dedup)."""
        return len(self._where(Where.PARKED))

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def alive(self) -> bool:
        """False once the worker thread has died (a never-started engine is not dead)."""
        return self._thread is None or self._thread.is_alive()

    def batch_sizes(self) -> tuple[int, int]:
        """(decoding, prefilling) sequences in the batch or alone right now."""
        running = self._where(Where.BATCH) + self._where(Where.SOLO)
        decoding = sum(f.prefilled_at is not None for f in running)
        return decoding, len(running) - decoding

    def retry_after(self) -> int:
        """Seconds a refused client should wait (scheduler.retry_after)."""
        return scheduler.retry_after(self.depth, self.decode_concurrency, self.rates.service_s.value)

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
                req.arrived = arrival.started
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

    def _new_batch(self) -> BatchPath:
        return BatchPath(self.model, self.tokenizer, self.keeper, self.rates,
                         decode_concurrency=self.decode_concurrency, prompt_concurrency=self.prompt_concurrency,
                         prefill_step_size=self.prefill_step_size, progress_every=self.progress_every)

    def _run_worker(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside any request: the worker is gone, say so everywhere
            log.critical("the MLX worker thread died; /health now reports it", exc_info=True)
            dead = WorkerDead(f"the MLX worker thread has died ({type(e).__name__}); restart the server")
            with self._cond:
                pending, self._pending = list(self._pending), collections.deque()
            running = [f for f in self._flights if f.phase is not Phase.DONE]
            self._flights = []
            for f in running:  # nobody waits forever for a worker that is gone
                f.fail(dead)
            for req in pending:
                req.emit(dead)

    def _gather(self) -> None:
        """(Under ``self._cond``.) The engine is idle and has work: let the requests sent together
        with it arrive first, so that they read their prompts in one step instead of one alone and
        the rest a step later, while the first one waits. It waits while others are being read
        (up to ``arrival_window``), and until the oldest request is ``arrival_grace`` old since it
        began to arrive (reading and rendering it count), unless the batch is full already."""
        window_end = time.monotonic() + self.arrival_window
        grace_end = self._pending[0].arrived + self.arrival_grace
        while not self._stopping and len(self._pending) < self.decode_concurrency:
            now = time.monotonic()
            if self._arriving and now < window_end:
                self._cond.wait(window_end - now)
            elif now < grace_end:
                self._cond.wait(grace_end - now)
            else:
                return

    def _loop(self) -> None:
        self._batch = self._new_batch()
        while True:
            with self._cond:
                while not self._stopping and not self.running and not self._pending:
                    self._cond.wait()
                if not self.running and self._pending:
                    self._gather()
                if self._stopping:
                    break
                room = self.decode_concurrency - self.running
                incoming = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                alone = (self.solo or not self.batchable) and not self.running and (
                    (not self._pending and len(incoming) == 1) or not self.batchable)
            for req in incoming:
                f = Flight(req)
                self._flights.append(f)
                self._admit(f, solo_ok=alone and self._solo is None)
            self._turn()
            self._flights = [f for f in self._flights if f.phase is not Phase.DONE]
        # stopping: a request still reading its prompt gets a 503 it can retry; an answer under
        # way ends as cancelled
        for f in self._flights:
            if f.phase is not Phase.DONE:
                f.shut_down()
        self._flights = []
        self._batch = None

    def _turn(self) -> None:
        """One step of the worker: whoever must move in moves in, stopped requests leave, then
        one solo step or one batch step, then parked requests whose prefix is ready go on."""
        solo = self._solo
        try:
            if solo is not None and self._solo_yields(solo):
                self._migrate(solo)  # company it must share the steps with: it joins the others
        except Exception as e:
            log.exception("moving the running request into the batch failed")
            solo.fail(e)
        try:
            self._sweep()
            solo = self._solo
            if solo is not None:
                self._solo_path.step(solo, self._batch.eos_ids)
            else:
                self._schedule()
                if self._batch.members:
                    self._batch.step(time.monotonic)
            self._release_parked()
        except Exception as e:  # a failing step fails the batch, never the worker
            failed = self._batch.fail_all() + ([self._solo] if self._solo is not None else [])
            log.exception("batch step failed; failing the %d requests in it", len(failed))
            for f in failed:
                f.fail(e)
            self._batch = self._new_batch()

    @property
    def _solo(self) -> Flight | None:
        return next((f for f in self._flights if f.where is Where.SOLO and f.phase is not Phase.DONE), None)

    # -- admission and dedup

    def _admit(self, f: Flight, solo_ok: bool = False) -> None:
        """A request leaves the queue (or a park): stopped already, parked behind a leader, alone
        (solo), or ready to prefill when its turn comes (_schedule)."""
        why = f.req.stopped()
        if why:
            f.phase = Phase.DONE
            f.req.emit(Done(why, 0))
            return
        try:
            leader = self._leader_for(f)
            if leader is not None:
                x, need = leader
                if x.where is not Where.READY and x.prefilled_at is not None:
                    self._share(x)  # its whole prompt is read already: store it now
                else:
                    f.park(x.req, need, time.monotonic())
                    self.metrics.dedup_waits.inc()
                    return
            if solo_ok and f.parked_since is None:
                self._start_solo(f)
                return
            f.where = Where.READY
            f.estimate = self.keeper.peek(f.tokens)
        except Exception as e:  # this request's failure (e.g. the store's), not the batch's
            log.exception("could not start a request")
            f.fail(e)

    def _leader_for(self, f: Flight) -> tuple[Flight, int] | None:
        """The admitted request whose prompt shares the most not-yet-cached tokens with f's
        (scheduler.choose_leader), when a store exists to fetch it from afterwards."""
        if self.store is None:  # nothing to fetch after a wait: waiting would only delay it
            return None
        solo = [self._solo] if self._solo is not None else []
        others = [x for x in [*solo, *self._batch.members.values(), *self._where(Where.READY)] if x is not f]
        found = scheduler.choose_leader(f.tokens, [(x.tokens, x.covered) for x in others], self.dedup_min_tokens)
        return (others[found[0]], found[1]) if found is not None else None

    def _find(self, req: GenerationRequest) -> Flight | None:
        return next((f for f in self._flights if f.req is req and f.where is not Where.PARKED
                     and f.phase is not Phase.DONE), None)

    def _has_waiters(self, req: GenerationRequest) -> bool:
        return any(p.leader is req for p in self._where(Where.PARKED))

    def _release_parked(self) -> None:
        """Parked requests whose leader has computed (and stored) their shared part, or is gone,
        are admitted again; together, in scheduler.release_order, so they dedup against each
        other too."""
        released: list[Flight] = []
        now = time.monotonic()
        for p in self._where(Where.PARKED):
            x = self._find(p.leader)
            if x is not None and x.in_cache < p.need:
                continue
            if x is not None and x.shared < p.need:
                self._share(x)
            p.unpark(now)
            released.append(p)
        for i in scheduler.release_order([p.tokens for p in released]):
            self._admit(released[i])

    def _share(self, x: Flight) -> None:
        """Store what ``x`` holds now, so others can fetch it."""
        if self.store is None:
            return
        if x.where is Where.BATCH:
            self._batch.share(x)
        else:
            self.keeper.share(x)

    def _start(self, f: Flight) -> None:
        """A fresh request's cache lookup: it now holds the longest stored prefix of its prompt."""
        from warmturn.server.sampling import make_sampler  # restores the random state if it raises

        r = f.req
        sampler = make_sampler(temp=r.temperature, top_p=r.top_p, top_k=r.top_k)  # (before: a fetch may hand over)
        kv, reused, kept = self.keeper.fetch(f.tokens)
        f.start(kv, reused, self.tokenizer.detokenizer, sampler, self.rates, time.monotonic(), kept)

    # -- who reads its prompt next (policy: server/scheduler.py)

    def _candidate(self, x: Flight, now: float) -> scheduler.Candidate:
        return scheduler.Candidate(len(x.tokens) - x.progress, now - x.req.submitted, x.req.submitted,
                                   self._has_waiters(x.req), x.req.background)

    def _schedule(self) -> None:
        ready = self._where(Where.READY)
        if not ready:
            return
        now = time.monotonic()
        if not self.batchable:  # one at a time: the best-placed waiting request runs alone
            r = ready[scheduler.best([self._candidate(x, now) for x in ready], self.rates.prefill_tps.value)]
            self._try(self._start_solo, r)
            return
        members = list(self._batch.members.values())
        if any(a.prefilled_at is not None and a.first_token_at is None for a in members):
            return  # a request's first token is due next step: no new prompt chunk delays it
        if self.prefill_order == "arrival":  # as mlx_lm.server: every admitted prompt at once
            for r in ready:
                self._try(self._insert, r)
            return
        prefilling = [a for a in members if a.prefilled_at is None]
        cands = [*prefilling, *ready]
        chosen = [cands[i] for i in scheduler.choose_prompts([self._candidate(x, now) for x in cands],
                                                             self.rates.prefill_tps.value, self.prefill_step_size,
                                                             self.prompt_concurrency)]
        self._preempt([a for a in prefilling if a not in chosen and not self._has_waiters(a.req)])
        if self.solo and not self._batch.members and len(chosen) == 1 and chosen[0].where is Where.READY:
            # one prompt to read and nothing in the batch: it runs alone, outside the batch, while
            # the others wait for their turn
            self._try(self._start_solo, chosen[0])
            return
        for x in chosen:
            if x.where is Where.READY:
                self._try(self._insert, x)

    def _preempt(self, flights: list[Flight]) -> None:
        """Take prompts that lost their place out of the batch, with the KV they hold."""
        for a in flights:
            if not self._batch.take_out(a):
                log.debug("%s: its cache could not be cut back; it starts again", a.req.request_id)
            self.metrics.preemptions.inc()

    def _solo_yields(self, s: Flight) -> bool:
        """Whether the solo request must move in with the others: it is generating and others
        wait to read their prompts (beside its decode steps), or the scheduler puts another
        prompt before it. Otherwise it reads its prompt on alone, which is faster than a batch
        of one, while the others wait for their turn as they would in the batch."""
        ready = self._where(Where.READY)
        if not ready or not self.batchable:
            return False
        if s.prefilled_at is not None:
            return True
        now = time.monotonic()
        cands = [s, *ready]
        return scheduler.best([self._candidate(x, now) for x in cands], self.rates.prefill_tps.value) != 0

    def _try(self, start: Any, f: Flight) -> None:
        try:
            start(f)
        except Exception as e:  # this request's failure (e.g. the store's), not the batch's
            log.exception("could not start a request")
            f.fail(e)

    def _insert(self, f: Flight) -> None:
        """Into the batch: a fresh request fetches its cached prefix now (so it gets whatever was
        stored while it waited), one that read part of its prompt before goes on from there."""
        if not f.started:
            self._start(f)
        self._batch.insert(f)

    def _sweep(self) -> None:
        """Take cancelled and timed-out requests out (storing what they computed)."""
        stopped = [(f, why) for f in self._flights if f.phase is not Phase.DONE and (why := f.req.stopped())]
        if not stopped:
            return
        in_batch = [f for f, _ in stopped if f.where is Where.BATCH]
        if in_batch:
            self._batch.drop(in_batch)
        for f, why in stopped:
            f.stop(why)
            if f.where is Where.SOLO:
                self._solo_path.store(f)
            elif f.where is Where.READY and f.kv is not None and f.in_cache > f.covered:
                self.keeper.hand_over(f, f.tokens[: f.in_cache], f.kv, exact=True)  # what it computed
                f.kv = None

    # -- one request alone: outside the batch (server/solo.py says why)

    def _start_solo(self, f: Flight) -> None:
        """It runs alone, from where it stopped if it has read part of its prompt already."""
        if not f.started:
            self._start(f)
        f.where, f.uid = Where.SOLO, -1

    def _migrate(self, s: Flight) -> None:
        """Another request arrived: the solo request goes on with the others, with the KV state it
        has, exactly where it is: mid-answer into the BatchGenerator, mid-prompt back to the
        requests waiting for their turn to prefill (_schedule)."""
        if s.prefilled_at is None:  # mid-prompt: its turn to go on comes from _schedule
            s.where = Where.READY
            return
        # the token sampled last is not handed out yet: out with it first (it may end it)
        self._solo_path.hand_out(s, s.y.item(), self._batch.eos_ids)
        if s.phase is Phase.DONE:
            return
        self._batch.insert_answering(s)
