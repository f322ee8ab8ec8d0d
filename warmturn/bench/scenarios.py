"""The concurrent replay's scenarios: Claude Code's concurrency, built from the recorded requests.

A scenario is a small graph of requests: each `Node` starts once the nodes it comes `after`
have finished (an agent's next request waits for its previous answer, as a tool round does),
plus an optional delay; nodes with no pending dependency run at the same time. The bodies
come from `bench/fixtures/session.json` (recorded Claude Code 2.1.197 payloads, shrunk to the
bench's prefix size by `bench.workload`), in three shapes the issue names:

- `a`  the start of an interactive 2.1.197 session: the title request (recorded in a
       terminal: `output_config.format` json_schema, no tools) and, 1.1 s later as recorded,
       the first turn, in flight together;
       `a-alone` is the same first turn with nothing beside it (the ratio's denominator);
- `b`  a fan-out as 2.1.332 does it: the main turn launches 3 background subagents that share
       one subagent prefix (system + tools) and each do 2 tool rounds, while the main agent does
       its own tool round; a last main request carries their completion notices;
- `c`  4 independent sessions at once (same system + tools, different first prompts), 4 turns each;
- `scale` decode throughput: rounds of 1 stream alone, then 4 streams at once (short prompts, long output).

Every replay request is greedy (`temperature` 0) with a fixed `max_tokens`, so every server is
asked for the same work. Pure: nothing here touches the network.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

from warmturn.bench.workload import (
    MAIN_TOOL_ORDER,
    SUB_TOOL_ORDER,
    BenchRequest,
    Counter,
    _compacted,
    _settle,
    _tool_result,
    _tool_use,
    _user_blocks,
    build_session,
    new_session_id,
    request_body,
    session_identity,
    shrink_prefix,
)

SCENARIOS = ("a-alone", "a", "b", "c", "scale")
SCALE_PROMPTS = [
    # every stream must decode its max_tokens, on the plain default model and on the one with the
    # Read adapter (checked to 256 tokens, greedy, repetition guard off): a prompt answered in 15
    # tokens makes "4 streams" fewer for most of the window. Counting prompts that stopped early
    # on one of them: "Count from 1 to 300 …", "Count down from 400 to 1 …", "List the numbers
    # from 1 to 500 …", "Write the numbers from 500 to 800 separated by commas."
    "List the multiples of 3 from 3 to 900, one per line.",
    "List the multiples of 4 from 4 to 800, one per line.",
    "List the numbers from 1000 to 1500, one per line.",
    "List the even numbers from 2 to 600, one per line.",
    "List the odd numbers from 1 to 599, one per line.",
]


@dataclass
class Node:
    """One request of a scenario, with what must finish before it starts."""

    request: BenchRequest
    after: tuple[str, ...] = ()
    delay_s: float = 0.0  # after its dependencies are done (or after the scenario's start)
    role: str = ""  # "first-turn", "title", "subagent", "stream", ... (how the summary groups it)

    @property
    def name(self) -> str:
        return self.request.name


@dataclass
class Scenario:
    key: str
    title: str
    nodes: list[Node]
    notes: dict = field(default_factory=dict)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def _greedy(req: BenchRequest, max_tokens: int) -> BenchRequest:
    req.body["temperature"] = 0.0
    req.body["max_tokens"] = max_tokens
    return req


def title_request(fixture: dict, first_prompt: str, headers: dict[str, str], max_tokens: int) -> BenchRequest:
    """The recorded title request, wrapping `first_prompt` as Claude Code does."""
    t = fixture["title"]
    text = f"{t['session_open']}{first_prompt}{t['session_close']}"
    body = {"model": t["model"], "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
            "system": copy.deepcopy(t["system"]), "tools": copy.deepcopy(t["tools"])}
    body.update(copy.deepcopy(t["params"]))
    return _greedy(BenchRequest("title", "title", 1, body, dict(headers, **t["headers"])), max_tokens)


def interactive_start(fixture: dict, target: int, count: Counter, max_tokens: int, title_max_tokens: int,
                      alone: bool = False, compact: bool = False) -> Scenario:
    """(a): the title request and, as recorded (~1.1 s later), the first turn, both in flight
    together (`alone`: the first turn only). The first turn's TTFT counts from its own send."""
    session = build_session(fixture, target, count, max_tokens=max_tokens, main_turns=1, subagent=False,
                            compact=compact)
    first = _greedy(session.requests[0], max_tokens)
    nodes = [Node(first, role="first-turn")]
    if not alone:
        prompt = fixture["main"]["first_prompt"]
        nodes.insert(0, Node(title_request(fixture, prompt, first.headers, title_max_tokens), role="title"))
        nodes[1].delay_s = fixture["title"]["lead_s"]  # as recorded: the title request goes out first
    key = "a-alone" if alone else "a"
    what = "the first turn alone" if alone else "title request + first turn together (2.1.197 interactive start)"
    return Scenario(key, what, nodes)


