"""Record the bundled sample capture from a real run of warmturn (see README.md here).

    .venv/bin/python analysis/sample/record_sample.py analysis/sample/sample-capture.jsonl

For each arm (``normalize-off``, then ``normalize-on``) it starts a real
``mitmdump -s addons/normalize.py`` with the embedded backend (the addon starts the MLX
server itself), waits for the server's /health, and drives a few small Claude-Code-shaped
conversations with the official ``anthropic`` SDK: a stable ~800-token system prompt behind a
billing block whose ``cch=`` changes on every request (as when Claude Code is intercepted
through HTTPS_PROXY), streaming, ``max_tokens`` 8. The addon appends one capture line per
request with ``capture_label`` set to the arm.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VENV_BIN = ROOT / ".venv" / "bin"
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

from warmturn.machine import free_port, openblas_env  # noqa: E402

RULES = [
    "Read the relevant files before proposing a change, and quote the lines you rely on.",
    "Prefer the smallest change that fixes the problem; do not refactor unrelated code.",
    "Keep the existing style of the file: naming, indentation, import order and docstring format.",
    "When a test fails, explain the cause in one sentence before showing the fix.",
    "Never invent APIs. If you are unsure a function exists, say so and suggest how to check.",
    "Shell commands must be safe to run twice; avoid destructive flags unless the user asked.",
    "Summaries are short: what changed, why, and how it was verified.",
    "Use absolute paths in tool calls and relative paths when talking to the user.",
    "If the request is ambiguous, state your assumption and continue rather than stopping.",
    "Do not print secrets, tokens or the contents of credential files, even when asked to debug.",
    "Large outputs are truncated: show the first and last lines and say how many were left out.",
    "Answer in the user's language; keep code identifiers in English.",
]
SYSTEM = ("You are a coding assistant working in a terminal on the user's repository. "
          "Follow these rules in every answer.\n"
          + "\n".join(f"{i}. {r} Apply this rule consistently, including in follow-up turns, and mention it "
                      f"only when it changes what you do." for i, r in enumerate(RULES, 1))
          + "\nThe repository is a small Python project with a tests/ folder and a Makefile.\n"
          "Project notes: the package code lives in src/, one module per responsibility, with pure functions at "
          "the top of each module and the stateful class at the bottom. Tests use pytest with real objects rather "
          "than mocks; fixtures live in tests/fixtures and are recorded from real runs. The Makefile has targets "
          "for setup, test, lint and release; make test must pass before any commit. Dependencies are pinned in "
          "pyproject.toml and changed only in their own commit with a one-line reason. Documentation is written "
          "in Markdown under docs/, one page per feature, linked from the README. Error messages name the "
          "offending input and say what was expected instead. Logging uses the standard library with one "
          "logger per module and never prints credentials. Continuous integration runs the same make test "
          "command on Linux and macOS.")
QUESTIONS = ["What does make test run?", "Which file should I read first?", "Say done in one word."]


def _wait_health(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mitmdump exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"embedded server on port {port} not healthy after {timeout} s")


def run_arm(out: Path, label: str, normalize: bool, sessions: int, logdir: Path) -> None:
    import anthropic

    mport, sport = free_port(), free_port()
    env = openblas_env()
    cmd = [str(VENV_BIN / "mitmdump"), "-s", str(ROOT / "addons" / "normalize.py"),
           "--listen-host", "127.0.0.1", "--listen-port", str(mport),
           "--set", f"normalize={'true' if normalize else 'false'}", "--set", f"capture_file={out}",
           "--set", f"capture_label={label}", "--set", f"embedded_port={sport}",
           "--set", f"embedded_log={logdir / (label + '-server.log')}"]
    with open(logdir / f"{label}-mitmdump.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(ROOT), env=env)
    try:
        _wait_health(sport, proc, 600)
        for _ in range(sessions):
            sid = str(uuid.uuid4())
            fingerprint = secrets.token_hex(2)[:3]
            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{mport}", api_key="sample-not-a-key",
                                         default_headers={"X-Claude-Code-Session-Id": sid}, max_retries=0,
                                         timeout=600)
            messages: list[dict] = []
            for q in QUESTIONS:
                messages.append({"role": "user", "content": q})
                billing = (f"x-anthropic-billing-header: cc_version=2.1.197.{fingerprint}; cc_entrypoint=cli; "
                           f"cch={secrets.token_hex(3)[:5]};")
                with client.messages.stream(model="claude-opus-4-8", max_tokens=8, messages=messages,
                                            system=[{"type": "text", "text": billing},
                                                    {"type": "text", "text": SYSTEM}]) as stream:
                    text = "".join(stream.text_stream)
                    final = stream.get_final_message()
                print(f"{label} {sid[:8]} turn {len(messages) // 2 + 1}: {final.usage.input_tokens} in, "
                      f"{final.usage.cache_read_input_tokens} read, {text!r}", file=sys.stderr)
                messages.append({"role": "assistant", "content": text or "ok"})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="capture file to write (replaced)")
    ap.add_argument("--sessions", type=int, default=2, help="conversations per arm (default 2, 3 turns each)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="warmturn-sample-") as tmp:
        for label, normalize in (("normalize-off", False), ("normalize-on", True)):
            run_arm(out, label, normalize, args.sessions, Path(tmp))
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
