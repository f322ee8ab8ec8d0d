"""Export the default model as a Hugging Face-format directory, for engines that load HF weights (vLLM, SGLang).

``python -m warmturn.server.hf_export --out DIR [--model MLX_DIR] [--no-verify]``

The same weights as the embedded server, so benchmarks and tests compare engines, not models:

- Q/K projections un-permuted. The GGUF (and so the mlx-lm copy, which says ``rope_traditional: true``)
  stores them in GGUF's interleaved order; HF llama expects the half-split (NeoX) order. Per head,
  ``w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`` inverts
  llama.cpp's permutation, with n = attention heads for q and key/value heads for k.
- A ``LlamaForCausalLM`` ``config.json`` (float32, tied embeddings) and a ``generation_config.json``.
- The tokenizer files, the chat template both inside ``tokenizer_config.json`` and as
  ``chat_template.jinja``.

Verification (on by default): the exported directory, loaded by mlx-lm as a plain HF llama
(``rope_traditional`` false), must produce the same greedy tokens as the source directory on a few
chat prompts. The vLLM integration tests (tests/engines/) check vLLM's greedy tokens against the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
)


def unpermute(w, n_heads: int):
    """Inverse of llama.cpp's Q/K permutation for one projection matrix (rows = n_heads * head_dim)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_config(cfg: dict, tok_cfg: dict, vocab: dict[str, int]) -> dict:
    """A transformers ``LlamaConfig`` dict from an mlx-lm llama config."""
    bos = vocab.get(tok_cfg.get("bos_token") or "")
    eos = vocab.get(tok_cfg.get("eos_token") or "")
    pad = vocab.get(tok_cfg.get("pad_token") or "")
    heads = cfg["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim", cfg["hidden_size"] // heads),
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg.get("rope_theta", 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": cfg["max_position_embeddings"],
        "vocab_size": cfg["vocab_size"],
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def _dense_weights(src: Path, cfg: dict) -> dict:
    """The source directory's weights as float32 arrays (dequantizing 4-bit triples if needed)."""
    import mlx.core as mx

    weights = mx.load(str(src / "model.safetensors"))
    quant = cfg.get("quantization")
    out = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        if quant and f"{base}.scales" in weights:
            spec = quant.get(base, quant)
            w = mx.dequantize(w, weights[f"{base}.scales"], weights[f"{base}.biases"],
                              group_size=spec["group_size"], bits=spec["bits"])
        out[name] = w.astype(mx.float32)
    return out


def export_hf(src: Path, out: Path) -> Path:
    """Write an HF llama directory for the mlx-lm llama directory ``src`` into ``out`` (atomically)."""
    import mlx.core as mx

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{src}: only llama models export (model_type {cfg.get('model_type')!r})")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    weights = _dense_weights(src, cfg)
    if cfg.get("rope_traditional"):
        heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        for name in list(weights):
            if name.endswith("self_attn.q_proj.weight"):
                weights[name] = unpermute(weights[name], heads)
            elif name.endswith("self_attn.k_proj.weight"):
                weights[name] = unpermute(weights[name], kv_heads)
    mx.eval(list(weights.values()))

    from warmturn.server.building import building

    config = hf_config(cfg, tok_cfg, vocab)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    with building(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(src / name, tmp / name)
        if tok_cfg.get("chat_template"):
            (tmp / "chat_template.jinja").write_text(tok_cfg["chat_template"])
        (tmp / "warmturn-source.json").write_text(json.dumps({"mlx_model": str(src), "exported_at": time.time()}))
    return out


def greedy_tokens(model_dir: Path, prompts=VERIFY_PROMPTS, max_tokens: int = 16) -> list[list[int]]:
    """Greedy continuations (token ids) of chat prompts, generated by mlx-lm from ``model_dir``."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(model_dir))
    results = []
    for text in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        toks = []
        for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
            t = int(t)
            if t in tok.eos_token_ids:
                break
            toks.append(t)
        results.append(toks)
    return results


def verify(src: Path, out: Path, prompts=VERIFY_PROMPTS) -> list[list[int]]:
    """Raise ValueError unless ``out`` (as HF llama) and ``src`` give equal greedy tokens; returns them."""
    want = greedy_tokens(src, prompts)
    got = greedy_tokens(out, prompts)
    for prompt, a, b in zip(prompts, want, got, strict=True):
        if a != b:
            raise ValueError(f"export mismatch on {prompt!r}: mlx-lm source {a} vs HF export {b}")
    return got


def main(argv: list[str] | None = None) -> int:
    """``python -m warmturn.server.hf_export --out DIR``: export the default model (or --model) as HF llama weights."""
    from .convert import cache_root, find_default_gguf, gguf_model_dir

    ap = argparse.ArgumentParser(prog="python -m warmturn.server.hf_export", description=main.__doc__)
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: $WARMTURN_CACHE/vllm-cpu/hf-model)")
    ap.add_argument("--model", type=Path, default=None,
                    help="mlx-lm llama directory to export (default: the default model, float32)")
    ap.add_argument("--no-verify", action="store_true", help="skip the greedy-token check against mlx-lm")
    args = ap.parse_args(argv)
    src = args.model or gguf_model_dir(find_default_gguf(), quantized=False)
    out = args.out or cache_root() / "vllm-cpu" / "hf-model"
    try:
        t0 = time.monotonic()
        export_hf(src, out.expanduser())
        print(f"[warmturn] exported {src} -> {out} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        if not args.no_verify:
            try:
                toks = verify(src, out)
            except ValueError:
                shutil.rmtree(out, ignore_errors=True)  # never leave an unverified export behind
                raise
            print(f"[warmturn] verified: greedy tokens equal mlx-lm's on {len(toks)} prompts", file=sys.stderr)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