def fan_out(fixture: dict, target: int, count: Counter, max_tokens: int, seed: int = 0,
            compact: bool = False) -> Scenario:
    """(b): main-1 asks for the work; its answer launches 3 background Explore agents (main-2
    carries the "launched" results and goes on with its own Read round: main-3), each agent
    does 2 tool rounds (3 requests), and main-4 carries the 3 completion notices."""
    rng = random.Random(f"fanout-{seed}")
    fo, main, sub = fixture["fanout"], fixture["main"], fixture["subagent"]
    if compact:  # short reminders and messages, as build_session(compact=True)
        main, sub = _compacted(main), _compacted(sub)
    m_system, m_tools, m_tokens = shrink_prefix(main["system"], main["tools"], target, count, MAIN_TOOL_ORDER)
    s_system, s_tools, s_tokens = shrink_prefix(sub["system"], sub["tools"], max(64, target // 2), count,
                                                SUB_TOOL_ORDER)
    metadata, base_headers = session_identity(fixture, new_session_id(rng))

    def body(model, system, tools, messages, params) -> dict:
        return request_body(model, system, tools, messages, params, metadata)

    nodes: list[Node] = []
    history = [{"role": "user", "content": _user_blocks([main["reminder"], fo["first_prompt"]])},
               {"role": "system", "content": main["system_message"]}]

    def main_node(n: int, after: tuple[str, ...]) -> None:
        req = BenchRequest(f"main-{n}", "main", n, body(main["model"], m_system, m_tools, history, fixture["params"]),
                           dict(base_headers))
        nodes.append(Node(_greedy(req, max_tokens), after=after, role="main"))

    main_node(1, ())
    agent_ids = [f"a{rng.getrandbits(64):016x}" for _ in fo["siblings"]]
    launch = [{"type": "text", "text": fo["launch_text"]}]
    launch += [_tool_use(f"toolu_fA{i}", "Agent", {"description": s["description"], "prompt": s["prompt"],
                                                   "subagent_type": "Explore", "run_in_background": True})
               for i, s in enumerate(fo["siblings"])]
    _settle(history)
    history += [{"role": "assistant", "content": launch},
                {"role": "user", "content": [_tool_result(f"toolu_fA{i}", fo["launched"].format(agent_id=a))
                                             for i, a in enumerate(agent_ids)]}]
    main_node(2, ("main-1",))
    _settle(history)
    history += [{"role": "assistant", "content": copy.deepcopy(fo["own_round"]["assistant"])},
                {"role": "user", "content": copy.deepcopy(fo["own_round"]["user"])}]
    main_node(3, ("main-2",))

    sub_params = dict(fixture["params"], **sub["params"])  # as build_session: main's, then the subagent's
    last_of_agent = []
    for i, (sib, agent_id) in enumerate(zip(fo["siblings"], agent_ids, strict=True), start=1):
        headers = dict(base_headers, **sub["headers"], **{"x-claude-code-agent-id": agent_id})
        sub_history = [{"role": "user", "content": _user_blocks([sub["reminder"], sib["prompt"]])}]
        prev: tuple[str, ...] = ("main-1",)  # launched when main-1's answer (the Agent calls) arrives
        for turn in range(1, len(sib["rounds"]) + 2):
            if turn > 1:
                step = sib["rounds"][turn - 2]
                _settle(sub_history)
                sub_history += [{"role": "assistant", "content": copy.deepcopy(step["assistant"])},
                                {"role": "user", "content": copy.deepcopy(step["user"])}]
            name = f"sub{i}-{turn}"
            req = BenchRequest(name, f"subagent-{i}", turn,
                               body(sub["model"], s_system, s_tools, sub_history, sub_params), headers)
            nodes.append(Node(_greedy(req, max_tokens), after=prev, role="subagent"))
            prev = (name,)
        last_of_agent.append(prev[0])

    _settle(history)
    history += [{"role": "assistant", "content": [{"type": "text", "text": "Waiting for the agents."}]},
                {"role": "user", "content": [{"type": "text", "text": fo["notice"].format(
                    description=s["description"], agent_id=a, report=s["report"])}
                    for s, a in zip(fo["siblings"], agent_ids, strict=True)]}]
    main_node(4, ("main-3", *last_of_agent))
    return Scenario("b", "fan-out: main turn + 3 background subagents (shared prefix, 2 tool rounds each)",
                    nodes, {"prefix_tokens": {"main": m_tokens, "subagent": s_tokens}})


def parallel_sessions(fixture: dict, target: int, count: Counter, max_tokens: int, sessions: int = 4,
                      turns: int = 4, compact: bool = False) -> Scenario:
    """(c): `sessions` independent sessions started together, `turns` main turns each."""
    nodes: list[Node] = []
    for tag in "abcdefghijklmnop"[:sessions]:
        s = build_session(fixture, target, count, max_tokens=max_tokens, main_turns=turns, subagent=False,
                          session_tag=tag, compact=compact)
        prev: tuple[str, ...] = ()
        for req in s.requests:
            req.name = f"{tag}/{req.name}"
            req.agent = f"session-{tag}"
            nodes.append(Node(_greedy(req, max_tokens), after=prev, role="turn"))
            prev = (req.name,)
    return Scenario("c", f"{sessions} independent sessions at once, {turns} turns each", nodes)


def decode_streams(max_tokens: int, streams: int = 4, rounds: int = 3) -> Scenario:
    """`scale`: a warm-up stream, then `rounds` rounds of one stream alone (`solo-<r>`) followed by
    `streams` at once (`r<r>-s1`…), short distinct prompts asking for long counts. Each round's
    ratio pairs a burst with the solo run just before it, so a machine that slows down between
    rounds moves both (targets.scale_figures takes the median over rounds)."""
    def req(name: str, prompt: str, tokens: int = max_tokens) -> BenchRequest:
        body = {"model": "claude-opus-4-8", "max_tokens": tokens, "temperature": 0.0, "stream": True,
                "messages": [{"role": "user", "content": prompt}]}
        return BenchRequest(name, name, 1, body, {"anthropic-version": "2023-06-01"})

    # the first decode after start-up may pay one-off costs: a short warm-up stream goes first, uncounted
    nodes = [Node(req("warm-up", SCALE_PROMPTS[-1], min(16, max_tokens)), role="warm-up")]
    before: tuple[str, ...] = ("warm-up",)
    for r in range(1, rounds + 1):
        nodes.append(Node(req(f"solo-{r}", SCALE_PROMPTS[-1]), after=before, delay_s=0.5, role="solo"))
        burst = [f"r{r}-s{i + 1}" for i in range(streams)]
        nodes += [Node(req(name, SCALE_PROMPTS[i % (len(SCALE_PROMPTS) - 1)]), after=(f"solo-{r}",), delay_s=1.0,
                       role="stream") for i, name in enumerate(burst)]
        before = tuple(burst)
    return Scenario("scale", f"decode: {rounds} rounds of 1 stream alone, then {streams} at once", nodes)


def scale_round(name: str) -> int | None:
    """The round a `scale` request belongs to (`solo-2` and `r2-s3` -> 2), None for the warm-up."""
    head = name.split("/")[-1].split("-")
    if head[0] == "solo" and len(head) == 2 and head[1].isdigit():
        return int(head[1])
    if head[0][:1] == "r" and head[0][1:].isdigit():
        return int(head[0][1:])
    return None


def build_scenarios(keys: list[str], fixture: dict, target: int, count: Counter, max_tokens: int,
                    title_max_tokens: int, decode_tokens: int, compact: bool = False,
                    scale_rounds: int = 3) -> list[Scenario]:
    """The scenarios named in `keys`; `compact` shortens reminders and tool results (the smoke run)."""
    out = []
    for key in keys:
        if key in ("a", "a-alone"):
            out.append(interactive_start(fixture, target, count, max_tokens, title_max_tokens,
                                         alone=key == "a-alone", compact=compact))
        elif key == "b":
            out.append(fan_out(fixture, target, count, max_tokens, compact=compact))
        elif key == "c":
            out.append(parallel_sessions(fixture, target, count, max_tokens, compact=compact))
        elif key == "scale":
            out.append(decode_streams(decode_tokens, rounds=scale_rounds))
        else:
            raise ValueError(f"unknown scenario {key!r} (known: {', '.join(SCENARIOS)})")
    return out
