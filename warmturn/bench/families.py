"""`make bench ARGS="--families all"`: every cache family of mlx-lm, warmturn beside mlx_lm.server
(issue 18), on tiny random-weight models built in the run (`warmturn/server/tinymodels.py`).

For each family the same procedure runs against four freshly started servers, one after another:

- ``warmturn-solo``: `python -m warmturn.server` as it ships: a lone request is served outside the
  batch, the way mlx-lm's ``generate_step`` serves one;
- ``warmturn-batched``: the same with ``--no-solo``: every request goes through the batch;
- ``mlx_lm-batched``: `python -m mlx_lm.server` (0.32.2) with requests that carry no ``seed``: its
  ``BatchGenerator``, which splits a chat prompt into system / user / assistant-tail segments and
  keeps a cache at each boundary (``insert_segments``);
- ``mlx_lm-solo``: the same server, every request with ``"seed": 0``: ``_serve_single`` (its
  ``stream_generate``), which keeps only the whole prompt + answer.

warmturn is reached on its Messages API, mlx_lm.server on its Chat Completions API with the same
conversation translated by the addon's own ``to_openai_request`` (no mitmdump in between: the
``seed`` must reach it). mlx_lm.server loads a copy of the model whose chat template renders the
tools as warmturn does (`bench/peer_model.py`), so both read the same prompt within a few tokens.

What is sent (greedy: ``temperature`` 0, ``max_tokens`` small), in order:

- ``t1`` … ``tN``: a conversation on a ~1,500-token system+tools prefix (Claude Code's recorded
  system text and tools, shrunk as `make bench` shrinks them); each turn re-sends the history with
  the server's own previous answer in it, as Claude Code does (``history="own"``), or a fixed
  answer that both servers get alike (``history="scripted"``);
- ``diverge``: a new conversation on the same system+tools: it shares only the system+tools prefix;
- ``repeat``: ``t1`` again, byte for byte;
- ``c1`` … ``cK``: K requests sent at once, on a system+tools prefix no earlier request had (Claude
  Code's subagent), different prompts: what each reads of the prefix they share.

What is computed, from what the servers report (warmturn's ``cache_read_input_tokens``,
mlx_lm.server's ``usage.prompt_tokens_details.cached_tokens``):

- **warm share** of turn k = tokens read from the cache / turn k-1's prompt tokens (a server that
  also reads the previous answer goes above 1.0);
- ``diverge`` read / the prefix it shares with ``t1``; ``repeat`` read / its prompt;
  concurrent: the reads summed / ((K-1) × the prefix they share), 1.0 = the shared prefix computed
  once (shared prefixes are counted on each server's own rendering of the prompts);
- **warm TTFT / floor** per turn: client-side time to the first streamed text ÷ mlx-lm's own time
  to prefill the turn's new tokens on a cache already holding the previous turn's prompt (the
  ideal reuse) and pick the first token (`bench/floor.py`, same tiny model, no server);
- **reads ≥ mlx_lm.server**: for each warmturn server, every read share above is at least the
  mlx_lm.server one minus ``TOLERANCE`` (the two templates differ by a few tokens).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from warmturn.bench import procs
from warmturn.bench.arms import ROOT, BenchTimeout, Context
from warmturn.bench.client import send
from warmturn.bench.family_figures import (  # noqa: F401  (re-exported: tests and __main__ import them from here)
    MLX_REFERENCE,
    TOLERANCE,
    _turn_pairs,
    add_verdicts,
    compare,
    family_table,
    overview_table,
    share_keys,
    summarize,
)
from warmturn.bench.workload import MAIN_TOOL_ORDER, SUB_TOOL_ORDER, Counter, shrink_prefix
from warmturn.prefix import common_prefix_len

MLX_LM_MODEL = "default_model"  # mlx_lm.server's alias for its --model


@dataclass(frozen=True)
class FamilyServer:
    key: str
    kind: str  # "warmturn" | "mlx_lm"
    solo: bool
    title: str


SERVERS: dict[str, FamilyServer] = {s.key: s for s in (
    FamilyServer("warmturn-solo", "warmturn", True, "warmturn, a lone request served outside the batch (default)"),
    FamilyServer("warmturn-batched", "warmturn", False, "warmturn --no-solo: every request in the batch"),
    FamilyServer("mlx_lm-batched", "mlx_lm", False, "mlx_lm.server, no seed: BatchGenerator with segments"),
    FamilyServer("mlx_lm-solo", "mlx_lm", True, "mlx_lm.server, seed 0: _serve_single"),
)}

# The conversation's user turns after the first (the first is the recorded Claude Code prompt),
# the divergent session's prompt, and the concurrent requests' prompts. Each starts with its own
# word, so two prompts share nothing after the system+tools prefix.
TURN_PROMPTS = [
    "Good. Now read src/dates.py and explain why parse_date() rejects '2026-11-22T10:00'.",
    "Fix it so ISO timestamps with a time part parse, and add a test for the new case.",
    "Then run the tests and tell me which ones fail.",
    "Finally write a one-line changelog entry for NOTES.md.",
]
DIVERGE_PROMPT = "Which files under src/ import the retry helper, and why?"
CONCURRENT_PROMPTS = [
    "Find every call of fetch_page() in the repository.",
    "List the test files that mention the date parser.",
    "Search for TODO comments in src/ and summarise them.",
    "Count the lines of Python code under src/.",
    "Show the git log of the last three commits.",
    "Report which modules have no docstring.",
]
SCRIPTED_ANSWER = "I will look at that now and report what I find."


@dataclass
class FamilyWorkload:
    system: list[dict]
    tools: list[dict]
    first_prompt: str
    sub_system: list[dict]
    sub_tools: list[dict]
    turns: int
    max_tokens: int
    concurrent: int
    history: str  # "own" | "scripted"
    prefix_tokens: int  # estimated system+tools tokens

    def body(self, messages: list[dict], system=None, tools=None) -> dict:
        return {"model": "claude-opus-4-8", "max_tokens": self.max_tokens, "temperature": 0.0, "stream": True,
                "system": copy.deepcopy(self.system if system is None else system),
                "tools": copy.deepcopy(self.tools if tools is None else tools),
                "messages": copy.deepcopy(messages)}

    def turn_body(self, k: int, answers: Sequence[str]) -> dict:
        """Turn k (1-based) with the answers of turns 1..k-1 in its history."""
        msgs: list[dict] = [{"role": "user", "content": self.first_prompt}]
        for i in range(1, k):
            answer = SCRIPTED_ANSWER if self.history == "scripted" else (answers[i - 1] or "…")
            msgs.append({"role": "assistant", "content": answer})
            msgs.append({"role": "user", "content": TURN_PROMPTS[(i - 1) % len(TURN_PROMPTS)]})
        return self.body(msgs)

    def diverge_body(self) -> dict:
        return self.body([{"role": "user", "content": DIVERGE_PROMPT}])

    def concurrent_bodies(self) -> list[dict]:
        return [self.body([{"role": "user", "content": CONCURRENT_PROMPTS[i % len(CONCURRENT_PROMPTS)]}],
                          self.sub_system, self.sub_tools) for i in range(self.concurrent)]


def build_workload(fixture: dict, count: Counter, target_tokens: int = 1500, turns: int = 3, max_tokens: int = 8,
                   concurrent: int = 3, history: str = "own") -> FamilyWorkload:
    if not 1 <= turns <= len(TURN_PROMPTS) + 1:
        raise ValueError(f"turns must be 1..{len(TURN_PROMPTS) + 1}")
    if history not in ("own", "scripted"):
        raise ValueError("history must be 'own' or 'scripted'")
    main, sub = fixture["main"], fixture["subagent"]
    system, tools, n = shrink_prefix(main["system"], main["tools"], target_tokens, count, MAIN_TOOL_ORDER)
    s_system, s_tools, _ = shrink_prefix(sub["system"], sub["tools"], max(64, target_tokens // 2), count,
                                         SUB_TOOL_ORDER)
    return FamilyWorkload(system, tools, main["first_prompt"], s_system, s_tools, turns, max_tokens, concurrent,
                          history, n)


# --- talking to the two servers ----------------------------------------------------------------


@dataclass
class Reply:
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    text: str = ""
    error: str | None = None
    ttft_from: str = "text"  # "text": first streamed text; "end": the answer had no text, its end


def ask_warmturn(client: httpx.Client, base: str, body: dict, timeout: float) -> Reply:
    res = send(client, base, body, {"anthropic-version": "2023-06-01", "x-api-key": "bench"}, timeout)
    r = Reply(res.prompt_tokens, res.cached_tokens, res.ttft_ms, res.total_ms, res.text, res.error)
    if res.error == "no content_block_delta in the stream" and res.usage:
        r.error, r.ttft_ms, r.ttft_from = None, res.total_ms, "end"
    return r


def ask_mlx_lm(client: httpx.Client, base: str, body: dict, timeout: float, seed: int | None) -> Reply:
    """One streamed Chat Completions request to mlx_lm.server; its usage comes in the last chunk
    (``stream_options.include_usage``), cached tokens in ``prompt_tokens_details.cached_tokens``."""
    from warmturn.addons.openai_translate import to_openai_request

    req = to_openai_request(body, MLX_LM_MODEL)
    if seed is not None:
        req["seed"] = seed
    r = Reply()
    t0 = time.perf_counter()
    ms = lambda: (time.perf_counter() - t0) * 1000.0  # noqa: E731
    usage: dict | None = None
    last_chunk_ms = None
    try:
        with client.stream("POST", f"{base}/v1/chat/completions", json=req,
                           timeout=httpx.Timeout(timeout, connect=10.0)) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {resp.read()[:300]!r}"
                return r
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or ""
                    if (piece or delta.get("tool_calls") or delta.get("reasoning")) and r.ttft_ms is None:
                        r.ttft_ms = ms()
                    r.text += piece
                    last_chunk_ms = ms()
    except (httpx.HTTPError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.total_ms = ms()
    if usage is None:
        r.error = "no usage in the stream"
        return r
    r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    r.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else None
    if r.ttft_ms is None:
        r.ttft_ms, r.ttft_from = last_chunk_ms or r.total_ms, "end"
    return r


class FamilyRun:
    """One server (of SERVERS) on one family's model: start, warm up, send, stop."""

    def __init__(self, server: FamilyServer, family: str, model: Path, peer_model: Path, ctx: Context):
        from warmturn.machine import free_port

        self.server, self.family, self.ctx = server, family, ctx
        self.model, self.peer_model = model, peer_model
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: procs.Proc | None = None
        self.cache_info: dict = {}

    def log(self, msg: str) -> None:
        self.ctx.progress(f"[{time.monotonic() - self.ctx.t0:7.1f}s] {self.family} {self.server.key}: {msg}")

    def start(self) -> None:
        if self.server.kind == "warmturn":
            cmd = [self.ctx.python, "-m", "warmturn.server", "--model", str(self.model), "--host", "127.0.0.1",
                   "--port", str(self.port)] + ([] if self.server.solo else ["--no-solo"])
            ready = f"{self.base}/health"
        else:
            cmd = [self.ctx.mlx_lm_python, "-m", "mlx_lm.server", "--model", str(self.peer_model), "--host",
                   "127.0.0.1", "--port", str(self.port)]
            ready = f"{self.base}/v1/models"
        self.proc = procs.start(f"family-{self.family}-{self.server.key}", cmd, self.ctx.out_dir / "logs",
                                env=procs.mlx_env(), cwd=ROOT)
        procs.wait_http(self.proc, ready, self.ctx.start_timeout, ok=lambda r: r.status_code == 200)
        if self.server.kind == "warmturn":
            self.cache_info = httpx.get(ready, timeout=10).json().get("cache") or {}
        # one tiny request first, so MLX's first-call costs are not charged to t1
        warm = self.ask({"model": "warm-up", "max_tokens": 2, "temperature": 0.0, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")

    def ask(self, body: dict, client: httpx.Client | None = None) -> Reply:
        if time.monotonic() > self.ctx.deadline:
            raise BenchTimeout(f"time limit reached before {self.family} {self.server.key}")
        own = client is None
        client = client or httpx.Client()
        try:
            if self.server.kind == "warmturn":
                return ask_warmturn(client, self.base, body, self.ctx.request_timeout)
            return ask_mlx_lm(client, self.base, body, self.ctx.request_timeout, 0 if self.server.solo else None)
        finally:
            if own:
                client.close()

    def row(self, name: str, reply: Reply, **extra) -> dict:
        return {"family": self.family, "server": self.server.key, "request": name,
                "prompt_tokens": reply.prompt_tokens, "cached_tokens": reply.cached_tokens,
                "ttft_ms": None if reply.ttft_ms is None else round(reply.ttft_ms, 2), "ttft_from": reply.ttft_from,
                "total_ms": None if reply.total_ms is None else round(reply.total_ms, 2),
                "answer_chars": len(reply.text), "error": reply.error, **extra}

    def run(self, w: FamilyWorkload) -> list[dict]:
        rows: list[dict] = []
        self.start()
        answers: list[str] = []
        with httpx.Client() as client:
            for k in range(1, w.turns + 1):
                body = w.turn_body(k, answers)
                rep = self.ask(body, client)
                answers.append(rep.text)
                rows.append(self.row(f"t{k}", rep, body=body))
                self.log(_fmt(rows[-1]))
            for name, body in (("diverge", w.diverge_body()), ("repeat", w.turn_body(1, []))):
                rep = self.ask(body, client)
                rows.append(self.row(name, rep, body=body))
                self.log(_fmt(rows[-1]))
        bodies = w.concurrent_bodies()
        replies: list[Reply | None] = [None] * len(bodies)

        def one(i: int) -> None:
            try:
                replies[i] = self.ask(bodies[i])
            except Exception as e:  # noqa: BLE001 - recorded in the row
                replies[i] = Reply(error=f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (rep, body) in enumerate(zip(replies, bodies, strict=True)):
            rows.append(self.row(f"c{i + 1}", rep or Reply(error="no reply"), body=body))
            self.log(_fmt(rows[-1]))
        return rows

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None


def _fmt(row: dict) -> str:
    if row["error"]:
        return f"{row['request']} ERROR {row['error']}"
    return (f"{row['request']}: read {row['cached_tokens']}/{row['prompt_tokens']} tokens, "
            f"TTFT {row['ttft_ms']:.0f} ms")


# --- shared prefixes as each server renders the prompts -----------------------------------------


def renderers(model: Path, peer_model: Path) -> dict[str, Callable[[dict], list[int]]]:
    """Token ids of a Messages body as warmturn renders it, and as mlx_lm.server renders its Chat
    Completions translation (the peer model's template, the same tokenizer)."""
    from transformers import AutoTokenizer

    from warmturn.addons.openai_translate import to_openai_request
    from warmturn.server.render import Renderer
    from warmturn.server.wire import parse_messages_request

    ours = Renderer(AutoTokenizer.from_pretrained(str(model)), "tools-first")
    peer_tok = AutoTokenizer.from_pretrained(str(peer_model))

    def warmturn_tokens(body: dict) -> list[int]:
        return list(ours.render(parse_messages_request(body)).tokens)

    def mlx_lm_tokens(body: dict) -> list[int]:
        req = to_openai_request(body, MLX_LM_MODEL)
        out = peer_tok.apply_chat_template(req["messages"], tools=req.get("tools"), add_generation_prompt=True,
                                           tokenize=True)
        return list(out if isinstance(out, list) else out["input_ids"])  # a list, or a BatchEncoding

    return {"warmturn": warmturn_tokens, "mlx_lm": mlx_lm_tokens}


def add_shared_prefixes(rows: list[dict], render: Callable[[dict], list[int]]) -> None:
    """Set ``shared_tokens`` on the diverge (its prefix shared with t1) and concurrent rows (the
    prefix every concurrent request shares), on the server's own rendering."""
    by = {r["request"]: r for r in rows}
    if "t1" in by and "diverge" in by:
        by["diverge"]["shared_tokens"] = common_prefix_len(render(by["t1"]["body"]), render(by["diverge"]["body"]))
    conc = [r for r in rows if r["request"].startswith("c")]
    if len(conc) > 1:
        toks = [render(r["body"]) for r in conc]
        shared = min(common_prefix_len(toks[0], t) for t in toks[1:])
        for r in conc:
            r["shared_tokens"] = shared


# --- the floor ------------------------------------------------------------------------------------


def floor_pairs(rows: list[dict]) -> list[tuple[int, int]]:
    """(cached, new) for every warm turn: the previous turn's prompt cached (ideal reuse), the rest new."""
    pairs = set()
    for prev, cur in _turn_pairs(rows):
        if prev["prompt_tokens"] and cur["prompt_tokens"]:
            cached = min(int(prev["prompt_tokens"]), int(cur["prompt_tokens"]) - 1)
            pairs.add((cached, int(cur["prompt_tokens"]) - cached))
    return sorted(pairs)


def measure_floor(model: Path, text: str, pairs: list[tuple[int, int]], repeats: int, out_dir: Path,
                  timeout: float, name: str) -> dict[tuple[int, int], float]:
    spec_path, result_path = out_dir / f"floor-{name}-spec.json", out_dir / f"floor-{name}.json"
    spec_path.write_text(json.dumps({"model": str(model), "text": text, "pairs": pairs, "repeats": repeats}))
    proc = procs.start(f"floor-{name}", [sys.executable, "-m", "warmturn.bench.floor", str(spec_path),
                                         str(result_path)], out_dir / "logs", env=procs.mlx_env(), cwd=ROOT)
    try:
        rc = proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchTimeout(f"floor of {name} exceeded the time limit") from None
    finally:
        procs.stop(proc)
    if rc != 0:
        raise RuntimeError(f"floor of {name} failed ({rc}):\n{proc.tail()}")
    return {(p["cached"], p["new"]): p["floor_ms"] for p in json.loads(result_path.read_text())}


# --- the whole comparison -------------------------------------------------------------------------


def select_families(spec: str) -> list[str]:
    from warmturn.server.tinymodels import FAMILIES

    if spec.strip() in ("all", ""):
        return list(FAMILIES)
    wanted = [f.strip() for f in spec.split(",") if f.strip()]
    bad = [f for f in wanted if f not in FAMILIES]
    if bad:
        raise SystemExit(f"--families: unknown {bad}; known: {', '.join(FAMILIES)} or all")
    return wanted


def select_servers(spec: str) -> list[str]:
    if not spec.strip():
        return list(SERVERS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SERVERS]
    if bad:
        raise SystemExit(f"--family-servers: unknown {bad}; known: {', '.join(SERVERS)}")
    return [k for k in SERVERS if k in wanted]


def build_models(families: Sequence[str], out_dir: Path, progress, seed: int = 0) -> dict[str, Path]:
    """The tiny models, built in a subprocess each (MLX stays out of the bench process)."""
    models = {}
    for f in families:
        d = out_dir / "models" / f
        if not (d / "model.safetensors").exists():
            r = subprocess.run([sys.executable, "-m", "warmturn.server.tinymodels", f, str(d), "--seed", str(seed)],
                               cwd=ROOT, env=procs.mlx_env(), capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"building the tiny {f} model failed: {(r.stderr or r.stdout)[-600:]}")
        progress(f"tiny {f} model: {d}")
        models[f] = d
    return models


def run_families(families: Sequence[str], servers: Sequence[str], workload: FamilyWorkload, ctx: Context,
                 floor_repeats: int = 3, no_floor: bool = False) -> tuple[list[dict], list[dict], list[str]]:
    """Every family × server. Returns (request rows, summaries, what failed)."""
    from warmturn.bench.peer_model import peer_model_dir

    models = build_models(families, ctx.out_dir, ctx.progress)
    peer = {f: peer_model_dir(m, ctx.out_dir) for f, m in models.items()}
    render = renderers(models[families[0]], peer[families[0]])  # one tokenizer for every family
    rows: list[dict] = []
    summaries: list[dict] = []
    failed: list[str] = []
    text = "\n".join(b["text"] for b in workload.system) + json.dumps(workload.tools)
    for f in families:
        fam_rows: dict[str, list[dict]] = {}
        infos: dict[str, dict] = {}
        for key in servers:
            run = FamilyRun(SERVERS[key], f, models[f], peer[f], ctx)
            try:
                fam_rows[key] = run.run(workload)
                infos[key] = run.cache_info
            except BenchTimeout:
                raise
            except (RuntimeError, TimeoutError, OSError, ValueError, httpx.HTTPError) as e:
                run.log(f"FAILED: {e}")
                failed.append(f"{f} {key}: {str(e).splitlines()[0][:160]}")
            finally:
                run.stop()
        for key, rs in fam_rows.items():
            add_shared_prefixes(rs, render[SERVERS[key].kind])
        floors: dict[tuple[int, int], float] = {}
        pairs = sorted({p for rs in fam_rows.values() for p in floor_pairs([r for r in rs if not r["error"]])})
        if pairs and not no_floor:
            try:
                floors = measure_floor(models[f], text, pairs, floor_repeats, ctx.out_dir,
                                       max(60.0, ctx.deadline - time.monotonic() + 300.0), f)
                ctx.progress(f"{f} floor: " + ", ".join(f"{c}+{n} → {ms:.0f} ms" for (c, n), ms in floors.items()))
            except (RuntimeError, OSError) as e:
                ctx.progress(f"{f} floor FAILED: {e}")
                failed.append(f"{f} floor: {str(e).splitlines()[0][:160]}")
        cache_info = next((i for i in infos.values() if i), {})
        for rs in fam_rows.values():
            summaries.append(summarize(rs, floors, cache_info))
            rows += [{k: v for k, v in r.items() if k != "body"} for r in rs]
    add_verdicts(summaries)
    return rows, summaries, failed
