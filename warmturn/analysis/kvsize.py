"""KV-cache bytes of a model, from its published architecture (config.json), at a KV dtype.

What one cache entry holding ``n`` tokens costs depends on the kind of each layer
(DESIGN.md, "Model families and their caches"):

* full attention: K and V for every token, ``2 · kv_heads · head_dim · dtype bytes`` per token;
* sliding-window attention: the same per token, but never more than the window;
* linear attention (Gated DeltaNet, Mamba): a state of constant size, whatever ``n`` is.

So ``KVCost.nbytes(n) = per_token · n + window_per_token · min(n, window) + constant``. A cache
with any window or linear layer cannot be trimmed back to a shorter prefix (mlx-lm's
``RotatingKVCache`` past its window, ``ArraysCache`` always): such a family reuses only whole
checkpoints, which :attr:`KVCost.trimmable` says.

The presets are the fields of the models' published ``config.json`` that size the cache, written
down without network access here and compared with copies of those configs in public code (Gemma 3
27B, gpt-oss, Qwen3-Next, Llama 3.1 8B); with the checkpoint at hand, ``--model DIR`` reads its own
config.json through :func:`cost_from_config` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "8bit": 1, "q8": 1, "int8": 1, "fp8": 1, "4bit": 0.5, "q4": 0.5}


@dataclass(frozen=True)
class KVCost:
    """Bytes of a cache entry as a function of the tokens it holds."""

    name: str
    per_token: float  # full-attention layers: bytes per token
    window: int = 0  # sliding-window length (0: no window layers)
    window_per_token: float = 0.0  # window layers: bytes per token, up to `window` tokens
    constant: float = 0.0  # linear-attention / SSM state: bytes whatever the length
    context: int = 0  # the model's context window (0: unknown)
    layers: str = ""  # a one-line description of the layer mix

    def nbytes(self, n: int) -> int:
        return int(self.per_token * n + self.window_per_token * min(n, self.window) + self.constant)

    @property
    def trimmable(self) -> bool:
        """Whether any stored prefix can be cut back (plain KV only): else checkpoints only."""
        return self.window_per_token == 0 and self.constant == 0

    def describe(self) -> str:
        parts = [f"{self.per_token:,.0f} B/token"]
        if self.window_per_token:
            parts.append(f"+ {self.window_per_token:,.0f} B/token up to a {self.window:,}-token window")
        if self.constant:
            parts.append(f"+ {self.constant / 2**20:,.1f} MiB state")
        return f"{self.name}: " + " ".join(parts) + (f" ({self.layers})" if self.layers else "")


def _dtype_bytes(dtype: str) -> float:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown KV dtype {dtype!r}: one of {', '.join(sorted(DTYPE_BYTES))}") from None


def _layer_kinds(cfg: dict[str, Any], n_layers: int) -> list[str]:
    """``full``, ``window`` or ``linear`` for every layer, from the config's own keys."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        out = []
        for t in types:
            t = str(t)
            out.append("window" if "sliding" in t else "linear" if ("linear" in t or "mamba" in t) else "full")
        return out
    if cfg.get("full_attention_interval"):  # qwen3_next, qwen3_5: every k-th layer is full attention
        k = int(cfg["full_attention_interval"])
        return ["full" if (i + 1) % k == 0 else "linear" for i in range(n_layers)]
    if cfg.get("sliding_window_pattern") and cfg.get("sliding_window"):  # gemma3: every k-th layer is global
        k = int(cfg["sliding_window_pattern"])
        return ["full" if (i + 1) % k == 0 else "window" for i in range(n_layers)]
    pattern = cfg.get("hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) == n_layers:  # nemotron_h: M Mamba, * attention, - MLP
        return ["full" if c == "*" else "linear" if c == "M" else "none" for c in pattern]
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True) is not False \
            and cfg.get("model_type") in ("mistral", "gemma2"):
        return ["window"] * n_layers
    return ["full"] * n_layers


