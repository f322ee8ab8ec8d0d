"""A repetition guard: notices an answer that has started to loop (pure, no MLX).

A small model decoding greedily can fall into a cycle ("The secret word is: The secret word is: …")
and repeat it until the output cap; Claude Code then asks it to go on, up to three times, so one loop
costs minutes. The guard watches the answer's text as it arrives and reports a loop once its end is
the same stretch of text repeated back to back, ``min_repeats`` times or more and over at least
``min_chars`` characters in all. The server then ends the turn with ``stop_reason: max_tokens``
(server/http.py), the honest reason a client already knows: the answer is incomplete.

Text, not token ids, is compared: a loop re-tokenizes the same way, and the text is what the server
has at that point. Only the last ``window`` characters are kept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loop:
    unit: str  # the repeated stretch
    repeats: int  # how many times it ends the answer, back to back


class RepetitionGuard:
    def __init__(self, min_chars: int = 160, min_repeats: int = 3, max_unit: int = 400) -> None:
        self.min_chars = min_chars
        self.min_repeats = min_repeats
        self.max_unit = max_unit
        self.window = max_unit * min_repeats + min_chars
        self._tail = ""

    def feed(self, text: str) -> Loop | None:
        """Add the answer's next piece; the loop it now ends with, if any."""
        if not text:
            return None
        self._tail = (self._tail + text)[-self.window:]
        return find_loop(self._tail, self.min_chars, self.min_repeats, self.max_unit)


def find_loop(text: str, min_chars: int = 160, min_repeats: int = 3, max_unit: int = 400) -> Loop | None:
    """The shortest stretch that ``text`` ends with, repeated back to back at least ``min_repeats`` times
    and over at least ``min_chars`` characters; None when there is none (pure)."""
    n = len(text)
    for size in range(1, min(max_unit, n // min_repeats) + 1):
        need = max(min_repeats, -(-min_chars // size))  # copies needed: ceil(min_chars / size), at least min_repeats
        if need * size > n:
            continue
        unit = text[n - size:]
        if text[n - 2 * size:n - size] == unit and text[n - need * size:] == unit * need:
            repeats = need
            while (repeats + 1) * size <= n and text[n - (repeats + 1) * size:n - repeats * size] == unit:
                repeats += 1
            return Loop(unit, repeats)
    return None
