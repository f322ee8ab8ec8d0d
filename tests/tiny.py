"""A tiny random llama and a word-level tokenizer for it: the same mlx-lm code paths as the
real model (KV caches, BatchGenerator, detokenizer), in milliseconds on a CPU."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import llama

VOCAB = 50
EOS = 1


def tiny_model(seed: int = 0):
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
    ))
    mx.eval(model.parameters())
    return model


def tiny_tokenizer():
    """An in-memory word-level tokenizer: token i is the word ``t<i>``, ``t1`` is EOS."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{EOS}", unk_token="t0"))
