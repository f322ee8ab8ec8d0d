"""In-process probes of the batching engine (server/engine.py), side by side in one process so
that ratios survive a loaded machine. Not a test and not part of `make bench`'s tables; the
numbers behind the engine's defaults (docs/server.md, "Concurrency figures").

    python -m warmturn.bench.engine_probe decode   [--streams 1,2,4,8] [--tokens 64] [--temperature 0]
    python -m warmturn.bench.engine_probe sampling [--streams 4] [--tokens 64] [--temperature 1] [--repeats 5]
    python -m warmturn.bench.engine_probe ceiling  [--streams 4] [--tokens 64] [--repeats 5]
    python -m warmturn.bench.engine_probe fairness [--steps 64,128,256,512] [--prompt 1500]
    python -m warmturn.bench.engine_probe warm     [--cached 2000] [--new 120,250] [--repeats 5]
    python -m warmturn.bench.engine_probe pair     [--prompt 650] [--tokens 96] [--repeats 4]

decode:   aggregate decode tokens/s with N streams at once, against one stream.
fairness: a stream generating while a cold prompt is read: the prompt's prefill time and the
          stream's largest gap between two tokens during it, per prefill step size.
warm:     TTFT of a warm request through the engine (prefix cache; served alone outside the
          batch, and as a batch of one) against the floor (mlx-lm directly: prefill exactly the
          new tokens on a built cache, first token).
sampling: N sampled streams at once, with one sampler per parameter set (as served) against one
          per request (mlx-lm's BatchGenerator then samples row by row), alternately.
ceiling:  N greedy streams decoding together through the engine, through mlx-lm's BatchGenerator
          directly, and as a bare model loop (no padding, no logprobs): how close the engine's
          batch comes to the model's own batched rate.
pair:     a cold first turn's TTFT alone and beside a title request's generation (issue 13 (a)).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from itertools import pairwise
from typing import Any


def _load():
    from mlx_lm import load

    from warmturn.server.convert import resolve_model

    return load(str(resolve_model(None, read_adapter=False)))  # as the bench (see its --model)


def _ids(tokenizer, n: int, salt: int = 0) -> list[int]:
    text = " ".join(f"line {i + salt}: the quick brown fox jumps over the lazy dog." for i in range(n // 8 + 8))
    return tokenizer.encode(text)[:n]


class _Run:
    """Submit requests, record when each item arrives."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.events: dict[str, list[tuple[float, object]]] = {}
        self.done: dict[str, threading.Event] = {}

    def submit(self, name: str, tokens: list[int], **kw):
        from warmturn.server.engine import Done, GenerationRequest

        self.events[name] = []
        self.done[name] = threading.Event()

        def emit(item):
            self.events[name].append((time.perf_counter(), item))
            if isinstance(item, (Done, Exception)):
                self.done[name].set()

        req = GenerationRequest(tokens=tokens, emit=emit, **{"temperature": 0.0, **kw})
        req.t0 = time.perf_counter()
        self.engine.submit(req)
        return req

    def wait(self, *names: str) -> None:
        for n in names or list(self.done):
            self.done[n].wait()

    def first_piece(self, name: str) -> float:
        """When the first token was out: its Piece, or Done if it printed nothing (one token)."""
        from warmturn.server.engine import Done, Piece

        return next(t for t, i in self.events[name] if isinstance(i, (Piece, Done)))


def _decode_rate(eng, tokenizer, n: int, tokens: int, temperature: float = 0.0) -> float:
    """Aggregate tokens/s of ``n`` streams decoding together (from the last one's first token to
    the first one's end)."""
    from warmturn.server.engine import Piece

    run = _Run(eng)
    names = [f"s{i}" for i in range(n)]
    for i, name in enumerate(names):
        # ignore_eos is not an option: long prompts that make the model ramble; max_tokens bounds it
        run.submit(name, _ids(tokenizer, 64, salt=100 * i), max_tokens=tokens, temperature=temperature)
    run.wait(*names)
    start = max(run.first_piece(name) for name in names)  # all decoding from here on
    end = min(max(t for t, _ in run.events[name]) for name in names)

    def generated(name: str, by: float) -> int:  # tokens, not pieces: a piece may hold several
        return max((i.output_tokens for t, i in run.events[name] if isinstance(i, Piece) and t <= by), default=0)

    count = sum(generated(name, end) - generated(name, start) for name in names)
    return count / (end - start) if end > start else float("nan")


