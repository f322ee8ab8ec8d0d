"""The engine's batched path: mlx-lm's :class:`BatchGenerator` and the flights inside it.

Continuous batching is mlx-lm's own: the generator keeps a prompt batch (chunked prefill,
``prefill_step_size`` tokens per sequence per step) and a decode batch; each ``next()`` runs one
decode step for every generating sequence and one prefill chunk for the sequences still reading
their prompt. This module puts flights in (with the KV they already hold), takes them out (with
the KV they computed), and turns the generator's responses into the flights' transitions
(server/lifecycle.py). Who reads a prompt in which step is the engine's decision
(server/scheduler.py).
"""

from __future__ import annotations

from typing import Any

from warmturn.server.keeper import Keeper
from warmturn.server.kvfamily import fed_tokens
from warmturn.server.lifecycle import Flight, Rates, Where


class BatchPath:
    def __init__(self, model: Any, tokenizer: Any, keeper: Keeper, rates: Rates, *, decode_concurrency: int,
                 prompt_concurrency: int, prefill_step_size: int, progress_every: float) -> None:
        from mlx_lm.generate import BatchGenerator, StopSequences

        self.eos_ids = set(tokenizer.eos_token_ids)
        self.eos = StopSequences([(t,) for t in self.eos_ids])
        self.gen = BatchGenerator(model, completion_batch_size=decode_concurrency,
                                  prefill_batch_size=prompt_concurrency, prefill_step_size=prefill_step_size)
        self.keeper, self.rates, self.progress_every = keeper, rates, progress_every
        self.members: dict[int, Flight] = {}

    # -- in and out ---------------------------------------------------------------------------

    def insert(self, f: Flight) -> None:
        """A flight that holds ``f.kv`` with ``f.in_cache`` prompt tokens reads the rest here. Its
        prompt segments end at each of its mark points, so the generator stops a chunk there (the
        system+tools checkpoint, and marks of window and state caches, are taken at exact lengths)."""
        tokens, start = f.tokens, f.in_cache
        cuts = [p for p in f.req.mark_points() if start < p < len(tokens) - 1]
        segments = [tokens[a:b] for a, b in zip([start, *cuts], [*cuts, len(tokens)], strict=True)]
        self._join(f, segments, f.req.max_tokens, list(tokens[:start]), start)

    def insert_answering(self, f: Flight) -> None:
        """A solo flight mid-answer moves in: its kv holds the prompt and every token handed out
        but the last, which the batch feeds next; it samples the rest."""
        held = list(f.tokens) + f.generated[:-1]
        self._join(f, [[f.generated[-1]]], f.req.max_tokens - f.output_tokens, held, f.in_cache)

    def _join(self, f: Flight, segments: list[list[int]], max_tokens: int, held: list[int], base: int) -> None:
        (uid,) = self.gen.insert_segments([segments], max_tokens=[max_tokens], caches=[f.kv], all_tokens=[held],
                                          samplers=[f.sampler], stop_sequences=[self.eos])
        f.uid, f.base, f.kv, f.where = uid, base, None, Where.BATCH
        self.members[uid] = f

    def extract(self, f: Flight) -> tuple[list[Any], list[int]]:
        """A copy of the flight's KV now and the tokens the batch fed it."""
        kv, held = self.gen.extract_cache([f.uid])[f.uid]
        return kv, list(held)

    def take_out(self, f: Flight) -> bool:
        """Take a flight that is reading its prompt out of the batch with the KV it holds (so that
        another prompt goes first): it goes on from there when its turn comes again. False when
        its cache holds more than its tokens say and cannot be cut back: it then starts again from
        the store."""
        from mlx_lm.models.cache import trim_prompt_cache

        kv, held = self.gen.remove([f.uid], return_prompt_caches=True)[f.uid]
        del self.members[f.uid]
        f.where, f.uid = Where.READY, -1
        fed = fed_tokens(kv)
        fed = len(held) if fed is None else fed
        f.in_cache = f.fed = min(len(held), fed)
        if fed > f.in_cache and trim_prompt_cache(kv, fed - f.in_cache) != fed - f.in_cache:
            f.kv, f.started, f.in_cache, f.marks = None, False, 0, {}
            return False
        f.kv = kv
        return True

    def drop(self, flights: list[Flight]) -> None:
        """Take flights out for good (cancelled, timed out), handing what they computed to the store."""
        caches = self.gen.remove([f.uid for f in flights], return_prompt_caches=self.keeper.store is not None)
        for f in flights:
            del self.members[f.uid]
            if f.uid in caches:
                kv, held = caches[f.uid]
                if len(held) > f.covered:
                    self.keeper.hand_over(f, held, kv, exact=f.prefilled_at is None)

    def share(self, f: Flight, checkpoint: bool = False) -> None:
        """Store what the batch holds of ``f`` now (an extracted copy), so others can fetch it."""
        kv, held = self.extract(f)
        if len(held) <= f.covered:
            return
        if self.keeper.hand_over(f, held, kv, checkpoints=[len(held)] if checkpoint else (),
                                 exact=f.prefilled_at is None):
            f.shared = len(held)

    # -- one step -----------------------------------------------------------------------------

    def step(self, now_fn: Any) -> None:
        prompt_responses, gen_responses = self.gen.next()
        now = now_fn()
        for r in prompt_responses:
            f = self.members.get(r.uid)
            if f is not None:
                self._on_prompt(f, r, now)
        for r in gen_responses:
            f = self.members.get(r.uid)
            if f is not None:
                self._on_token(f, r, now)

    def _on_prompt(self, f: Flight, r: Any, now: float) -> None:
        if f.prefilled_at is not None:  # moved in from solo mid-answer: its prompt was done before
            return
        done, _total = r.progress
        if r.end_of_prompt:
            f.prefilled(self.keeper.created(f), self.rates, now)
            return
        f.in_cache = f.base + done
        if r.end_of_segment:
            self.keeper.take_mark(f, lambda: self.extract(f)[0])
            if f.in_cache == f.req.prefix_len and f.reused < f.in_cache:
                self.share(f, checkpoint=True)  # the system+tools checkpoint, as soon as it exists
        f.log_progress(now, self.progress_every)

    def _on_token(self, f: Flight, r: Any, now: float) -> None:
        reason = r.finish_reason
        if reason != "stop":  # "stop" is an end-of-sequence token: never shown, never counted
            f.token(r.token, now)
            if reason is None:
                f.piece()
        if reason is None:
            return
        del self.members[f.uid]
        f.finish("stop" if reason == "stop" else "length", self.rates, now)
        if self.keeper.store is not None and r.prompt_cache is not None:
            # the extracted cache holds the prompt and the tokens fed back
            ck = [f.req.prefix_len] if 0 < f.req.prefix_len < len(f.tokens) else []
            self.keeper.hand_over(f, list(r.all_tokens), r.prompt_cache, checkpoints=ck)

    def fail_all(self) -> list[Flight]:
        """A step failed: every member fails with it (the caller makes a new BatchPath)."""
        out = list(self.members.values())
        self.members.clear()
        return out
