"""``python -m warmturn.analysis diff|report|whatif``: argument parsing only; the work is in the modules."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _diff(args: argparse.Namespace) -> int:
    from .diff import diff_records
    from .divergence import load_tokenizer
    from .load import load_records, stderr_progress
    from .term import format_diff

    res = load_records(args.captures, progress=stderr_progress)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    served = None
    if not args.no_tokens:
        from .whatif import Served, load_renderer

        try:  # the prompts as the server renders them, and what its cache gave each request
            served = Served(*load_renderer(args.tokenizer or "default"))
        except (ImportError, OSError, ValueError) as e:
            print(f"note: no server rendering ({e}): token columns left empty", file=sys.stderr)
    rep = diff_records(res.records, tokenizer=tok, session=args.session, original=args.original, served=served)
    if args.json:
        out = rep.as_dict()
        out["load"] = {"records": res.stats.records, "bad_lines": res.stats.bad, "files": res.stats.files,
                       "bad_examples": res.stats.bad_examples}
        json.dump(out, sys.stdout, indent=1, default=repr, ensure_ascii=False)
        print()
    else:
        print(format_diff(rep))
        print(f"\n{res.stats.records} records read, {res.stats.bad} bad lines skipped")
        for ex in res.stats.bad_examples:
            print(f"  bad: {ex}")
    if not rep.pairs:
        print("no pairs of requests to compare (need two Messages requests)", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import SAMPLE_CAPTURES, build_report

    captures, sample = args.captures, args.sample
    if not captures:  # the capture bundled with the package (also in a non-editable install)
        captures, sample = sorted(SAMPLE_CAPTURES.glob("*.jsonl")), True
        if not captures:
            raise ValueError(f"no CAPTURE given and no bundled sample capture in {SAMPLE_CAPTURES}")
    summary = build_report(captures, args.out, labels=args.label or None, sample=sample)
    print(f"report: {summary['html']}")
    for k in ("md", "csv", "flows_csv"):
        print(f"        {summary[k]}")
    print(f"{summary['records']} records, {summary['flows']} Messages flows, {summary['bad']} bad lines skipped")
    return 0


def _whatif(args: argparse.Namespace) -> int:
    from .kvsize import parse_bytes
    from .load import load_records, stderr_progress
    from .term import format_whatif
    from .whatif import Options, whatif

    res = load_records(args.captures, labels=args.label or None, progress=stderr_progress)
    opts = Options(tokenizer=args.tokenizer, model=args.model, kv_dtype=args.kv_dtype,
                   ram_bytes=parse_bytes(args.ram) if args.ram else None,
                   disk_bytes=parse_bytes(args.disk) if args.disk else 0, policy=args.policy, slots=args.slots,
                   rules_off=tuple(args.no_rule or ()), suggestions=not args.no_suggestions,
                   prefill_rate=args.prefill_rate, prefix_order=args.prefix_order, context=args.context,
                   anthropic=args.anthropic)
    out = whatif(res.records, opts)
    out["load"] = {"records": res.stats.records, "bad_lines": res.stats.bad, "files": res.stats.files}
    if args.json:
        json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
        print()
    else:
        print(format_whatif(out))
        print(f"\n{res.stats.records} records read, {res.stats.bad} bad lines skipped")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m warmturn.analysis", description=(
        "Read warmturn captures (or raw Anthropic request JSONL / HAR files): find what busts the "
        "prompt cache (diff) and show cold-vs-warm latency (report)."))
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diff", help="diff consecutive requests; show volatile paths, prefix divergence, fixes")
    d.add_argument("captures", nargs="+", metavar="CAPTURE", help="capture JSONL, raw request JSONL or HAR")
    d.add_argument("--session", help="only pairs involving this session id")
    d.add_argument("--tokenizer", metavar="MODEL", help=(
        "count the shared prefix in tokens too: 'default' (the default model) or an mlx-lm/Hugging Face "
        "model directory holding tokenizer.json"))
    d.add_argument("--no-tokens", action="store_true", help=(
        "skip the server's view (prompts rendered by the chat template, cache reads): no tokenizer loaded"))
    d.add_argument("--original", action="store_true",
                   help="diff what the client sent (stripped content restored) instead of what was forwarded")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_diff)
    r = sub.add_parser("report", help="build report.html, report.md, PNG plots and CSV summaries")
    r.add_argument("captures", nargs="*", metavar="CAPTURE",
                   help="capture files (default: the sample capture bundled with warmturn)")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    r.add_argument("--label", action="append", metavar="LABEL",
                   help="arm label: once for all files, or once per file in order (default: the capture's "
                        "label, else the file name)")
    r.add_argument("--sample", action="store_true", help="mark the report as built from the bundled sample")
    r.set_defaults(func=_report)
    w = sub.add_parser("whatif", help="replay captures through a prefix-cache model: hit rate, prefill, evictions")
    w.add_argument("captures", nargs="+", metavar="CAPTURE", help="capture JSONL, raw request JSONL or HAR")
    w.add_argument("--tokenizer", metavar="MODEL", default="default", help=(
        "render prompts with this model's tokenizer and chat template, as the server does: 'default' (the "
        "default model, offline) or an mlx-lm/Hugging Face model directory (default: default)"))
    w.add_argument("--model", metavar="PRESET|DIR", help=(
        "KV bytes per token and context from a preset (Qwen3-Coder-30B-A3B, gpt-oss-20b, Gemma-3-27B, "
        "Qwen3-Next-80B, Llama-3.1-8B) or a model directory's config.json (default: the tokenizer's model)"))
    w.add_argument("--kv-dtype", metavar="DTYPE", help=(
        "KV dtype: bfloat16, float16, float32, 8bit, 4bit (default: the model's own; presets: bfloat16)"))
    w.add_argument("--ram", metavar="BYTES", help="RAM budget of the prefix cache, e.g. 8G (default: the "
                   "server's own default, a third of the memory available now)")
    w.add_argument("--disk", metavar="BYTES", help="disk budget for checkpoints, e.g. 20G (default: off)")
    w.add_argument("--policy", choices=("auto", "trimmable", "checkpoints"), default="auto", help=(
        "trimmable: any stored prefix is reused; checkpoints: an entry resumes only at its end or at a mark (the "
        "end of system+tools, of the history, of the prompt), as the server does for sliding-window and "
        "linear-attention families. auto: from the model's layers"))
    w.add_argument("--slots", type=int, metavar="N", help="at most N conversation entries (default: unlimited)")
    w.add_argument("--no-rule", action="append", metavar="NAME", choices=("billing_block", "model_identity"),
                   help="turn one of today's normalization rules off in the 'rules' variants (repeatable)")
    w.add_argument("--no-suggestions", action="store_true", help="skip the rules+<diff suggestion> variants")
    w.add_argument("--prefill-rate", type=float, metavar="TOK/S", help=(
        "prefill speed for predicted seconds (default: measured from the captures' prefill_ms when present)"))
    w.add_argument("--prefix-order", choices=("system-first", "tools-first"), default="tools-first",
                   help="the server's --prefix-order (default: tools-first, the server's default)")
    w.add_argument("--context", type=int, metavar="TOKENS",
                   help="refuse prompts this long, as the server does (default: the model's context)")
    w.add_argument("--anthropic", action="store_true", help=(
        "the captures' usage is Anthropic's own (e.g. a HAR of api.anthropic.com): compare every request with a "
        "model of Anthropic's cache (captures recorded with --set backend=passthrough are compared anyway)"))
    w.add_argument("--label", action="append", metavar="LABEL", help="arm label, as for report")
    w.add_argument("--json", action="store_true", help="one JSON object: {\"variants\": [...], ...}")
    w.set_defaults(func=_whatif)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into head/less that exited: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
