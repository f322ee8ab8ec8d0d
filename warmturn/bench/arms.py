"""The arms of the benchmark and how one arm runs: start its backend (and mitmdump with the
warmturn addon in front of it), replay the session, record one row per request, stop
everything it started.
"""

from __future__ import annotations

import json
import random
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from warmturn.bench import procs
from warmturn.bench.client import Result, send
from warmturn.bench.workload import BenchRequest, Session, with_billing
from warmturn.machine import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout (installed: above site-packages/warmturn)
ADDON_SCRIPT = Path(__file__).resolve().parents[1] / "addons" / "normalize.py"
BACKEND_MODEL_FOR_MLX_LM = "default_model"  # mlx_lm.server's alias for its --model


@dataclass(frozen=True)
class Arm:
    key: str  # short id, also the capture label: "1-stable"
    title: str
    backend: str = "embedded"  # embedded | mlx_lm | vllm_mlx | vllm
    billing: bool = True  # rotating billing block at system[0], a new one per request
    normalize: bool = True
    proxy: bool = True  # through mitmdump + addons/normalize.py
    server_args: tuple[str, ...] = ()
    backend_api: str = "anthropic"
    restart: bool = False  # arm 6: prime, restart with --cache-dir, measure a new session's first turn
    volatile: bool = False  # a per-request line vLLM does not strip (VOLATILE_LINE) at the top of the system text


# A per-request line that engines do not know (vLLM strips only Claude Code's billing block), and the
# addon pattern that cuts it (arm 8-vllm-volatile-on sets it with volatile_fragments).
VOLATILE_LINE = "request-nonce: {}\n"
VOLATILE_FRAGMENT = r"request-nonce: [0-9a-f]{32}\n"
VLLM_MODEL = "smollm2"  # --served-model-name in scripts/vllm-cpu.sh


def all_arms(vllm_mlx: bool = False, vllm: bool = False) -> list[Arm]:
    arms = [
        Arm("1-stable", "stable prefix, no billing block (normalize on)", billing=False),
        Arm("2-rotating-off", "rotating billing block, normalize=false", normalize=False),
        Arm("3-rotating-on", "rotating billing block, normalize=true"),
        Arm("4-no-cache", "server --no-cache, normalize on", server_args=("--no-cache",)),
        Arm("5-mlx_lm.server", "peer: mlx_lm.server behind the addon (backend_api=openai)", backend="mlx_lm",
            backend_api="openai"),
    ]
    if vllm_mlx:
        arms += [
            Arm("5-vllm-mlx", "peer: vllm-mlx default mode, its /v1/messages behind the addon", backend="vllm_mlx"),
            Arm("5-vllm-mlx-cb", "peer: vllm-mlx --continuous-batching behind the addon", backend="vllm_mlx",
                server_args=("--continuous-batching",)),
        ]
    if vllm:
        arms += [
            Arm("8-vllm-billing-off", "peer: vLLM (CPU, float32), rotating billing block, normalize=false "
                "(vLLM strips the billing block itself)", backend="vllm", normalize=False),
            Arm("8-vllm-volatile-off", "peer: vLLM, billing + a per-request line vLLM does not strip, "
                "normalize=false", backend="vllm", normalize=False, volatile=True),
            Arm("8-vllm-volatile-on", "peer: vLLM, billing + the same line, normalize=true (addon pattern for it)",
                backend="vllm", volatile=True),
        ]
    arms += [
        Arm("6-restart", "restart with --cache-dir: a new session's first turn", restart=True),
        Arm("7-direct", "direct to the server, no mitmdump (stable prefix)", billing=False, proxy=False),
    ]
    return arms


