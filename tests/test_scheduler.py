"""The engine's scheduling policy as pure functions (warmturn/server/scheduler.py): who reads
its prompt in the next step, whom a new request waits for, in which order parked requests go on,
and how long a refused client should wait."""

from __future__ import annotations

from warmturn.server.scheduler import (
    Candidate,
    best,
    choose_leader,
    choose_prompts,
    rank,
    release_order,
    retry_after,
)


def cand(remaining: int, waited: float = 0.0, submitted: float = 0.0, **kw) -> Candidate:
    return Candidate(remaining, waited, submitted, **kw)


def test_shortest_remaining_prompt_goes_first():
    cands = [cand(900, submitted=1), cand(40, submitted=2), cand(300, submitted=3)]
    assert choose_prompts(cands, prefill_tps=0, step_size=256, max_prompts=4)[0] == 1
    assert best(cands, prefill_tps=0) == 1


def test_short_prompts_share_a_padded_step_long_ones_take_turns():
    four_short = [cand(50, submitted=i) for i in range(4)]
    assert choose_prompts(four_short, 0, step_size=256, max_prompts=4) == [0, 1, 2, 3]  # 4 x 50 padded to 4 x 50
    two_long = [cand(2000, submitted=0), cand(1500, submitted=1)]
    assert choose_prompts(two_long, 0, step_size=256, max_prompts=4) == [1]  # 2 x 256 would not fit one step
    assert choose_prompts(four_short, 0, step_size=256, max_prompts=2) == [0, 1]  # the concurrency bound


def test_a_prompt_others_wait_on_goes_first_and_a_title_last():
    cands = [cand(30, submitted=0, background=True), cand(800, submitted=1), cand(900, submitted=2, waited_on=True)]
    order = sorted(range(3), key=lambda i: rank(cands[i], 0))
    assert order == [2, 1, 0]


def test_ageing_lets_a_long_prompt_pass_a_newer_short_one():
    old_long = cand(1000, waited=10.0, submitted=0)
    new_short = cand(100, waited=0.0, submitted=10)
    assert best([old_long, new_short], prefill_tps=200) == 0  # 1000 - 2000 < 100
    assert best([old_long, new_short], prefill_tps=50) == 1  # 1000 - 500 > 100


def test_leader_is_the_one_sharing_the_most_uncached_tokens():
    tokens = list(range(100))
    running = [(list(range(40)) + [999], 0), (list(range(90)) + [999], 0), (list(range(95)) + [7], 80)]
    assert choose_leader(tokens, running, min_tokens=32) == (1, 90)
    # below the threshold of tokens not in the store already: nobody to wait for
    assert choose_leader(tokens, [(list(range(95)) + [7], 80)], min_tokens=32) is None
    # never the whole prompt: at least the last token is computed by the request itself
    assert choose_leader(tokens, [(tokens + [5], 0)], min_tokens=32) == (0, 99)


def test_released_requests_sharing_a_longer_part_go_first():
    tools = [1] * 50
    prompts = [tools + [2, 3], tools + [9] * 40 + [4], tools + [9] * 40 + [5], tools + [6]]
    order = release_order(prompts)
    assert set(order[:2]) == {1, 2} and order[2:] == [0, 3]  # ties keep arrival order
    assert release_order([tools]) == [0]


def test_retry_after_is_the_queue_ahead_in_waves_of_concurrency():
    assert retry_after(depth=0, concurrency=8, service_s=5.0) == 1
    assert retry_after(depth=15, concurrency=8, service_s=5.0) == 10
    assert retry_after(depth=1000, concurrency=1, service_s=5.0) == 60
