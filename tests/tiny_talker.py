"""A tiny random-weight model that ends its answers (no tests here).

``warmturn.server.tinymodels`` builds random models whose answers are noise that never ends: the
end-of-turn token is one of ~49K, so every answer runs to ``max_tokens``. Claude Code then asks
the model to go on, and a compaction summary that never ends fails ("this summary is too long to
finish"). :func:`build_talker` builds the same tiny llama and gives its end-of-turn token a
steady probability per step (the answers are still noise, and end after ~1/p tokens):

- one residual dimension (0) is the same constant for every token's embedding and no layer writes
  to it (row 0 of every ``o_proj`` and ``down_proj`` is zero), so after the final RMSNorm it is a
  positive number close to the same for every position;
- the output layer (untied from the embeddings) reads that dimension only into the end-of-turn
  logit, with a weight calibrated on the model's own logits so that the end-of-turn token gets
  probability ``p`` at temperature 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def build_talker(out_dir: Path, *, context: int, p_end: float = 0.08, seed: int = 0) -> Path:
    import mlx.core as mx
    import numpy as np

    from warmturn.server.tinymodels import build_tiny

    out = build_tiny("llama", out_dir, context=context, seed=seed, tie_word_embeddings=False)
    cfg = json.loads((out / "config.json").read_text())
    w = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    w["model.embed_tokens.weight"][:, 0] = 1.0
    for k in w:
        if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[k][0, :] = 0.0
    w["lm_head.weight"][:, 0] = 0.0
    mx.save_safetensors(str(out / "model.safetensors"), {k: mx.array(v) for k, v in w.items()})

    # calibrate on the model's own hidden states: logit_eos = beta * h0 + rest
    from mlx_lm import load

    model, tokenizer = load(str(out))
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(3, cfg["vocab_size"], size=(1, 256)))
    h = model.model(tokens)  # final-normed hidden states
    logits = np.array(model.lm_head(h)[0].astype(mx.float32))
    h0 = float(np.array(h[0, :, 0].astype(mx.float32)).mean())
    others = np.delete(logits, eos, axis=1)
    lse = float(np.mean(np.log(np.exp(others - others.max(axis=1, keepdims=True)).sum(axis=1))
                        + others.max(axis=1)))
    target = math.log(p_end / (1 - p_end)) + lse  # the eos logit that gives probability p_end
    base = float(logits[:, eos].mean())
    w["lm_head.weight"][eos, 0] = (target - base) / h0
    mx.save_safetensors(str(out / "model.safetensors"), {k: mx.array(v) for k, v in w.items()})
    return out
