"""Bounded soak test (``make soak``): a few hundred mixed requests through a real mitmdump with
the addon and the embedded server, then checks that both processes are back to their baseline
open file descriptors and memory, and that every capture line is valid.

Mixed traffic, several clients at once: good count_tokens, good messages (streamed and not),
hostile bodies (the issue-12 probe's malformed inputs and the fuzz pool), clients that disconnect
mid-stream, oversized bodies, and requests that must be refused (wrong content type, a foreign
Host). Prints one line per class (tried / handled right) and the resource table; exits 1 when a
class was mishandled, a resource did not come back, or a capture line is invalid.

    python scripts/soak.py [--requests 300] [--concurrency 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_server_hardening import FUZZ_BASE, HOSTILE, PATHS, assemble  # noqa: E402
from tests.test_server_input import MALFORMED  # noqa: E402
from warmturn.machine import free_port, openblas_env  # noqa: E402

HI = [{"role": "user", "content": "Say hi."}]
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
EMOJI = [{"role": "user", "content": "Reply with three emoji."}]
TOOL = {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {}}}


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:  # macOS: lsof
        out = subprocess.run(["lsof", "-p", str(pid)], capture_output=True, text=True).stdout
        return max(0, len(out.splitlines()) - 1)


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout
    return int(out.strip() or 0) / 1024


def cache_mib(port: int) -> float:
    """The embedded server's prefix-cache bytes (its /metrics), in MiB: memory it keeps on purpose."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    m = re.search(r"^warmturn_cache_bytes (\S+)$", text, re.M)
    return float(m.group(1)) / 2**20 if m else 0.0


def mlx_mib(port: int) -> tuple[float, float]:
    """The embedded server's MLX active and buffer-cache bytes (its /metrics), in MiB."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0, 0.0
    out = []
    for name in ("warmturn_mlx_active_bytes", "warmturn_mlx_cache_bytes"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out.append(float(m.group(1)) / 2**20 if m else 0.0)
    return out[0], out[1]


def requests_500(port: int) -> float:
    """The embedded server's count of 500 answers (warmturn_requests_total{status="500"})."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("warmturn_requests_total{") and 'status="500"' in line)


def anthropic_error(r: httpx.Response, statuses: tuple[int, ...] = (400, 413)) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    return r.status_code in statuses and body.get("type") == "error" and isinstance(body["error"].get("message"), str)


