"""What-if for Anthropic's own prompt cache: which passthrough requests should hit, and why some miss.

With the addon in front of the real API (``--set backend=passthrough``) each capture line holds the
body Anthropic got and the usage it answered with (``cache_read_input_tokens``,
``cache_creation_input_tokens``). Anthropic's cache works on content blocks, not tokens
(docs.anthropic.com, "Prompt caching"):

* the prefix is tools, then system, then messages, block by block;
* a block marked ``cache_control`` is a *breakpoint* (at most 4): the prefix up to it is written
  to the cache, and a later request reads the longest cached prefix that ends at one of its own
  breakpoints or at a block boundary up to 20 blocks before one;
* an entry lives 5 minutes (``"ttl": "1h"``: an hour), refreshed by every read; caches are per
  model (and per organization);
* a prefix shorter than the model's minimum cacheable length is neither written nor read;
* usage then says: read = the cached prefix, creation = the rest up to the last breakpoint,
  input = what follows it.

:func:`compare` replays the captured requests in order through that model. No tokenizer is
needed: the tokens of a prefix are known exactly from an earlier request whose last breakpoint
ended there (its read + creation), else estimated from its share of the request's characters.
Each request gets a verdict: a hit as predicted, a cold prefix (and the block where it parted
from the closest earlier request), expired, too short, no breakpoint, or a miss (or hit) that
the model does not explain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

LOOKBACK = 20  # block boundaries checked before each breakpoint
TTL = {"5m": 300.0, "1h": 3600.0}
TOLERANCE = 0.02  # a prediction within 2% of the reported read counts as matching
# Minimum cacheable prompt length by model, as Anthropic's prompt-caching page gave it when this was written
# (not re-checked against the live page: compare() takes min_tokens to override); first match wins.
MIN_CACHEABLE = (("opus-4-5", 4096), ("haiku-4-5", 4096), ("haiku", 2048), ("", 1024))


def min_cacheable(model: str | None) -> int:
    m = (model or "").lower()
    return next(n for key, n in MIN_CACHEABLE if key in m)


@dataclass(frozen=True)
class Block:
    where: str  # tools[3], system[1], messages[4].content[0]
    chars: int
    breakpoint: bool
    ttl: float


def _canonical(block: Any) -> str:
    if isinstance(block, dict):
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return json.dumps(block, sort_keys=True, ensure_ascii=False)


def _ttl(block: Any) -> float:
    cc = block.get("cache_control") if isinstance(block, dict) else None
    return TTL.get(str((cc or {}).get("ttl", "5m")), TTL["5m"])


def blocks(body: dict) -> tuple[list[Block], list[str]]:
    """The body's content blocks in cache order, and the hash of each prefix (block 0..i)."""
    items: list[tuple[str, Any, str]] = []
    for i, t in enumerate(body.get("tools") or []):
        items.append((f"tools[{i}]", t, "tool"))
    system = body.get("system")
    if isinstance(system, str):
        system = [{"type": "text", "text": system}]
    for i, b in enumerate(system or []):
        items.append((f"system[{i}]", b, "system"))
    for i, m in enumerate(body.get("messages") or []):
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):  # a string and the same text as one block are the same prompt
            content = [{"type": "text", "text": content}]
        for j, b in enumerate(content or []):
            items.append((f"messages[{i}].content[{j}]", b, str(m.get("role"))))
    h = hashlib.sha256(str(body.get("model")).encode())
    out, hashes = [], []
    for where, b, role in items:
        text = _canonical(b)
        h.update(f"\x00{role}\x00{text}".encode())
        hashes.append(h.hexdigest()[:24])
        cc = isinstance(b, dict) and b.get("cache_control") is not None
        out.append(Block(where, len(text), cc, _ttl(b)))
    return out, hashes


@dataclass
class Verdict:
    id: str
    session: str
    t: float | None
    reported_read: int
    reported_creation: int
    reported_input: int
    predicted_read: int
    predicted_creation: int
    verdict: str  # hit | cold | expired | too_short | no_breakpoint | unexpected_miss | unexpected_hit | partial
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Entry:
    tokens: float
    exact: bool
    expires: float
    ttl: float
    first_seen: float


def _usage(rec: dict) -> tuple[int, int, int] | None:
    u = rec.get("usage") or {}
    if not isinstance(u.get("input_tokens"), int):
        return None
    return (int(u.get("cache_read_input_tokens") or 0), int(u.get("cache_creation_input_tokens") or 0),
            int(u["input_tokens"]))


