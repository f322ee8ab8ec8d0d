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
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deepdiff import DeepDiff
from deepdiff.helper import notpresent

from warmturn import identity, protocol, rules

from .divergence import Divergence, Tokenizer, divergence
from .sessions import group

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

# Changes a prefix cache never sees: listed apart as harmless (see in_prompt()).
HARMLESS = frozenset({"cache_control_moved", "volatile_header", "request_field", "session_id"})

_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b|"
                   r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* \d{1,2},? \d{4}\b")
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{16,}\b", re.I)
_ENV = re.compile(r"working directory|current branch|gitstatus|git status|<env>|platform:|os version|"
                  r"is directory a git repo|is a git repository|shell:", re.I)
_MODEL = re.compile(r"model named|model id|co-authored-by|powered by", re.I)
_PATH = re.compile(r"(?<![\w.])(?:~|/)[\w.@%+~-]*(?:/[\w.@%+~-]*)+")


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
class Suggestion:
    """A normalization pattern that removes volatile text seen at ``path``."""

    path: str
    pattern: str
    option: str  # the addon option it belongs to
    poison: str | None
    example_old: str
    example_new: str

    @property
    def set_arg(self) -> str:
        return "--set " + shlex.quote(f"{self.option}={self.pattern}")


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
    if keys[0] in ("system", "messages") and len(keys) >= 3 and keys[2] not in ("text", "type", "content", "role"):
        return False
    return True


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


def _common_ends(old: str, new: str) -> tuple[int, int]:
    """Lengths of the common prefix and of the common suffix (not overlapping it) of two strings."""
    i = 0
    n = min(len(old), len(new))
    while i < n and old[i] == new[i]:
        i += 1
    j = 0
    while j < n - i and old[-1 - j] == new[-1 - j]:
        j += 1
    return i, j


def _changed_middle(old: str, new: str) -> tuple[str, str]:
    i, j = _common_ends(old, new)
    return old[i: len(old) - j], new[i: len(new) - j]


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