class Soak:
    def __init__(self, base: str) -> None:
        self.base = base
        self.tried: collections.Counter[str] = collections.Counter()
        self.right: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.extra_flows = 0  # flows beyond one per call (warm-up included)

    def note(self, cls: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.tried[cls] += 1
            self.right[cls] += ok
            if not ok and len(self.failures) < 20:
                self.failures.append(f"{cls}: {detail[:300]}")

    def post(self, path: str, **kw) -> httpx.Response:
        kw.setdefault("timeout", 600)
        return httpx.post(self.base + path, **kw)

    # one request of each class -----------------------------------------------------------------

    def count(self, _rng: random.Random) -> None:
        r = self.post("/v1/messages/count_tokens", json={"model": "m", "messages": HI})
        self.note("good count_tokens", r.status_code == 200 and r.json().get("input_tokens", 0) > 0, r.text)

    def message(self, rng: random.Random) -> None:
        r = self.post("/v1/messages", json={"model": "claude-opus-4-8", "max_tokens": rng.randint(1, 6), "messages": HI})
        self.note("good messages", r.status_code == 200 and r.json().get("type") == "message", r.text)

    def stream(self, rng: random.Random) -> None:
        body = {"model": "claude-opus-4-8", "max_tokens": rng.randint(1, 6), "stream": True, "messages": HI}
        r = self.post("/v1/messages", json=body)
        self.note("good streams", r.status_code == 200 and "event: message_stop" in r.text, r.text[-300:])

    def malformed(self, rng: random.Random) -> None:
        raw, field = rng.choice(MALFORMED)
        path = rng.choice(["/v1/messages", "/v1/messages/count_tokens"])
        r = self.post(path, content=raw, headers={"content-type": "application/json"})
        self.note("malformed (probe list)", anthropic_error(r) and field in r.json()["error"]["message"],
                  f"{r.status_code} {r.text}")

    def fuzz(self, rng: random.Random) -> None:
        holes = [(rng.choice(PATHS), rng.choice(HOSTILE)) for _ in range(rng.randint(1, 3))]
        r = self.post(rng.choice(["/v1/messages", "/v1/messages/count_tokens"]), content=assemble(FUZZ_BASE, holes),
                      headers={"content-type": "application/json"})
        shaped = r.status_code < 500 and (r.status_code == 200 or anthropic_error(r, (400, 404, 413)))
        self.note("hostile (fuzz pool)", shaped, f"{r.status_code} {r.text[:200]}")

    def disconnect(self, _rng: random.Random) -> None:
        body = {"model": "m", "max_tokens": 200, "stream": True, "messages": STORY}
        ok = False
        with httpx.stream("POST", self.base + "/v1/messages", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("event: content_block_delta"):
                    ok = True
                    break  # leave mid-stream: the connection closes here
        self.note("disconnect mid-stream", ok, "no delta before leaving")

    def oversized(self, _rng: random.Random) -> None:
        r = self.post("/v1/messages", json={"model": "m", "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "word " * 400_000}]})
        self.note("oversized prompt (2 MB)", anthropic_error(r) and "too long" in r.json()["error"]["message"],
                  f"{r.status_code} {r.text[:200]}")

    def refused(self, rng: random.Random) -> None:
        if rng.random() < 0.5:  # the embedded server's guard, reached through the addon
            r = self.post("/v1/messages", content=json.dumps({"model": "m", "max_tokens": 1, "messages": HI}),
                          headers={"content-type": "text/plain"})
            self.note("refused (wrong content type)", anthropic_error(r, (415,)), f"{r.status_code} {r.text}")
        else:
            r = self.post("/v1/messages/", json={"model": "m", "max_tokens": 1, "messages": HI},
                          follow_redirects=False)
            self.note("refused (trailing slash)", anthropic_error(r, (404,)), f"{r.status_code} {r.text}")


    # issue 21's classes ----------------------------------------------------------------------------

    def sampler(self, rng: random.Random) -> None:
        """Sampler values at and past the edges (top_k >= the vocabulary broke sampling until a
        restart): served, and a sampled request after it is served too."""
        values = {"temperature": rng.choice([0.0, 0.5, 1.0, 2.0]), "top_p": rng.choice([0.0, 1e-9, 0.5, 1.0]),
                  "top_k": rng.choice([0, 1, 49151, 49152, 49153, 10**9, 2**63 - 1])}
        r = self.post("/v1/messages", json={"model": "m", "max_tokens": 2, "messages": HI,
                                            "stream": rng.random() < 0.5, **values})
        after = self.post("/v1/messages", json={"model": "m", "max_tokens": 2, "temperature": 1.0, "messages": HI})
        with self.lock:
            self.extra_flows += 1  # the second request is a flow of its own
        self.note("sampler extremes (+ sampled after)", r.status_code == 200 and after.status_code == 200,
                  f"{values} {r.status_code} {after.status_code} {r.text[:200]}")

    def utf8_cut(self, rng: random.Random) -> None:
        """An emoji answer cut by max_tokens at any token: never U+FFFD."""
        stream = rng.random() < 0.5
        r = self.post("/v1/messages", json={"model": "m", "max_tokens": rng.randint(1, 9), "temperature": 0,
                                            "stream": stream, "messages": EMOJI})
        self.note("UTF-8 cut by max_tokens", r.status_code == 200 and "\ufffd" not in (
            r.text if stream else "".join(b.get("text", "") for b in r.json()["content"])), r.text[-200:])

    def refused2(self, rng: random.Random) -> None:
        """Requests the API refuses (200s before): a tool_choice naming no tool, is_error as a string."""
        if rng.random() < 0.5:
            body = {"model": "m", "max_tokens": 1, "messages": HI, "tools": [TOOL],
                    "tool_choice": {"type": "tool", "name": "Write"}}
        else:
            body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "ok", "is_error": "false"}]}]}
        r = self.post(rng.choice(["/v1/messages", "/v1/messages/count_tokens"]), json=body)
        self.note("refused (tool_choice / is_error)", anthropic_error(r, (400,)), f"{r.status_code} {r.text[:200]}")

    def leave_whole(self, rng: random.Random) -> None:
        """A non-streaming client that leaves mid-answer (a held-back JSON answer: a logged 500 before);
        the server's 500 count is checked at the end."""
        body = {"model": "m", "max_tokens": 200, "messages": STORY,
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
        try:
            self.post("/v1/messages", json=body, timeout=httpx.Timeout(60, read=rng.uniform(0.3, 2.0)))
            left = False  # answered before the client gave up
        except httpx.ReadTimeout:
            left = True
        self.note("non-streaming client leaves", True, "")
        with self.lock:
            self.tried["(of which left mid-answer)"] += left
            self.right["(of which left mid-answer)"] += left


MIX = [("count", 25), ("message", 12), ("stream", 12), ("malformed", 20), ("fuzz", 20), ("disconnect", 5),
       ("oversized", 2), ("refused", 4), ("sampler", 8), ("utf8_cut", 6), ("refused2", 4), ("leave_whole", 3)]


def _wait_ready(base: str, mitm: subprocess.Popen, mlog: Path) -> bool:
    """The first request waits for the embedded server (up to 5 minutes)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.post(base + "/v1/messages", timeout=600,
                          json={"model": "m", "max_tokens": 2, "messages": HI}).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if mitm.poll() is not None or time.monotonic() > deadline:
            print(f"mitmdump did not come up; see {mlog}", file=sys.stderr)
            return False
        time.sleep(1)


def _resources(mitm: subprocess.Popen, server: int, server_port: int) -> dict[str, tuple]:
    return {"mitmdump": (fds(mitm.pid), rss_mib(mitm.pid), 0.0),
            "server": (fds(server), rss_mib(server), cache_mib(server_port))}


def _soak(soak: Soak, rng: random.Random, args: argparse.Namespace, mitm: subprocess.Popen, slog: Path) -> dict:
    """The warm-up, the baseline, the mixed requests and the end state; its figures (flows: those sent)."""
    flows = 1  # the first request
    server = int(re.findall(r"=== pid (\d+)", slog.read_text())[-1])
    server_port = int(re.findall(r"--port (\d+)", slog.read_text())[-1])
    for _ in range(10):  # warm-up: every code path once before the baseline
        for name, _w in MIX:
            getattr(soak, name)(rng)
            flows += 1
    soak.tried.clear()
    soak.right.clear()
    soak.failures.clear()
    time.sleep(3)
    base_res, base_mlx = _resources(mitm, server, server_port), mlx_mib(server_port)
    names = [n for n, w in MIX for _ in range(w)]
    plan = [rng.choice(names) for _ in range(args.requests)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for fut in [pool.submit(getattr(soak, name), random.Random(rng.random())) for name in plan]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - a client-side failure is a mishandled request
                soak.note("client errors", False, repr(e))
    elapsed = time.monotonic() - t0
    time.sleep(10)  # let disconnected generations wind down and buffers drain
    return {"flows": flows + len(plan), "elapsed": elapsed, "base_res": base_res, "base_mlx": base_mlx,
            "end_res": _resources(mitm, server, server_port), "end_mlx": mlx_mib(server_port),
            "server_500s": requests_500(server_port)}


def _capture_lines(cap: Path) -> tuple[int, int]:
    """(lines, invalid lines) of the capture file."""
    lines = cap.read_bytes().splitlines()
    bad = 0
    for line in lines:
        try:
            rec = json.loads(line.decode("utf-8"))
            bad += rec.get("schema") != 1
        except (ValueError, UnicodeDecodeError):
            bad += 1
    return len(lines), bad


def _report(soak: Soak, args: argparse.Namespace, m: dict, cap: Path) -> bool:
    """Print the tables; True when every class was handled right and nothing leaked."""
    ok = True
    print(f"\n{args.requests} requests, {args.concurrency} clients at once, {m['elapsed']:.0f} s\n")
    print(f"{'class':34} {'tried':>6} {'handled right':>14}")
    for cls in sorted(soak.tried):
        print(f"{cls:34} {soak.tried[cls]:>6} {soak.right[cls]:>14}")
        ok &= soak.tried[cls] == soak.right[cls]
    flows = m["flows"] + soak.extra_flows
    lines, bad = _capture_lines(cap)
    print(f"\ncapture: {lines} lines for {flows} flows, {bad} invalid")
    ok &= bad == 0 and lines == flows
    # RSS may grow by what the prefix cache holds on purpose (bounded by --cache-bytes); the rest
    # must come back to within 25 % + 64 MiB of the baseline.
    print(f"\n{'process':10} {'fds before':>10} {'fds after':>10} {'RSS MiB before':>15} {'RSS MiB after':>14} "
          f"{'KV cache MiB before':>20} {'after':>6}")
    for proc in ("mitmdump", "server"):
        (f0, r0, c0), (f1, r1, c1) = m["base_res"][proc], m["end_res"][proc]
        print(f"{proc:10} {f0:>10} {f1:>10} {r0:>15.0f} {r1:>14.0f} {c0:>20.0f} {c1:>6.0f}")
        ok &= f1 <= f0 + 4 and r1 - max(c1 - c0, 0) <= r0 * 1.25 + 64
    base_mlx, end_mlx = m["base_mlx"], m["end_mlx"]
    print(f"server MLX memory, MiB: arrays {base_mlx[0]:.0f} -> {end_mlx[0]:.0f}, "
          f"buffer cache (freed, kept for reuse) {base_mlx[1]:.0f} -> {end_mlx[1]:.0f}")
    print(f"server: {m['server_500s']:.0f} answers with status 500 (requests_total)")
    ok &= m["server_500s"] == 0
    for f in soak.failures:
        print("  mishandled:", f)
    return ok


def run(args: argparse.Namespace) -> int:
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="warmturn-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    cap, slog, mlog = work / "cap.jsonl", work / "server.log", work / "mitm.log"
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "mitmdump"), "-s", str(ROOT / "addons" / "normalize.py"),
           "--listen-host", "127.0.0.1", "--listen-port", str(port), "--set", f"capture_file={cap}",
           "--set", f"embedded_log={slog}", "--set", "flow_detail=0",
           "--set", f"embedded_args=--cache-bytes {args.cache_mib << 20}"]
    env = openblas_env()
    env["PYTHONUNBUFFERED"] = "1"
    with open(mlog, "ab") as fh:
        mitm = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    soak = Soak(base)
    try:
        if not _wait_ready(base, mitm, mlog):
            return 1
        measured = _soak(soak, random.Random(args.seed), args, mitm, slog)
    finally:
        mitm.send_signal(signal.SIGTERM)
        try:
            mitm.wait(30)
        except subprocess.TimeoutExpired:
            mitm.kill()
    ok = _report(soak, args, measured, cap)
    print("\nPASS" if ok else "\nFAIL", f"(files in {work})")
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="mixed requests after the warm-up (default: 300)")
    p.add_argument("--concurrency", type=int, default=4, help="clients at once (default: 4)")
    p.add_argument("--seed", type=int, default=12, help="random seed of the mix (default: 12)")
    p.add_argument("--cache-mib", type=int, default=256,
                   help="the embedded server's prefix-cache budget, MiB (default: 256)")
    p.add_argument("--keep", default=None, help="keep the capture and logs in this directory")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
