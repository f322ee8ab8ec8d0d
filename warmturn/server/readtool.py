"""The default model's Read-tool adapter: a LoRA that teaches SmolLM2-135M-Instruct `make claude`'s Read
call, trained on CPU by scripts/train_toolcall.py (docs/default-model-tools.md), fused into the weights.

The adapter ships in this package (``adapters/``, about 1.6 MB). Its SHA-256 is pinned here and checked
before it is used, like every file the server trusts; a mismatch is an error, never a silent fallback.
The fused model is written once next to the converted default model, under the converted directory's
name plus ``-read`` and the adapter's hash: another name, hence another served model id, and other
weights, hence another prefix-cache identity, so KV computed by the plain model is never reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-135m-read.safetensors"
ADAPTER_SHA256 = "51962ef1cc8ed2bbd045e9bc0a5635b383e33a838d687c08220a083683fef7d8"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def apply_adapter(model: Any, path: Path, fuse: bool = True) -> dict[str, str]:
    """Load a LoRA adapter (rank, scale and layer count from the file's metadata) into ``model`` and,
    with ``fuse``, fold it into the base weights. Returns the file's metadata."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    weights, meta = mx.load(str(path), return_metadata=True)
    layers, rank, scale = int(meta["layers"]), int(meta["rank"]), float(meta["scale"])
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS})
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=False)
    if fuse:
        model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    mx.eval(model.parameters())
    return dict(meta)


def tuned_name(base: Path, expected: str = ADAPTER_SHA256) -> str:
    return f"{base.name}-read{expected[:8]}"


def tuned_model_dir(base: Path, adapter: Path = ADAPTER, expected: str = ADAPTER_SHA256) -> Path:
    """The converted default model ``base`` with the Read adapter fused in: made once (a few seconds),
    then reused. Raises ValueError when the adapter's SHA-256 is not the pinned one."""
    out = base.with_name(tuned_name(base, expected))
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not adapter.is_file():
        raise FileNotFoundError(f"the default model's Read adapter {adapter} is missing: reinstall warmturn")
    digest = sha256(adapter)
    if digest != expected:
        raise ValueError(f"the default model's Read adapter {adapter} has SHA-256 {digest}, expected {expected}: "
                         "the file was changed or damaged; reinstall warmturn (or serve the plain model with "
                         "--no-read-adapter)")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    t0 = time.monotonic()
    model, _ = load_model(base)
    meta = apply_adapter(model, adapter)
    from warmturn.server.building import building

    with building(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        for name in _COPIED:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        (tmp / "warmturn-source.json").write_text(json.dumps(
            {"base": str(base), "adapter": adapter.name, "adapter_sha256": digest, "adapter_meta": meta,
             "fused_at": time.time()}))
    print(f"[warmturn] fused the Read adapter into {out.name} in {time.monotonic() - t0:.1f}s", flush=True,
          file=__import__("sys").stderr)
    return out