def _changed_lines(old: str, new: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(replaced line pairs, lines only one side has) between two texts, matched by difflib."""
    la, lb = old.splitlines(), new.splitlines()
    pairs: list[tuple[str, str]] = []
    single: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=la, b=lb, autojunk=False).get_opcodes():
        if tag == "replace":
            pairs.extend(zip(la[i1:i2], lb[j1:j2]))
            single.extend(la[i1 + (j2 - j1):i2] + lb[j1 + (i2 - i1):j2])
        elif tag != "equal":
            single.extend(la[i1:i2] + lb[j1:j2])
    return pairs, single


def _text_kind(old: str, new: str, system: bool) -> str | None:
    """The poison behind the changed lines of a text: the first of environment, date, model
    identity, id and path that any changed line shows (a wholly different text: a new prompt)."""
    pairs, single = _changed_lines(old, new)
    changed = sum(len(a) + len(b) for a, b in pairs) + sum(map(len, single))
    if system and changed > max(1000, 0.5 * (len(old) + len(new))):  # most of a long prompt changed
        return "system_prompt_changed"
    kinds = set()
    for a, b in pairs:
        i, j = _common_ends(a, b)
        mid_a, mid_b = a[i: len(a) - j], b[i: len(b) - j]
        window_a, window_b = _window(a, mid_a), _window(b, mid_b)
        if _ENV.search(a) or _ENV.search(b):
            kinds.add("environment")
        if _DATE.search(window_a) and _DATE.search(window_b):
            kinds.add("date")
        if _MODEL.search(a) and _MODEL.search(b) and difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio() > 0.8:
            kinds.add("model_identity")  # the same model line, naming the model a little differently
        if _ID.search(window_a) or _ID.search(window_b):
            kinds.add("session_id")
        if _path_around(a, i, len(a) - j) or _path_around(b, i, len(b) - j):
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


def _path_around(line: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of the path that ``line[start:end]`` (the changed part, maybe empty) sits in, if any."""
    for m in _PATH.finditer(line):
        if m.start() <= start and end <= m.end():
            return m.span()
    return None


def _window(text: str, mid: str, pad: int = 12) -> str:
    i = text.find(mid) if mid else -1
    if i < 0:
        return mid
    return text[max(0, i - pad): i + len(mid) + pad]


def _line_of(text: str, mid: str) -> str:
    i = text.find(mid) if mid else -1
    if i < 0:
        return ""
    start = text.rfind("\n", 0, i) + 1
    end = text.find("\n", i + len(mid))
    return text[start: end if end >= 0 else len(text)]


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
        pairs.extend(("turn", a, b) for a, b in zip(recs, recs[1:]))
    # first requests of each session's main agent, in time order, per arm
    by_arm: dict[str, list[dict]] = {}
    for (arm, _session, agent), recs in groups.items():
        if agent == "main":
            by_arm.setdefault(arm, []).append(recs[0])
    for firsts in by_arm.values():
        firsts.sort(key=lambda r: ((r.get("t") or {}).get("request") or 0.0, r["line"]))
        pairs.extend(("session", a, b) for a, b in zip(firsts, firsts[1:]))
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
                 original: bool = False) -> DiffReport:
    """Diff a capture's requests. ``original`` diffs what the client sent instead of what was
    forwarded; ``session`` (a session id or a prefix of one) keeps the pairs involving it."""
    pairs_out: list[PairDiff] = []
    compared: list[tuple[PairDiff, dict, dict]] = []
    tok_cache: dict = {}
    all_pairs = make_pairs(records)
    if session:
        session = match_session([r for r in records if r.get("kind") == "messages"], session)
    body_key, head_key = ("original", "original_headers") if original else ("body", "headers")
    for relation, a, b in all_pairs:
        if session and session not in (a["session"], b["session"]):
            continue
        ab, bb = a.get(body_key) or a["body"], b.get(body_key) or b["body"]
        changes = diff_payloads(ab, bb, a.get(head_key), b.get(head_key))
        div = divergence(ab, bb, tokenizer, tok_cache)
        pd_ = PairDiff(relation, str(b.get("arm")), b["session"], b["agent"], a["id"], b["id"], changes, div,
                       a.get("turn", 0), b.get("turn", 0), a["session"])
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


def _clip_value(v: Any, n: int = 80) -> Any:
    """Long strings and containers cut to ``n`` characters for display; other values as they are."""
    if isinstance(v, str) and len(v) > n:
        return v[: n - 1] + "…"
    if isinstance(v, (dict, list)):
        s = repr(v)
        return s if len(s) <= n else s[: n - 1] + "…"
    return v


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
                    old, new = _changed_middle(old, new)
                row = rows[key] = VolatilePath(key, c.region, 0, [], _clip_value(old), _clip_value(new), c.expected,
                                               c.poison, c.in_prompt)
            row.count += 1
            row.poison = row.poison or c.poison
            if p.relation not in row.relations:
                row.relations.append(p.relation)
    order = {"prefix": 0, "headers": 1, "params": 2, "messages": 3}
    return sorted(rows.values(), key=lambda r: (r.expected, order.get(r.region, 9), -r.count, r.path))


# --------------------------------------------------------------------------- suggestions


def _token_class(parts: Sequence[str]) -> str:
    joined = "".join(parts)
    if re.fullmatch(r"[0-9]+", joined):
        return r"[0-9]+"
    if re.fullmatch(r"[0-9a-f]+", joined):
        return r"[0-9a-f]+"
    if re.fullmatch(r"[0-9-]+", joined):
        return r"[0-9-]+"
    if re.fullmatch(r"[0-9A-Fa-f-]+", joined):
        return r"[0-9A-Fa-f-]+"
    if re.fullmatch(r"[\w.:/-]+", joined):
        return r"[\w.:/-]+"
    return r"[^\n]*"


def _escape(text: str) -> str:
    """re.escape for readable patterns: only the characters that are special in a regex."""
    return re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", text)


_PATH_CHARS = r"[^\s`]+"


