"""Run one scenario (bench/scenarios.py) against one server: every request in its own thread,
started as soon as the requests it comes after have finished, all timed on one clock.

Each row keeps when the request was sent, when its first token arrived and when it ended
(seconds since the scenario's start), so the summary can compute makespan, overlap and
decode windows, plus the usage the server reported and its `request-id` (to find the
server's own log record of the request: queue wait, reused tokens).
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable

import httpx

from warmturn.bench.client import Result, send
from warmturn.bench.scenarios import Node, Scenario
from warmturn.bench.workload import billing_block


def bodies_with_billing(scenario: Scenario, rng: random.Random) -> dict[str, dict]:
    """Every node's body, with a fresh billing block at system[0] where Claude Code sends one
    (each request: a rotating `cch=`, as when it believes it talks to api.anthropic.com; the
    addon strips it). Drawn in node order before anything starts, so every server gets the
    same bodies."""
    out = {}
    for node in scenario.nodes:
        body = copy.deepcopy(node.request.body)
        if "system" in body:
            body["system"] = [billing_block(rng, node.request.agent.startswith("subagent")), *body["system"]]
        out[node.name] = body
    return out


def result_row(scenario: str, peer: str, rep: int, node: Node, sent_s: float, res: Result) -> dict:
    u = res.usage
    first = sent_s + res.ttft_ms / 1000 if res.ttft_ms is not None else None
    end = sent_s + res.total_ms / 1000 if res.total_ms is not None else None
    return {"scenario": scenario, "peer": peer, "rep": rep, "request": node.name, "agent": node.request.agent,
            "role": node.role, "after": ",".join(node.after), "sent_s": round(sent_s, 4),
            "first_token_s": None if first is None else round(first, 4), "end_s": None if end is None else round(end, 4),
            "ttft_ms": res.ttft_ms, "ttfb_ms": res.ttfb_ms, "total_ms": res.total_ms, "status": res.status,
            "input_tokens": u.get("input_tokens"), "cache_read_input_tokens": u.get("cache_read_input_tokens"),
            "cache_creation_input_tokens": u.get("cache_creation_input_tokens"),
            "output_tokens": u.get("output_tokens"), "prompt_tokens": res.prompt_tokens,
            "stop_reason": res.stop_reason, "request_id": res.request_id, "error": res.error}


def run_scenario(scenario: Scenario, base_url: str, peer: str, *, rep: int = 0, timeout: float = 900.0,
                 seed: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """Replay `scenario` against `base_url`; one row per request, in the scenario's node order.
    A request whose predecessor failed still runs (a client would carry on or retry)."""
    bodies = bodies_with_billing(scenario, random.Random(f"replay-{seed}-{scenario.key}-{rep}"))
    done = {n.name: threading.Event() for n in scenario.nodes}
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=len(scenario.nodes) + 4, max_keepalive_connections=len(scenario.nodes))

    def worker(node: Node, client: httpx.Client) -> None:
        try:
            for dep in node.after:
                done[dep].wait()
            if node.delay_s:
                time.sleep(node.delay_s)
            headers = dict(node.request.headers, **{"x-api-key": "bench-not-a-key"})
            sent = time.perf_counter() - t0
            res = send(client, base_url, bodies[node.name], headers, timeout)
            rows[node.name] = row = result_row(scenario.key, peer, rep, node, sent, res)
            if res.error:
                log(f"{scenario.key}/{peer} {node.name}: ERROR {res.error}")
            else:
                log(f"{scenario.key}/{peer} {node.name}: sent {sent:6.1f}s TTFT {res.ttft_ms / 1000:6.2f}s "
                    f"end {row['end_s']:6.1f}s out {row['output_tokens']} cached {row['cache_read_input_tokens']}"
                    f"/{row['prompt_tokens']}")
        finally:
            done[node.name].set()

    with httpx.Client(limits=limits) as client:
        threads = [threading.Thread(target=worker, args=(n, client), name=f"replay-{n.name}", daemon=True)
                   for n in scenario.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [rows[n.name] for n in scenario.nodes if n.name in rows]
