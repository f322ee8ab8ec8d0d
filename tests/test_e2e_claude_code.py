"""End to end: the real Claude Code CLI -> mitmdump -s addons/normalize.py -> the embedded MLX server.

Every test runs both CLI versions setup installs: the current release and the older one (2.1.197).
The embedded server runs with its defaults for the bundled model (greedy decoding, output cap). One mitmdump
(and so one embedded server) serves the module; each test reads the capture from its own start on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.procs import ROOT, claude_bin, claude_code_versions, mitmdump, read_capture

SYSTEM = "You are a terse assistant. Answer in one short sentence."
# Questions the small default model answers briefly and then stops (greedy: the same short answers each run).
FIRST, SECOND = "What is the capital of France?", "And the capital of Italy?"
HELLO = "Say hi."
MAX_OUTPUT = 64
CURRENT, OLDER = claude_code_versions()
CACHE = claude_bin(CURRENT).parents[3]  # the warmturn cache (the tests give the CLI a throwaway HOME)

pytestmark = [pytest.mark.e2e, pytest.mark.model]


def require_cli(version: str) -> Path:
    """The CLI of one version; make setup installs both. In CI a missing one fails, never a silent skip."""
    path = claude_bin(version)
    if not path.exists():
        msg = f"Claude Code {version} not installed at {path} (make setup installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(params=[CURRENT, OLDER])
def cli(request) -> Path:
    return require_cli(request.param)


class Proxy:
    """The module's mitmdump with the addon and its embedded server."""

    def __init__(self, port: int, cap: Path, confdir: Path) -> None:
        self.port, self.cap, self.confdir = port, cap, confdir
        self.ca = confdir / "mitmproxy-ca-cert.pem"  # mitmproxy's CA, for HTTPS_PROXY interception

    def since(self, t0: float) -> list[dict]:
        """The capture's records of requests that arrived at or after `t0` (a test's start)."""
        return [x for x in read_capture(self.cap) if x["t"]["request"] >= t0]

    def turns(self, t0: float) -> list[dict]:
        return [x for x in self.since(t0) if x["kind"] == "messages"]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy")
    port, cap, confdir = free_port(), d / "cap.jsonl", d / "mitmconf"
    with mitmdump(port, d / "mitm.log", capture_file=cap, embedded_log=d / "server.log", confdir=confdir):
        yield Proxy(port, cap, confdir)


def clean_env(home: Path) -> dict[str, str]:
    """The test's environment without the developer's Anthropic/Claude/proxy settings."""
    proxies = ("https_proxy", "http_proxy", "no_proxy")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_", "WARMTURN_")) and k.lower() not in proxies}
    env.update(HOME=str(home), DISABLE_AUTOUPDATER="1")
    env.pop("LD_PRELOAD", None)
    return env


