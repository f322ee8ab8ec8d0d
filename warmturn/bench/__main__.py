"""`python -m warmturn.bench` (`make bench`): replay a Claude-Code-shaped session through every arm,
replay Claude Code's concurrency against warmturn and its batching peers, measure the floor
with mlx-lm, print the tables, write CSV + the analysis report's charts.

See docs/bench.md for what each arm means and how to read the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from warmturn.bench import procs
from warmturn.bench.arms import ROOT, ArmRun, BenchTimeout, Context, all_arms
from warmturn.bench.concurrent import ideal_prefill, run_concurrent, select_peers
from warmturn.bench.families import build_workload, family_table, overview_table, run_families, select_families, select_servers
from warmturn.bench.peer_model import peer_model_dir
from warmturn.bench.scenarios import SCENARIOS, build_scenarios
from warmturn.bench.summary import ratios, summarize_arm, table, write_csv
from warmturn.bench.targets import concurrent_table, summarize_concurrent, targets, targets_table
from warmturn.bench.workload import build_session, load_fixture, make_counter, request_tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m warmturn.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="mlx-lm model directory or .gguf (default: the project's default model, "
                                   "without its Read-tool adapter: the tuned model starts tool calls in the "
                                   "replayed turns, and a server holds such text back until the call is parsed, "
                                   "so TTFT would time the whole answer)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CI version: ~300-token prefix, short messages, 2 requests per arm, max_tokens 4; "
                        "concurrent replay b and scale on warmturn only")
    p.add_argument("--target-tokens", type=int, help="system+tools prefix tokens (default 2000; smoke 300; "
                                                     "~19000 is Claude Code's full size)")
    p.add_argument("--turns", type=int, help="main-agent requests per session (default all 7; smoke 2)")
    p.add_argument("--max-tokens", type=int, help="max_tokens per request (default 8; smoke 4)")
    p.add_argument("--repeats", type=int, default=1, help="run every arm this many times (default 1)")
    p.add_argument("--arms", default="", help="sequential arms: comma-separated numbers or keys (default: all), "
                                              "e.g. 1,3,7, or 'none'")
    p.add_argument("--scenarios", default=None,
                   help="concurrent replay scenarios, comma-separated, or 'none': a-alone (first turn alone), "
                        "a (title request + first turn), b (fan-out: 3 background subagents), c (4 sessions x "
                        "4 turns), scale (decode tok/s, 1 vs 4 streams). Default: all; smoke: b,scale")
    p.add_argument("--peers", default="",
                   help="servers of the concurrent replay: warmturn, mlx_lm.server, vllm-mlx-cb (default: all; "
                        "vllm-mlx-cb only with --vllm-mlx-cmd; smoke: warmturn); warmturn-arrival (opt-in: warmturn "
                        "with --prefill-order arrival, for A/B), warmturn-no-solo (opt-in: warmturn "
                        "with --no-solo, a lone request as a batch of one, as the peers serve it)")
    p.add_argument("--replay-target-tokens", type=int,
                   help="system+tools prefix tokens of the concurrent replay (default: --target-tokens)")
    p.add_argument("--replay-max-tokens", type=int,
                   help="max_tokens of every replayed turn, greedy (default 32; smoke 4)")
    p.add_argument("--title-max-tokens", type=int, help="max_tokens of the title request (default 32; smoke 8)")
    p.add_argument("--decode-tokens", type=int, help="max_tokens per stream of the scale scenario "
                                                     "(default 128; smoke 12)")
    p.add_argument("--scale-rounds", type=int, help="rounds of the scale scenario: one stream alone, then the "
                                                    "burst; the figures are medians over rounds (default 3; smoke 1)")
    p.add_argument("--vllm-mlx-cmd", default=os.environ.get("VLLM_MLX_CMD", ""),
                   help="opt-in vllm-mlx peer arms: command prefix that serves a model, e.g. "
                        "'/opt/vllm-mlx/.venv/bin/vllm-mlx serve' (env VLLM_MLX_CMD)")
    p.add_argument("--vllm", action="store_true", default=os.environ.get("WARMTURN_BENCH_VLLM") == "1",
                   help="opt-in vLLM arms (8-vllm-*): vLLM CPU from `make vllm` behind the addon, on the default "
                        "model exported as HF weights (env WARMTURN_BENCH_VLLM=1)")
    p.add_argument("--mlx-lm-python", default=sys.executable,
                   help="Python that runs mlx_lm.server (default: this one)")
    p.add_argument("--peer-template", choices=["tools", "native"], default="tools",
                   help="tools (default): when the model's chat template ignores tools, the peers load a copy "
                        "whose template renders them as warmturn's server does, so every server prefills the "
                        "same prompt; native: the model's own template (peers then drop the tool schemas)")
    p.add_argument("--families", default="",
                   help="opt-in, minutes: the model-family comparison (issue 18) on tiny random models of each "
                        "family, warmturn (solo and --no-solo) beside mlx_lm.server (batched and seeded solo): "
                        "'all' or comma-separated mlx-lm model types (llama, gemma3_text, qwen3_5...). With it, "
                        "--arms and --scenarios default to none")
    p.add_argument("--family-servers", default="",
                   help="servers of --families, comma-separated (default all: warmturn-solo, warmturn-batched, "
                        "mlx_lm-batched, mlx_lm-solo)")
    p.add_argument("--family-target-tokens", type=int, default=1500,
                   help="system+tools prefix tokens of --families (default 1500)")
    p.add_argument("--family-turns", type=int, default=3, help="conversation turns of --families (default 3)")
    p.add_argument("--family-max-tokens", type=int, default=8, help="max_tokens per request of --families "
                                                                    "(default 8), greedy")
    p.add_argument("--family-concurrent", type=int, default=3,
                   help="requests sent at once on a fresh prefix in --families (default 3)")
    p.add_argument("--family-history", choices=["own", "scripted"], default="own",
                   help="what the next turn's history carries as the assistant's answer: the server's own answer "
                        "(default, as Claude Code re-sends it) or one fixed text for every server")
    p.add_argument("--time-limit", type=float, help="seconds; no request starts after it (default 3600; "
                                                    "smoke 600)")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request (default 900)")
    p.add_argument("--floor-repeats", type=int, help="timed repeats per floor point (default 3; smoke 1)")
    p.add_argument("--no-floor", action="store_true", help="skip the mlx-lm floor measurement")
    p.add_argument("--no-report", action="store_true", help="skip `python -m warmturn.analysis report`")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<UTC timestamp> in a checkout, "
                                            "else ./warmturn-bench-results/<UTC timestamp>)")
    args = p.parse_args(argv)
    smoke = args.smoke
    if args.families:  # the family comparison alone unless arms or scenarios are asked for too
        args.arms = args.arms or "none"
        args.scenarios = "none" if args.scenarios is None else args.scenarios
    args.target_tokens = args.target_tokens or (300 if smoke else 2000)
    args.turns = args.turns or (2 if smoke else None)
    args.max_tokens = args.max_tokens or (4 if smoke else 8)
    args.time_limit = args.time_limit or (600.0 if smoke else 3600.0)
    args.floor_repeats = args.floor_repeats or (1 if smoke else 3)
    if args.scenarios is None:
        args.scenarios = "b,scale" if smoke else ",".join(SCENARIOS)
    if smoke and not args.peers:
        args.peers = "warmturn"
    args.replay_target_tokens = args.replay_target_tokens or args.target_tokens
    args.replay_max_tokens = args.replay_max_tokens or (4 if smoke else 32)
    args.title_max_tokens = args.title_max_tokens or (8 if smoke else 32)
    args.decode_tokens = args.decode_tokens or (12 if smoke else 128)
    args.scale_rounds = args.scale_rounds or (1 if smoke else 3)
    return args


def select_scenarios(spec: str) -> list[str]:
    if spec.strip() == "none":
        return []
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [w for w in wanted if w not in SCENARIOS]
    if bad:
        raise SystemExit(f"--scenarios: unknown {bad}; known: {', '.join(SCENARIOS)} or none")
    return [k for k in SCENARIOS if k in wanted]  # in the canonical order


def select_arms(spec: str, vllm_mlx: bool, vllm: bool = False):
    arms = all_arms(vllm_mlx=vllm_mlx, vllm=vllm)
    if not spec:
        return arms
    if spec.strip() == "none":
        return []
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [a for a in arms if any(a.key == w or a.key.split("-")[0] == w for w in wanted)]
    if not chosen:
        raise SystemExit(f"--arms {spec!r} matches none of {[a.key for a in arms]}")
    return chosen


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        info["loadavg_start"] = os.getloadavg()
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages / 2**30, 1)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import importlib.metadata as md

        info["mlx"] = md.version("mlx")
        info["mlx_lm"] = md.version("mlx-lm")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def floor_pairs(rows: list[dict], sessions, count) -> tuple[list[tuple[int, int]], list[tuple[str, int]]]:
    """(cached, new) token pairs for the floor, from the reference arm's warm requests: the
    embedded server's own log (tokens reused / prompt tokens) when present, else the
    response usage (Anthropic's accounting: read + creation + input = prompt), else the
    workload's own token estimate."""
    for ref in ("3-rotating-on", "1-stable", "7-direct"):
        warm = [r for r in rows if r["arm"] == ref and r["phase"] == "warm" and not r["error"]]
        if warm and all(r.get("server_prompt_tokens") is not None for r in warm):
            pairs = [(int(r["server_reused_tokens"]), int(r["server_prompt_tokens"]) - int(r["server_reused_tokens"]))
                     for r in warm]
            return pairs, [(r["request"], r["rep"]) for r in warm]
        if warm and all(r.get("prompt_tokens") and r.get("cache_read_input_tokens") is not None for r in warm):
            pairs = [(int(r["cache_read_input_tokens"]), int(r["prompt_tokens"]) - int(r["cache_read_input_tokens"]))
                     for r in warm]
            return pairs, [(r["request"], r["rep"]) for r in warm]
    pairs, keys, prev = [], [], {}
    for req in sessions.requests:
        n = request_tokens(req.body, count)
        if req.agent in prev:
            pairs.append((prev[req.agent], n - prev[req.agent]))
            keys.append((req.name, 0))
        prev[req.agent] = n
    return pairs, keys


def measure_floor(model: Path, fixture: dict, pairs, repeats: int, out_dir: Path, timeout: float) -> list[dict]:
    spec = {"model": str(model), "repeats": repeats, "pairs": pairs,
            "text": "\n".join(b["text"] for b in fixture["main"]["system"]) + json.dumps(fixture["main"]["tools"])}
    spec_path, result_path = out_dir / "floor-spec.json", out_dir / "floor.json"
    spec_path.write_text(json.dumps(spec))
    proc = procs.start("floor", [sys.executable, "-m", "warmturn.bench.floor", str(spec_path), str(result_path)],
                       out_dir / "logs", env=procs.mlx_env(), cwd=ROOT)
    try:
        rc = proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchTimeout("floor measurement exceeded the time limit") from None
    finally:
        procs.stop(proc)
    if rc != 0:
        raise RuntimeError(f"floor measurement failed ({rc}):\n{proc.tail()}")
    return json.loads(result_path.read_text())


def run_analysis(captures: Path, out_dir: Path, progress) -> list[Path]:
    if not captures.exists():
        progress("no capture file was written: skipping the analysis report")
        return []
    report_dir = out_dir / "report"
    cmd = [sys.executable, "-m", "warmturn.analysis", "report", str(captures), "--out", str(report_dir)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        progress("analysis report timed out")
        return []
    if r.returncode != 0:
        progress(f"analysis report failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        return []
    return sorted(report_dir.glob("*.png"))


@dataclasses.dataclass
class Plan:
    """What one bench run will do, decided from the arguments before anything starts."""

    session: Any
    new_session: Any
    arms: list
    scenario_keys: list[str]
    scenarios: list
    peers: list[str]
    families: list[str]
    family_servers: list[str]
    family_workload: Any


@dataclasses.dataclass
class Collected:
    """Every row the run measured (partial when it was cut short)."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    conc_rows: list[dict] = dataclasses.field(default_factory=list)
    conc_infos: list[dict] = dataclasses.field(default_factory=list)
    fam_rows: list[dict] = dataclasses.field(default_factory=list)
    fam_summaries: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False


def make_plan(args: argparse.Namespace, fixture: dict, count: Any) -> Plan:
    from warmturn.server.convert import resolve_model

    scenario_keys = select_scenarios(args.scenarios)
    families = select_families(args.families) if args.families else []
    return Plan(
        session=build_session(fixture, args.target_tokens, count, max_tokens=args.max_tokens,
                              main_turns=args.turns, subagent=not args.smoke, compact=args.smoke),
        new_session=build_session(fixture, args.target_tokens, count, max_tokens=args.max_tokens, main_turns=1,
                                  subagent=False, session_tag="b", compact=args.smoke),
        arms=select_arms(args.arms, vllm_mlx=bool(args.vllm_mlx_cmd), vllm=args.vllm),
        scenario_keys=scenario_keys,
        scenarios=build_scenarios(scenario_keys, fixture, args.replay_target_tokens, count, args.replay_max_tokens,
                                  args.title_max_tokens, args.decode_tokens, compact=args.smoke,
                                  scale_rounds=args.scale_rounds),
        peers=select_peers(args.peers, vllm_mlx=bool(args.vllm_mlx_cmd)) if scenario_keys else [],
        families=families,
        family_servers=select_servers(args.family_servers) if families else [],
        family_workload=build_workload(fixture, make_counter(resolve_model(None)), args.family_target_tokens,
                                       args.family_turns, args.family_max_tokens, args.family_concurrent,
                                       args.family_history) if families else None)


def make_meta(args: argparse.Namespace, argv: list[str] | None, stamp: str, model: Path, peer_model: Path,
              plan: Plan) -> dict:
    meta = {"date": stamp, "command": "python -m warmturn.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "model": str(model), "peer_model": str(peer_model), "machine": machine_info(),
            "target_prefix_tokens": args.target_tokens,
            "estimated_prefix_tokens": plan.session.prefix_tokens, "requests_per_session": len(plan.session.requests),
            "max_tokens": args.max_tokens, "repeats": args.repeats, "arms": [a.key for a in plan.arms],
            "scenarios": plan.scenario_keys, "peers": plan.peers, "replay_target_tokens": args.replay_target_tokens,
            "replay_max_tokens": args.replay_max_tokens, "title_max_tokens": args.title_max_tokens,
            "decode_tokens": args.decode_tokens, "scale_rounds": args.scale_rounds, "families": plan.families,
            "family_servers": plan.family_servers}
    if plan.family_workload is not None:
        meta.update({"family_prefix_tokens": plan.family_workload.prefix_tokens, "family_turns": args.family_turns,
                     "family_max_tokens": args.family_max_tokens, "family_concurrent": args.family_concurrent,
                     "family_history": args.family_history})
    return meta


def announce(args: argparse.Namespace, model: Path, plan: Plan, out_dir: Path, progress: Any) -> None:
    session = plan.session
    progress(f"warmturn bench → {out_dir}")
    progress(f"model {model}; prefix ~{session.prefix_tokens['main']} tokens (subagent "
             f"~{session.prefix_tokens['subagent']}); {len(session.requests)} requests per session; "
             f"arms: {', '.join(a.key for a in plan.arms) or 'none'}; time limit {args.time_limit:.0f}s")
    if plan.scenarios:
        progress(f"concurrent replay: scenarios {', '.join(plan.scenario_keys)} on {', '.join(plan.peers)}; prefix "
                 f"~{args.replay_target_tokens} tokens, max_tokens {args.replay_max_tokens} (title "
                 f"{args.title_max_tokens}, decode streams {args.decode_tokens}), greedy")
    if plan.families:
        progress(f"families: {', '.join(plan.families)} on {', '.join(plan.family_servers)}; prefix "
                 f"~{plan.family_workload.prefix_tokens} tokens, {args.family_turns} turns ({args.family_history} "
                 f"answers in the history), max_tokens {args.family_max_tokens}, greedy; "
                 f"{args.family_concurrent} concurrent")


def run_arms(plan: Plan, ctx: Context, rep: int, got: Collected) -> None:
    """Every sequential arm once; a failed arm is noted and the next one runs (a time limit ends all)."""
    for arm in plan.arms:
        run = ArmRun(arm, ctx, rep)
        try:
            got.rows += run.run(plan.session, plan.new_session)
        except BenchTimeout as e:
            got.rows += run.rows
            ctx.progress(f"time limit: {e}")
            got.skipped.append(f"{arm.key} (rep {rep}, partial)")
            raise
        except (RuntimeError, TimeoutError, OSError, ValueError) as e:
            got.rows += run.rows
            ctx.progress(f"{arm.key}: FAILED: {e}")
            got.skipped.append(f"{arm.key} (rep {rep}: {str(e).splitlines()[0][:120]})")
        finally:
            run.close()


def run_all(args: argparse.Namespace, plan: Plan, ctx: Context, out_dir: Path) -> Collected:
    """The arms, the concurrent replay and the families, in that order; every process is stopped
    at the end, also on the time limit or Ctrl-C (then with the rows so far)."""
    got = Collected()
    try:
        for rep in range(args.repeats):
            run_arms(plan, ctx, rep, got)
        if plan.scenarios:
            conc_ctx = dataclasses.replace(ctx, capture_file=out_dir / "captures-concurrent.jsonl")
            got.conc_rows, got.conc_infos, failed = run_concurrent(plan.scenarios, plan.peers, conc_ctx, args.repeats,
                                                                   out_dir)
            got.skipped += failed
        if plan.families:
            got.fam_rows, got.fam_summaries, failed = run_families(plan.families, plan.family_servers,
                                                                   plan.family_workload, ctx, args.floor_repeats,
                                                                   args.no_floor)
            got.skipped += failed
    except BenchTimeout:
        pass
    except KeyboardInterrupt:
        got.interrupted = True
        ctx.progress("interrupted: stopping every process and writing partial results")
    finally:
        procs.stop_all()
    return got


def run_floor(args: argparse.Namespace, plan: Plan, got: Collected, model: Path, fixture: dict, count: Any,
              ctx: Context, out_dir: Path) -> tuple[dict[tuple[str, int], float], list[dict]]:
    """The floor for the reference arm's warm requests: ({(request, rep): ms}, rows)."""
    floors: dict[tuple[str, int], float] = {}
    floor_rows: list[dict] = []
    if args.no_floor or got.interrupted or not plan.arms:
        return floors, floor_rows
    pairs, keys = floor_pairs(got.rows, plan.session, count)
    if not pairs:
        return floors, floor_rows
    remaining = max(60.0, ctx.deadline - time.monotonic() + 300.0)
    ctx.progress(f"floor: mlx-lm direct, {len(pairs)} points (cached/new tokens as the server reported them)")
    try:
        floor_rows = measure_floor(model, fixture, pairs, args.floor_repeats, out_dir, remaining)
        for key, fr in zip(keys, floor_rows, strict=True):
            floors[key] = fr["floor_ms"]
            fr["request"], fr["rep"] = key
            ctx.progress(f"floor {key[0]}: {fr['cached']} cached + {fr['new']} new tokens → "
                         f"{fr['floor_ms'] / 1000:.2f}s")
    except (RuntimeError, BenchTimeout, OSError) as e:
        ctx.progress(f"floor measurement failed: {e}")
    return floors, floor_rows


def write_results(out_dir: Path, got: Collected, tables: dict[str, list[dict]], text: str, meta: dict) -> None:
    for name in ("requests", "summary", "ratios", "floor"):
        write_csv(out_dir / f"{name}.csv", tables[name])
    if got.conc_rows:
        for name in ("concurrent", "concurrent_summary", "targets"):
            write_csv(out_dir / f"{name}.csv", tables[name])
    if got.fam_rows:
        write_csv(out_dir / "families.csv", got.fam_rows)
        write_csv(out_dir / "families_summary.csv", got.fam_summaries)
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from warmturn.server.convert import resolve_model

    model = resolve_model(args.model, read_adapter=False)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "bench" / "results" if (ROOT / "pyproject.toml").is_file() else Path("warmturn-bench-results")
    out_dir = (args.out or results / stamp).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(msg, flush=True)
        with (out_dir / "progress.log").open("a") as f:
            f.write(msg + "\n")

    procs.install_signal_handlers()
    t0 = time.monotonic()
    peer_model = model if args.peer_template == "native" else peer_model_dir(model, out_dir)
    ctx = Context(model=model, out_dir=out_dir, peer_model=peer_model, capture_file=out_dir / "captures.jsonl",
                  mlx_lm_python=args.mlx_lm_python, vllm_mlx_cmd=args.vllm_mlx_cmd,
                  request_timeout=args.request_timeout, deadline=t0 + args.time_limit, progress=progress, t0=t0)
    fixture = load_fixture()
    count = make_counter(model)
    plan = make_plan(args, fixture, count)
    meta = make_meta(args, argv, stamp, model, peer_model, plan)
    announce(args, model, plan, out_dir, progress)
    got = run_all(args, plan, ctx, out_dir)
    floors, floor_rows = run_floor(args, plan, got, model, fixture, count, ctx, out_dir)

    summaries = [summarize_arm(a.key, a.title, got.rows, floors) for a in plan.arms]
    floor_median = (sorted(floors.values())[len(floors) // 2] / 1000) if floors else None
    ratio_rows = ratios({s["arm"]: s for s in summaries if s["requests"]}, floor_median)
    text = table(summaries, ratio_rows) if plan.arms else ""
    conc_summaries: list[dict] = []
    target_rows: list[dict] = []
    if got.conc_rows:
        conc_summaries = summarize_concurrent(got.conc_rows, got.conc_infos, ideal_prefill(plan.scenarios, model))
        names = next((list(i.get("metrics_after") or {}) for i in reversed(got.conc_infos) if i.get("metrics_after")),
                     [])
        target_rows = targets(conc_summaries, {s["arm"]: s for s in summaries if s["requests"]}, names)
        text += ("\n\n" if text else "") + "Concurrent replay\n\n" + concurrent_table(conc_summaries)
        text += "\n\nTargets (issues 13 and 20)\n\n" + targets_table(target_rows)
    if got.fam_summaries:
        text += (("\n\n" if text else "") + "Model families (issue 18): warm share per turn, warmturn vs "
                 "mlx_lm.server\n\n" + overview_table(got.fam_summaries, plan.family_servers)
                 + "\n\n" + family_table(got.fam_summaries))
    meta.update(elapsed_s=round(time.monotonic() - t0, 1), skipped=got.skipped, interrupted=got.interrupted)
    try:
        meta["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    write_results(out_dir, got, {"requests": got.rows, "summary": summaries, "ratios": ratio_rows,
                                 "floor": floor_rows, "concurrent": got.conc_rows,
                                 "concurrent_summary": conc_summaries, "targets": target_rows}, text, meta)
    charts = [] if args.no_report or got.interrupted else run_analysis(ctx.capture_file, out_dir, progress)

    print()
    print(text)
    print()
    if got.skipped:
        print("skipped or failed: " + "; ".join(got.skipped))
    print(f"results: {out_dir} (requests.csv, summary.csv, ratios.csv, floor.csv, "
          f"{'concurrent.csv, concurrent_summary.csv, targets.csv, ' if got.conc_rows else ''}"
          f"{'families.csv, families_summary.csv, ' if got.fam_rows else ''}table.md, meta.json"
          f"{', report/' if charts else ''})")
    for c in charts:
        print(f"chart: {c}")
    print(f"elapsed {meta['elapsed_s']:.0f}s; load average {meta['machine'].get('loadavg_start')} → "
          f"{meta['machine'].get('loadavg_end')}")
    return 130 if got.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
