"""One request's life inside the engine, and the items it sends back to its caller.

A :class:`GenerationRequest` is what the HTTP layer submits. Once the engine admits it, a
:class:`Flight` carries it to the end: one object whose :class:`Phase` says where it is

    queued -> waiting (for its turn to read its prompt, or parked on another's prefill)
           -> prefilling (solo or in the batch) -> decoding -> done

and whose methods are the transitions, each with its bookkeeping written once: the item sent to
the caller (:class:`Admitted`, :class:`Prefilled`, :class:`Piece`, :class:`Done` or an
exception), the metrics, and the engine-wide averages (:class:`Rates`). The engine's solo and
batch paths (server/engine.py, server/batch.py) only move tokens; they call these.

Nothing here touches MLX: the KV cache a flight holds is an opaque list.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from warmturn.protocol import Usage

log = logging.getLogger("warmturn.server.engine")


# ---------------------------------------------------------------------------------------------
# What the caller submits, and what it gets back
# ---------------------------------------------------------------------------------------------


@dataclass
class Arrival:
    """A request being read and tokenized, not submitted yet (see Engine.arriving)."""

    done: bool = False
    started: float = field(default_factory=time.monotonic)  # when it began to arrive


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


def prompt_usage(prompt_tokens: int, reused: int, created: int) -> Usage:
    """Anthropic's accounting of one prompt, three disjoint counts that add up to it: ``reused``
    tokens came from the store (cache_read); of the ones computed, ``created`` were stored
    (cache_creation); input_tokens is the rest, at least the last prompt token, which is always
    computed and never stored, so it is never 0 for a non-empty prompt."""
    reused = max(0, min(reused, prompt_tokens))
    created = max(0, min(created, prompt_tokens - reused - 1))
    return Usage(prompt_tokens - reused - created, reused, created)


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
    def usage(self) -> Usage:
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
    arrived: float = field(default_factory=time.monotonic)  # when it began to arrive (Engine.submit sets it)
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


# ---------------------------------------------------------------------------------------------
# Engine-wide figures the transitions keep up to date
# ---------------------------------------------------------------------------------------------


@dataclass
class Ewma:
    """An exponentially weighted moving average (weight 0.2 for each new sample)."""

    value: float
    weight: float = 0.2

    def add(self, sample: float) -> None:
        self.value += self.weight * (sample - self.value)


@dataclass
class Rates:
    """What the scheduler and the 529's retry-after need to know of recent requests, and the
    metrics every transition reports to."""

    metrics: Any
    service_s: Ewma = field(default_factory=lambda: Ewma(5.0))  # request durations
    prefill_tps: Ewma = field(default_factory=lambda: Ewma(200.0))  # prefill tokens/s (ageing)


# ---------------------------------------------------------------------------------------------
# A request's life
# ---------------------------------------------------------------------------------------------


class Phase(enum.Enum):
    WAITING = "waiting"  # admitted: waiting for its turn to read its prompt, or parked (dedup)
    PREFILLING = "prefilling"
    DECODING = "decoding"
    DONE = "done"


class Where(enum.Enum):
    READY = "ready"  # outside the batch, waiting for the scheduler (kv set if it read part already)
    PARKED = "parked"  # waiting for another request's prefill of a prefix they share
    SOLO = "solo"  # running alone, outside the batch (server/solo.py)
    BATCH = "batch"  # inside mlx-lm's BatchGenerator (server/batch.py)


@dataclass(eq=False)
class Flight:
    """One admitted request, from admission to its end (worker-thread state)."""

    req: GenerationRequest
    where: Where = Where.READY
    phase: Phase = Phase.WAITING
    started: bool = False  # it holds a cache from its lookup (kv, reused)
    announced: bool = False  # Admitted was sent (once, even if it must look up again)
    uid: int = -1  # its BatchGenerator uid while in the batch
    kv: list[Any] | None = None  # its KV cache while outside the batch
    reused: int = 0  # prompt tokens that came from the store
    kept: int = 0  # of those, the ones the store still has (the rest it handed over: PrefixCache.take)
    in_cache: int = 0  # prompt tokens whose KV it holds
    base: int = 0  # in_cache when it joined the batch (BatchGenerator counts progress from there)
    fed: int = 0  # tokens fed into kv (solo): the count the store is told it holds
    shared: int = 0  # prompt tokens stored for others (checkpoint or dedup)
    estimate: int = 0  # before its lookup: prompt tokens the store holds (PromptCacheStore.peek)
    marks: dict[int, Any] = field(default_factory=dict)  # position -> store.mark() taken there
    # dedup: while parked, the request it waits for and the prompt tokens it will then fetch
    leader: GenerationRequest | None = None
    need: int = 0
    parked_since: float | None = None
    parked_ms: float = 0.0
    joined: float = 0.0  # when its prefill started
    queued_ms: float = 0.0
    prefilled_at: float | None = None
    first_token_at: float | None = None
    output_tokens: int = 0
    generated: list[int] = field(default_factory=list)  # solo: every token handed out
    y: Any = None  # solo: the next token, sampled but not yet handed out
    detok: Any = None
    sampler: Any = None
    last_log: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.req.tokens

    @property
    def covered(self) -> int:
        """Prompt tokens the store has of it already (fetched and still there, or stored for others)."""
        return max(self.kept, self.shared) if self.started else self.estimate

    @property
    def progress(self) -> int:
        """Prompt tokens it will not have to compute again."""
        return self.in_cache if self.started else self.estimate

    # -- transitions ------------------------------------------------------------------------

    def park(self, leader: GenerationRequest, need: int, now: float) -> None:
        if self.parked_since is None:
            self.parked_since = now
        self.where, self.leader, self.need = Where.PARKED, leader, need

    def unpark(self, now: float) -> None:
        """Its leader is done with the shared part: it is admitted again (the engine decides where
        it goes; until then it stays out of everyone's way, parked on no one)."""
        if self.parked_since is not None:
            self.parked_ms = (now - self.parked_since) * 1000
        self.leader, self.need = None, 0

    def start(self, kv: list[Any], reused: int, detok: Any, sampler: Any, rates: Rates, now: float,
              kept: int | None = None) -> None:
        """Its cache lookup ended: it holds ``kv`` with ``reused`` prompt tokens (``kept`` of them
        still in the store: all unless the store handed its entry over) and starts reading the
        rest (now, or when its turn comes)."""
        self.kv, self.reused, self.in_cache, self.fed = kv, reused, reused, reused
        self.kept = reused if kept is None else kept
        self.detok, self.sampler, self.started = detok, sampler, True
        self.joined = self.last_log = now
        self.queued_ms = (now - self.req.submitted) * 1000
        self.phase = Phase.PREFILLING
        rates.metrics.queue_wait.observe(self.queued_ms / 1000)
        if self.parked_since is not None:
            rates.metrics.dedup_tokens.inc(reused)
        if not self.announced:
            self.announced = True
            self.req.emit(Admitted(reused, len(self.tokens), self.queued_ms))

    def log_progress(self, now: float, every: float) -> None:
        """A line for a long prefill, at most every ``every`` seconds."""
        if now - self.last_log < every:
            return
        self.last_log = now
        done, total = self.in_cache - self.reused, len(self.tokens) - self.reused
        rate = done / max(now - self.joined, 1e-9)
        log.info("prefill %s: %d/%d tokens, %.0f tok/s, ETA %.0f s", self.req.request_id or "-", done, total, rate,
                 (total - done) / max(rate, 1e-9))

    def prefilled(self, created: int, rates: Rates, now: float) -> None:
        """Its whole prompt is read: the first token comes next."""
        self.in_cache, self.prefilled_at, self.phase = len(self.tokens), now, Phase.DECODING
        computed = len(self.tokens) - self.reused
        rates.prefill_tps.add(computed / max(now - self.joined, 1e-3))
        rates.metrics.prefill_tokens.inc(computed)
        rates.metrics.reused_tokens.inc(self.reused)
        rates.metrics.prefill_time.observe(now - self.joined)
        self.req.emit(Prefilled(self.reused, created, (now - self.joined) * 1000, self.queued_ms, len(self.tokens),
                                self.parked_ms))

    def token(self, token: int, now: float) -> None:
        """One generated token (not an end-of-sequence one) handed out."""
        self.output_tokens += 1
        self.detok.add_token(token)
        if self.first_token_at is None:
            self.first_token_at = now

    def piece(self) -> None:
        """Send what the detokenizer has completed since the last piece."""
        seg = self.detok.last_segment
        if seg:
            self.req.emit(Piece(seg, self.output_tokens))

    def finish(self, reason: Literal["stop", "length"], rates: Rates, now: float) -> None:
        """Its answer ended (end of sequence or max_tokens)."""
        self.detok.finalize()
        self.piece()
        elapsed = now - (self.first_token_at or now)
        tps = (self.output_tokens - 1) / elapsed if elapsed > 0 and self.output_tokens > 1 else 0.0
        rates.metrics.generated_tokens.inc(self.output_tokens)
        rates.service_s.add(now - self.req.submitted)
        self.phase = Phase.DONE
        self.req.emit(Done(reason, self.output_tokens, tps))

    def stop(self, why: Literal["cancelled", "timeout"]) -> None:
        """Cancelled, or its time limit passed: a timeout before the first token is an error."""
        self.phase = Phase.DONE
        if self.prefilled_at is None and why == "timeout":
            self.req.emit(RequestTimeout("the request's time limit passed during prefill"))
        else:
            self.req.emit(Done(why, self.output_tokens))

    def fail(self, error: BaseException) -> None:
        self.phase = Phase.DONE
        self.req.emit(error)

    def shut_down(self) -> None:
        """The engine is stopping: an answer under way ends as cancelled; a request still reading
        its prompt gets a 503 it can retry."""
        self.phase = Phase.DONE
        self.req.emit(Done("cancelled", self.output_tokens) if self.prefilled_at is not None
                      else ShuttingDown("the server is shutting down"))
