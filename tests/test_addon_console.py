"""The console line per API flow (addons/console.py), and the capture's `side` kind for title requests."""

from __future__ import annotations

import json
import logging

from mitmproxy.test import taddons, tflow

from tests.conftest import FIXTURES
from warmturn import protocol, rules
from warmturn.addons.console import Console, summary
from warmturn.addons.state import FlowState, Timings


def test_a_warm_turn_line():
    state = FlowState(kind="messages", t=Timings(request=100.0, first_content=100.79), stop_reason="end_turn",
                      usage={"input_tokens": 1, "cache_read_input_tokens": 365, "cache_creation_input_tokens": 15,
                             "output_tokens": 7},
                      queue_ms=3.2, stripped=[rules.StrippedBlock("^x-anthropic-billing-header:", 0,
                                                                  {"type": "text", "text": "x" * 57})])
    assert summary(state, 200) == ("warmturn: messages 200 end_turn · TTFT 0.79 s · 381 prompt tokens, 95% from cache"
                                   " · queue 3 ms · 7 out · stripped system block 0 (57 chars)")


def test_an_over_context_refusal_line_carries_the_servers_explanation(caplog):
    rec = json.loads((FIXTURES / "claude_code_2.1.332" / "interactive_full.jsonl").read_text().splitlines()[0])
    f = tflow.tflow(resp=True)
    f.response.status_code = 400
    FlowState(kind="messages", error=rec["error"]).attach(f)
    with taddons.context(Console()), caplog.at_level(logging.INFO):
        Console().response(f)
    [line] = [r for r in caplog.records if r.name == "warmturn.addons.console"]
    assert line.levelno == logging.WARNING
    msg = line.getMessage()
    assert msg.startswith("warmturn: messages 400 · prompt is too long: 13940 tokens > 8191 maximum")
    assert "8192-token context" in msg and "SmolLM2" in msg and "README.md, section 'Prompt is too long'" in msg


def test_identity_rewrites_are_summarized():
    body = json.loads((FIXTURES / "claude_code" / "full_first_turn.json").read_text())["body"]
    _, stripped = rules.Rules.make().apply(body)
    line = summary(FlowState(kind="messages", stripped=stripped), 200)
    assert line.endswith("stripped system block 0 (74 chars) · model name canonicalized")


def test_title_request_is_a_side_request():
    """Claude Code 2.1.197's interactive title request (a real capture): structured output, no tools."""
    recs = [json.loads(x) for x in (FIXTURES / "claude_code" / "interactive_title_capture.jsonl").read_text().splitlines()]
    sides = [protocol.side_request(r["request"]["headers"], r["request"]["body"]) for r in recs if r["kind"] == "messages"]
    assert sides.count("title") == 2 and sides.count(None) == 2  # two sessions: title request + first turn each
    turn = json.loads((FIXTURES / "claude_code_2.1.332" / "intercept_p_small.jsonl").read_text().splitlines()[2])
    assert turn["kind"] == "messages"
    assert protocol.side_request(turn["request"]["headers"], turn["request"]["body"]) is None  # request-class main
    assert protocol.side_request({"x-claude-code-request-class": "compact"}, turn["request"]["body"]) == "compact"
