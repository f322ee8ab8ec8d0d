"""The client's model identity, canonicalized (standard library only).

Claude Code writes the model's display name and id into its prompt: "You are powered by the model
named Opus 4.8 (1M context). The exact model ID is claude-opus-4-8[1m]." (system text, or a role=system
message in 2.1.332) and "Co-Authored-By: Claude Opus 4.8 (1M context) <noreply@anthropic.com>" (the Bash
tool's description, the attribution reminder). The wording changes within one conversation: 2.1.197 names
the model with "(1M context)"/``[1m]`` in a first ``-p`` turn and without them in a later ``--continue``
turn, and every client changes it when the user switches model mid-session. With tools rendered first
the prefix cache then misses from the Bash tool on.

These rules replace the name and the id inside exactly those two sentences by one stable form,
:data:`CANONICAL_NAME` / :data:`CANONICAL_ID`; the sentences and every other word stay (the family list
"Opus 4.8: 'claude-opus-4-8'" and the like is stable text and is left alone). :func:`rewrites` is pure:
the caller (:meth:`warmturn.rules.Rules.apply`) records each change so that it can be undone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CANONICAL_NAME = "Claude"
CANONICAL_ID = "claude"

# Each pattern's named groups are what gets replaced: group name -> canonical text.
MODEL_LINE = re.compile(
    r"You are powered by the model named (?P<name>[^\n]+?)\. The exact model ID is (?P<id>\S+?)(?=\.(?:\s|$))")
CO_AUTHORED_BY = re.compile(r"Co-Authored-By: (?P<name>Claude(?: [^<\n]*?)?) <noreply@anthropic\.com>")
PATTERNS: tuple[re.Pattern[str], ...] = (MODEL_LINE, CO_AUTHORED_BY)
CANONICAL = {"name": CANONICAL_NAME, "id": CANONICAL_ID}


@dataclass(frozen=True)
class Rewrite:
    """``old`` at ``start`` (in the text after the earlier rewrites of the same call) becomes ``new``."""

    start: int
    old: str
    new: str
    pattern: str


def rewrites(text: str) -> tuple[str, list[Rewrite]]:
    """``text`` with the model identity canonicalized, and the rewrites in order (offsets in the result)."""
    spans: list[tuple[int, int, str, str]] = []
    for pat in PATTERNS:
        for m in pat.finditer(text):
            for group, new in CANONICAL.items():
                if group in pat.groupindex and m.group(group) != new:
                    spans.append((m.start(group), m.end(group), new, pat.pattern))
    if not spans:
        return text, []
    spans.sort()
    out: list[str] = []
    done: list[Rewrite] = []
    last = shift = 0
    for start, end, new, pattern in spans:
        if start < last:  # overlapping matches: the first one wins
            continue
        out.append(text[last:start])
        done.append(Rewrite(start + shift, text[start:end], new, pattern))
        out.append(new)
        shift += len(new) - (end - start)
        last = end
    out.append(text[last:])
    return "".join(out), done
