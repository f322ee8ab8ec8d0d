"""Text comparison helpers shared by the diff (classifying a change) and the suggestions (patterns)."""

from __future__ import annotations

import difflib
import re
from typing import Any

PATH = re.compile(r"(?<![\w.])(?:~|/)[\w.@%+~-]*(?:/[\w.@%+~-]*)+")


def common_ends(old: str, new: str) -> tuple[int, int]:
    """Lengths of the common prefix and of the common suffix (not overlapping it) of two strings."""
    i = 0
    n = min(len(old), len(new))
    while i < n and old[i] == new[i]:
        i += 1
    j = 0
    while j < n - i and old[-1 - j] == new[-1 - j]:
        j += 1
    return i, j


def changed_middle(old: str, new: str) -> tuple[str, str]:
    i, j = common_ends(old, new)
    return old[i: len(old) - j], new[i: len(new) - j]


def changed_lines(old: str, new: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(replaced line pairs, lines only one side has) between two texts, matched by difflib."""
    la, lb = old.splitlines(), new.splitlines()
    pairs: list[tuple[str, str]] = []
    single: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=la, b=lb, autojunk=False).get_opcodes():
        if tag == "replace":
            pairs.extend(zip(la[i1:i2], lb[j1:j2], strict=False))
            single.extend(la[i1 + (j2 - j1):i2] + lb[j1 + (i2 - i1):j2])
        elif tag != "equal":
            single.extend(la[i1:i2] + lb[j1:j2])
    return pairs, single


def path_around(line: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of the path that ``line[start:end]`` (the changed part, maybe empty) sits in, if any."""
    for m in PATH.finditer(line):
        if m.start() <= start and end <= m.end():
            return m.span()
    return None


def text_window(text: str, mid: str, pad: int = 12) -> str:
    i = text.find(mid) if mid else -1
    if i < 0:
        return mid
    return text[max(0, i - pad): i + len(mid) + pad]


def clip_value(v: Any, n: int = 80) -> Any:
    """Long strings and containers cut to ``n`` characters for display; other values as they are."""
    if isinstance(v, str) and len(v) > n:
        return v[: n - 1] + "…"
    if isinstance(v, (dict, list)):
        s = repr(v)
        return s if len(s) <= n else s[: n - 1] + "…"
    return v
