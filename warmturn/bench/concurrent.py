"""The concurrent replay of `make bench`: every scenario (bench/scenarios.py) against every
peer, each on a freshly started server behind `mitmdump -s addons/normalize.py`, scenario by
scenario with the peers side by side (so a change in the machine's load hits them alike).

What each server computed is read where that server tells it:
- warmturn: `/metrics` (`warmturn_prefill_tokens_total`, scraped on the backend before and after
  the scenario) and its per-request log (`queued_ms`, `reused`), matched by `request-id`;
- mlx_lm.server: the usage of each response (`prompt_tokens_details.cached_tokens`, which the
  addon turns into `cache_read_input_tokens`): prompt - cached = computed;
- vllm-mlx: its `/v1/status` and `/metrics` when they carry counters, else nothing (n/a).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import httpx

from warmturn.bench.arms import Arm, ArmRun, BenchTimeout, Context, server_request_log
from warmturn.bench.replay import run_scenario
from warmturn.bench.scenarios import Scenario
from warmturn.bench.targets import distinct_prefix_tokens

PEERS = {
    "warmturn": Arm("warmturn", "warmturn's embedded server behind the addon"),
    # opt-in (--peers): the same server reading every admitted prompt at once, for A/B
    "warmturn-arrival": Arm("warmturn-arrival", "warmturn with --prefill-order arrival",
                            server_args=("--prefill-order", "arrival")),
    # opt-in: a lone request served in the batch too, as a batch of one (the way both peers serve it)
    "warmturn-no-solo": Arm("warmturn-no-solo", "warmturn with --no-solo", server_args=("--no-solo",)),
    "mlx_lm.server": Arm("mlx_lm.server", "mlx_lm.server (BatchGenerator, its defaults) behind the addon",
                         backend="mlx_lm", backend_api="openai"),
    "vllm-mlx-cb": Arm("vllm-mlx-cb", "vllm-mlx --continuous-batching, its /v1/messages behind the addon",
                       backend="vllm_mlx", server_args=("--continuous-batching",)),
}


def select_peers(spec: str, vllm_mlx: bool) -> list[str]:
    """Peer keys from a comma-separated spec ('' = all available; vllm-mlx only with its command)."""
    known = [k for k in PEERS if vllm_mlx or not k.startswith("vllm")]
    if not spec:
        return [k for k in known if k not in OPT_IN]
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [w for w in wanted if w not in PEERS]
    if bad:
        raise SystemExit(f"--peers: unknown {bad}; known: {list(PEERS)}")
    missing = [w for w in wanted if w not in known]
    if missing:
        raise SystemExit(f"--peers {missing} need --vllm-mlx-cmd (or VLLM_MLX_CMD; see scripts/vllm-mlx.sh)")
    return wanted


OPT_IN = {"warmturn-arrival", "warmturn-no-solo"}

_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)\s*$")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {name{labels}: value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line.strip())
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def scrape(peer: str, backend_url: str) -> dict:
    """The server's own counters: Prometheus `/metrics` and, for vllm-mlx, its JSON `/v1/status`."""
    out: dict = {}
    for path in ("/metrics", "/v1/status") if peer.startswith("vllm") else ("/metrics",):
        try:
            r = httpx.get(backend_url + path, timeout=10.0)
        except httpx.HTTPError:
            continue
        if r.status_code != 200:
            continue
        if "json" in r.headers.get("content-type", ""):
            try:
                out[path] = r.json()
            except ValueError:
                pass
        else:
            out[path] = parse_prometheus(r.text)
    return out


def metric_delta(before: dict, after: dict, name: str) -> float | None:
    """Increase of a Prometheus counter (summed over its label sets) between two scrapes."""
    b, a = before.get("/metrics") or {}, after.get("/metrics") or {}
    keys = [k for k in a if k == name or k.startswith(name + "{")]
    if not keys:
        return None
    return sum(a[k] - b.get(k, 0.0) for k in keys)


_VLLM_FETCH = re.compile(r"\[cache_fetch\] request=\S+ (HIT|MISS) prompt_tokens=(\d+)(?: cached=(\d+) remaining=(\d+))?")


def vllm_prefill_from_log(text: str) -> int | None:
    """Prompt tokens vllm-mlx computed, from its `[cache_fetch]` log lines (one per scheduled
    request: a MISS computes the whole prompt, a HIT its `remaining` tokens); None without any."""
    total, seen = 0, False
    for m in _VLLM_FETCH.finditer(text):
        seen = True
        total += int(m.group(4)) if m.group(1) == "HIT" and m.group(4) else int(m.group(2))
    return total if seen else None