def decode(model, tokenizer, streams: list[int], tokens: int, temperature: float) -> None:
    from warmturn.server.engine import Engine

    eng = Engine(model, tokenizer, None, decode_concurrency=max(streams), prompt_concurrency=max(streams))
    eng.start()
    try:
        base = None
        for n in streams:
            rate = _decode_rate(eng, tokenizer, n, tokens, temperature)
            base = base or rate
            print(f"decode streams={n}: {rate:7.1f} tok/s aggregate ({rate / base:.2f}x one stream)")
    finally:
        eng.stop()


def sampling(model, tokenizer, streams: int, tokens: int, temperature: float, repeats: int) -> None:
    """``streams`` sampled streams decoding together, with one sampler shared by requests that ask
    for the same parameters (as served) against one sampler per request, alternately."""
    from warmturn.server import sampling as mod
    from warmturn.server.engine import Engine

    shared = mod.make_sampler
    arms: dict[str, Any] = {"shared": shared, "per-request": shared.__wrapped__}
    eng = Engine(model, tokenizer, None, decode_concurrency=streams, prompt_concurrency=streams)
    eng.start()
    rates: dict[str, list[float]] = {k: [] for k in arms}
    try:
        for r in range(repeats):
            for name in list(arms)[r % 2:] + list(arms)[:r % 2]:
                mod.make_sampler = arms[name]  # the engine looks it up on each request
                rates[name].append(_decode_rate(eng, tokenizer, streams, tokens, temperature))
    finally:
        mod.make_sampler = shared
        eng.stop()
    # a run where one stream ended before the last one started measures nothing (nan): left out
    runs = [(x, y) for x, y in zip(rates["per-request"], rates["shared"], strict=True) if x == x and y == y]
    if not runs:
        print(f"sampling streams={streams}: no run had every stream decoding at once (raise --tokens)")
        return
    a, b = statistics.median(x for x, _ in runs), statistics.median(y for _, y in runs)
    print(f"sampling streams={streams} temperature={temperature}: one sampler per request {a:.1f} tok/s, "
          f"shared {b:.1f} tok/s: {b / a:.2f}x (per run {' '.join(f'{y / x:.2f}' for x, y in runs)}; "
          f"{len(runs)} of {repeats} runs)",
          flush=True)


