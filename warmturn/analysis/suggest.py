"""Normalization patterns for volatile system-prompt text, each checked with the addon's own rules engine.

Within a session (``turn`` pairs) any text that changes can get a pattern; between sessions and
agents only per-machine values (paths, dates, ids, environment lines), generalized into a pattern
of their shape. See ``diff.py`` for where the changes come from.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmturn import model_identity, rules

from .textdiff import changed_lines, clip_value, common_ends, path_around

if TYPE_CHECKING:
    from .diff import Change, PairDiff


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
    i, j = common_ends(old, new)
    path_old = path_around(old, i, len(old) - j)
    path_new = path_around(new, i, len(new) - j)
    is_path = (not rest_of_line and path_old is not None and path_new is not None
               and path_old[0] == path_new[0] and old[path_old[1]:] == new[path_new[1]:])
    if is_path:
        i, j = path_old[0], len(old) - path_old[1]
    else:  # widen the change to whole words on both sides
        while i > 0 and (old[i - 1].isalnum() or old[i - 1] in "_-"):
            i -= 1
        while j > 0 and (old[len(old) - j].isalnum() or old[len(old) - j] in "_-"):
            j -= 1
        if all(re.fullmatch(r"[0-9.:-]+", m) for m in (old[i: len(old) - j], new[i: len(new) - j])):
            # a number inside a time, date or version (00:01:20.778): the whole token changes, not the
            # digits two requests happen to differ in, so the pattern fits every later value too
            while i > 0 and old[i - 1] in "0123456789.:-":
                i -= 1
            while j > 0 and old[len(old) - j] in "0123456789.:-":
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
            for x, y in zip(la[i1:i2], lb[j1:j2], strict=False):
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
    for x, y in changed_lines(old, new)[0]:
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
    grew = common_ends(*after)[0] > common_ends(*before)[0]
    fewer = sum(map(len, changed_lines(*after))) < sum(map(len, changed_lines(*before)))
    return "closer" if grew and fewer else None


def _same_identity(old: Any, new: Any) -> bool:
    """Two texts that differ only in the model's name/id, which the addon canonicalizes by default."""
    return isinstance(old, str) and isinstance(new, str) and model_identity.rewrites(old)[0] == model_identity.rewrites(new)[0]


class _Suggester:
    """What :func:`suggest` gathers over the compared pairs: the suggestions, the reasons a path still
    differs, the paths the identity rule already equalizes, and what each suggestion must equalize."""

    def __init__(self, option: str) -> None:
        self.option = option
        self.out: list[Suggestion] = []
        self.reasons: dict[str, str] = {}
        self.canonical: set[str] = set()
        self.targets: list[tuple[str, dict, dict, str | None]] = []  # (path, a_body, b_body, poison) to equalize
        self.cross_only: dict[str, list[tuple[str, dict, dict]]] = {}  # text that differs between sessions/agents

    def change(self, c: Change, relation: str, ab: dict, bb: dict) -> None:
        if not c.in_prompt or c.expected or c.poison == "billing_block":
            return
        if c.path.startswith("tools"):
            if _same_identity(c.old, c.new):
                self.canonical.add(c.path)  # e.g. the Bash tool's Co-Authored-By line: canonicalized by default
            else:
                self.reasons.setdefault("tools", "tool definitions: volatile_fragments patterns apply to the system prompt only")
            return
        if c.path.startswith("system"):  # (messages: the conversation itself)
            self.system_change(c, relation, ab, bb)

    def system_change(self, c: Change, relation: str, ab: dict, bb: dict) -> None:
        if c.poison == "system_prompt_changed":
            self.reasons.setdefault(c.path, "a different system prompt, not volatile text")
            return
        old, new = _text(c.old), _text(c.new)
        if old is None or new is None:
            self.reasons.setdefault(c.path, "a system block added or removed")
            return
        if c.poison == "model_identity" and _same_identity(old, new):
            self.canonical.add(c.path)  # the addon's canonical_model_identity (on by default) already equalizes it
            return
        cross = relation != "turn"
        if cross and c.poison not in _CROSS_SESSION_KINDS:
            self.cross_only.setdefault(c.path, []).append((relation, ab, bb))
            return
        self.targets.append((c.path, ab, bb, c.poison))
        pats = pattern_for(old, new, generalize_only=cross)
        if pats and check_with_addon_rules(pats, ab, bb, c.path):
            self.add(c, pats, old, new)

    def add(self, c: Change, pats: list[str], old: str, new: str) -> None:
        for pat in pats:
            if pat not in {s.pattern for s in self.out}:
                mo, mn = (re.search(pat, t, re.MULTILINE) for t in (old, new))
                self.out.append(Suggestion(c.path, pat, self.option, c.poison, clip_value(mo.group(0) if mo else "", 60),
                                           clip_value(mn.group(0) if mn else "", 60)))

    def leftovers(self) -> None:
        """The reasons for what still differs once every suggested pattern is applied."""
        patterns = [s.pattern for s in self.out]
        for path, compared_pairs in self.cross_only.items():  # unless what changes within a session explains it too
            rel, _, _ = compared_pairs[0]
            if not patterns or any(check_with_addon_rules(patterns, ab, bb, path) != "equal" for _, ab, bb in compared_pairs):
                self.reasons.setdefault(path, f"differs between {rel}s but not within one: a different prompt")
        for path, ab, bb, poison in self.targets:
            if patterns and check_with_addon_rules(patterns, ab, bb, path) == "equal":
                continue
            if poison == "environment":
                self.reasons.setdefault(path, "per-session environment left (e.g. git status): claude "
                                              "--exclude-dynamic-system-prompt-sections moves it out of the system prompt")
            else:
                self.reasons.setdefault(path, "no pattern removes only the changing text")


def suggest(compared: Sequence[tuple[PairDiff, dict, dict]],
            option: str = "volatile_fragments") -> tuple[list[Suggestion], list[str], list[str]]:
    """Patterns for volatile text in system blocks, each checked with the addon's rules engine.

    Within a session (``turn`` pairs) any text that changes can get a pattern. Between sessions
    and agents only per-machine values (paths, dates, ids, environment lines) generalized into a
    pattern of their shape: text that is stable within each session but differs between them is a
    different prompt, not volatile. ``unsuggested`` lists the prompt paths that still differ once
    every suggested pattern is applied, with the reason; the last list, the paths whose only change is
    the model's name or id, which the addon canonicalizes by default (``canonical_model_identity``)."""
    g = _Suggester(option)
    for pd_, ab, bb in compared:
        for c in pd_.changes:
            g.change(c, pd_.relation, ab, bb)
    g.leftovers()
    return g.out, [f"{path} ({why})" for path, why in g.reasons.items()], sorted(g.canonical)
