"""Diff consecutive requests: what changed, where the prompts diverge, what to strip.

The published way to find what busts a prompt cache is to capture consecutive requests and
diff the raw payloads. ``diff_records`` automates it over a capture:

* pairs: each request against the previous one of its session and agent (``turn``), the
  first request of each session against the previous session's first (``session``), and
  each subagent's first request against the main agent's latest request before it
  (``subagent``);
* per pair, every changed path (deepdiff of bodies and headers) and the shared prompt prefix
  in model order (characters, and tokens given a tokenizer);
* the changed paths aggregated into a volatile-path table, known poisons named, and for
  volatile text in the system prompt a ``--set volatile_fragments=…`` pattern, checked
  to make both sides equal before it is suggested.
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

from warmturn import rules

from .divergence import Divergence, Tokenizer, divergence
from .sessions import group

# Headers that differ on every request for reasons no cache cares about.
IGNORED_HEADERS = frozenset({"content-length"})
BILLING_PREFIX = "x-anthropic-billing-header:"

POISONS: dict[str, str] = {
    "billing_block": "Claude Code's x-anthropic-billing-header system block (per-session fingerprint; "
                     "cch= changes every request when intercepted). The addon strips it by default.",
    "date": "a date in the prompt (changes daily).",
    "session_id": "a session/device/request id (uuid or long hex) in the payload.",
    "environment": "per-session environment (working directory, platform, git status) in the system prompt; "
                   "claude --exclude-dynamic-system-prompt-sections moves it into the first user message.",
    "system_prompt_changed": "a different system prompt (subagents have their own): only the text before it "
                             "can be shared.",
    "tools_reordered": "the same tools in a different order (the tool JSON is part of the cached prefix).",
    "tools_changed": "tool definitions changed (the addon does not rewrite tools: fix the client or its MCP set).",
    "cache_control_moved": "cache_control breakpoints moved (harmless for a local prefix cache; changes "
                           "Anthropic-side cache segments).",
    "content_shape": "message content switched between a string and a block list (harmless when the server "
                     "renders history deterministically).",
    "volatile_header": "a request header that changes per request (some caches and routers key on headers).",
}

_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b|"
                   r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* \d{1,2},? \d{4}\b")
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{16,}\b", re.I)
_ENV = re.compile(r"working directory|current branch|gitstatus|git status|<env>|platform:|os version|"
                  r"is directory a git repo", re.I)


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

    @property
    def paths(self) -> list[str]:
        return [c.path for c in self.changes]


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
    unsuggested: list[str] = field(default_factory=list)  # prefix paths with no pattern

    def as_dict(self) -> dict:
        return {
            "pairs": [{**{k: v for k, v in asdict(p).items() if k not in ("changes", "divergence")},
                       "changes": [asdict(c) for c in p.changes], "divergence": p.divergence.as_dict()}
                      for p in self.pairs],
            "volatile": [asdict(v) for v in self.volatile],
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
        changes.append(Change(format_path(keys), action, old, new, _region(keys), expected))
    changes.extend(_diff_tools(a_body.get("tools"), b_body.get("tools")))
    ha = {k: v for k, v in (a_headers or {}).items() if k not in IGNORED_HEADERS}
    hb = {k: v for k, v in (b_headers or {}).items() if k not in IGNORED_HEADERS}
    for name in sorted(set(ha) | set(hb)):
        if ha.get(name) != hb.get(name):
            action = "added" if name not in ha else "removed" if name not in hb else "changed"
            changes.append(Change(f"headers.{name}", action, ha.get(name), hb.get(name), "headers"))
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
            out.append(Change(format_path(["tools", j, *keys]), action, old, new, "prefix", poison="tools_changed"))
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
    if c.action == "type_changed" and c.region == "messages" and c.path.endswith("content"):
        return "content_shape"
    if c.path.startswith("tools"):
        return "tools_changed"
    if len(texts) == 2:
        mid_old, mid_new = _changed_middle(*texts)
        if c.path.startswith("system") and max(len(mid_old), len(mid_new)) > max(500, 0.5 * max(map(len, texts))):
            return "system_prompt_changed"
        window_old = _window(texts[0], mid_old)
        window_new = _window(texts[1], mid_new)
        if _DATE.search(window_old) and _DATE.search(window_new):
            return "date"
        if _ENV.search(_line_of(texts[0], mid_old)) or _ENV.search(_line_of(texts[1], mid_new)):
            return "environment"
        if _ID.search(window_old) or _ID.search(window_new):
            return "session_id"
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
    """``(relation, a, b)`` pairs: turns, session starts, subagents vs the main agent."""
    groups = group(records)
    pairs: list[tuple[str, dict, dict]] = []
    for recs in groups.values():
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


def diff_records(records: Sequence[dict], tokenizer: Tokenizer | None = None, session: str | None = None,
                 original: bool = False) -> DiffReport:
    """Diff a capture's requests. ``original`` diffs what the client sent instead of what was forwarded."""
    pairs_out: list[PairDiff] = []
    tok_cache: dict = {}
    for relation, a, b in make_pairs(records):
        if session and session not in (a["session"], b["session"]):
            continue
        body_key, head_key = ("original", "original_headers") if original else ("body", "headers")
        ab, bb = a.get(body_key) or a["body"], b.get(body_key) or b["body"]
        changes = diff_payloads(ab, bb, a.get(head_key), b.get(head_key))
        div = divergence(ab, bb, tokenizer, tok_cache)
        pairs_out.append(PairDiff(relation, str(b.get("arm")), b["session"], b["agent"], a["id"], b["id"], changes, div))
    stripped: dict[str, int] = {}
    for r in records:
        for e in r.get("stripped") or []:
            key = rules.stripped_from_json(e).label  # entries were validated when loaded
            stripped[key] = stripped.get(key, 0) + 1
    volatile = aggregate(pairs_out)
    poisons: dict[str, int] = {}
    for p in pairs_out:
        for c in p.changes:
            if c.poison:
                poisons[c.poison] = poisons.get(c.poison, 0) + 1
    suggestions, unsuggested = suggest(pairs_out)
    return DiffReport(pairs_out, volatile, poisons, suggestions, stripped, unsuggested)


