"""The engine's scheduling policy, as pure functions over plain numbers (tested in
tests/test_scheduler.py; the engine, server/engine.py, applies them every step).

mlx-lm's BatchGenerator reads a chunk of every prompt in its prompt batch at every step,
right-padded to the longest chunk. Left to itself, four prompts that arrive together all finish
reading at the end of the four (each request's TTFT is the whole batch's prefill time), and a
short prompt beside a long one pays for the padding. So the engine decides who is in the prompt
batch, step by step (:func:`choose_prompts`): shortest remaining prompt first (the order that
minimises the mean wait), several prompts in one step only while the padded step stays within
``prefill_step_size`` tokens (four short prompts read in one step; two long ones one after the
other), a prompt others are parked on first (its prefill serves them all), side requests such as
a conversation title last (they yield to the turn a user waits for), and ageing so that a long
prompt is never starved: a request that has waited t seconds counts as t * (prefill rate)
tokens shorter (:func:`rank`). A prompt that loses its place mid-way leaves the batch with its
KV state and goes on later from there. Decoding streams are untouched by all of this: every
step decodes them.

Dedup (:func:`choose_leader`, :func:`release_order`): a request sharing a not-yet-cached prefix
with one being read waits for it ("parks"), then fetches that prefix from the store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from warmturn.prefix import common_prefix_len


@dataclass(frozen=True)
class Candidate:
    """A prompt that wants to be read: what the policy needs to know of it."""

    remaining: int  # prompt tokens still to compute
    waited_s: float  # since it was submitted
    submitted: float  # monotonic time, the last tie-breaker
    waited_on: bool = False  # other requests are parked on its prefill
    background: bool = False  # a side request (a conversation title)


def rank(c: Candidate, prefill_tps: float) -> tuple[int, float, float]:
    """Sort key: group (0 waited on, 1 a turn, 2 background), remaining tokens minus ageing, arrival."""
    group = 0 if c.waited_on else 2 if c.background else 1
    return group, c.remaining - prefill_tps * c.waited_s, c.submitted


def choose_prompts(cands: Sequence[Candidate], prefill_tps: float, step_size: int, max_prompts: int) -> list[int]:
    """Indices of the prompts read in the next step, best first: by :func:`rank`, as many as fit
    one padded step of ``step_size`` tokens (the first always does), at most ``max_prompts``."""
    chosen: list[int] = []
    widest = 0
    for i in sorted(range(len(cands)), key=lambda i: rank(cands[i], prefill_tps)):
        if len(chosen) >= max_prompts:
            break
        chunk = min(max(1, cands[i].remaining), step_size)
        if chosen and max(widest, chunk) * (len(chosen) + 1) > step_size:
            continue
        chosen.append(i)
        widest = max(widest, chunk)
    return chosen


def best(cands: Sequence[Candidate], prefill_tps: float) -> int:
    """Index of the prompt that would be read first."""
    return min(range(len(cands)), key=lambda i: rank(cands[i], prefill_tps))


def choose_leader(tokens: Sequence[int], running: Sequence[tuple[Sequence[int], int]], min_tokens: int) -> tuple[int, int] | None:
    """Which admitted request a new one should wait for: ``running`` holds (prompt, tokens the
    store has of it) for each; the result is (index, shared tokens) of the one sharing the most
    not-yet-cached tokens with ``tokens``, if that is at least ``min_tokens``; else None."""
    found: tuple[int, int] | None = None
    limit = len(tokens) - 1
    for i, (other, covered) in enumerate(running):
        s = min(common_prefix_len(other, tokens), limit)
        if s - covered >= min_tokens and (found is None or s > found[1]):
            found = (i, s)
    return found


def release_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Order in which requests released from a park together are admitted again: the one sharing
    the longest prefix with another goes first (the others then park on it for that longer part),
    ties in arrival order."""
    if len(prompts) < 2:
        return list(range(len(prompts)))
    longest = [max(common_prefix_len(p, q) for j, q in enumerate(prompts) if j != i) for i, p in enumerate(prompts)]
    return sorted(range(len(prompts)), key=lambda i: -longest[i])


def retry_after(depth: int, concurrency: int, service_s: float) -> int:
    """Seconds a refused client should wait: the queue ahead of it, served ``concurrency`` at a
    time, at the recent mean request duration; between 1 and 60."""
    waves = (depth + 1) / concurrency
    return int(min(60, max(1, math.ceil(waves * service_s))))
