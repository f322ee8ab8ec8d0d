"""Real-size Claude Code sessions (issue 19): the real 2.1.332 CLI with its own full system prompt and
all its tools (WARMTURN_FULL_PROMPT=1, ~12.3K tokens), through scripts/claude.sh (make claude) and the
addon, to a long-context model built at test time with no download: a tiny random-weight llama
(warmturn.server.tinymodels, with an end-of-turn token it picks now and then: tests/tiny_talker.py),
served by the embedded server as make run does.

Its answers are noise; the protocol, the prefix cache and Claude Code's context accounting are
real. One proxy and server per context size serve the module: the first cold prefill of the full
prompt (~25 s on a 2-core CPU) is paid once, later sessions read the system+tools prefix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.procs import ROOT, mitmdump, read_capture
from tests.test_e2e_claude_code import CACHE, CURRENT, clean_env, require_cli
from tests.tiny_talker import build_talker

pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.timeout(900)]

CONTEXT = 65536
OUTPUT_CAP = 64


COMPACT_CONTEXT = 32768  # room for the ~12.3K-token prompt under Claude Code's compaction point (19,704)


def serve_model(tmp_path_factory, context: int):
    """mitmdump with the addon and its embedded server on a tiny long-context model (make run, MODEL=...)."""
    require_cli(CURRENT)
    d = tmp_path_factory.mktemp("proxy")
    model = build_talker(d / f"llama-{context // 1024}k", context=context)
    port, cap = free_port(), d / "cap.jsonl"
    with mitmdump(port, d / "mitm.log", capture_file=cap, embedded_log=d / "server.log",
                  embedded_args=f"--model {model} --max-output-tokens {OUTPUT_CAP} --cache-dir {d / 'kv'}"):
        yield {"port": port, "cap": cap, "log": d / "server.log", "model": model.name}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    yield from serve_model(tmp_path_factory, CONTEXT)


@pytest.fixture(scope="module")
def compact_proxy(tmp_path_factory):
    yield from serve_model(tmp_path_factory, COMPACT_CONTEXT)


def cli_env(home: Path, port: int, config: Path) -> dict[str, str]:
    env = clean_env(home)
    env.update(PORT=str(port), WARMTURN_CLAUDE_CONFIG=str(config), WARMTURN_CACHE=str(CACHE), WARMTURN_FULL_PROMPT="1")
    return env


def claude_sh(args: list[str], home: Path, port: int, config: Path) -> subprocess.CompletedProcess:
    """scripts/claude.sh (what make claude runs) with Claude Code's own prompt and tools."""
    return subprocess.run(["bash", str(ROOT / "scripts" / "claude.sh"), *args], cwd=home / "work",
                          env=cli_env(home, port, config), capture_output=True, text=True, timeout=600)


def session(tmp_path: Path) -> tuple[Path, Path]:
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    return home, tmp_path / "claude-config"


def turns_since(cap: Path, t0: float, kind: str = "messages") -> list[dict]:
    return [x for x in read_capture(cap) if x["kind"] == kind and x["t"]["request"] >= t0]


def prompt_of(usage: dict) -> int:
    return usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]


def assert_full_prompt(turn: dict, model: str = "llama-64k") -> None:
    body = turn["request"]["body"]
    assert len(body["tools"]) >= 10, [t["name"] for t in body["tools"]]  # Claude Code's own tools
    assert prompt_of(turn["usage"]) > 12000, turn["usage"]  # its own ~12.3K-token prompt
    assert body["model"] == model  # make claude names the served model: its window applies


def test_make_claude_tells_claude_code_the_served_context(proxy, tmp_path):
    """/context (its burst of count_tokens) shows the served 64K window, not the 200K/1M Claude Code assumes,
    and an auto-compact reserve of 13K + the output cap make claude sets."""
    home, config = session(tmp_path)
    t0 = time.time()
    run = claude_sh(["-p", "/context"], home, proxy["port"], config)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "context window 65536 tokens, auto-compaction at 52472" in run.stderr, run.stderr
    assert "**Model:** llama-64k" in run.stdout, run.stdout
    shown = re.search(r"\*\*Tokens:\*\* ([\d.]+)k / ([\d.]+)k", run.stdout)
    assert shown and float(shown.group(2)) * 1000 <= CONTEXT, run.stdout  # "9.3k / 65.5k" (65,536)
    assert re.search(r"Autocompact buffer \| 13\.1k", run.stdout), run.stdout
    counts = turns_since(proxy["cap"], t0, "count_tokens")
    assert len(counts) >= 10 and all(c["status"] == 200 for c in counts), [c["status"] for c in counts]