def ceiling(model, tokenizer, streams: int, tokens: int, repeats: int) -> None:
    """The engine's batch decode against what the hardware gives the model: ``streams`` greedy
    streams decoding together through the engine, through mlx-lm's ``BatchGenerator`` driven
    directly, and as a bare model loop (one plain KV cache holding every stream, equal-length
    prompts, no padding, no logprobs), arms rotated each repeat."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    from warmturn.server.engine import Engine

    prompts = [_ids(tokenizer, 64, salt=100 * i) for i in range(streams)]

    def model_loop() -> float:
        cache = make_prompt_cache(model)
        logits = model(mx.array(prompts), cache=cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)
        t0 = time.perf_counter()
        for _ in range(tokens):
            prev, y = y, mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(y)
            prev.tolist()  # hand the previous step's tokens out while this one computes
        mx.eval(y)
        return streams * tokens / (time.perf_counter() - t0)

    def batch_generator() -> float:
        gen = BatchGenerator(model, completion_batch_size=streams, prefill_batch_size=streams)
        gen.insert(prompts, max_tokens=[tokens] * streams)
        t0, count, done = None, 0, 0
        while done < streams:
            _, responses = gen.next()
            if responses and t0 is None:  # every stream's first token: decoding from here on
                t0 = time.perf_counter()
                continue
            count += len(responses) if t0 is not None else 0
            done += sum(1 for r in responses if r.finish_reason)
        return count / (time.perf_counter() - t0) if t0 is not None else float("nan")

    eng = Engine(model, tokenizer, None, decode_concurrency=streams, prompt_concurrency=streams)
    eng.start()
    arms = {"model loop": model_loop, "BatchGenerator": batch_generator,
            "engine": lambda: _decode_rate(eng, tokenizer, streams, tokens)}
    rates: dict[str, list[float]] = {k: [] for k in arms}
    try:
        for r in range(repeats):
            order = list(arms)
            for name in order[r % 3:] + order[:r % 3]:
                rates[name].append(arms[name]())
    finally:
        eng.stop()
    loop = statistics.median(rates["model loop"])
    print(f"ceiling streams={streams}: " + ", ".join(
        f"{k} {statistics.median(v):.1f} tok/s ({statistics.median(v) / loop:.2f}x the model loop)"
        for k, v in rates.items()), flush=True)


def fairness(model, tokenizer, steps: list[int], prompt: int) -> None:
    from warmturn.server.engine import Engine, Piece, Prefilled

    for step in steps:
        eng = Engine(model, tokenizer, None, prefill_step_size=step)
        eng.start()
        try:
            run = _Run(eng)
            gen = run.submit("gen", _ids(tokenizer, 32), max_tokens=4000)
            while not any(isinstance(i, Piece) for _, i in run.events["gen"]):
                time.sleep(0.01)
            long = run.submit("long", _ids(tokenizer, prompt, salt=7), max_tokens=1)
            run.wait("long")
            gen.cancel.set()
            run.wait("gen")
            t_pref = next(t for t, i in run.events["long"] if isinstance(i, Prefilled))
            ts = [t for t, i in run.events["gen"] if isinstance(i, Piece) and long.t0 <= t <= t_pref]
            gaps = [b - a for a, b in pairwise(ts)] or [float("nan")]
            print(f"prefill-step-size={step:4d}: {prompt}-token prefill {t_pref - long.t0:6.1f} s beside a stream; "
                  f"that stream's largest gap between tokens {max(gaps):5.2f} s, median {statistics.median(gaps):5.2f} s, "
                  f"{len(ts)} tokens meanwhile")
        finally:
            eng.stop()


def warm(model, tokenizer, cached: int, news: list[int], repeats: int) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from warmturn.server.cache import PrefixCache
    from warmturn.server.engine import Engine

    ids = _ids(tokenizer, cached + max(news) + 8, salt=3)

    def floor_once(cache, new: list[int]) -> float:
        t0 = time.perf_counter()
        if len(new) > 1:
            model(mx.array(new[:-1])[None], cache=cache)
            mx.eval([c.state for c in cache])
        y = mx.argmax(model(mx.array(new[-1:])[None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
        dt = time.perf_counter() - t0
        trim_prompt_cache(cache, len(new))
        return dt

    floor_cache = make_prompt_cache(model)
    for i in range(0, cached, 512):
        model(mx.array(ids[i:min(i + 512, cached)])[None], cache=floor_cache)
        mx.eval([c.state for c in floor_cache])
    arms = {"solo": Engine(model, tokenizer, PrefixCache(model, max_bytes=2 << 30)),
            "batch-of-one": Engine(model, tokenizer, PrefixCache(model, max_bytes=2 << 30), solo=False)}
    runs = {}
    for name, eng in arms.items():
        eng.start()
        runs[name] = _Run(eng)
        runs[name].submit("seed", ids[:cached + 1], max_tokens=1)
        runs[name].wait("seed")
    try:
        for new in news:
            times: dict[str, list[float]] = {"floor": [], **{k: [] for k in arms}}
            order = ["floor", *runs]
            for r in range(repeats):
                tail = _ids(tokenizer, new, salt=1000 * (r + 1) + new)  # a new turn each time
                # rotate the arms' order, so load changes and whatever one arm leaves behind (a
                # batch empties MLX's buffer cache after each prefill chunk) hit all alike
                for name in order[r % 3:] + order[: r % 3]:
                    if name == "floor":
                        times["floor"].append(floor_once(floor_cache, tail))
                        continue
                    run = runs[name]
                    req = run.submit(f"w{new}-{r}", ids[:cached] + tail, max_tokens=1)
                    run.wait(f"w{new}-{r}")
                    times[name].append(run.first_piece(f"w{new}-{r}") - req.t0)
            fm = statistics.median(times["floor"])
            line = ", ".join(f"{k} {statistics.median(v) * 1000:6.0f} ms ({statistics.median(v) / fm:.2f}x; "
                             f"per run {' '.join(f'{b / a:.2f}' for a, b in zip(times['floor'], v, strict=True))})"
                             for k, v in times.items() if k != "floor")
            print(f"warm cached={cached} new={new}: floor {fm * 1000:6.0f} ms, {line}", flush=True)
    finally:
        for eng in arms.values():
            eng.stop()


def pair(model, tokenizer, prompt: int, title_tokens: int, repeats: int) -> None:
    """Issue 13 case (a), synthetic: a cold ~`prompt`-token first turn alone, and submitted
    right after a short title request that generates `title_tokens` tokens."""
    from warmturn.server.engine import Engine

    eng = Engine(model, tokenizer, None)
    eng.start()
    try:
        alone, beside = [], []
        for r in range(repeats):
            for arm in ("alone", "beside") if r % 2 == 0 else ("beside", "alone"):
                run = _Run(eng)
                if arm == "beside":
                    run.submit("title", _ids(tokenizer, 40, salt=50 + r), max_tokens=title_tokens)
                turn = run.submit("turn", _ids(tokenizer, prompt, salt=7 * r + (arm == "beside")), max_tokens=1)
                run.wait()
                (alone if arm == "alone" else beside).append(run.first_piece("turn") - turn.t0)
        a, b = statistics.median(alone), statistics.median(beside)
        print(f"pair: {prompt}-token first turn alone {a:.2f} s, beside a {title_tokens}-token title generation "
              f"{b:.2f} s: {b / a:.2f}x (per run {' '.join(f'{y / x:.2f}' for x, y in zip(alone, beside, strict=True))})",
              flush=True)
    finally:
        eng.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m warmturn.bench.engine_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["decode", "fairness", "warm", "pair", "sampling", "ceiling"])
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", default="64,128,256,512")
    p.add_argument("--prompt", type=int, default=1500)
    p.add_argument("--cached", type=int, default=2000)
    p.add_argument("--new", default="120,250")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--temperature", type=float, default=None,
                   help="decode: 0 (greedy) unless given; sampling: 1 (Claude Code's) unless given")
    args = p.parse_args(argv)
    model, tokenizer = _load()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    if args.probe == "decode":
        decode(model, tokenizer, ints(args.streams), args.tokens, args.temperature or 0.0)
    elif args.probe == "ceiling":
        ceiling(model, tokenizer, max(ints(args.streams)), args.tokens, args.repeats)
    elif args.probe == "sampling":
        temperature = 1.0 if args.temperature is None else args.temperature
        sampling(model, tokenizer, max(ints(args.streams)), args.tokens, temperature, args.repeats)
    elif args.probe == "pair":
        pair(model, tokenizer, args.prompt, args.tokens, args.repeats)
    elif args.probe == "fairness":
        fairness(model, tokenizer, ints(args.steps), args.prompt)
    else:
        warm(model, tokenizer, args.cached, ints(args.new), args.repeats)
    return 0


if __name__ == "__main__":
    code = main()
    # Every engine is stopped and joined by now, yet finalizing the interpreter after MLX work in
    # several worker threads sometimes aborts ("terminate called without an active exception");
    # the probe's output is printed, so leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