def _clip_value(v: Any, n: int = 80) -> Any:
    """Long strings and containers cut to ``n`` characters for display; other values as they are."""
    if isinstance(v, str) and len(v) > n:
        return v[: n - 1] + "…"
    if isinstance(v, (dict, list)):
        s = repr(v)
        return s if len(s) <= n else s[: n - 1] + "…"
    return v


def aggregate(pairs: Sequence[PairDiff]) -> list[VolatilePath]:
    """The volatile-path table: one row per path (appended messages folded into ``messages[+]``)."""
    rows: dict[str, VolatilePath] = {}
    for p in pairs:
        for c in p.changes:
            key = "messages[+]" if c.expected else c.path
            row = rows.get(key)
            if row is None:
                old, new = c.old, c.new
                if isinstance(old, str) and isinstance(new, str):
                    old, new = _changed_middle(old, new)
                row = rows[key] = VolatilePath(key, c.region, 0, [], _clip_value(old), _clip_value(new), c.expected, c.poison)
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


def _line_pattern(old: str, new: str, rest_of_line: bool = False) -> str | None:
    """A regex that matches the differing part of two versions of one line (and its label)."""
    i, j = _common_ends(old, new)
    # widen the change to whole words on both sides
    while i > 0 and (old[i - 1].isalnum() or old[i - 1] in "_-"):
        i -= 1
    while j > 0 and (old[len(old) - j].isalnum() or old[len(old) - j] in "_-"):
        j -= 1
    mid_old, mid_new = old[i: len(old) - j], new[i: len(new) - j]
    anchor = old[:i].lstrip()
    if len(anchor) > 40:  # keep the last 40 characters, starting at a word
        anchor = re.sub(r"^\S*\s+", "", anchor[-40:]) or anchor[-40:]
    tail = old[len(old) - j:]
    cls = r"[^\n]*" if rest_of_line else _token_class([mid_old, mid_new])
    if rest_of_line:
        tail = ""
    if cls == r"[^\n]*" and tail.strip():
        cls = r"[^\n]*?(?=" + _escape(tail[:12]) + ")"
    if not anchor and not tail.strip():
        return r"^[^\n]*" if cls == r"[^\n]*" else "^" + cls
    return _escape(anchor) + cls


def _apply(patterns: Sequence[str], text: str) -> str:
    """``text`` as the addon forwards it with ``patterns`` as its volatile_fragments (its own rules engine)."""
    return rules.Rules.make(patterns=(), fragments=patterns, headers=()).strip_text(text)[0]


def pattern_for(old: str, new: str) -> list[str] | None:
    """Fragment patterns that make ``old`` and ``new`` equal once removed, or None.

    Lines are matched with difflib. One pass over the changed lines builds three candidate sets,
    tried from the narrowest: the changed token of each replaced line (anchored on the stable text
    before it), the rest of each replaced line from that anchor, and whole changed lines from
    their stable label (``Label:``) on.
    """
    la, lb = old.splitlines(), new.splitlines()
    token: list[str] = []
    rest: list[str] = []
    whole: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=la, b=lb, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag == "replace":
            for x, y in zip(la[i1:i2], lb[j1:j2]):
                _add(token, _line_pattern(x, y))
                _add(rest, _line_pattern(x, y, rest_of_line=True))
        for x in la[i1:i2] + lb[j1:j2]:
            label = re.match(r"\s*[^:=\n]{1,40}[:=]", x)
            _add(whole, (_escape(label.group(0).lstrip()) + r"[^\n]*\n?") if label else ("^" + _escape(x) + r"\n?"))
    for patterns in (token, rest, whole):
        if patterns and _apply(patterns, old) == _apply(patterns, new):
            return patterns
    return None


def _add(patterns: list[str], p: str | None) -> None:
    if p and p not in patterns:
        patterns.append(p)


def suggest(pairs: Sequence[PairDiff], option: str = "volatile_fragments") -> tuple[list[Suggestion], list[str]]:
    """Patterns for volatile text in system blocks (the billing block is stripped by default)."""
    out: list[Suggestion] = []
    seen: set[str] = set()
    unsuggested: list[str] = []
    for p in pairs:
        for c in p.changes:
            if not (c.path.startswith("system") and isinstance(c.old, str) and isinstance(c.new, str)):
                key = "tools" if c.path.startswith("tools") else c.path
                if c.region == "prefix" and c.poison not in ("billing_block", "cache_control_moved") \
                        and key not in unsuggested:
                    unsuggested.append(key)
                continue
            if c.poison in ("billing_block", "system_prompt_changed"):
                if c.poison == "system_prompt_changed" and c.path not in unsuggested:
                    unsuggested.append(c.path)
                continue
            pats = pattern_for(c.old, c.new)
            if not pats:
                if c.path not in unsuggested:
                    unsuggested.append(c.path)
                continue
            for pat in pats:
                if pat in seen:
                    continue
                seen.add(pat)
                mo, mn = _changed_middle(c.old, c.new)
                out.append(Suggestion(c.path, pat, option, c.poison, _clip_value(mo, 60), _clip_value(mn, 60)))
    return out, unsuggested