def claude(cli: Path, args: list[str], home: Path, port: int, ca: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI against mitmdump: as its base URL, or (with `ca`) through it as HTTPS proxy."""
    env = clean_env(home)
    env.update(ANTHROPIC_API_KEY="x", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(MAX_OUTPUT))
    if ca is None:
        env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    else:
        env.update(HTTPS_PROXY=f"http://127.0.0.1:{port}", NODE_EXTRA_CA_CERTS=str(ca))
    return subprocess.run([str(cli), *args], cwd=home / "work", env=env, capture_output=True, text=True, timeout=600)


def workdir(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    return home


def answered(run: subprocess.CompletedProcess) -> None:
    """The CLI answered, or ended honestly on the output cap: greedy, the small model's answer depends on every
    prompt token (the throwaway HOME's path is in it) and now and then runs on; then the server stops it at
    max_tokens, Claude Code asks it to continue three times and reports the cap. Either way the flows are
    what these tests check."""
    out = run.stdout + run.stderr
    assert (run.returncode == 0 and run.stdout.strip()) or "output token maximum" in out, out


def test_two_turns_through_the_addon(tmp_path, cli, proxy):
    home, port, t0 = workdir(tmp_path), proxy.port, time.time()
    answered(claude(cli, ["-p", FIRST, "--system-prompt", SYSTEM, "--tools", ""], home, port))
    second_started = time.time()
    answered(claude(cli, ["-p", SECOND, "--continue", "--system-prompt", SYSTEM, "--tools", ""], home, port))
    lines = proxy.since(t0)
    turns = [x for x in lines if x["kind"] == "messages"]
    assert turns, [(x["kind"], x["status"]) for x in lines]
    for t in turns:
        assert t["status"] == 200 and t["error"] is None and t["stream"] is True
        assert t["stop_reason"] in ("end_turn", "max_tokens")
        blocks = [e for e in t["stripped"] if e["kind"] == "system_block"]
        assert len(blocks) == 1 and blocks[0]["block"]["text"].startswith("x-anthropic-billing-header:")
        forwarded = json.dumps(t["request"]["body"])
        assert "x-anthropic-billing-header" not in forwarded  # what mitmdump sent to the backend
        assert t["session_id"] and t["usage"]["output_tokens"] > 0 and t["ttft_ms"] is not None
        assert "temperature" not in t["request"]["body"]  # Claude Code sets none: the server's default applies
        assert t["request"]["body"]["max_tokens"] == MAX_OUTPUT
    second = next(t for t in turns if t["t"]["request"] >= second_started)  # --continue's first request
    assert turns[0]["session_id"] == second["session_id"] and turns[0]["prefix_hash"] == second["prefix_hash"]
    assert second["usage"].get("cache_read_input_tokens", 0) > 0, second["usage"]  # the prefix cache hit


def test_interception_of_api_anthropic_com(tmp_path, cli, proxy):
    """HTTPS_PROXY + mitmproxy's CA: requests to api.anthropic.com (with a per-request cch=) are rerouted."""
    home, t0 = workdir(tmp_path), time.time()
    answered(claude(cli, ["-p", HELLO, "--system-prompt", SYSTEM, "--tools", ""], home, proxy.port, ca=proxy.ca))
    turns = proxy.turns(t0)
    assert turns and all(t["status"] == 200 for t in turns)
    assert len({t["stripped"][0]["block"]["text"] for t in turns}) == len(turns), "cch= differs per request"
    t = turns[0]
    assert t["upstream"].startswith("http://127.0.0.1:") and t["mode"] == "regular"
    billing = [e["block"]["text"] for e in t["stripped"] if e["kind"] == "system_block"]
    assert len(billing) == 1 and "cch=" in billing[0]
    assert "x-anthropic-billing-header" not in json.dumps(t["request"]["body"])


def run_claude_sh(args: list[str], home: Path, port: int, config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """scripts/claude.sh as a user runs it: only HOME, PORT and its config dir set."""
    env = clean_env(home)
    env.update(PORT=str(port), WARMTURN_CLAUDE_CONFIG=str(config), WARMTURN_CACHE=str(CACHE))
    return subprocess.run(["bash", str(ROOT / "scripts" / "claude.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_make_claude_p_then_continue(tmp_path, proxy):
    """scripts/claude.sh (what make claude runs): the current CLI, the small-model profile, two turns."""
    home, port, t0 = workdir(tmp_path), proxy.port, time.time()
    config = tmp_path / "claude-config"
    require_cli(CURRENT)
    first = run_claude_sh(["-p", FIRST], home, port, config, home / "work")
    answered(first)
    second_started = time.time()
    answered(run_claude_sh(["-p", SECOND, "--continue"], home, port, config, home / "work"))
    assert "small-model profile" in first.stderr and "context 8192" in first.stderr
    seeded = json.loads((config / ".claude.json").read_text())
    assert seeded["hasCompletedOnboarding"] is True
    assert "warmturn-local"[-20:] in seeded["customApiKeyResponses"]["approved"]
    assert seeded["projects"][str(home / "work")]["hasTrustDialogAccepted"] is True
    turns = proxy.turns(t0)
    assert turns, [(x["kind"], x["status"]) for x in proxy.since(t0)]
    for t in turns:
        body = t["request"]["body"]
        assert t["status"] == 200 and body["max_tokens"] == 256  # the server's cap, told to the CLI
        assert [tool["name"] for tool in body["tools"] if not tool.get("defer_loading")] == ["Read"]
        assert "small local model" in json.dumps(body["system"])
        assert t["request"]["headers"]["x-api-key"] == "<redacted>"
    second = next(t for t in turns if t["t"]["request"] >= second_started)  # --continue's first request
    assert turns[0]["prefix_hash"] == second["prefix_hash"]
    u = second["usage"]
    prompt = u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
    assert u["cache_read_input_tokens"] >= 0.9 * prompt, u


def test_make_claude_interactive_first_run_does_not_block(tmp_path, proxy):
    """A newcomer's first interactive session in a terminal (tmux): no onboarding, no API-key or folder-trust
    question; the first prompt typed gets an answer. A fresh config dir, as on a new machine."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): it plays the user's terminal here")
    require_cli(CURRENT)
    home, port, t0 = workdir(tmp_path), proxy.port, time.time()
    session = f"warmturn-test-{port}"
    env = clean_env(home)
    env.update(PORT=str(port), WARMTURN_CLAUDE_CONFIG=str(tmp_path / "claude-config"), WARMTURN_CACHE=str(CACHE))
    exports = " ".join(f"{k}={json.dumps(v)}" for k, v in env.items()
                       if k in ("HOME", "PORT", "WARMTURN_CLAUDE_CONFIG", "WARMTURN_CACHE"))

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(pred, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = screen()
            if pred(text):
                return text
            time.sleep(1)
        raise AssertionError(f"timed out; the screen shows:\n{text}")

    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "40", "-c", str(home / "work"),
                    f"env {exports} bash {ROOT / 'scripts' / 'claude.sh'}; sleep 30"], check=True, env=env)
    try:
        text = wait_for(lambda s: "❯" in s and "trust" not in s.lower(), 120)
        for blocker in ("Unable to connect", "Do you want to use this API key", "Not logged in", "Select"):
            assert blocker not in text, text
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", FIRST], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        wait_for(lambda s: any(x["status"] == 200 for x in proxy.turns(t0)), 600)
        text = wait_for(lambda s: "esc to interrupt" not in s, 120)
        assert "Not logged in" not in text, text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    turn = next(x for x in proxy.turns(t0) if x["status"] == 200)
    assert turn["usage"]["output_tokens"] > 0 and turn["request"]["body"]["max_tokens"] == 256


def test_continue_reads_its_prompt_from_the_cache_despite_the_model_renaming(tmp_path, cli, proxy):
    """Claude Code's own system prompt and the Bash tool (whose description carries the Co-Authored-By line):
    2.1.197 names the model "Opus 4.8 (1M context)" in a first -p turn and "Opus 4.8" after --continue. With
    the addon's default identity rule the --continue turn still reads >= 95% of its prompt from the cache."""
    home, port, t0 = workdir(tmp_path), proxy.port, time.time()
    claude(cli, ["-p", FIRST, "--tools", "Bash"], home, port)
    second_started = time.time()
    claude(cli, ["-p", SECOND, "--continue", "--tools", "Bash"], home, port)
    turns = proxy.turns(t0)
    assert turns and all(t["status"] == 200 for t in turns), [(t["status"], t["error"]) for t in turns]
    first = turns[0]
    second = next(t for t in turns if t["t"]["request"] >= second_started)
    renamed = {e["text"] for t in (first, second) for e in t["stripped"] if e["kind"] == "rewrite"}
    assert renamed, "the model's name and id are canonicalized"
    if cli == claude_bin(OLDER):
        assert "Opus 4.8 (1M context)" in renamed and "Opus 4.8" in renamed  # both spellings seen, made one
    assert first["prefix_hash"] == second["prefix_hash"]
    u = second["usage"]
    prompt = u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
    assert u["cache_read_input_tokens"] >= 0.95 * prompt, u
