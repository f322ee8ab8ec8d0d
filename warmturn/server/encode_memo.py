"""Tokenizing a prompt by reusing the tokens of an earlier prompt it starts with.

Claude Code sends the same 12-20K-token system prompt and tools on every turn, and each turn's
prompt starts with the previous one. Tokenizing it all again costs ~5 ms per 1K tokens on a CPU
core: ~100 ms at Claude Code's size, paid twice per request (the prompt, and the system turn
alone for the prefix length), before the first token, on every warm turn.

A fast tokenizer (Hugging Face ``tokenizers``) splits its input at added special tokens first
and tokenizes the pieces between them on their own. So the tokens of a text cut right after a
special token ``S`` are the tokens of the part before the cut followed by the tokens of ``S +
rest`` minus its first token (``S`` itself): ``rest`` is read after ``S`` in both cases. The
memo keeps, for recent texts, the part up to their last special token and its tokens; a new
text that starts with one of those parts only tokenizes what follows.

It is used only when that holds for this tokenizer: a fast tokenizer, special tokens that strip
no whitespace around them and are not normalized, and a self-test on probe texts at start-up
(the composed tokens must equal a whole-text encoding); anything else tokenizes the whole text
as before.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

MIN_CHARS = 1024  # shorter texts are tokenized whole: nothing worth keeping
MAX_ENTRIES = 32
MAX_CHARS = 8_000_000  # the memo's texts, in all (~30 MB with their tokens)

_PROBES = (
    "plain text\n\nwith  two spaces, digits 12345 and ünïcödé ✓",
    " leading space",
    "\n\nnewlines first",
    "tabs\tand\r\nCRLF",
    "",
)


def _backend(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind an mlx-lm or Hugging Face tokenizer, if it is fast."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if not getattr(hf, "is_fast", False):
        return None
    return getattr(hf, "backend_tokenizer", None)


def _clean_specials(tokenizer: Any) -> dict[int, str]:
    """Special tokens that cut a text into independently tokenized pieces with nothing around
    them touched: id -> text."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    out: dict[int, str] = {}
    for i, tok in (getattr(hf, "added_tokens_decoder", None) or {}).items():
        content = getattr(tok, "content", None)
        if (isinstance(content, str) and content and getattr(tok, "special", False)
                and not getattr(tok, "lstrip", True) and not getattr(tok, "rstrip", True)
                and not getattr(tok, "single_word", True) and not getattr(tok, "normalized", True)):
            out[int(i)] = content
    return out


class EncodeMemo:
    """Shared by every renderer of a server (one per tokenizer copy): the texts are keys, the
    tokenizing is done by the caller's own tokenizer copy. Thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_chars: int = MAX_CHARS) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self._entries: OrderedDict[str, array[int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def longest(self, text: str) -> tuple[str, array[int]] | None:
        with self._lock:
            best: str | None = None
            for head in self._entries:
                if len(head) <= len(text) and (best is None or len(head) > len(best)) and text.startswith(head):
                    best = head
            if best is None:
                return None
            self._entries.move_to_end(best)
            return best, self._entries[best]

    def count(self, reused: int) -> None:
        with self._lock:
            self.hits += 1
            self.reused_tokens += reused

    def keep(self, head: str, tokens: array[int]) -> None:
        with self._lock:
            if head in self._entries:
                self._entries.move_to_end(head)
                return
            self._entries[head] = tokens
            self._chars += len(head)
            while self._entries and (len(self._entries) > self.max_entries or self._chars > self.max_chars):
                old, _ = self._entries.popitem(last=False)
                self._chars -= len(old)


class MemoEncoder:
    """``encode(text)`` as ``tokenizer.encode(text, add_special_tokens=False)``, with the memo."""

    def __init__(self, tokenizer: Any, memo: EncodeMemo | None) -> None:
        self.tokenizer = tokenizer
        self.memo = memo
        self._backend = _backend(tokenizer)
        self._specials = _clean_specials(tokenizer)
        self.enabled = memo is not None and self._backend is not None and bool(self._specials)
        if self.enabled and not self._self_test():
            log.info("tokenizer: prompts are tokenized whole (the special-token split does not hold for it)")
            self.enabled = False

    def _whole(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _self_test(self) -> bool:
        assert self._backend is not None
        specials = list(self._specials.values())[:3]
        for s in specials:
            for k, a in enumerate(_PROBES):
                b = _PROBES[(k + 1) % len(_PROBES)]
                text = f"{a}{s}{b}{specials[0]}{a}"
                cut = len(a) + len(s)
                head, whole = self._whole(text[:cut]), self._whole(text)
                tail = self._tail(s, text[cut:])
                if tail is None or head + tail[0] != whole:
                    return False
                enc = self._backend.encode(text, add_special_tokens=False)
                if list(enc.ids) != whole or enc.offsets[len(head) - 1][1] != cut:
                    return False
        return True

    def _tail(self, special: str, rest: str) -> tuple[list[int], list[int]] | None:
        """Tokens of ``rest`` as read right after ``special``, and where each ends in ``rest``."""
        assert self._backend is not None  # (enabled)
        enc = self._backend.encode(special + rest, add_special_tokens=False)
        ids = list(enc.ids)
        if not ids or self._specials.get(ids[0]) != special:
            return None
        return ids[1:], [end - len(special) for _, end in enc.offsets[1:]]

    def encode(self, text: str) -> list[int]:
        if not self.enabled or len(text) < MIN_CHARS:
            return self._whole(text)
        assert self.memo is not None
        found = self.memo.longest(text)
        if found is not None:
            head, head_ids = found
            special = self._specials.get(head_ids[-1]) if head_ids else None
            tail = self._tail(special, text[len(head):]) if special else None
            if tail is not None:
                self.memo.count(len(head_ids))
                ids = head_ids.tolist() + tail[0]
                self._keep(text, ids, len(head_ids), [len(head) + end for end in tail[1]])
                return ids
        assert self._backend is not None  # (enabled)
        enc = self._backend.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        self._keep(text, ids, 0, [end for _, end in enc.offsets])
        return ids

    def _keep(self, text: str, ids: list[int], start: int, ends: list[int]) -> None:
        """Remember ``text`` up to its last special token at or after token ``start``; ``ends[i]``
        is where token ``start + i`` ends in ``text``."""
        assert self.memo is not None
        for j in range(len(ids) - 1, start - 1, -1):
            special = self._specials.get(ids[j])
            if special is None:
                continue
            end = ends[j - start]
            if end >= MIN_CHARS and text[end - len(special):end] == special:
                self.memo.keep(text[:end], array("i", ids[: j + 1]))
            return