def _line_pattern(old: str, new: str, rest_of_line: bool = False) -> str | None:
    """A regex that matches the differing part of two versions of one line, anchored on the stable
    text before it by a lookbehind (the anchor itself is kept). A change inside a path is widened
    to the whole path and matched by a path class, so the pattern fits any machine's path, not
    the two compared."""
    i, j = _common_ends(old, new)
    path_old = _path_around(old, i, len(old) - j)
    path_new = _path_around(new, i, len(new) - j)
    is_path = (not rest_of_line and path_old is not None and path_new is not None
               and path_old[0] == path_new[0] and old[path_old[1]:] == new[path_new[1]:])
    if is_path:
        i, j = path_old[0], len(old) - path_old[1]
    else:  # widen the change to whole words on both sides
        while i > 0 and (old[i - 1].isalnum() or old[i - 1] in "_-"):
            i -= 1
        while j > 0 and (old[len(old) - j].isalnum() or old[len(old) - j] in "_-"):
            j -= 1
    mid_old, mid_new = old[i: len(old) - j], new[i: len(new) - j]
    anchor = old[:i].lstrip()
    if len(anchor) > 40:  # keep the last 40 characters, starting at a word
        anchor = re.sub(r"^\S*\s+", "", anchor[-40:]) or anchor[-40:]
    tail = "" if rest_of_line else old[len(old) - j:]
    if is_path:  # up to the text after the path, when the path class could run into it
        stop = re.match(r"[^\s`]*", tail).group(0)
        cls = _PATH_CHARS + ("?(?=" + _escape(stop) + ")" if stop else "")
    else:
        cls = r"[^\n]*" if rest_of_line else _token_class([mid_old, mid_new])
        if cls == r"[^\n]*" and tail.strip():
            cls = r"[^\n]*?(?=" + _escape(tail[:12]) + ")"
    if not anchor and not tail.strip():
        return r"^[^\n]*" if cls == r"[^\n]*" else "^" + cls
    return f"(?<={_escape(anchor)})" + cls  # the stable text before the change anchors it but stays


def _piece_patterns(old: str, new: str) -> list[str]:
    """One pattern per separate change inside a line (2.1.197's model line differs in two places:
    "Opus 4.8 (1M context)" and "claude-opus-4-8[1m]"), each anchored on the stable text before it,
    so the words between the changes stay."""
    sm = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    regions: list[list[int]] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        if regions and i1 - regions[-1][1] < 4:  # a few equal characters between: one change
            regions[-1][1], regions[-1][3] = i2, j2
        else:
            regions.append([i1, i2, j1, j2])
    out: list[str] = []
    prev_end = 0
    for i1, i2, j1, j2 in regions:
        while i1 > prev_end and i2 > i1 and j2 > j1 and (old[i1 - 1].isalnum() or old[i1 - 1] in "_-"):
            i1, j1 = i1 - 1, j1 - 1  # a replaced word is matched whole; an insertion is matched as itself
        while (i2 < len(old) and j2 < len(new) and i2 > i1 and j2 > j1 and old[i2] == new[j2]
               and (old[i2].isalnum() or old[i2] in "_-")):
            i2, j2 = i2 + 1, j2 + 1
        a, b = old[i1:i2], new[j1:j2]
        anchor = old[max(prev_end, i1 - 40):i1]
        if len(anchor) == 40:
            anchor = re.sub(r"^\S*\s+", "", anchor) or anchor
        cls = _token_class([a, b])
        if cls == r"[^\n]*":
            alternatives = [_escape(t) for t in sorted({a, b} - {""}, key=len, reverse=True)]
            cls = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        out.append((f"(?<={_escape(anchor)})" if anchor else "^") + cls)
        prev_end = i2
    return out


def _generalizes(pattern: str) -> bool:
    """A pattern that removes a value of a known shape (number, hex id, path, date token), not free text."""
    return "[^\\n]*" not in pattern and pattern.startswith("(?<=")


def _apply(patterns: Sequence[str], text: str) -> str:
    """``text`` as the addon forwards it with ``patterns`` as its volatile_fragments (its own rules engine)."""
    return rules.Rules.make(patterns=(), fragments=patterns, headers=(), identity=False).strip_text(text)[0]