@dataclass
class Context:
    """Everything an arm needs that does not change between arms."""

    model: Path
    out_dir: Path
    peer_model: Path  # what the peer servers load (bench/peer_model.py)
    capture_file: Path
    python: str = sys.executable
    mlx_lm_python: str = sys.executable
    vllm_mlx_cmd: str = ""  # command prefix, e.g. "/opt/vllm-mlx/bin/vllm-mlx serve"
    start_timeout: float = 600.0
    request_timeout: float = 900.0
    deadline: float = float("inf")  # time.monotonic() after which no new request starts
    seed: int = 0
    progress: Callable[[str], None] = print
    t0: float = field(default_factory=time.monotonic)


class BenchTimeout(Exception):
    """The bench's time limit was reached; the remaining work is skipped."""


def _wait_port(proc: procs.Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not listening on {port} after {timeout:.0f}s:\n{proc.tail()}")


def backend_cmd(arm: Arm, ctx: Context, port: int, cache_dir: Path | None = None) -> tuple[list[str], str]:
    """Command line of the arm's backend and the URL that answers when it is ready."""
    base = f"http://127.0.0.1:{port}"
    if arm.backend == "embedded":
        cmd = [ctx.python, "-m", "warmturn.server", "--model", str(ctx.model), "--host", "127.0.0.1", "--port", str(port),
               *arm.server_args]
        if cache_dir is not None:
            cmd += ["--cache-dir", str(cache_dir)]
        return cmd, f"{base}/health"
    if arm.backend == "mlx_lm":
        return [ctx.mlx_lm_python, "-m", "mlx_lm.server", "--model", str(ctx.peer_model), "--host", "127.0.0.1",
                "--port", str(port), *arm.server_args], f"{base}/v1/models"
    if arm.backend == "vllm_mlx":
        if not ctx.vllm_mlx_cmd:
            raise RuntimeError("vllm-mlx arm needs --vllm-mlx-cmd (see docs/bench.md)")
        return [*shlex.split(ctx.vllm_mlx_cmd), str(ctx.peer_model), "--host", "127.0.0.1", "--port", str(port),
                *arm.server_args], f"{base}/v1/models"
    if arm.backend == "vllm":  # scripts/vllm-cpu.sh serve (make vllm): a later --port wins
        return ["bash", str(ROOT / "scripts" / "vllm-cpu.sh"), "serve", "--port", str(port)], f"{base}/health"
    raise ValueError(f"unknown backend {arm.backend!r}")


def backend_model(arm: Arm, ctx: Context) -> str | None:
    """The model name the backend accepts, when it does not take Claude's names: the addon's
    `backend_model` rewrites every request to it."""
    if arm.backend == "mlx_lm":
        return BACKEND_MODEL_FOR_MLX_LM  # mlx_lm.server's alias for its --model
    if arm.backend == "vllm_mlx":
        return str(ctx.peer_model)  # vllm-mlx 0.6.0 answers 404 to any other name
    if arm.backend == "vllm":
        return VLLM_MODEL
    return None


def proxy_cmd(arm: Arm, ctx: Context, port: int, backend_url: str) -> list[str]:
    mitmdump = str(Path(ctx.python).parent / "mitmdump")
    cmd = [mitmdump, "--listen-host", "127.0.0.1", "--listen-port", str(port),
           "-s", str(ADDON_SCRIPT),
           "--set", f"backend={backend_url}", "--set", f"backend_api={arm.backend_api}",
           "--set", f"normalize={'true' if arm.normalize else 'false'}",
           "--set", f"capture_file={ctx.capture_file}", "--set", f"capture_label={arm.key}",
           "--set", "termlog_verbosity=warn", "--set", "flow_detail=0"]
    model = backend_model(arm, ctx)
    if model:
        cmd += ["--set", f"backend_model={model}"]
    if arm.volatile:
        cmd += ["--set", f"volatile_fragments={VOLATILE_FRAGMENT}",
                "--set", r"volatile_fragments=x-anthropic-billing-header:[^\n]*\n?"]
    return cmd


def warm_up(arm: Arm, backend_url: str, timeout: float, model: str | None = None) -> None:
    """One tiny request straight to the backend, so lazy initialisation (first MLX kernels,
    allocator growth) is not charged to the arm's cold turn. It shares no real prefix with
    the workload."""
    if arm.backend_api == "openai":
        body = {"model": model or "default_model", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "stream": False}
        r = httpx.post(f"{backend_url}/v1/chat/completions", json=body, timeout=timeout)
    else:
        body = {"model": model or "warm-up", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{backend_url}/v1/messages", json=body, timeout=timeout,
                       headers={"anthropic-version": "2023-06-01", "x-api-key": "bench"})
    if r.status_code != 200:
        raise RuntimeError(f"warm-up request failed: HTTP {r.status_code} {r.text[:300]}")


def make_row(arm: Arm, rep: int, req: BenchRequest, phase: str, res: Result) -> dict:
    u = res.usage
    return {"arm": arm.key, "rep": rep, "request": req.name, "agent": req.agent, "turn": req.turn, "phase": phase,
            "ttft_ms": res.ttft_ms, "ttfb_ms": res.ttfb_ms, "total_ms": res.total_ms, "status": res.status,
            "input_tokens": u.get("input_tokens"), "cache_read_input_tokens": u.get("cache_read_input_tokens"),
            "cache_creation_input_tokens": u.get("cache_creation_input_tokens"),
            "output_tokens": u.get("output_tokens"), "prompt_tokens": res.prompt_tokens,
            "stop_reason": res.stop_reason, "error": res.error}


def with_volatile_line(body: dict, rng: random.Random) -> dict:
    """A copy of `body` whose first non-billing system block starts with a fresh VOLATILE_LINE."""
    system = [dict(b) for b in body["system"]]
    i = next(i for i, b in enumerate(system) if not b.get("text", "").startswith("x-anthropic-billing-header"))
    system[i]["text"] = VOLATILE_LINE.format(f"{rng.getrandbits(128):032x}") + system[i]["text"]
    return {**body, "system": system}


REQUEST_LOG_MARK = "warmturn.requests: "


def server_request_log(path: Path) -> list[dict]:
    """The embedded server's per-request JSON log lines (prompt_tokens, reused, prefill_ms…),
    warm-up requests left out, in order."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        i = line.find(REQUEST_LOG_MARK)
        if i < 0:
            continue
        try:
            rec = json.loads(line[i + len(REQUEST_LOG_MARK):])
        except ValueError:
            continue
        if rec.get("model") != "warm-up":
            out.append(rec)
    return out


def attach_server_log(rows: list[dict], records: list[dict]) -> None:
    """Add the server's own view (prompt tokens, reused tokens, prefill ms) to the rows,
    matched in order; only when the counts agree, so a mismatch never mislabels a row."""
    if len(records) != len(rows):
        return
    for row, rec in zip(rows, records, strict=True):
        row["server_prompt_tokens"] = rec.get("prompt_tokens")
        row["server_reused_tokens"] = rec.get("reused")
        row["server_prefill_ms"] = rec.get("prefill_ms")
        row["server_ttft_ms"] = rec.get("ttft_ms")


class ArmRun:
    """Runs one arm once; `close()` stops whatever it started."""

    def __init__(self, arm: Arm, ctx: Context, rep: int):
        self.arm, self.ctx, self.rep = arm, ctx, rep
        self.backend: procs.Proc | None = None
        self.proxy: procs.Proc | None = None
        self.backend_port = free_port()
        self.backend_url = f"http://127.0.0.1:{self.backend_port}"
        self.cache_dir = ctx.out_dir / f"cache-{arm.key}-{rep}" if arm.restart else None
        self.rows: list[dict] = []
        self.rng = random.Random(f"billing-{ctx.seed}-{rep}")  # same billing variants for every arm

    def log(self, msg: str) -> None:
        self.ctx.progress(f"[{time.monotonic() - self.ctx.t0:7.1f}s] {self.arm.key}: {msg}")

    def start_backend(self, warm: bool = True) -> None:
        cmd, ready = backend_cmd(self.arm, self.ctx, self.backend_port, self.cache_dir)
        self.log(f"starting backend: {' '.join(cmd[1:4])} … port {self.backend_port}")
        name = f"{self.arm.key}-{self.rep}-backend"
        env = procs.mlx_env() if self.arm.backend != "vllm" else None  # vLLM: torch brings its own BLAS
        if self.arm.backend == "vllm_mlx":
            # vllm-mlx --continuous-batching persists its prefix cache under ~/.cache/vllm-mlx and
            # reloads it at start: a private HOME per arm keeps runs (and its two arms) independent
            home = self.ctx.out_dir / f"home-{self.arm.key}-{self.rep}"
            home.mkdir(parents=True, exist_ok=True)
            env["HOME"] = str(home)
        self.backend = procs.start(name, cmd, self.ctx.out_dir / "logs", env=env, cwd=ROOT)
        t = time.monotonic()
        # vLLM's start-up is minutes of torch.compile warm-up on a small CPU (cached after the first)
        timeout = self.ctx.start_timeout * (2 if self.arm.backend == "vllm" else 1)
        procs.wait_http(self.backend, ready, timeout, ok=lambda r: r.status_code == 200)
        self.log(f"backend ready in {time.monotonic() - t:.1f}s")
        if warm:
            warm_up(self.arm, self.backend_url, self.ctx.request_timeout, backend_model(self.arm, self.ctx))

    def start_proxy(self) -> str:
        if not self.arm.proxy:
            return self.backend_url
        port = free_port()
        cmd = proxy_cmd(self.arm, self.ctx, port, self.backend_url)
        self.proxy = procs.start(f"{self.arm.key}-{self.rep}-mitmdump", cmd, self.ctx.out_dir / "logs", cwd=ROOT)
        _wait_port(self.proxy, port, 60.0)
        return f"http://127.0.0.1:{port}"

    def send(self, client: httpx.Client, base: str, req: BenchRequest, phase: str) -> dict:
        if time.monotonic() > self.ctx.deadline:
            raise BenchTimeout(f"time limit reached before {self.arm.key} {req.name}")
        body = with_billing(req, self.rng) if self.arm.billing else req.body
        if self.arm.volatile:
            body = with_volatile_line(body, self.rng)
        headers = dict(req.headers, **{"x-api-key": "bench-not-a-key"})
        res = send(client, base, body, headers, self.ctx.request_timeout)
        row = make_row(self.arm, self.rep, req, phase, res)
        self.rows.append(row)
        if res.error:
            self.log(f"{req.name} ({phase}) ERROR {res.error}")
        else:
            cached = row["cache_read_input_tokens"]
            hit = f", cached {cached}/{row['prompt_tokens']} tokens" if cached is not None else ""
            self.log(f"{req.name} ({phase}) TTFT {res.ttft_ms / 1000:.2f}s{hit}")
        return row

    def run(self, session: Session, new_session: Session | None = None) -> list[dict]:
        self.start_backend()
        base = self.start_proxy()
        seen: set[str] = set()
        with httpx.Client() as client:
            if self.arm.restart:
                assert new_session is not None
                self.send(client, base, session.requests[0], "prime")
                time.sleep(2.0)  # let a background checkpoint write finish before the restart
                self.log("restarting the server with the same --cache-dir")
                procs.stop(self.backend)
                self.start_backend(warm=True)
                self.send(client, base, new_session.requests[0], "restart")
                return self.rows
            for req in session.requests:
                phase = "warm" if req.agent in seen else ("cold" if req.agent == "main" else "cold-sub")
                seen.add(req.agent)
                self.send(client, base, req, phase)
        return self.rows

    def close(self) -> None:
        for p in (self.proxy, self.backend):
            if p is not None:
                procs.stop(p)
        if self.arm.backend == "embedded" and self.backend is not None:
            attach_server_log(self.rows, server_request_log(self.backend.log_path))
        self.proxy = self.backend = None