def cost_from_config(config: dict[str, Any], dtype: str = "bfloat16", name: str = "") -> KVCost:
    """Bytes per token (and per-layer-kind extras) of a Hugging Face / mlx-lm ``config.json``."""
    cfg = config
    if "num_hidden_layers" not in cfg and isinstance(config.get("text_config"), dict):  # multimodal: the text tower
        cfg = config["text_config"]
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    b = _dtype_bytes(dtype)
    per_layer = 2 * kv_heads * head_dim * b
    kinds = _layer_kinds(cfg, n_layers)
    n_full, n_win, n_lin = (kinds.count(k) for k in ("full", "window", "linear"))
    constant = 0.0
    if n_lin:
        if cfg.get("linear_num_value_heads"):  # Gated DeltaNet (qwen3_next): recurrent state + conv state
            vh, kh = int(cfg["linear_num_value_heads"]), int(cfg["linear_num_key_heads"])
            kd, vd = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
            conv = (int(cfg.get("linear_conv_kernel_dim") or 4) - 1) * (2 * kh * kd + vh * vd)
            constant = n_lin * (vh * kd * vd + conv) * b
        elif cfg.get("mamba_num_heads") or cfg.get("ssm_state_size"):  # Mamba-2 style
            heads_m = int(cfg.get("mamba_num_heads") or 1)
            hd = int(cfg.get("mamba_head_dim") or 64)
            state = int(cfg.get("ssm_state_size") or 128)
            constant = n_lin * heads_m * hd * state * b
    layers = ", ".join(f"{n} {k}" for n, k in ((n_full, "full"), (n_win, "window"), (n_lin, "linear")) if n)
    ctx = int(cfg.get("max_position_embeddings") or 0)
    return KVCost(name or str(cfg.get("model_type", "model")), n_full * per_layer,
                  int(cfg.get("sliding_window") or 0) if n_win else 0, n_win * per_layer, constant, ctx,
                  f"{n_layers} layers: {layers}; {kv_heads} KV heads × {head_dim}, {dtype}")


# The published config.json values that size the KV cache (and the context), per model.
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen3-Coder-30B-A3B": {"model_type": "qwen3_moe", "num_hidden_layers": 48, "num_attention_heads": 32,
                            "num_key_value_heads": 4, "head_dim": 128, "hidden_size": 2048,
                            "max_position_embeddings": 262144},
    "gpt-oss-20b": {"model_type": "gpt_oss", "num_hidden_layers": 24, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "head_dim": 64, "hidden_size": 2880, "sliding_window": 128,
                    "layer_types": ["sliding_attention", "full_attention"] * 12,
                    "max_position_embeddings": 131072},
    "Gemma-3-27B": {"model_type": "gemma3_text", "num_hidden_layers": 62, "num_attention_heads": 32,
                    "num_key_value_heads": 16, "head_dim": 128, "hidden_size": 5376, "sliding_window": 1024,
                    "sliding_window_pattern": 6, "max_position_embeddings": 131072},
    "Qwen3-Next-80B": {"model_type": "qwen3_next", "num_hidden_layers": 48, "num_attention_heads": 16,
                       "num_key_value_heads": 2, "head_dim": 256, "hidden_size": 2048,
                       "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                       "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
                       "max_position_embeddings": 262144},
    "Llama-3.1-8B": {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 4096,
                     "max_position_embeddings": 131072},
}


def preset_cost(name: str, dtype: str = "bfloat16") -> KVCost:
    """A preset by name (case-insensitive)."""
    for key, cfg in PRESETS.items():
        if key.lower() == name.lower():
            return cost_from_config(cfg, dtype, key)
    raise ValueError(f"unknown model preset {name!r}: one of {', '.join(PRESETS)}")


def model_cost(spec: str, dtype: str = "bfloat16") -> KVCost:
    """A preset name, a model directory holding config.json, or a config.json file."""
    if spec.lower() in {k.lower() for k in PRESETS}:
        return preset_cost(spec, dtype)
    p = Path(spec).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model config")
    return cost_from_config(json.loads(file.read_text()), dtype, p.name if p.is_dir() else p.parent.name)


def parse_bytes(text: str) -> int:
    """``512M``, ``8G``, ``1.5GiB``, ``1000000`` -> bytes (K/M/G/T are powers of 1024)."""
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if mult > 1 else s) * mult)
    except ValueError:
        raise ValueError(f"not a byte size: {text!r} (e.g. 512M, 8G)") from None