def pattern_for(old: str, new: str, generalize_only: bool = False) -> list[str] | None:
    """Fragment patterns that make ``old`` and ``new`` equal once removed, or None.

    Lines are matched with difflib. One pass over the changed lines builds three candidate sets,
    tried from the narrowest: the changed token of each replaced line (anchored on the stable text
    before it), each separate change inside a line, the rest of each replaced line from its
    anchor, and whole changed lines from
    their stable label (``Label:``) on. When no set makes the texts equal, the patterns that each
    equalize one replaced line are returned (the shared prefix still grows). No pattern may match
    a line both texts share (a stable instruction). ``generalize_only`` keeps only token patterns
    of a known shape (paths, ids, numbers): what is allowed from comparing two different sessions.
    """
    la, lb = old.splitlines(), new.splitlines()
    token: list[str] = []
    pieces: list[str] = []
    rest: list[str] = []
    whole: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=la, b=lb, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag == "replace":
            for x, y in zip(la[i1:i2], lb[j1:j2]):
                _add(token, _line_pattern(x, y))
                for piece in _piece_patterns(x, y):
                    _add(pieces, piece)
                _add(rest, _line_pattern(x, y, rest_of_line=True))
        for x in la[i1:i2] + lb[j1:j2]:
            label = re.match(r"\s*[^:=\n]{1,40}[:=]", x)
            _add(whole, (_escape(label.group(0).lstrip()) + r"[^\n]*\n?") if label else ("^" + _escape(x) + r"\n?"))
    stable = _stable_lines(la, lb)
    if not generalize_only:
        for patterns in (token, pieces, rest, whole):
            if patterns and _apply(patterns, old) == _apply(patterns, new) and not _touches(patterns, stable):
                return patterns
    # no set equalizes the whole text: one pattern per replaced line that equalizes that line
    partial: list[str] = []
    for x, y in _changed_lines(old, new)[0]:
        for cand in (_line_pattern(x, y), None if generalize_only else _line_pattern(x, y, rest_of_line=True)):
            if (cand and (not generalize_only or _generalizes(cand)) and _apply([cand], x) == _apply([cand], y)
                    and not _touches([cand], stable)):
                _add(partial, cand)
                break
    return partial or None


def _stable_lines(la: Sequence[str], lb: Sequence[str]) -> list[str]:
    """The lines two texts share (difflib's equal blocks)."""
    sm = difflib.SequenceMatcher(a=la, b=lb, autojunk=False)
    return [line for tag, i1, i2, _, _ in sm.get_opcodes() if tag == "equal" for line in la[i1:i2]]


def _touches(patterns: Sequence[str], lines: Sequence[str]) -> bool:
    """Whether a pattern would remove anything from one of these (stable) lines."""
    compiled = [re.compile(p, re.MULTILINE) for p in patterns]
    return any(c.search(line) and c.search(line).end() > c.search(line).start() for c in compiled for line in lines)


def _add(patterns: list[str], p: str | None) -> None:
    if p and p not in patterns:
        patterns.append(p)


_CROSS_SESSION_KINDS = frozenset({"date", "session_id", "environment", "path"})


def _text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("text"), str):
        return v["text"]
    return None


def _get(body: Any, path: str) -> Any:
    cur = body
    for k in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+", path):
        try:
            cur = cur[int(k)] if k.isdigit() else cur[k]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _block_path(path: str) -> str:
    """``system[2]`` / ``system[2].text`` -> ``system[2].text``: where the addon records a fragment."""
    m = re.match(r"system\[\d+\]", path)
    return m.group(0) + ".text" if m else path


def check_with_addon_rules(patterns: Sequence[str], a_body: dict, b_body: dict, path: str) -> str | None:
    """Run the addon's own rules engine (``warmturn.rules``) with these fragment patterns on both bodies.

    ``"equal"`` when the text at ``path`` becomes the same, ``"closer"`` when it shares a longer
    prefix and fewer differing lines than before, None otherwise or when a pattern cuts anything
    elsewhere in the system prompt."""
    engine = rules.Rules.make(patterns=(), fragments=list(patterns), headers=(), identity=False)
    (sa, ea), (sb, eb) = engine.apply(a_body), engine.apply(b_body)
    target = _block_path(path)
    if any(getattr(e, "path", None) != target for e in ea + eb):
        return None
    before = (_text(_get(a_body, target)) or "", _text(_get(b_body, target)) or "")
    after = (_text(_get(sa, target)) or "", _text(_get(sb, target)) or "")
    if after[0] == after[1]:
        return "equal"
    grew = _common_ends(*after)[0] > _common_ends(*before)[0]
    fewer = sum(map(len, _changed_lines(*after))) < sum(map(len, _changed_lines(*before)))
    return "closer" if grew and fewer else None


