"""The benchmark workload: a Claude-Code-shaped session built from real recorded payloads.

`bench/fixtures/session.json` holds the material, taken verbatim from Claude Code 2.1.197
recordings (`tests/fixtures/claude_code/`): the main agent's system blocks and 24 tools, the
Explore subagent's system blocks and 17 tools, the first user messages, plus a scripted
conversation in Claude Code's shapes (tool_use/tool_result rounds for Read and Bash, an
Agent call that spawns a subagent). `python -m warmturn.bench.workload --rebuild` regenerates it.

`build_session()` shrinks the system+tools prefix to a target token count (whole tools in
order of use, then the main system text cut at a token boundary), so the same bench runs
at ~2,000 tokens on a CPU and at ~20K (the real size) on a GPU or Apple silicon. It yields
the requests of one session in order: main turns, with the subagent's two requests
interleaved, as Claude Code sends them (billing block not included: `with_billing()` adds
one per request).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "session.json"
RECORDINGS = ROOT / "tests" / "fixtures" / "claude_code"
CC_VERSION = "2.1.197"

# Tools the scripted conversation calls come first, so they survive any shrinking.
MAIN_TOOL_ORDER = ["Read", "Bash", "Agent", "Edit", "Write"]
SUB_TOOL_ORDER = ["Read", "Bash"]

Counter = Callable[[str], int]


@dataclass
class BenchRequest:
    """One request of the replay: who sends it and the body without a billing block."""

    name: str  # "main-3", "sub-1"
    agent: str  # "main" or "subagent"
    turn: int  # 1-based within its agent
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Session:
    requests: list[BenchRequest]
    prefix_tokens: dict[str, int]  # estimated system+tools tokens per agent
    session_id: str


def load_fixture(path: Path = FIXTURE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def make_counter(model_dir: Path | None) -> Counter:
    """Token counter from the model's tokenizer.json (no MLX needed); chars/4 if absent."""
    tok_file = model_dir / "tokenizer.json" if model_dir else None
    if tok_file and tok_file.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    return lambda text: max(1, len(text) // 4)


def cut_to_tokens(text: str, budget: int, count: Counter) -> str:
    """The longest prefix of `text` (cut at a line break when possible) with <= budget tokens."""
    if budget <= 0:
        return ""
    if count(text) <= budget:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # binary search on characters; token counts are monotone enough for this
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    nl = cut.rfind("\n")
    return cut[: nl + 1] if nl > len(cut) * 0.8 else cut


def order_tools(tools: list[dict], first: list[str]) -> list[dict]:
    by_name = {t["name"]: t for t in tools}
    head = [by_name[n] for n in first if n in by_name]
    return head + [t for t in tools if t["name"] not in first]


def shrink_prefix(system: list[dict], tools: list[dict], target: int, count: Counter,
                  tool_order: list[str]) -> tuple[list[dict], list[dict], int]:
    """System blocks and tools whose text totals about `target` tokens.

    The long last system block gets up to 35% of the budget, whole tools (in `tool_order`
    first) that fit fill the rest, then the system text takes what is left (a tiny target
    keeps no tools). Returns (system, tools, estimated tokens)."""
    system = copy.deepcopy(system)
    fixed = sum(count(b["text"]) for b in system[:-1])
    long_text = system[-1]["text"]
    long_budget = min(count(long_text), int(target * 0.35))
    chosen: list[dict] = []
    used = fixed + long_budget
    for tool in order_tools(tools, tool_order):
        n = count(json.dumps(tool))
        if used + n <= target:
            chosen.append(tool)
            used += n
    remaining = target - (used - long_budget)
    system[-1]["text"] = cut_to_tokens(long_text, remaining, count)
    total = fixed + count(system[-1]["text"]) + sum(count(json.dumps(t)) for t in chosen)
    return system, chosen, total


def _user_blocks(texts: list[str]) -> list[dict]:
    blocks = [{"type": "text", "text": t} for t in texts]
    blocks[-1]["cache_control"] = {"type": "ephemeral"}
    return blocks


def _settle(messages: list[dict]) -> None:
    """What Claude Code does to history on the next turn: drop cache_control markers and
    turn a one-text-block user message back into a plain string."""
    for m in messages:
        if isinstance(m.get("content"), list):
            for b in m["content"]:
                if isinstance(b, dict):
                    b.pop("cache_control", None)
            c = m["content"]
            if m["role"] == "user" and len(c) == 1 and c[0].get("type") == "text":
                m["content"] = c[0]["text"]


def _mark_last(messages: list[dict]) -> None:
    for m in reversed(messages):
        if m["role"] == "user" and isinstance(m["content"], list):
            m["content"][-1]["cache_control"] = {"type": "ephemeral"}
            return


def new_session_id(rng: random.Random) -> str:
    """A session id shaped as Claude Code's (a version-4 UUID), drawn from ``rng``."""
    a, b, c, d, e = (rng.getrandbits(n) for n in (32, 16, 12, 12, 48))
    return f"{a:08x}-{b:04x}-4{c:03x}-8{d:03x}-{e:012x}"


def session_identity(fixture: dict, session_id: str) -> tuple[dict, dict[str, str]]:
    """The body ``metadata`` and the headers every request of session ``session_id`` carries."""
    metadata = {"user_id": json.dumps({"device_id": fixture["device_id"], "account_uuid": "",
                                       "session_id": session_id}, separators=(",", ":"))}
    return metadata, dict(fixture["headers"], **{"x-claude-code-session-id": session_id})


def request_body(model: str, system: list, tools: list, messages: list[dict], params: dict,
                 metadata: dict) -> dict:
    """One Messages body: copies of everything given (requests never share objects), the last
    user block marked for caching, as Claude Code marks it."""
    msgs = copy.deepcopy(messages)
    _mark_last(msgs)
    b = {"model": model, "messages": msgs, "system": copy.deepcopy(system), "tools": copy.deepcopy(tools),
         "metadata": metadata}
    b.update(copy.deepcopy(params))
    return b


def build_session(fixture: dict, target_prefix_tokens: int, count: Counter, *, max_tokens: int = 8,
                  main_turns: int | None = None, subagent: bool = True, session_tag: str = "a",
                  seed: int = 0, compact: bool = False) -> Session:
    """The requests of one Claude-Code-shaped session, shrunk to `target_prefix_tokens`.

    `main_turns` limits the main agent's requests (None = all scripted turns);
    `session_tag` makes the first user prompt (and ids) differ between sessions, as two
    real sessions do; the subagent's prefix is half the main one."""
    rng = random.Random(f"{seed}-{session_tag}")
    session_id = new_session_id(rng)
    main = _compacted(fixture["main"]) if compact else fixture["main"]
    sub = _compacted(fixture["subagent"]) if compact else fixture["subagent"]
    m_system, m_tools, m_tokens = shrink_prefix(main["system"], main["tools"], target_prefix_tokens, count,
                                                MAIN_TOOL_ORDER)
    s_system, s_tools, s_tokens = shrink_prefix(sub["system"], sub["tools"], max(64, target_prefix_tokens // 2),
                                                count, SUB_TOOL_ORDER)
    params = {k: copy.deepcopy(v) for k, v in fixture["params"].items()}
    params["max_tokens"] = max_tokens
    metadata, base_headers = session_identity(fixture, session_id)

    def body(model: str, system, tools, messages) -> dict:
        return request_body(model, system, tools, messages, params, metadata)

    first_prompt = main["first_prompt"] if session_tag == "a" else f"{main['first_prompt']} (session {session_tag})"
    history: list[dict] = [
        {"role": "user", "content": _user_blocks([main["reminder"], first_prompt])},
        {"role": "system", "content": main["system_message"]},
    ]
    requests: list[BenchRequest] = [
        BenchRequest("main-1", "main", 1, body(main["model"], m_system, m_tools, history), dict(base_headers))
    ]
    script = main["script"]
    limit = len(script) + 1 if main_turns is None else main_turns
    for step in script:
        if sum(r.agent == "main" for r in requests) >= limit:
            break
        if step.get("subagent") and subagent:
            requests.extend(_subagent_requests(sub, s_system, s_tools, body, base_headers, rng))
        _settle(history)
        history.append({"role": "assistant", "content": copy.deepcopy(step["assistant"])})
        history.append({"role": "user", "content": copy.deepcopy(step["user"])})
        n = sum(r.agent == "main" for r in requests) + 1
        requests.append(BenchRequest(f"main-{n}", "main", n, body(main["model"], m_system, m_tools, history),
                                     dict(base_headers)))
    return Session(requests, {"main": m_tokens, "subagent": s_tokens}, session_id)


def _first_lines(text: str, n: int) -> str:
    lines = text.splitlines()
    if len(lines) <= n:
        return text
    closing = "\n</system-reminder>" if lines[0] == "<system-reminder>" else ""
    return "\n".join(lines[:n]) + closing + "\n"


def _compacted(agent: dict) -> dict:
    """A copy of the fixture's agent material with short messages (see build_session)."""
    agent = copy.deepcopy(agent)
    agent["reminder"] = _first_lines(agent["reminder"], 4)
    if "system_message" in agent:
        agent["system_message"] = _first_lines(agent["system_message"], 1)
    for step in agent["script"]:
        for block in step["user"]:
            if block.get("type") == "tool_result" and isinstance(block["content"], str):
                block["content"] = _first_lines(block["content"], 3)
            elif block.get("type") == "tool_result":
                for b in block["content"]:
                    b["text"] = _first_lines(b["text"], 3)
    return agent


def _subagent_requests(sub: dict, system, tools, body, base_headers, rng) -> list[BenchRequest]:
    agent_id = f"a{rng.getrandbits(64):016x}"
    headers = dict(base_headers, **sub["headers"], **{"x-claude-code-agent-id": agent_id})
    history = [{"role": "user", "content": _user_blocks([sub["reminder"], sub["prompt"]])}]
    out = [BenchRequest("sub-1", "subagent", 1, body(sub["model"], system, tools, history), headers)]
    for i, step in enumerate(sub["script"], start=2):
        _settle(history)
        history.append({"role": "assistant", "content": copy.deepcopy(step["assistant"])})
        history.append({"role": "user", "content": copy.deepcopy(step["user"])})
        out.append(BenchRequest(f"sub-{i}", "subagent", i, body(sub["model"], system, tools, history), headers))
    for r in out:
        r.body.update(copy.deepcopy(sub["params"]))
    return out


def billing_block(rng: random.Random, subagent: bool, entrypoint: str = "cli") -> dict:
    """A billing block as Claude Code sends it when it believes it talks to api.anthropic.com:
    the conversation fingerprint and the per-request `cch=` both vary (here: per request)."""
    text = (f"x-anthropic-billing-header: cc_version={CC_VERSION}.{rng.getrandbits(12):03x}; "
            f"cc_entrypoint={entrypoint}; cch={rng.getrandbits(20):05x};")
    if subagent:
        text += " cc_is_subagent=true;"
    return {"type": "text", "text": text}


def with_billing(req: BenchRequest, rng: random.Random) -> dict:
    """A copy of the request body with a fresh billing block at system[0]."""
    b = copy.deepcopy(req.body)
    b["system"] = [billing_block(rng, req.agent == "subagent"), *b["system"]]
    return b


def request_tokens(body: dict, count: Counter) -> int:
    """Rough token count of a body's text (system + tools + messages), for progress lines."""
    parts = [b.get("text", "") for b in body.get("system", [])]
    parts += [json.dumps(t) for t in body.get("tools", [])]
    parts += [json.dumps(m["content"]) for m in body.get("messages", [])]
    return sum(count(p) for p in parts)


# ---------------------------------------------------------------------------------------
# Fixture (re)building from the recordings: run once, commit bench/fixtures/session.json.

NOTES = ("# Release notes\n\n- 0.4.2: fix the retry loop in fetch_page(); the backoff now caps at 30 s.\n"
         "- 0.4.1: parse ISO dates with a timezone offset.\n- 0.4.0: add the `--dry-run` flag to the sync command.\n"
         "TODO: the date parser still rejects a trailing 'Z' on Python 3.10.\n")
PYTEST_OUT = ("============================= test session starts ==============================\n"
              "collected 14 items\n\ntests/test_dates.py ....F.                                              [ 42%]\n"
              "tests/test_fetch.py ........                                             [100%]\n\n"
              "=================================== FAILURES ===================================\n"
              "_____________________________ test_parse_utc_suffix _____________________________\n"
              "E       ValueError: Invalid isoformat string: '2026-11-02T10:00:00Z'\n"
              "src/sync/dates.py:18: ValueError\n"
              "=========================== short test summary info ============================\n"
              "FAILED tests/test_dates.py::test_parse_utc_suffix - ValueError: Invalid isoformat string\n"
              "========================= 1 failed, 13 passed in 0.41s =========================\n")
def _numbered(text: str) -> str:
    return "".join(f"{i}\t{line}\n" for i, line in enumerate(text.splitlines(), start=1))


def _tool_use(uid: str, name: str, inp: dict) -> dict:
    return {"type": "tool_use", "id": uid, "name": name, "input": inp}


def _tool_result(uid: str, content) -> dict:
    return {"tool_use_id": uid, "type": "tool_result", "content": content}


def rebuild_fixture(out: Path = FIXTURE) -> dict:
    """Assemble session.json from the recordings plus the scripted conversation."""
    first = json.loads((RECORDINGS / "full_first_turn.json").read_text())
    subrec = [json.loads(line) for line in (RECORDINGS / "subagent_round.jsonl").read_text().splitlines()]
    sub_req = next(r for r in subrec if "x-claude-code-agent-id" in r["headers"])
    fb, sb = first["body"], sub_req["body"]
    keep_headers = ["accept", "content-type", "user-agent", "x-stainless-arch", "x-stainless-lang", "x-stainless-os",
                    "x-stainless-package-version", "x-stainless-retry-count", "x-stainless-runtime",
                    "x-stainless-runtime-version", "x-stainless-timeout", "anthropic-beta",
                    "anthropic-dangerous-direct-browser-access", "anthropic-version", "x-app"]
    cwd = "/home/dev/sync-tool"
    main_user = fb["messages"][0]["content"]
    agent_types = fb["messages"][1]["content"]
    sub_user = sb["messages"][0]["content"]
    fixture = {
        "source": f"Claude Code {CC_VERSION} recordings in tests/fixtures/claude_code/ (see its README.md); "
                  "scripted turns written for the bench",
        "device_id": json.loads(fb["metadata"]["user_id"])["device_id"],
        "headers": {k: first["headers"][k] for k in keep_headers if k in first["headers"]},
        "params": {k: fb[k] for k in ("thinking", "context_management", "output_config", "stream")},
        "main": {
            "model": fb["model"],
            "system": fb["system"][1:],  # without the billing block
            "tools": fb["tools"],
            "reminder": main_user[0]["text"],
            "first_prompt": "What does NOTES.md say about the date parser?",
            # the recorded agent-type list is ~1.6K tokens: keep its first lines
            "system_message": "\n".join(agent_types.splitlines()[:3]),
            "script": [
                {"assistant": [{"type": "text", "text": "I'll read the notes file."},
                               _tool_use("toolu_01Rd", "Read", {"file_path": f"{cwd}/NOTES.md"})],
                 "user": [_tool_result("toolu_01Rd", _numbered(NOTES))]},
                {"assistant": [{"type": "text", "text": "NOTES.md says the date parser still rejects a trailing "
                                                        "'Z' on Python 3.10; the other entries are release notes."}],
                 "user": [{"type": "text", "text": "Run the tests and tell me which one fails, if any."}]},
                {"assistant": [_tool_use("toolu_02Bs", "Bash", {"command": "python -m pytest -q",
                                                                "description": "Run the test suite"})],
                 "user": [_tool_result("toolu_02Bs", [{"type": "text", "text": PYTEST_OUT}])]},
                {"subagent": True,
                 "assistant": [{"type": "text", "text": "One test fails. Let me find every caller of the parser."},
                               _tool_use("toolu_03Ag", "Agent", {"description": "Find parse_date callers",
                                                                 "prompt": "Find every caller of parse_date in "
                                                                           "src/ and report file:line for each.",
                                                                 "subagent_type": "Explore"})],
                 "user": [_tool_result("toolu_03Ag", [{"type": "text", "text":
                          "parse_date is defined in src/sync/dates.py:4 and called from src/sync/client.py:57 "
                          "(server timestamps) and src/sync/cli.py:112 (the --since flag). Both pass strings "
                          "straight from JSON or argv, so a trailing 'Z' reaches fromisoformat unchanged."}])]},
                {"assistant": [{"type": "text", "text": "The failure is test_parse_utc_suffix: fromisoformat on "
                                                        "Python 3.10 does not accept 'Z'. Both callers pass raw "
                                                        "strings, so the fix belongs in parse_date itself."}],
                 "user": [{"type": "text", "text": "Fix it in parse_date and keep the behaviour for offsets."}]},
                {"assistant": [{"type": "text", "text": "I'll strip a trailing 'Z' and replace it with +00:00."},
                               _tool_use("toolu_04Ed", "Edit", {"file_path": f"{cwd}/src/sync/dates.py",
                                                                "old_string": "    return datetime.fromisoformat(text)",
                                                                "new_string": "    if text.endswith(\"Z\"):\n"
                                                                              "        text = text[:-1] + \"+00:00\"\n"
                                                                              "    return datetime.fromisoformat(text)"})],
                 "user": [_tool_result("toolu_04Ed", f"The file {cwd}/src/sync/dates.py has been updated "
                                                     "successfully.")]},
            ],
        },
        "subagent": {
            "model": sb["model"],
            "system": sb["system"][1:],
            "tools": sb["tools"],
            "headers": {"anthropic-beta": sub_req["headers"]["anthropic-beta"]},
            "params": {"thinking": sb["thinking"], "temperature": sb.get("temperature", 1)},
            "reminder": sub_user[-2]["text"],
            "prompt": "Find every caller of parse_date in src/ and report file:line for each.",
            "script": [
                {"assistant": [_tool_use("toolu_s1Bs", "Bash", {"command": "grep -rn 'parse_date' src/",
                                                                "description": "Find parse_date callers"})],
                 "user": [_tool_result("toolu_s1Bs", "src/sync/dates.py:4:def parse_date(text: str) -> datetime:\n"
                                                     "src/sync/client.py:57:        ts = parse_date(item['updated'])\n"
                                                     "src/sync/cli.py:112:    since = parse_date(args.since)\n")]},
            ],
        },
    }
    fixture["title"] = _title_material()
    fixture["fanout"] = _fanout_script(cwd)
    text = fixture["main"]["system"][-1]["text"]
    text = text.replace("/tmp/rec/home_full/work", cwd).replace("/tmp/rec/home_full", "/home/dev")
    fixture["main"]["system"][-1]["text"] = text.replace("-tmp-rec-home-full-work", "-home-dev-sync-tool")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return fixture


def _title_material() -> dict:
    """The interactive session's title request (recorded from 2.1.197 in a terminal, see
    tests/fixtures/claude_code/README.md), with the user's first prompt cut out of its
    `<session>` wrapper so another first prompt can go in."""
    recs = [json.loads(line) for line in (RECORDINGS / "interactive_first_turn.jsonl").read_text().splitlines()]
    posts = [r for r in recs if r["method"] == "POST"]
    title = next(r for r in posts if "format" in (r["body"].get("output_config") or {}))
    turn = next(r for r in posts if r is not title)
    prompt = turn["body"]["messages"][0]["content"][-1]["text"]
    tb = title["body"]
    wrapped = tb["messages"][0]["content"][0]["text"]
    before, after = wrapped.split(prompt)
    return {"model": tb["model"], "system": tb["system"][1:], "tools": tb["tools"],
            "headers": {"anthropic-beta": title["headers"]["anthropic-beta"]},
            "params": {k: tb[k] for k in ("thinking", "output_config", "stream")},
            "session_open": before, "session_close": after,
            "lead_s": round(turn["t"] - title["t"], 3)}  # the title request went out this much earlier


def _fanout_script(cwd: str) -> dict:
    """Scripted content for the fan-out scenario (bench/scenarios.py): a main turn that
    launches three background Explore agents, each doing two tool rounds (Bash, then Read),
    in Claude Code's message shapes. Written for the bench, like the session script."""
    def rounds(uid: str, command: str, desc: str, out: str, path: str, text: str) -> list[dict]:
        return [{"assistant": [_tool_use(f"toolu_{uid}1", "Bash", {"command": command, "description": desc})],
                 "user": [_tool_result(f"toolu_{uid}1", out)]},
                {"assistant": [_tool_use(f"toolu_{uid}2", "Read", {"file_path": f"{cwd}/{path}"})],
                 "user": [_tool_result(f"toolu_{uid}2", _numbered(text))]}]

    siblings = [
        {"description": "Find parse_date callers",
         "prompt": "Find every caller of parse_date in src/ and report file:line for each, with what it passes.",
         "rounds": rounds("f1", "grep -rn 'parse_date' src/", "Find parse_date callers",
                          "src/sync/dates.py:4:def parse_date(text: str) -> datetime:\n"
                          "src/sync/client.py:57:        ts = parse_date(item['updated'])\n"
                          "src/sync/cli.py:112:    since = parse_date(args.since)\n",
                          "src/sync/client.py", "def fetch_items(session, url):\n    items = []\n"
                          "    for item in session.get(url).json()['items']:\n"
                          "        ts = parse_date(item['updated'])\n        items.append((ts, item))\n"
                          "    return sorted(items)\n"),
         "report": "parse_date is called from src/sync/client.py:57 (server timestamps from JSON) and "
                   "src/sync/cli.py:112 (the --since flag); both pass raw strings."},
        {"description": "Find the date parser tests",
         "prompt": "List the tests that cover src/sync/dates.py and say which inputs they use.",
         "rounds": rounds("f2", "grep -rln 'dates' tests/", "Find tests of dates.py",
                          "tests/test_dates.py\ntests/test_cli.py\n",
                          "tests/test_dates.py", "from sync.dates import parse_date\n\n\n"
                          "def test_parse_offset():\n    assert parse_date('2026-11-02T10:00:00+01:00').hour == 10\n\n\n"
                          "def test_parse_utc_suffix():\n    assert parse_date('2026-11-02T10:00:00Z').hour == 10\n"),
         "report": "tests/test_dates.py has test_parse_offset (+01:00) and test_parse_utc_suffix (a trailing "
                   "'Z', the failing one); tests/test_cli.py only checks --since with a plain date."},
        {"description": "Check the parser's history",
         "prompt": "Check the git history and the changelog of src/sync/dates.py for changes to date handling.",
         "rounds": rounds("f3", "git log --oneline -- src/sync/dates.py", "History of dates.py",
                          "9c1e2f4 parse ISO dates with a timezone offset\n41aa0b7 add parse_date\n",
                          "CHANGELOG.md", NOTES),
         "report": "Two commits touch dates.py: 41aa0b7 added parse_date, 9c1e2f4 added offsets (release "
                   "0.4.1). Nothing handles 'Z'; NOTES.md lists it as a TODO for Python 3.10."},
    ]
    return {
        "first_prompt": "The date tests fail. Use agents in the background to look at the callers, the tests "
                        "and the history of the parser while you read the notes file.",
        "launch_text": "I'll start three agents in the background and read the notes meanwhile.",
        "launched": "Async agent launched successfully.\nagentId: {agent_id} (internal ID, do not mention it "
                    "to the user)\nThe agent is working in the background. You will be notified when it "
                    "completes.",
        "own_round": {"assistant": [_tool_use("toolu_f0Rd", "Read", {"file_path": f"{cwd}/NOTES.md"})],
                      "user": [_tool_result("toolu_f0Rd", _numbered(NOTES))]},
        "notice": "<task-notification>\nAgent \"{description}\" ({agent_id}) completed.\nResult: {report}\n"
                  "</task-notification>",
        "siblings": siblings,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Inspect or rebuild the bench workload")
    parser.add_argument("--rebuild", action="store_true", help="regenerate bench/fixtures/session.json")
    parser.add_argument("--target", type=int, default=2000, help="system+tools prefix tokens (default 2000)")
    parser.add_argument("--model", type=Path, help="model dir whose tokenizer.json counts tokens")
    args = parser.parse_args(argv)
    fixture = rebuild_fixture() if args.rebuild else load_fixture()
    count = make_counter(args.model)
    session = build_session(fixture, args.target, count)
    print(f"prefix tokens (estimated): {session.prefix_tokens}")
    prev = 0
    for r in session.requests:
        n = request_tokens(r.body, count)
        print(f"{r.name:8s} {len(json.dumps(r.body)):7d} chars ~{n:6d} tokens"
              f" (+{n - prev if r.agent == 'main' else n})  tools={[t['name'] for t in r.body['tools']]}")
        prev = n if r.agent == "main" else prev


if __name__ == "__main__":
    main()
