"""The engine's path for a request that runs alone: outside the batch.

Why not BatchGenerator for a lone request too: for a batch of one, mlx-lm's batch classes copy
the whole reused prefix several times before the first token (merging the fetched cache into a
BatchKVCache, growing that buffer on the first chunk, deep-copying the prompt batch when the
sequence moves to decoding) and empty MLX's buffer cache after every prefill chunk. On a warm
turn that is pure overhead above the floor (an mlx-lm prefill of the new tokens on a built
cache). So a request that runs alone is served the way mlx-lm's ``generate_step`` serves one
(the next token computed while the current one is handed out), one step per call like the batch,
and the moment another request arrives the engine moves it into the BatchGenerator with its KV
state (server/batch.py, ``insert_answering``), or back to the waiting prompts mid-prompt.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from warmturn.server.keeper import Keeper
from warmturn.server.lifecycle import Flight, Rates


class SoloPath:
    def __init__(self, model: Any, keeper: Keeper, rates: Rates, *, prefill_step_size: int,
                 progress_every: float) -> None:
        self.model, self.keeper, self.rates = model, keeper, rates
        self.prefill_step_size, self.progress_every = prefill_step_size, progress_every

    def step(self, s: Flight, eos_ids: set[int]) -> None:
        """One prefill chunk, or the last prompt token, or one decode step of ``s``."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        tokens = s.tokens
        if s.prefilled_at is None:
            end = len(tokens) - 1
            stop = min(s.in_cache + self.prefill_step_size, end)
            stop = min([p for p in s.req.mark_points() if s.in_cache < p < stop] + [stop])  # chunks end at marks
            if s.in_cache < stop:
                with mx.stream(generation_stream):
                    self.model(mx.array(tokens[s.in_cache:stop])[None], cache=s.kv)
                    mx.eval([c.state for c in s.kv])
                s.in_cache = s.fed = stop
                self.keeper.take_mark(s, s.kv)
                # the system+tools checkpoint, as soon as it exists (a copy: kv goes on)
                if (stop == s.req.prefix_len and s.reused < stop
                        and self.keeper.put(tokens[:stop], s.kv, checkpoints=[stop], marks=s.marks)):
                    s.shared = stop
                s.log_progress(time.monotonic(), self.progress_every)
                if stop < end:
                    return
            with mx.stream(generation_stream):
                s.y = self._sample(s, self.model(mx.array(tokens[-1:])[None], cache=s.kv)[:, -1, :])
            s.fed = len(tokens)
            s.prefilled(self.keeper.created(s), self.rates, time.monotonic())
            return
        y = s.y
        if s.output_tokens + 1 < s.req.max_tokens:  # compute the next token while this one goes out
            with mx.stream(generation_stream):
                s.y = self._sample(s, self.model(y[None], cache=s.kv)[:, -1, :])
            s.fed += 1
        else:
            s.y = None
        self.hand_out(s, y.item(), eos_ids)

    @staticmethod
    def _sample(s: Flight, logits: Any) -> Any:
        import mlx.core as mx

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = s.sampler(logprobs)
        mx.async_eval(y)
        return y

    def hand_out(self, s: Flight, token: int, eos_ids: set[int]) -> None:
        """Hand out one generated token; end the request on end-of-sequence or max_tokens."""
        now = time.monotonic()
        s.generated.append(token)
        if token in eos_ids:
            self._finish(s, "stop", now)
            return
        s.token(token, now)
        if s.output_tokens >= s.req.max_tokens:
            self._finish(s, "length", now)
            return
        s.piece()

    def _finish(self, s: Flight, reason: Literal["stop", "length"], now: float) -> None:
        s.finish(reason, self.rates, now)
        self.store(s)

    def store(self, s: Flight) -> None:
        """Hand the request's KV over to the store: prompt + every token fed back."""
        if self.keeper.store is None or s.kv is None or s.in_cache <= s.covered:
            return
        held = list(s.tokens[: s.in_cache]) + (s.generated if s.prefilled_at is not None else [])
        ck = [s.req.prefix_len] if 0 < s.req.prefix_len < s.in_cache else []
        self.keeper.put(held[: s.fed], s.kv, checkpoints=ck, owned=True, marks=s.marks, prompt_len=len(s.tokens))
        s.kv = None  # the store's now: a later turn that takes it writes into it in place