def attach_server_records(rows: list[dict], records: list[dict]) -> None:
    """Add the embedded server's own view of each request, matched by request id."""
    by_id = {r.get("request_id"): r for r in records if r.get("request_id")}
    for row in rows:
        rec = by_id.get(row.get("request_id"))
        if rec is None:
            continue
        row["server_prompt_tokens"] = rec.get("prompt_tokens")
        row["server_reused_tokens"] = rec.get("reused")
        row["server_prefill_ms"] = rec.get("prefill_ms")
        row["queue_ms"] = rec.get("queued_ms", rec.get("queue_ms"))


def run_one(scenario: Scenario, peer: str, ctx: Context, rep: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Fresh server (+ warm-up) and mitmdump for `peer`, replay `scenario`, stop both.
    Returns the rows and what the server's counters said (before/after scrapes)."""
    arm = dataclasses.replace(PEERS[peer], key=f"{scenario.key}-{peer}")
    run = ArmRun(arm, ctx, rep)
    info: dict = {"scenario": scenario.key, "peer": peer, "rep": rep}
    rows: list[dict] = []
    log_path: Path | None = None
    try:
        run.start_backend()
        log_path = run.backend.log_path if run.backend else None
        base = run.start_proxy()
        before = scrape(peer, run.backend_url)
        log_offset = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
        t = time.monotonic()
        rows = run_scenario(scenario, base, peer, rep=rep, timeout=ctx.request_timeout, seed=seed, log=run.log)
        info["wall_s"] = round(time.monotonic() - t, 2)
        time.sleep(0.5)  # let the last request's bookkeeping land before scraping
        after = scrape(peer, run.backend_url)
        info["prefill_tokens_metric"] = metric_delta(before, after, "warmturn_prefill_tokens_total")
        info["metrics_after"] = {k: v for k, v in (after.get("/metrics") or {}).items()
                                 if k.startswith("warmturn_")} if arm.backend == "embedded" else {}
        if "/v1/status" in after:
            info["status_after"] = after["/v1/status"]
        if peer.startswith("vllm") and log_path is not None:
            with log_path.open("rb") as f:
                f.seek(log_offset)
                info["vllm_prefill_tokens"] = vllm_prefill_from_log(f.read().decode(errors="replace"))
            info["vllm_metrics_delta"] = {k: v - (before.get("/metrics") or {}).get(k, 0.0)
                                          for k, v in (after.get("/metrics") or {}).items()
                                          if "token" in k or "cache" in k}
    finally:
        run.close()
        if arm.backend == "embedded" and log_path is not None:
            attach_server_records(rows, server_request_log(log_path))
    return rows, info


def run_concurrent(scenarios: list[Scenario], peers: list[str], ctx: Context, repeats: int = 1,
                   out_dir: Path | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Every scenario × peer × repeat; returns (rows, per-run info, failures)."""
    rows: list[dict] = []
    infos: list[dict] = []
    failed: list[str] = []
    for rep in range(repeats):
        for scenario in scenarios:
            for peer in peers:
                if time.monotonic() > ctx.deadline:
                    raise BenchTimeout(f"time limit reached before concurrent {scenario.key} on {peer}")
                ctx.progress(f"[{time.monotonic() - ctx.t0:7.1f}s] concurrent {scenario.key} on {peer} "
                             f"({len(scenario.nodes)} requests): {scenario.title}")
                try:
                    r, info = run_one(scenario, peer, ctx, rep)
                except (RuntimeError, TimeoutError, OSError, ValueError) as e:
                    ctx.progress(f"concurrent {scenario.key} on {peer}: FAILED: {e}")
                    failed.append(f"{scenario.key}/{peer} (rep {rep}: {str(e).splitlines()[0][:120]})")
                    continue
                rows += r
                infos.append(info)
                if out_dir is not None:
                    with (out_dir / "concurrent-info.jsonl").open("a") as f:
                        f.write(json.dumps(info) + "\n")
    return rows, infos, failed


def ideal_prefill(scenarios: list[Scenario], model: Path, prefix_order: str = "tools-first") -> dict[str, int]:
    """Per scenario, the prompt tokens a perfect shared prefix cache would compute: the prefix
    tree of every request's prompt as warmturn's server renders it (after the addon has
    stripped the billing block, which these bodies do not carry)."""
    from transformers import AutoTokenizer

    from warmturn.server.render import Renderer
    from warmturn.server.wire import parse_messages_request

    renderer = Renderer(AutoTokenizer.from_pretrained(str(model)), prefix_order)
    out = {}
    for sc in scenarios:
        seqs = [renderer.render(parse_messages_request(n.request.body)).tokens for n in sc.nodes]
        out[sc.key] = distinct_prefix_tokens(seqs)
    return out
