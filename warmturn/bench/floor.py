"""The floor: time to prefill exactly a request's uncached tokens on top of an already-built
KV cache, plus sampling the first token, measured with mlx-lm directly (no HTTP, no server).

Run as a subprocess by the bench (so MLX gets OpenBLAS preloaded and the bench process stays
free of MLX): `python -m warmturn.bench.floor SPEC.json OUT.json`. SPEC is
`{"model": dir, "text": str, "pairs": [[cached, new], ...], "repeats": int}`; the token ids
come from tokenizing `text` (repeated as needed), since prefill cost depends on how many
tokens there are and how many are cached, not on which. OUT is a list of
`{"cached": int, "new": int, "floor_ms": float, "samples_ms": [...]}` in SPEC order.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def measure(model_dir: str, text: str, pairs: list[tuple[int, int]], repeats: int = 3) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    model, tokenizer = load(model_dir)
    base = tokenizer.encode(text)
    need = max(c + max(n, 1) for c, n in pairs) + 1
    ids = (base * (need // max(1, len(base)) + 1))[:need]

    def forward(tokens: list[int], cache) -> mx.array:
        # as mlx-lm's generate_step: all but the last token only fill the cache (their logits
        # are never evaluated), the last one gives the logits of the first new token
        if len(tokens) > 1:
            model(mx.array(tokens[:-1])[None], cache=cache)
            mx.eval([c.state for c in cache])
        logits = model(mx.array(tokens[-1:])[None], cache=cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y)
        return y

    forward(ids[:8], make_prompt_cache(model))  # first-call overhead out of the way

    def build(cache, cur: int, upto: int) -> int:
        while cur < upto:  # fill the cache up to `upto` tokens (not timed)
            step = min(512, upto - cur)
            forward(ids[cur:cur + step], cache)
            cur += step
        return cur

    cache = make_prompt_cache(model)
    cur = 0
    results: dict[int, dict] = {}
    for i in sorted(range(len(pairs)), key=lambda k: pairs[k][0]):
        cached, new = pairs[i]
        new = max(new, 1)  # a full hit still recomputes the last token
        samples = []
        for _ in range(max(1, repeats)):
            # Full-attention caches are cut back to `cached` after each sample. Window and state
            # caches (RotatingKVCache past its window, ArraysCache) cannot be cut back: those are
            # built anew up to `cached` before each sample.
            if cur > cached and can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, cur - cached)
                cur = cached
            elif cur > cached:
                cache, cur = make_prompt_cache(model), 0
            cur = build(cache, cur, cached)
            t0 = time.perf_counter()
            forward(ids[cached:cached + new], cache)
            samples.append((time.perf_counter() - t0) * 1000.0)
            cur += new
        results[i] = {"cached": cached, "new": new, "floor_ms": statistics.median(samples), "samples_ms": samples}
    return [results[i] for i in range(len(pairs))]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m warmturn.bench.floor SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    out = measure(spec["model"], spec["text"], [tuple(p) for p in spec["pairs"]], spec.get("repeats", 3))
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