def compare(records: Sequence[dict], min_tokens: int | None = None) -> list[Verdict]:
    """Replay requests with Anthropic usage through the model of Anthropic's cache, in order."""
    cache: dict[str, _Entry] = {}
    seen: list[tuple[list[str], list[Block], float]] = []  # earlier requests: prefix hashes, blocks, time
    out: list[Verdict] = []
    for i, rec in enumerate(records):
        body, usage = rec.get("body"), _usage(rec)
        if not isinstance(body, dict) or usage is None:
            continue
        read, creation, inp = usage
        t = (rec.get("t") or {}).get("request")
        now = float(t) if isinstance(t, (int, float)) else float(i) * 1e-3  # no times: all within the TTL
        bl, hashes = blocks(body)
        total_chars = sum(b.chars for b in bl) or 1
        bps = [k for k, b in enumerate(bl) if b.breakpoint]
        minimum = min_tokens or min_cacheable(body.get("model"))
        last_tokens = read + creation  # tokens up to the last breakpoint, as Anthropic counted them
        per_char = (read + creation + inp) / total_chars

        # (B023: tokens_at is called in this iteration only, so it sees this iteration's values)
        def tokens_at(k: int) -> float:  # tokens of the prefix ending with block k
            e = cache.get(hashes[k])  # noqa: B023
            if e is not None and e.exact:
                return e.tokens
            if bps and k == bps[-1] and last_tokens:  # noqa: B023
                return float(last_tokens)  # noqa: B023
            return per_char * sum(b.chars for b in bl[: k + 1])  # noqa: B023

        # the longest cached prefix ending at a breakpoint or up to LOOKBACK boundaries before one
        hit, stale = -1, None
        for b in bps:
            for k in range(b, max(-1, b - LOOKBACK - 1), -1):
                e = cache.get(hashes[k])
                if e is None:
                    continue
                if e.expires >= now:
                    hit = max(hit, k)
                    break
                stale = max(stale or -1, k)
        pred_read = round(tokens_at(hit)) if hit >= 0 else 0
        end_tokens = tokens_at(bps[-1]) if bps else 0.0
        too_short = bool(bps) and end_tokens < minimum
        if too_short:
            pred_read = 0
        pred_creation = max(round(end_tokens) - pred_read, 0) if bps and not too_short else 0
        verdict, why = _verdict(read, pred_read, bps, too_short, stale, hit, cache, hashes, bl, seen, now, minimum,
                                end_tokens)
        out.append(Verdict(str(rec.get("id")), str(rec.get("session") or rec.get("session_id")), t, read, creation,
                           inp, pred_read, pred_creation, verdict, why))
        # what this request leaves in the cache: every breakpoint's prefix (when long enough), reads refreshed
        if bps and not too_short:
            for b in bps:
                exact = b == bps[-1] and bool(last_tokens)
                e = cache.get(hashes[b])
                tok = float(last_tokens) if exact else tokens_at(b)
                first = e.first_seen if e is not None else now
                cache[hashes[b]] = _Entry(tok, exact or (e is not None and e.exact), now + bl[b].ttl, bl[b].ttl, first)
            if hit >= 0:
                cache[hashes[hit]].expires = now + cache[hashes[hit]].ttl
        seen.append((hashes, bl, now))
    return out


def _parted(hashes: list[str], bl: list[Block], seen: Sequence[tuple[list[str], list[Block], float]]) -> str:
    """Where this request parts from the earlier request it shares the most blocks with."""
    best, where = 0, None
    for h2, _b2, _t in seen:
        n = 0
        while n < min(len(h2), len(hashes)) and h2[n] == hashes[n]:
            n += 1
        if n >= best:
            best, where = n, (bl[n].where if n < len(bl) else "end")
    if where is None:
        return "the first request seen"
    if best == 0:
        return f"shares nothing with any earlier request (differs from the first block, {bl[0].where})"
    return f"parts from the closest earlier request at {where} ({best} blocks shared)"


def _verdict(read: int, pred: int, bps: list[int], too_short: bool, stale: int | None, hit: int,
             cache: dict, hashes: list[str], bl: list[Block], seen, now: float, minimum: int,
             end_tokens: float) -> tuple[str, str]:
    close = abs(read - pred) <= max(TOLERANCE * max(read, pred), 1)
    if not bps:
        return ("no_breakpoint" if read == 0 else "unexpected_hit",
                "no cache_control block: nothing is written or read" + ("" if read == 0 else f", yet {read} read"))
    if too_short:
        return ("too_short" if read == 0 else "unexpected_hit",
                f"~{end_tokens:,.0f} tokens up to the last breakpoint, under the {minimum:,}-token minimum")
    if pred > 0 and close:
        return "hit", f"reads the prefix up to {bl[hit].where}"
    if pred > 0 and read == 0:
        e = cache[hashes[hit]]
        return ("unexpected_miss", f"the prefix up to {bl[hit].where} was written {now - e.first_seen:,.0f} s ago "
                                   f"and is within its TTL: Anthropic evicted it, or the request went to another "
                                   f"organization, workspace or model")
    if pred == 0 and read == 0:
        if stale is not None:
            e = cache[hashes[stale]]
            gone = now - (e.expires - e.ttl)
            return "expired", f"the prefix up to {bl[stale].where} was last used {gone:,.0f} s ago (TTL {e.ttl:,.0f} s)"
        return "cold", _parted(hashes, bl, seen)
    if pred == 0:
        return "unexpected_hit", f"read {read:,} tokens of a prefix this capture never wrote (another client?)"
    return "partial", f"predicted {pred:,} (up to {bl[hit].where}), reported {read:,}"


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """Counts per verdict, and the tokens read as reported and as predicted."""
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    return {"requests": len(verdicts), "verdicts": counts,
            "reported_read": sum(v.reported_read for v in verdicts),
            "predicted_read": sum(v.predicted_read for v in verdicts),
            "prompt_tokens": sum(v.reported_read + v.reported_creation + v.reported_input for v in verdicts)}
