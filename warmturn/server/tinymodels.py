"""Tiny random-weight models of every cache family mlx-lm has, built offline in seconds.

Each family is built with mlx-lm's own model class (``mlx_lm.models.<type>.Model``) from a
small config whose layers come in the real models' order (a sliding-window or linear layer
first, as Gemma 3, gpt-oss, Qwen3-Next and Nemotron-H have it), saved as a checkpoint
directory (``config.json`` + ``model.safetensors`` + the default model's tokenizer files) that
``mlx_lm.load`` and ``python -m server --model DIR`` load like a real one. Their answers are
noise; their KV caches are the real classes (``KVCache``, ``RotatingKVCache``, ``ArraysCache``,
``CacheList``, ``ChunkedKVCache``), so every cache path of the server runs on them.

    python -m warmturn.server.tinymodels gemma3_text /tmp/tiny-gemma --context 65536

Random weights often repeat one token: compare logprobs, not only text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HIDDEN = 64
WINDOW = 64  # sliding window of the tiny window families: small, so tests cross it

# Per family: the config beyond the common fields, with the layer order of the real models.
_COMMON: dict[str, Any] = {
    "hidden_size": HIDDEN, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}
FAMILIES: dict[str, dict[str, Any]] = {
    # plain attention: KVCache
    "llama": {"num_hidden_layers": 2},
    "qwen3": {"num_hidden_layers": 2, "head_dim": 16, "rope_theta": 1e6},
    "qwen3_moe": {
        "num_hidden_layers": 2, "head_dim": 16, "rope_theta": 1e6, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 32, "norm_topk_prob": True,
    },
    # sliding window first, one global layer: RotatingKVCache + KVCache (Gemma 3: 5 local, 1 global)
    "gemma3_text": {
        "num_hidden_layers": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    },
    "gpt_oss": {
        "num_hidden_layers": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"], "rope_theta": 150000,
    },
    # linear attention (gated delta net) first, then full attention: ArraysCache + KVCache
    "qwen3_next": {
        "num_hidden_layers": 2, "head_dim": 16, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 4,
        "num_experts_per_tok": 2, "decoder_sparse_step": 1, "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [], "moe_intermediate_size": 32, "rope_theta": 1e6, "partial_rotary_factor": 0.25,
        "full_attention_interval": 2,
    },
    "qwen3_5": {
        "num_hidden_layers": 2, "head_dim": 16, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
    },
    # Mamba-2 first ("M"), then attention ("*") and an MLP ("-"): ArraysCache + KVCache
    "nemotron_h": {
        "hybrid_override_pattern": ["M", "*", "-"], "num_hidden_layers": 3, "attention_bias": False,
        "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False, "ssm_state_size": 16,
        "conv_kernel": 4, "n_groups": 1, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False,
        "use_conv_bias": True, "head_dim": 16,
    },
    # short convolutions first, then attention: ArraysCache + KVCache
    "lfm2": {
        "num_hidden_layers": 2, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": HIDDEN,
        "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False,
        "block_ff_dim": 128, "layer_types": ["conv", "full_attention"],
    },
    "granitemoehybrid": {
        "num_hidden_layers": 2, "attention_bias": False, "embedding_multiplier": 1.0,
        "attention_multiplier": 0.25, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_proj_bias": False,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": True,
        "position_embedding_type": "rope",
    },
    # chunked attention in three layers of four (Llama 4): ChunkedKVCache + KVCache
    "llama4": {
        "num_hidden_layers": 4, "head_dim": 16, "attention_bias": False, "attention_chunk_size": 64,
        "interleave_moe_layer_step": 2, "intermediate_size_mlp": 128, "num_experts_per_tok": 1,
        "num_local_experts": 2, "rope_scaling": None, "rope_theta": 500000.0, "use_qk_norm": True,
    },
    # attention and Mamba side by side in every layer: CacheList(ArraysCache, KVCache)
    "falcon_h1": {
        "num_hidden_layers": 2, "head_dim": 16, "mamba_d_ssm": 64, "mamba_d_head": 16, "mamba_n_heads": 4,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_chunk_size": 16,
    },
}


def family_config(family: str, vocab_size: int, context: int = 8192, **overrides: Any) -> dict[str, Any]:
    """The config.json of a tiny ``family`` model with ``vocab_size`` tokens and a ``context``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cfg = {"model_type": family, **_COMMON, **FAMILIES[family], "vocab_size": vocab_size,
           "max_position_embeddings": context, **overrides}
    if family == "llama4":  # a multimodal wrapper: the language model's config is nested
        return {"model_type": family, "tie_word_embeddings": False, "text_config": cfg}
    return cfg


def _default_model_dir() -> Path:
    from warmturn.server.convert import resolve_model

    return Path(resolve_model(None))


def build_tiny(family: str, out_dir: str | Path, *, context: int = 8192, seed: int = 0,
               tokenizer_dir: str | Path | None = None, **overrides: Any) -> Path:
    """Build a tiny random ``family`` model into ``out_dir`` (made if missing) and return it.

    The tokenizer files come from ``tokenizer_dir`` (default: the converted default model,
    which must exist: ``make setup`` makes it). Deterministic for a given seed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    src = Path(tokenizer_dir) if tokenizer_dir else _default_model_dir()
    tok_cfg = json.loads((src / "config.json").read_text())
    vocab = int(tok_cfg["vocab_size"])
    cfg = family_config(family, vocab, context, **overrides)
    for key in ("bos_token_id", "eos_token_id"):
        if key in tok_cfg:
            cfg[key] = tok_cfg[key]
    module = __import__(f"mlx_lm.models.{family}", fromlist=["Model", "ModelArgs"])
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    # mlx-lm's loader calls sanitize on what it reads; weights saved from the model itself are
    # already in the model's own layout, so they round-trip.
    weights = dict(tree_flatten(model.parameters()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m warmturn.server.tinymodels",
        description="Build a tiny random-weight model of one mlx-lm architecture (answers are noise; the "
                    "KV cache classes are real), with the default model's tokenizer, for tests and trials.")
    p.add_argument("family", choices=sorted(FAMILIES), help="mlx-lm model type")
    p.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--context", type=int, default=8192, help="max_position_embeddings (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    a = p.parse_args(argv)
    out = build_tiny(a.family, a.out_dir, context=a.context, seed=a.seed)
    print(f"built a tiny {a.family} model in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
