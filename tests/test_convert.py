"""The offline default-model provisioning: GGUF -> mlx-lm directory that answers sensibly."""

import json

import pytest

from warmturn.server import convert


def test_default_gguf_is_found_without_importing_the_package():
    path = convert.find_default_gguf()
    assert path.name == convert.DEFAULT_GGUF_NAME
    assert path.stat().st_size > 50_000_000


def test_converted_directory_is_cached_and_complete(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["rope_traditional"] is True
    assert cfg["num_hidden_layers"] == 30 and cfg["max_position_embeddings"] == 8192
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    # a second resolve is a cache hit: same directory, no rewrite
    mtime = (model_dir / "model.safetensors").stat().st_mtime
    assert convert.resolve_model(None) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime == mtime


def test_tokenizer_round_trips_chatml(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi 2024!"}], add_generation_prompt=True)
    assert ids[0] == 1  # <|im_start|>
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>user\nHi 2024!<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token_id == 2


def test_model_answers_capital_of_france(model_and_tokenizer):
    from mlx_lm import generate

    model, tok = model_and_tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    out = generate(model, tok, prompt, max_tokens=12)
    assert "Paris" in out


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        convert.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert.resolve_model(str(tmp_path / "empty"))