def _same_identity(old: Any, new: Any) -> bool:
    """Two texts that differ only in the model's name/id, which the addon canonicalizes by default."""
    return isinstance(old, str) and isinstance(new, str) and identity.rewrites(old)[0] == identity.rewrites(new)[0]


def suggest(compared: Sequence[tuple[PairDiff, dict, dict]],
            option: str = "volatile_fragments") -> tuple[list[Suggestion], list[str], list[str]]:
    """Patterns for volatile text in system blocks, each checked with the addon's rules engine.

    Within a session (``turn`` pairs) any text that changes can get a pattern. Between sessions
    and agents only per-machine values (paths, dates, ids, environment lines) generalized into a
    pattern of their shape: text that is stable within each session but differs between them is a
    different prompt, not volatile. ``unsuggested`` lists the prompt paths that still differ once
    every suggested pattern is applied, with the reason; the last list, the paths whose only change is
    the model's name or id, which the addon canonicalizes by default (``canonical_model_identity``)."""
    out: list[Suggestion] = []
    reasons: dict[str, str] = {}
    canonical: set[str] = set()
    targets: list[tuple[str, dict, dict, str | None]] = []  # (path, a_body, b_body, poison) to equalize
    for pd_, ab, bb in compared:
        cross = pd_.relation != "turn"
        for c in pd_.changes:
            if not c.in_prompt or c.expected or c.poison == "billing_block":
                continue
            if c.path.startswith("tools"):
                if _same_identity(c.old, c.new):
                    canonical.add(c.path)  # e.g. the Bash tool's Co-Authored-By line: canonicalized by default
                else:
                    reasons.setdefault("tools", "tool definitions: volatile_fragments patterns apply to the system prompt only")
                continue
            if not c.path.startswith("system"):
                continue  # messages: the conversation itself
            if c.poison == "system_prompt_changed":
                reasons.setdefault(c.path, "a different system prompt, not volatile text")
                continue
            old, new = _text(c.old), _text(c.new)
            if old is None or new is None:
                reasons.setdefault(c.path, "a system block added or removed")
                continue
            if c.poison == "model_identity" and _same_identity(old, new):
                canonical.add(c.path)  # the addon's canonical_model_identity (on by default) already equalizes it
                continue
            if cross and c.poison not in _CROSS_SESSION_KINDS:
                reasons.setdefault(c.path, f"differs between {pd_.relation}s but not within one: a different prompt")
                continue
            targets.append((c.path, ab, bb, c.poison))
            pats = pattern_for(old, new, generalize_only=cross)
            if not pats or not check_with_addon_rules(pats, ab, bb, c.path):
                continue
            for pat in pats:
                if pat not in {s.pattern for s in out}:
                    mo, mn = (re.search(pat, t, re.MULTILINE) for t in (old, new))
                    out.append(Suggestion(c.path, pat, option, c.poison, _clip_value(mo.group(0) if mo else "", 60),
                                          _clip_value(mn.group(0) if mn else "", 60)))
    patterns = [s.pattern for s in out]
    for path, ab, bb, poison in targets:
        if patterns and check_with_addon_rules(patterns, ab, bb, path) == "equal":
            continue
        if poison == "environment":
            reasons.setdefault(path, "per-session environment left (e.g. git status): claude "
                                     "--exclude-dynamic-system-prompt-sections moves it out of the system prompt")
        else:
            reasons.setdefault(path, "no pattern removes only the changing text")
    return out, [f"{path} ({why})" for path, why in reasons.items()], sorted(canonical)
