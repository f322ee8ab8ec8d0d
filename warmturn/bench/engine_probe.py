"""In-process probes of the batching engine (server/engine.py), side by side in one process so
that ratios survive a loaded machine. Not a test and not part of `make bench`'s tables; the
numbers behind the engine's defaults (docs/server.md, "Concurrency figures").

    python -m warmturn.bench.engine_probe decode   [--streams 1,2,4,8] [--tokens 64]
    python -m warmturn.bench.engine_probe fairness [--steps 64,128,256,512] [--prompt 1500]
    python -m warmturn.bench.engine_probe warm     [--cached 2000] [--new 120,250] [--repeats 5]
    python -m warmturn.bench.engine_probe pair     [--prompt 650] [--tokens 96] [--repeats 4]

decode:   aggregate decode tokens/s with N streams at once, against one stream.
fairness: a stream generating while a cold prompt is read: the prompt's prefill time and the
          stream's largest gap between two tokens during it, per prefill step size.
warm:     TTFT of a warm request through the engine (prefix cache; served alone outside the
          batch, and as a batch of one) against the floor (mlx-lm directly: prefill exactly the
          new tokens on a built cache, first token).
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


def decode(model, tokenizer, streams: list[int], tokens: int) -> None:
    from warmturn.server.engine import Engine, Piece

    eng = Engine(model, tokenizer, None, decode_concurrency=max(streams), prompt_concurrency=max(streams))
    eng.start()
    try:
        base = None
        for n in streams:
            run = _Run(eng)
            names = [f"s{i}" for i in range(n)]
            for i, name in enumerate(names):
                # ignore_eos is not an option: long prompts that make the model ramble; max_tokens bounds it
                run.submit(name, _ids(tokenizer, 64, salt=100 * i), max_tokens=tokens)
            run.wait(*names)
            pieces = [(t, i.output_tokens) for name in names for t, i in run.events[name] if isinstance(i, Piece)]
            start = max(run.first_piece(name) for name in names)  # all decoding from here on
            end = min(max(t for t, _ in run.events[name]) for name in names)
            count = sum(1 for t, _ in pieces if start < t <= end)
            rate = count / (end - start) if end > start else float("nan")
            base = base or rate
            print(f"decode streams={n}: {rate:7.1f} tok/s aggregate ({rate / base:.2f}x one stream)")
    finally:
        eng.stop()


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
    p.add_argument("probe", choices=["decode", "fairness", "warm", "pair"])
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", default="64,128,256,512")
    p.add_argument("--prompt", type=int, default=1500)
    p.add_argument("--cached", type=int, default=2000)
    p.add_argument("--new", default="120,250")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    model, tokenizer = _load()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    if args.probe == "decode":
        decode(model, tokenizer, ints(args.streams), args.tokens)
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
