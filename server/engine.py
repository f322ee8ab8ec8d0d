"""The MLX worker: one thread runs every prefill and generation, one request at a time.

Requests wait in a bounded queue (a full queue is refused at once, never blocks the caller).
Each request carries a ``cancel`` event checked between prefill chunks and after every
generated token, and a deadline; so a client that went away or a runaway generation stops
within one token. Results go back through the request's ``emit`` callback as
:class:`Prefilled`, :class:`Piece` and :class:`Done` items, or as the exception that ended it:
the worker itself never dies on a request's failure.

The cross-request KV store (``server/cache.py``) is reached only through
:class:`PromptCacheStore`; with ``store=None`` every request prefills from scratch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)


class PromptCacheStore(Protocol):
    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any], int]:
        """Return (kv, reused): a per-layer mlx-lm KV cache list that the caller now owns and may
        mutate (a private copy/trim, never an object still held by the store), already holding the
        KV state of tokens[:reused]. Always reused <= len(tokens) - 1, so at least the last token
        is computed (an exact repeat is a full hit that recomputes only the last token)."""
        ...

    def store(self, tokens: Sequence[int], kv: list[Any], checkpoints: Sequence[int] = ()) -> int:
        """Keep the KV state of `tokens` (kv may hold more positions; only len(tokens) count) and
        a separate entry at each length in `checkpoints` (e.g. the end of the system+tools
        prefix). Snapshot what is needed (copy, never alias). Returns the number of tokens newly
        stored (Anthropic's cache_creation_input_tokens).

        Without the optional ``plan_store`` below, the engine calls this right after prefilling
        `tokens` (the prompt minus its last token), before generation touches kv."""
        ...

    # Optional extensions, looked up with getattr (a store may lack them):
    #
    # plan_store(tokens, kv) -> int | None
    #     What store(tokens, ...) would return now, computed without copying. When it returns an
    #     int, the engine reports that as `created` before the first token and stores only after
    #     generation is over, with one call
    #         store(prompt + generated tokens kv holds, kv, checkpoints, owned=True)
    #     handing kv over (the engine never touches it again), so the store may keep kv's own
    #     buffers instead of copying them and nothing is copied before the first token. None
    #     (e.g. a cache layout that cannot trim back after generation): store before generating.
    #
    # store_generated(tokens, kv)
    #     Without plan_store: after generation, keep prompt + generated tokens as well.

    def stats(self) -> dict[str, float]:
        """Counters for /metrics and the log: hits, misses, evictions, bytes, entries, ..."""
        ...


class Overloaded(RuntimeError):
    """The queue is full: becomes a 529 ``overloaded_error``."""


class RequestTimeout(RuntimeError):
    """The request's time limit passed before its first token."""


@dataclass(frozen=True)
class Prefilled:
    reused: int  # tokens whose KV came from the store
    created: int  # tokens newly stored (cache_creation_input_tokens)
    prefill_ms: float
    queued_ms: float


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

    def stopped(self) -> Literal["cancelled", "timeout"] | None:
        if self.cancel.is_set():
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None


class Engine:
    """One MLX worker thread over a bounded queue. ``start()``, ``submit()``..., ``stop()``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: PromptCacheStore | None = None,
        *,
        max_queue: int = 8,
        prefill_chunk: int = 512,
        on_event: Callable[[str, float], None] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.prefill_chunk = prefill_chunk
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._on_event = on_event or (lambda name, value: None)
        self._current: GenerationRequest | None = None
        self.busy = False

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running request and everything queued, then end the worker thread."""
        if self._thread is None:
            return
        current = self._current
        if current is not None:
            current.cancel.set()
        while True:  # make room for the sentinel: cancel whatever still waits
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.cancel.set()
                req.emit(Done("cancelled", 0))
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("MLX worker queue refilled during shutdown; not waiting for the worker")
            return
        self._thread.join(timeout)
        self._thread = None

    def submit(self, req: GenerationRequest) -> None:
        """Queue ``req``; raises :class:`Overloaded` at once when the queue is full."""
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise Overloaded(f"the server is busy: {self._queue.maxsize} requests are already waiting") from None

    # -- worker thread

    def _loop(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            self.busy, self._current = True, req
            try:
                self._run(req)
            except Exception as e:  # the request's failure goes down its own queue
                log.exception("generation failed")
                req.emit(e)
            finally:
                self.busy, self._current = False, None

    def _run(self, req: GenerationRequest) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, generation_stream
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        start = time.monotonic()
        queued_ms = (start - req.submitted) * 1000
        why = req.stopped()
        if why:
            req.emit(Done(why, 0))
            return
        tokens = req.tokens
        if self.store is not None:
            kv, reused = self.store.fetch(tokens)
        else:
            kv, reused = make_prompt_cache(self.model), 0
        rest = tokens[reused:-1]
        for i in range(0, len(rest), self.prefill_chunk):
            why = req.stopped()
            if why == "timeout":
                raise RequestTimeout("the request's time limit passed during prefill")
            if why:
                req.emit(Done(why, 0))
                return
            with mx.stream(generation_stream):
                self.model(mx.array(rest[i : i + self.prefill_chunk])[None], cache=kv)
                mx.eval([c.state for c in kv])
        created = 0
        checkpoints = [req.prefix_len] if req.prefix_len else []
        deferred = False  # store after generation, handing kv over (see PromptCacheStore)
        if self.store is not None:
            plan = getattr(self.store, "plan_store", None)
            planned = plan(tokens[:-1], kv) if plan is not None else None
            if planned is not None:
                created, deferred = planned, True
            else:
                created = self.store.store(tokens[:-1], kv, checkpoints=checkpoints)
        prefill_ms = (time.monotonic() - start) * 1000
        self._on_event("prefill_tokens", float(len(rest)))
        req.emit(Prefilled(reused, created, prefill_ms, queued_ms))

        sampler = make_sampler(temp=req.temperature, top_p=req.top_p, top_k=req.top_k)
        detok = self.tokenizer.detokenizer
        detok.reset()
        eos = set(self.tokenizer.eos_token_ids)
        n = 0
        generated: list[int] = []
        reason: Literal["stop", "length", "cancelled", "timeout"] = "length"
        gen_start = time.monotonic()
        steps = generate_step(mx.array(tokens[-1:]), self.model, prompt_cache=kv, sampler=sampler,
                              max_tokens=req.max_tokens)
        try:
            for token, _ in steps:
                if token in eos:
                    reason = "stop"
                    generated.append(token)  # the next turn renders it too (e.g. <|im_end|>)
                    break
                n += 1
                generated.append(token)
                detok.add_token(token)
                if n == 1:
                    self._on_event("ttft_ms", (time.monotonic() - req.submitted) * 1000)
                seg = detok.last_segment
                if seg:
                    req.emit(Piece(seg, n))
                why = req.stopped()
                if why:
                    reason = why
                    break
        finally:
            steps.close()
        detok.finalize()
        seg = detok.last_segment
        if seg:
            req.emit(Piece(seg, n))
        elapsed = time.monotonic() - gen_start
        self._on_event("generated_tokens", float(n))
        req.emit(Done(reason, n, n / elapsed if elapsed > 0 else 0.0))
        if deferred:
            # kv holds the prompt and every generated token fed back so far (all valid KV state,
            # also after a cancel); the store trims it back to whatever a later request shares.
            held = (list(tokens) + generated)[: kv[0].size()]
            try:
                self.store.store(held, kv, checkpoints=checkpoints, owned=True)
            except Exception:
                log.exception("prefix cache store failed (ignored)")
            return
        keep_generated = getattr(self.store, "store_generated", None)
        if keep_generated is not None and reason in ("stop", "length"):
            # Optional extension of the store: keep prompt + answer, so the next turn, which
            # re-renders this answer, reuses its KV state too.
            try:
                keep_generated(list(tokens) + generated, kv)
            except Exception:
                log.exception("store_generated failed (ignored)")
