"""Diff consecutive requests: what changed, where the prompts diverge, what to strip.

The published way to find what busts a prompt cache is to capture consecutive requests and
diff the raw payloads. ``diff_records`` automates it over a capture:

* pairs: each request against the previous one of its session and agent (``turn``), the
  first request of each session against the previous session's first (``session``), and
  each subagent's first request against the main agent's latest request before it
  (``subagent``);
* per pair, every changed path (deepdiff of bodies and headers) and the shared prompt prefix
  in model order (characters, and tokens given a tokenizer);
* the changed paths split in two tables: what changes in the prompt (system, tools, message
  content: what a prefix cache sees) and what changes outside it (headers, ``metadata``,
  ``safeguards``, ``diagnostics``, ``cache_control``…: harmless to a KV prefix cache);
* known poisons named, and for volatile text in the system prompt a
  ``--set volatile_fragments=…`` pattern, checked with the addon's own rules engine: it must
  make both versions equal and remove nothing from text that is stable. Patterns come from text
  that changes within one session; between sessions, only per-machine values (paths, dates,
  ids) are generalized into patterns, never one session's stable instructions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from deepdiff import DeepDiff
from deepdiff.helper import notpresent

from warmturn import protocol, rules

from .divergence import Divergence, Tokenizer, divergence
from .sessions import group
from .suggest import Suggestion, pattern_for, suggest  # noqa: F401 - pattern_for: part of this module's API
from .textdiff import changed_lines, changed_middle, clip_value, common_ends, path_around, text_window

# Headers that differ on every request for reasons no cache cares about.
IGNORED_HEADERS = frozenset({"content-length"})
BILLING_PREFIX = "x-anthropic-billing-header:"

POISONS: dict[str, str] = {
    "billing_block": "Claude Code's x-anthropic-billing-header system block (a per-conversation fingerprint; "
                     "cch= and, in first-party mode, cc_prompt_id/cc_prev_req change on every request). "
                     "The addon strips it by default.",
    "date": "a date in the prompt (changes daily).",
    "session_id": "a session/device/request id (uuid or long hex).",
    "environment": "per-session environment (working directory, platform, date, git status). Claude Code "
                   "2.1.197 ends system[2] with it, so a new session re-prefills everything after it; 2.1.332 "
                   "sends it in messages (git status in messages[0], the rest in the role=system messages[1]), "
                   "after the system+tools prefix, which new sessions then share. "
                   "claude --exclude-dynamic-system-prompt-sections moves what is left in the system prompt "
                   "(2.1.332: the memory path in system[2]) into the first user message.",
    "path": "a per-machine path (HOME, working directory, memory directory) in the prompt: it differs between "
            "users and repositories. A pattern that removes just the path keeps the prompt around it shared.",
    "model_identity": "the model's display name or id changed in the prompt (Claude Code 2.1.197 writes "
                      "'Opus 4.8 (1M context)' / '[1m]' in a first -p turn and drops it on --continue; switching "
                      "models mid-session does the same).",
    "system_prompt_changed": "a different system prompt (subagents have their own, and so does a --system-prompt "
                             "run): only the text before it can be shared. Not volatile: nothing to normalize.",
    "tools_reordered": "the same tools in a different order (the tool JSON is part of the cached prefix).",
    "tools_changed": "tool definitions changed (volatile_fragments patterns apply to the system prompt only: fix the "
                     "client or its MCP set).",
    "cache_control_moved": "cache_control breakpoints moved: outside the prompt, harmless to a local prefix "
                           "cache (changes Anthropic-side cache segments only).",
    "content_shape": "message content switched between a string and a block list (harmless when the server "
                     "renders history deterministically).",
    "volatile_header": "a request header that changes per request (2.1.332 first-party mode adds "
                       "x-claude-code-prompt-id, -request-class, -sandy-plover, -prev-tool-durations): outside "
                       "the prompt, harmless to a KV prefix cache (some routers key on headers).",
    "request_field": "a request field outside the prompt changed (safeguards, diagnostics.previous_message_id, "
                     "output_config, max_tokens…): harmless to a KV prefix cache.",
}

# Changes a prefix cache never sees (see in_prompt()), or that the server renders away (a message's
# content as a string or as one text block renders the same): harmless, never listed as poisons.
HARMLESS = frozenset({"cache_control_moved", "volatile_header", "request_field", "session_id", "content_shape"})

_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b|"
                   r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* \d{1,2},? \d{4}\b")
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{16,}\b", re.I)
_ENV = re.compile(r"working directory|current branch|gitstatus|git status|<env>|platform:|os version|"
                  r"is directory a git repo|is a git repository|shell:", re.I)
_MODEL = re.compile(r"model named|model id|co-authored-by|powered by", re.I)


@dataclass
class Change:
    """One changed path between two requests."""

    path: str  # e.g. system[0].text, tools[3], messages[4], headers.x-stainless-retry-count
    action: str  # changed | added | removed | type_changed
    old: Any
    new: Any
    region: str  # prefix (system, tools) | messages | params | headers
    expected: bool = False  # conversation growth: a message appended at the end
    poison: str | None = None
    in_prompt: bool = True  # part of what a prefix cache sees (system, tools, message content)


@dataclass
class PairDiff:
    relation: str  # turn | session | subagent
    arm: str
    session: str
    agent: str
    a_id: str
    b_id: str
    changes: list[Change]
    divergence: Divergence
    a_turn: int = 0  # turn numbers within their session and agent (1-based)
    b_turn: int = 0
    a_session: str = ""
    # As the server sees them (prompts rendered by its chat template, given a ``Served``): the prompt
    # tokens the two share, b's prompt length, and what b read from the prefix cache, which holds every
    # earlier request, not only a: the reported cache_read_input_tokens, else whatif's prediction.
    shared_tokens: int | None = None
    prompt_tokens: int | None = None
    cache_read: int | None = None
    cache_read_source: str | None = None  # "reported" | "predicted"

    @property
    def paths(self) -> list[str]:
        return [c.path for c in self.changes]

    @property
    def label(self) -> str:
        """The pair by session and turn, e.g. ``session 3f1266f8579c main turn 1→2``."""
        if self.relation == "turn":
            return f"session {self.session[:12]} {self.agent[:12]} turn {self.a_turn}→{self.b_turn}"
        if self.relation == "session":
            return f"session {self.a_session[:12]}→{self.session[:12]} first turns"
        return f"session {self.session[:12]} main turn {self.a_turn}→subagent {self.agent[:12]}"


@dataclass
class VolatilePath:
    path: str
    region: str
    count: int
    relations: list[str]
    example_old: Any
    example_new: Any
    expected: bool
    poison: str | None
    in_prompt: bool = True


@dataclass
class DiffReport:
    pairs: list[PairDiff]
    volatile: list[VolatilePath]
    poisons: dict[str, int]
    suggestions: list[Suggestion]
    stripped: dict[str, int]  # what the addon already removed: pattern -> count
    unsuggested: list[str] = field(default_factory=list)  # prompt paths that still differ, with the reason
    outside: list[VolatilePath] = field(default_factory=list)  # changes outside the prompt: harmless
    side: dict[str, int] = field(default_factory=dict)  # side requests (title…) left out of the pairs
    canonical_identity: list[str] = field(default_factory=list)  # model-identity changes the addon already fixes

    def prompt_poisons(self) -> dict[str, int]:
        """The known poisons among the prompt's changes, most frequent first (harmless kinds left out)."""
        out: dict[str, int] = {}
        for p in self.pairs:
            for c in p.changes:
                if c.poison and c.in_prompt and c.poison not in HARMLESS:
                    out[c.poison] = out.get(c.poison, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def as_dict(self) -> dict:
        return {
            "pairs": [{**{k: v for k, v in asdict(p).items() if k not in ("changes", "divergence")},
                       "label": p.label, "changes": [asdict(c) for c in p.changes],
                       "divergence": p.divergence.as_dict()}
                      for p in self.pairs],
            "volatile": [asdict(v) for v in self.volatile],
            "outside_prompt": [asdict(v) for v in self.outside],
            "side_requests": self.side,
            "canonical_identity": self.canonical_identity,
            "poisons": {k: {"count": n, "meaning": POISONS.get(k, "")} for k, n in self.poisons.items()},
            "suggestions": [{**asdict(s), "set_arg": s.set_arg} for s in self.suggestions],
            "stripped_by_addon": self.stripped,
            "unsuggested": self.unsuggested,
        }


# --------------------------------------------------------------------------- changes


def format_path(keys: Sequence) -> str:
    out = ""
    for k in keys:
        if isinstance(k, int):
            out += f"[{k}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
            out += ("." if out else "") + str(k)
        else:
            out += f"[{str(k)!r}]"
    return out


def in_prompt(keys: Sequence) -> bool:
    """Whether a request path is part of the prompt a prefix cache sees.

    The prompt is the system text, the tools and the messages' roles and content. Everything
    else (headers, ``metadata``, ``safeguards``, ``diagnostics``, ``output_config`` and other
    parameters, ``cache_control`` marks, extra keys on a message such as 2.1.332's
    ``output_config`` inside role=system messages) never reaches the KV cache.
    """
    if not keys or keys[0] not in ("system", "tools", "messages") or "cache_control" in keys:
        return False
    return not (keys[0] in ("system", "messages") and len(keys) >= 3 and keys[2] not in ("text", "type", "content", "role"))


def _region(keys: Sequence) -> str:
    top = keys[0] if keys else ""
    if top in ("system", "tools"):
        return "prefix"
    if top == "messages":
        return "messages"
    if top == "headers":
        return "headers"
    return "params"


_ACTIONS = {
    "values_changed": "changed", "type_changes": "type_changed",
    "dictionary_item_added": "added", "iterable_item_added": "added", "attribute_added": "added",
    "dictionary_item_removed": "removed", "iterable_item_removed": "removed", "attribute_removed": "removed",
    "set_item_added": "added", "set_item_removed": "removed",
}


def diff_payloads(a_body: dict, b_body: dict, a_headers: dict | None = None, b_headers: dict | None = None) -> list[Change]:
    """Every path that differs between two requests (bodies, then headers), nothing else."""
    changes: list[Change] = []
    n_old_msgs = len(a_body.get("messages") or [])
    tree = DeepDiff(a_body, b_body, view="tree", verbose_level=2, exclude_paths=["root['tools']"])
    for keys, action, old, new in _tree_changes(tree):
        expected = (action == "added" and len(keys) == 2 and keys[0] == "messages"
                    and isinstance(keys[1], int) and keys[1] >= n_old_msgs)
        changes.append(Change(format_path(keys), action, old, new, _region(keys), expected, in_prompt=in_prompt(keys)))
    changes.extend(_diff_tools(a_body.get("tools"), b_body.get("tools")))
    ha = {k: v for k, v in (a_headers or {}).items() if k not in IGNORED_HEADERS}
    hb = {k: v for k, v in (b_headers or {}).items() if k not in IGNORED_HEADERS}
    for name in sorted(set(ha) | set(hb)):
        if ha.get(name) != hb.get(name):
            action = "added" if name not in ha else "removed" if name not in hb else "changed"
            changes.append(Change(f"headers.{name}", action, ha.get(name), hb.get(name), "headers", in_prompt=False))
    for c in changes:
        c.poison = c.poison or classify(c)
    changes.sort(key=lambda c: _sort_key(c.path))
    return changes


def _tree_changes(tree) -> list[tuple[list, str, Any, Any]]:
    out = []
    for report_type, levels in tree.items():
        action = _ACTIONS.get(report_type, report_type)
        for level in levels:
            out.append((level.path(output_format="list"), action,
                        None if level.t1 is notpresent else level.t1, None if level.t2 is notpresent else level.t2))
    return out


def _tool_name(t: Any, i: int) -> str:
    return str(t.get("name")) if isinstance(t, dict) and t.get("name") is not None else f"#{i}"


def _diff_tools(a: Any, b: Any) -> list[Change]:
    """Tools compared by name: one change for the list (added/removed/reordered), then per tool.

    Same names in the same order give exact deepdiff paths (``tools[3].description``); a
    different tool set gives one ``tools`` change naming what was added and removed instead of
    a cascade of index-shifted differences.
    """
    a = a if isinstance(a, list) else ([] if a is None else [a])
    b = b if isinstance(b, list) else ([] if b is None else [b])
    if a == b:
        return []
    names_a = [_tool_name(t, i) for i, t in enumerate(a)]
    names_b = [_tool_name(t, i) for i, t in enumerate(b)]
    out: list[Change] = []
    if names_a != names_b:
        added = [n for n in names_b if n not in names_a]
        removed = [n for n in names_a if n not in names_b]
        if not added and not removed:
            out.append(Change("tools", "reordered", names_a, names_b, "prefix", poison="tools_reordered"))
        else:
            out.append(Change("tools", "changed", {"removed": removed}, {"added": added}, "prefix",
                              poison="tools_changed"))
    index_a = {n: i for i, n in enumerate(names_a)}
    for j, name in enumerate(names_b):
        i = index_a.get(name)
        if i is None or a[i] == b[j]:
            continue
        tree = DeepDiff(a[i], b[j], view="tree", verbose_level=2)
        for keys, action, old, new in _tree_changes(tree):
            path = ["tools", j, *keys]
            out.append(Change(format_path(path), action, old, new, "prefix", in_prompt=in_prompt(path),
                              poison="tools_changed" if in_prompt(path) else None))
    return out


def _sort_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[\[\]\.]+", path) if p]


def classify(c: Change) -> str | None:
    """The known poison a change is an instance of, if any."""
    texts = [t for t in (c.old, c.new) if isinstance(t, str)]
    blocks = [t.get("text") for t in (c.old, c.new) if isinstance(t, dict) and isinstance(t.get("text"), str)]
    if any(t.lstrip().startswith(BILLING_PREFIX) for t in texts + blocks) and c.path.startswith("system"):
        return "billing_block"
    if "cache_control" in c.path:
        return "cache_control_moved"
    if c.region == "headers":
        return "session_id" if "session-id" in c.path else "volatile_header"
    if c.path.startswith("metadata"):
        return "session_id"
    if not c.in_prompt:
        return "request_field"
    if c.action == "type_changed" and c.region == "messages" and c.path.endswith("content"):
        return "content_shape"
    if c.path.startswith("tools"):
        return "tools_changed"
    if len(texts) == 2:
        return _text_kind(*texts, system=c.path.startswith("system"))
    if len(blocks) == 2:
        return _text_kind(*blocks, system=c.path.startswith("system"))
    return None


def _text_kind(old: str, new: str, system: bool) -> str | None:
    """The poison behind the changed lines of a text: the first of environment, date, model
    identity, id and path that any changed line shows (a wholly different text: a new prompt)."""
    pairs, single = changed_lines(old, new)
    changed = sum(len(a) + len(b) for a, b in pairs) + sum(map(len, single))
    if system and changed > max(1000, 0.5 * (len(old) + len(new))):  # most of a long prompt changed
        return "system_prompt_changed"
    kinds = set()
    for a, b in pairs:
        i, j = common_ends(a, b)
        mid_a, mid_b = a[i: len(a) - j], b[i: len(b) - j]
        window_a, window_b = text_window(a, mid_a), text_window(b, mid_b)
        if _ENV.search(a) or _ENV.search(b):
            kinds.add("environment")
        if _DATE.search(window_a) and _DATE.search(window_b):
            kinds.add("date")
        if _MODEL.search(a) and _MODEL.search(b) and difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio() > 0.8:
            kinds.add("model_identity")  # the same model line, naming the model a little differently
        if _ID.search(window_a) or _ID.search(window_b):
            kinds.add("session_id")
        if path_around(a, i, len(a) - j) or path_around(b, i, len(b) - j):
            kinds.add("path")
    for line in single:
        if _ENV.search(line):
            kinds.add("environment")
    for kind in ("environment", "date", "model_identity", "session_id", "path"):
        if kind in kinds:
            return kind
    if system and (single or pairs) and changed > 0.5 * (len(old) + len(new)):
        return "system_prompt_changed"
    return None


# --------------------------------------------------------------------------- pairs


def make_pairs(records: Sequence[dict]) -> list[tuple[str, dict, dict]]:
    """``(relation, a, b)`` pairs: turns, session starts, subagents vs the main agent.

    Each record gets ``turn``, its 1-based number within its session and agent. Side requests
    (the title request) are no turn: they are in no pair."""
    groups = group(records)
    pairs: list[tuple[str, dict, dict]] = []
    for recs in groups.values():
        for n, r in enumerate(recs, 1):
            r["turn"] = n
        pairs.extend(("turn", a, b) for a, b in pairwise(recs))
    # first requests of each session's main agent, in time order, per arm
    by_arm: dict[str, list[dict]] = {}
    for (arm, _session, agent), recs in groups.items():
        if agent == "main":
            by_arm.setdefault(arm, []).append(recs[0])
    for firsts in by_arm.values():
        firsts.sort(key=lambda r: ((r.get("t") or {}).get("request") or 0.0, r["line"]))
        pairs.extend(("session", a, b) for a, b in pairwise(firsts))
    for (arm, session, agent), recs in groups.items():
        if agent == "main":
            continue
        main = groups.get((arm, session, "main"))
        if not main:
            continue
        t_sub = (recs[0].get("t") or {}).get("request")
        before = [m for m in main if t_sub is None or ((m.get("t") or {}).get("request") or 0) <= t_sub]
        pairs.append(("subagent", (before or main)[-1], recs[0]))
    return pairs


def match_session(records: Sequence[dict], prefix: str) -> str:
    """The one session id that starts with ``prefix`` (the diff table prints 12 characters).

    Raises ValueError when none or several match."""
    sessions = sorted({r["session"] for r in records if r.get("session")})
    hits = [s for s in sessions if s.startswith(prefix)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ValueError(f"no session starts with {prefix!r}; sessions: {', '.join(s[:12] for s in sessions) or 'none'}")
    raise ValueError(f"{prefix!r} is ambiguous: it starts {', '.join(hits)}")


def diff_records(records: Sequence[dict], tokenizer: Tokenizer | None = None, session: str | None = None,
                 original: bool = False, served: Any = None) -> DiffReport:
    """Diff a capture's requests. ``original`` diffs what the client sent instead of what was
    forwarded; ``session`` (a session id or a prefix of one) keeps the pairs involving it;
    ``served`` (a :class:`~warmturn.analysis.whatif.Served`) adds each pair's shared prompt tokens
    as the server renders them and what the later request read from the prefix cache."""
    pairs_out: list[PairDiff] = []
    compared: list[tuple[PairDiff, dict, dict]] = []
    tok_cache: dict = {}
    all_pairs = make_pairs(records)
    if session:
        session = match_session([r for r in records if r.get("kind") == "messages"], session)
    body_key, head_key = ("original", "original_headers") if original else ("body", "headers")
    seen = served.replay(records, original) if served is not None else {}
    for relation, a, b in all_pairs:
        if session and session not in (a["session"], b["session"]):
            continue
        ab, bb = a.get(body_key) or a["body"], b.get(body_key) or b["body"]
        changes = diff_payloads(ab, bb, a.get(head_key), b.get(head_key))
        div = divergence(ab, bb, tokenizer, tok_cache)
        pd_ = PairDiff(relation, str(b.get("arm")), b["session"], b["agent"], a["id"], b["id"], changes, div,
                       a.get("turn", 0), b.get("turn", 0), a["session"])
        if b["id"] in seen:
            ta, (tb, read, source) = seen.get(a["id"], (None, 0, None))[0], seen[b["id"]]
            pd_.prompt_tokens, pd_.cache_read, pd_.cache_read_source = len(tb), read, source
            pd_.shared_tokens = served.shared(ta, tb) if ta is not None else None
        pairs_out.append(pd_)
        compared.append((pd_, ab, bb))
    stripped: dict[str, int] = {}
    side: dict[str, int] = {}
    for r in records:
        for e in r.get("stripped") or []:
            key = rules.stripped_from_json(e).label  # entries were validated when loaded
            stripped[key] = stripped.get(key, 0) + 1
        if r.get("kind") == "messages" and (not session or r.get("session") == session):
            kind = r.get("side") or protocol.side_request(r.get("original_headers") or r.get("headers"),
                                                          r.get("original") or r.get("body"))
            if kind:
                side[kind] = side.get(kind, 0) + 1
    poisons: dict[str, int] = {}
    for p in pairs_out:
        for c in p.changes:
            if c.poison:
                poisons[c.poison] = poisons.get(c.poison, 0) + 1
    suggestions, unsuggested, canonical = suggest(compared)
    rows = aggregate(pairs_out)
    return DiffReport(pairs_out, [r for r in rows if r.in_prompt], poisons, suggestions, stripped, unsuggested,
                      [r for r in rows if not r.in_prompt], side, canonical)


def aggregate(pairs: Sequence[PairDiff]) -> list[VolatilePath]:
    """The changed-path table: one row per path (appended messages folded into ``messages[+]``)."""
    rows: dict[str, VolatilePath] = {}
    for p in pairs:
        for c in p.changes:
            key = "messages[+]" if c.expected else c.path
            row = rows.get(key)
            if row is None:
                old, new = c.old, c.new
                if isinstance(old, str) and isinstance(new, str):
                    old, new = changed_middle(old, new)
                row = rows[key] = VolatilePath(key, c.region, 0, [], clip_value(old), clip_value(new), c.expected,
                                               c.poison, c.in_prompt)
            row.count += 1
            row.poison = row.poison or c.poison
            if p.relation not in row.relations:
                row.relations.append(p.relation)
    order = {"prefix": 0, "headers": 1, "params": 2, "messages": 3}
    return sorted(rows.values(), key=lambda r: (r.expected, order.get(r.region, 9), -r.count, r.path))
