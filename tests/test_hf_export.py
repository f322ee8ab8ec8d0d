"""The HF-format export of the default model (for vLLM/SGLang): same weights, same greedy tokens."""

import json

import mlx.core as mx
import numpy as np
import pytest

from warmturn.server import hf_export


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF Q/K permutation (what the GGUF on disk went through)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_heads", [9, 3])
def test_unpermute_inverts_llama_cpp_permutation(n_heads):
    hf = np.arange(n_heads * 64 * 8, dtype=np.float32).reshape(n_heads * 64, 8)
    gguf = _llama_cpp_permute(hf, n_heads)
    assert not np.array_equal(gguf, hf)
    assert np.array_equal(np.array(hf_export.unpermute(mx.array(gguf), n_heads)), hf)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "smollm2-hf"
    return hf_export.export_hf(model_dir, out)


def test_export_is_an_hf_llama_directory(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "rope_traditional" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["torch_dtype"]) == (9, 3, "float32")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    tok = json.loads((exported / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok["chat_template"]
    assert (exported / "chat_template.jinja").read_text() == tok["chat_template"]
    weights = mx.load(str(exported / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float32
    assert not any(k.endswith((".scales", ".biases")) for k in weights)


def test_export_gives_mlx_lms_greedy_tokens(model_dir, exported):
    toks = hf_export.verify(model_dir, exported)
    assert all(len(t) > 3 for t in toks)


def test_verify_catches_q_k_left_in_gguf_order(model_dir, exported, tmp_path):
    """The check has teeth: the same weights without the un-permutation generate other tokens."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in exported.iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    src = mx.load(str(model_dir / "model.safetensors"))
    mx.save_safetensors(str(bad / "model.safetensors"), src, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="export mismatch"):
        hf_export.verify(model_dir, bad, hf_export.VERIFY_PROMPTS[:1])
