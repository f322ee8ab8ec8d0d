"""Sampler parameters at the request boundary, and samplers that cannot poison the process.

Why this module exists (issue 21): mlx-lm's ``apply_top_k`` is an ``mx.compile`` function that
captures ``mx.random.state`` as an input and an output, and raises ``ValueError`` when
``top_k >= vocabulary size``. Raising while the function is traced leaves the process-wide
random key replaced by a tracer that has no primitive, so from then on every sampling call with
temperature > 0, in any request, fails with ``RuntimeError: [eval] Attempting to eval an array
without a primitive`` until a restart. Two guards:

- :func:`clamp_top_k` at the HTTP boundary: ``top_k`` at or above the vocabulary keeps every
  token, which is what ``top_k = 0`` (off) means, so it is sent to the engine as 0 (and
  :func:`clamp_temperature` sends a temperature too small to divide by as 0, greedy);
- :func:`make_sampler`: mlx-lm's sampler, wrapped so that any exception inside it (a bad
  parameter that got through, a new check in a later mlx-lm) restores a working random key
  before it propagates. A failed request then fails alone; it cannot break the ones after it.

Requests that ask for the same parameters get the same sampler object (:func:`make_sampler` is
memoized). mlx-lm's ``BatchGenerator`` samples a batch in one call when every row's sampler is
the same object, and row by row otherwise; Claude Code asks for ``temperature`` 1 on every
request. On this project's 2-core CPU that made no measurable difference (0.99-1.02x the decode
rate at 4 and 8 streams: ``python -m warmturn.bench.engine_probe sampling``); it is one graph per
step instead of one per row, which is what the batched path is for.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import mlx.core as mx


def clamp_top_k(top_k: int | None, vocab_size: int) -> int:
    """``top_k`` as the engine should get it: 0 (off) for none, 0, or any value that keeps the
    whole vocabulary (``>= vocab_size``; an unknown ``vocab_size`` of 0 leaves it unchanged)."""
    if not top_k or (vocab_size > 0 and top_k >= vocab_size):
        return 0
    return top_k


#: below this a temperature is greedy decoding: mlx-lm samples from ``logprobs * (1 / temp)``,
#: which overflows float32 for a tiny temperature (``5e-324``, ``1e-300``: inf * 0 = NaN) and then
#: picks tokens at random, the opposite of what a near-zero temperature asks for
MIN_TEMPERATURE = 1e-3


def clamp_temperature(temperature: float) -> float:
    """``temperature`` as the engine should get it: 0 (greedy) below :data:`MIN_TEMPERATURE`."""
    return 0.0 if temperature < MIN_TEMPERATURE else temperature


def vocab_size(model: Any) -> int:
    """The width of the model's logits (what ``top_k`` is checked against), or 0 if unknown."""
    args = getattr(model, "args", None)
    n = getattr(args, "vocab_size", None)
    if isinstance(n, int) and n > 0:
        return n
    text = getattr(args, "text_config", None)  # multimodal configs keep it one level down
    n = text.get("vocab_size") if isinstance(text, dict) else getattr(text, "vocab_size", None)
    return n if isinstance(n, int) and n > 0 else 0


def reseed() -> None:
    """Give the process a working random key again (after a compiled sampler raised mid-trace)."""
    mx.random.seed(int.from_bytes(os.urandom(8), "little"))


@functools.lru_cache(maxsize=256)
def make_sampler(temp: float = 0.0, top_p: float = 0.0, top_k: int = 0) -> Any:
    """mlx-lm's ``make_sampler(temp=, top_p=, top_k=)``; if the sampler raises, the random state
    is restored (:func:`reseed`) and the exception propagates to fail only its request's step.
    One object per parameter set (it holds no state of its own), so a batch can share it."""
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    inner = mlx_make_sampler(temp=temp, top_p=top_p, top_k=top_k)
    if temp == 0:
        return inner  # greedy: argmax, no random state involved

    def sampler(logprobs: mx.array) -> mx.array:
        try:
            return inner(logprobs)
        except BaseException:
            reseed()
            raise

    return sampler