def test_full_prompt_p_then_continue_reads_the_cache(proxy, tmp_path):
    home, config = session(tmp_path)
    t0 = time.time()
    claude_sh(["-p", "Say hi."], home, proxy["port"], config)
    t1 = time.time()
    claude_sh(["-p", "And again.", "--continue"], home, proxy["port"], config)
    first, later = turns_since(proxy["cap"], t0), turns_since(proxy["cap"], t1)
    assert first and later and all(t["status"] == 200 and t["error"] is None for t in first), \
        [(t["status"], t["error"]) for t in first]
    for t in first:
        assert_full_prompt(t)
    assert first[0]["session_id"] == later[0]["session_id"]
    for t in first[1:]:  # every request after the session's first one, --continue's included
        u = t["usage"]
        assert u["cache_read_input_tokens"] >= 0.95 * prompt_of(u), u


class Terminal:
    """make claude in a real terminal (tmux), as a user runs it interactively."""

    def __init__(self, name: str, home: Path, env: dict[str, str], args: str = "") -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed (apt-get install tmux): it plays the user's terminal here")
        self.name = name
        exports = " ".join(f"{k}={json.dumps(v)}" for k, v in env.items() if k in (
            "HOME", "PORT", "WARMTURN_CLAUDE_CONFIG", "WARMTURN_CACHE", "WARMTURN_FULL_PROMPT"))
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "150", "-y", "40", "-c", str(home / "work"),
                        f"env {exports} bash {ROOT / 'scripts' / 'claude.sh'} {args}; sleep 30"], check=True, env=env)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def wait_for(self, pred, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if pred(text):
                return text
            time.sleep(1)
        raise AssertionError(f"timed out; the screen shows:\n{text}")

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", line], check=True)
        subprocess.run(["tmux", "send-keys", "-t", self.name, "Enter"], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_full_prompt_interactive_three_turns_in_tmux(proxy, tmp_path):
    """A real terminal session (tmux): three prompts typed, each answered; turns 2 and 3 read >= 95% of
    their prompt from the cache."""
    home, config = session(tmp_path)
    t0 = time.time()
    term = Terminal(f"warmturn-realsize-{proxy['port']}", home, cli_env(home, proxy["port"], config))
    starts = []
    try:
        term.wait_for(lambda s: "❯" in s and "trust" not in s.lower(), 120)
        for prompt in ("Say hi.", "Say hi again.", "And once more."):
            starts.append(time.time())
            term.type(prompt)
            term.wait_for(lambda s: any(t["status"] == 200 for t in turns_since(proxy["cap"], starts[-1])), 600)
            term.wait_for(lambda s: "esc to interrupt" not in s, 300)
    finally:
        term.close()
    turns = [t for t in turns_since(proxy["cap"], t0) if t["side"] is None]
    assert all(t["status"] == 200 and t["error"] is None for t in turns), [(t["status"], t["error"]) for t in turns]
    assert len({t["session_id"] for t in turns}) == 1
    for start in starts[1:]:
        t = next(t for t in turns if t["t"]["request"] >= start)  # the turn's first request
        assert_full_prompt(t)
        u = t["usage"]
        assert u["cache_read_input_tokens"] >= 0.95 * prompt_of(u), u


FORK_SKILL = """---
name: probe-{x}
description: Look around the project ({x}) and report briefly.
context: fork
agent: general-purpose
---
List what is in this folder ({x}) and report in one line.
"""


def test_subagent_fan_out_in_tmux(proxy, tmp_path):
    """Subagents without a model that decides to start them: two project skills with `context: fork` typed as
    /probe-a and /probe-b run as background subagents (Claude Code's own general-purpose agent, its own prompt),
    beside the main session; the second reads its shared prefix from the cache. --permission-mode default: in
    2.1.332's default auto mode each subagent's hand-back is also reviewed by a non-streaming security-monitor
    request (~33K tokens here, 60 s client timeout; docs/claude-code-context.md)."""
    home, config = session(tmp_path)
    for x in "ab":
        skill = home / "work" / ".claude" / "skills" / f"probe-{x}" / "SKILL.md"
        skill.parent.mkdir(parents=True)
        skill.write_text(FORK_SKILL.format(x=x))
    t0 = time.time()
    term = Terminal(f"warmturn-fanout-{proxy['port']}", home, cli_env(home, proxy["port"], config),
                    "--permission-mode default")

    def subagents() -> list[dict]:
        return [t for t in turns_since(proxy["cap"], t0) if t["is_subagent"] and t["status"] is not None]

    try:
        term.wait_for(lambda s: "❯" in s and "trust" not in s.lower(), 120)
        term.type("/probe-a")
        term.wait_for(lambda s: "@probe-a" in s, 60)
        term.type("/probe-b")
        term.wait_for(lambda s: len({t["agent_id"] for t in subagents()}) >= 2, 600)
        term.type("Say hi.")
        main_start = time.time()
        term.wait_for(lambda s: any(t["status"] == 200 and not t["is_subagent"]
                                    for t in turns_since(proxy["cap"], main_start)), 600)
    finally:
        term.close()
    subs = subagents()
    assert len({t["agent_id"] for t in subs}) >= 2, subs
    assert all(t["status"] == 200 and t["error"] is None for t in subs), [(t["status"], t["error"]) for t in subs]
    assert len({t["session_id"] for t in turns_since(proxy["cap"], t0)}) == 1  # one session, its subagents in it
    later = sorted(subs, key=lambda t: t["t"]["request"])[-1]
    u = later["usage"]
    assert u["cache_read_input_tokens"] >= 0.9 * prompt_of(u), u  # the subagent prompt, read once


WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count silver coins under an old oak "  # noqa: SIM905
         "tree near the river bank").split()
COMPACTION_ASK = "detailed summary"  # Claude Code's compaction request asks for one
COMPACTED = "This session is being continued from a previous conversation"  # how the compacted one starts


def note(i: int, words: int = 2500) -> str:
    """A user message of ~4.3K tokens (the default tokenizer): a log to keep, different every turn."""
    return f"Note {i}: please remember this log. " + " ".join(
        WORDS[(i * 7 + j * 3) % len(WORDS)] + (str(j) if j % 5 == 0 else "") for j in range(words))


def text_of(message: dict) -> str:
    c = message["content"]
    return c if isinstance(c, str) else " ".join(b.get("text", "") for b in c if isinstance(b, dict))


def test_a_session_longer_than_the_window_auto_compacts_and_goes_on(compact_proxy, tmp_path):
    """A 32K context: make claude tells Claude Code (compaction at 32768 - 64 - 13000 = 19,704 tokens). Turns of
    ~4.3K tokens each grow the session past that point; Claude Code compacts (its own request, answered by the
    server) instead of sending a request the server refuses, and the turns after it go on from the summary."""
    home, config = session(tmp_path)
    cap, t0 = compact_proxy["cap"], time.time()
    compacted_at = None
    for i in range(1, 7):
        run = claude_sh(["-p", note(i), *(["--continue"] if i > 1 else [])], home, compact_proxy["port"], config)
        assert run.returncode == 0, run.stdout + run.stderr
        asks = [r for r in turns_since(cap, t0) if COMPACTION_ASK in text_of(r["request"]["body"]["messages"][-1])]
        if asks and compacted_at is None:
            compacted_at = i
        if compacted_at is not None and i >= compacted_at + 1:
            break
    assert compacted_at is not None, "the session never compacted"
    requests = turns_since(cap, t0)
    assert all(r["status"] == 200 and r["error"] is None for r in requests), \
        [(r["status"], r["error"]) for r in requests]  # no "prompt is too long", no other failure
    assert max(prompt_of(r["usage"]) for r in requests) < COMPACT_CONTEXT
    def asks_summary(r: dict) -> bool:
        return COMPACTION_ASK in text_of(r["request"]["body"]["messages"][-1])

    def goes_on(r: dict) -> bool:  # a turn that carries the summary instead of the conversation
        return not asks_summary(r) and COMPACTED in json.dumps(r["request"]["body"]["messages"])

    # Claude Code 2.1.332 sometimes drops a first summary (this random model's, 64 tokens) and sends that
    # turn uncompacted, then compacts again in the next one: the compaction that counts is the last ask
    # before the first turn that goes on from a summary
    first_after = next((r for r in requests if goes_on(r)), None)
    assert first_after is not None, [json.dumps(r["request"]["body"]["messages"])[-300:] for r in requests]
    ask = [r for r in requests if asks_summary(r) and r["t"]["end"] <= first_after["t"]["request"]][-1]
    assert ask["stop_reason"] == "end_turn" and ask["usage"]["cache_read_input_tokens"] > 0.9 * prompt_of(ask["usage"])
    after = [r for r in requests if r["t"]["request"] > ask["t"]["end"] and not asks_summary(r)]
    assert after[0] is first_after  # the turn right after the compaction goes on from the summary ...
    body = json.dumps(first_after["request"]["body"]["messages"])
    assert any(f"Note {i}:" in body for i in range(compacted_at, 7))  # ... with the prompt that was typed
    assert prompt_of(first_after["usage"]) < prompt_of(ask["usage"])  # smaller than before the compaction
    for r in after:
        assert_full_prompt(r, compact_proxy["model"])
    u = first_after["usage"]
    warm = u["cache_read_input_tokens"] / prompt_of(u)
    # the system+tools prefix (~9.3K tokens) survives a compaction; the conversation after it is new
    # (measured: 9,308 of 16,992 tokens; docs/claude-code-context.md)
    assert u["cache_read_input_tokens"] > 9000, u
    print(f"turn after compaction: read {u['cache_read_input_tokens']} of {prompt_of(u)} tokens ({warm:.0%}), "
          f"ttft {first_after['ttft_ms']:.0f} ms; compaction request: read {ask['usage']['cache_read_input_tokens']} "
          f"of {prompt_of(ask['usage'])}, ttft {ask['ttft_ms']:.0f} ms")
