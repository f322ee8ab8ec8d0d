"""What-if: replay captured requests through a model of the prefix cache.

``python -m analysis whatif CAPTURE…`` answers "with my traffic, what hit rate and prefill
would I get?" without running a server for a week:

1. every Messages request is rendered to prompt tokens exactly as the embedded server renders
   it (``warmturn.server.render.Renderer`` with the served model's tokenizer, offline), once
   per *variant* of normalization: ``none`` (what the client sent), ``rules`` (today's addon
   rules), ``rules+<suggestion>`` (plus one pattern ``analysis diff`` suggests), and
   ``as-captured`` (the bodies the backend really got: what the reality check compares);
2. the requests are replayed in their recorded order and timing through
   :class:`~warmturn.analysis.cachemodel.CacheModel`: a fetch when the request arrived, the
   system+tools checkpoint once its prefill passed it, the prompt and the answer when it ended,
   and a concurrent request that shares a prefix with one in flight waits for it, as the
   engine's dedup does;
3. tokens read, tokens prefilled, evictions, per session and in total; with usage in the
   captures, the prediction against the ``cache_read_input_tokens`` the server reported.
"""

from __future__ import annotations

import copy
import functools
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from warmturn import rules

from .cachemodel import CacheModel, Policy, common_prefix_len
from .kvsize import KVCost
from .sessions import assign_sessions, order_key

DEDUP_MIN_TOKENS = 32  # the server's --dedup-min-tokens default
RULE_NAMES = ("billing_block", "model_identity")  # the addon's default rules, each on or off


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way of normalizing the captured requests before they reach the cache."""

    name: str
    body: Callable[[dict], dict | None]  # record -> the body the backend would get
    pattern: str | None = None  # the suggested pattern it adds, if any


def make_rules(disabled: Sequence[str] = (), extra_fragments: Sequence[str] = ()) -> rules.Rules:
    """Today's default addon rules minus ``disabled`` (names in :data:`RULE_NAMES`), plus patterns."""
    unknown = set(disabled) - set(RULE_NAMES)
    if unknown:
        raise ValueError(f"unknown rule {', '.join(sorted(unknown))}: one of {', '.join(RULE_NAMES)}")
    billing = "billing_block" not in disabled
    return rules.Rules.make(
        patterns=rules.DEFAULT_VOLATILE_PATTERNS if billing else (),
        fragments=(rules.DEFAULT_VOLATILE_FRAGMENTS if billing else ()) + tuple(extra_fragments),
        identity="model_identity" not in disabled)


def _ruled(engine: rules.Rules) -> Callable[[dict], dict | None]:
    def body(rec: dict) -> dict | None:
        original = rec.get("original") or rec.get("body")
        return engine.apply(original)[0] if isinstance(original, dict) else None
    return body


def make_variants(records: Sequence[dict], disabled: Sequence[str] = (), suggestions: bool = True,
                  captured: bool = True) -> list[Variant]:
    """``none``, ``rules``, ``rules+<each diff suggestion>`` and (``captured``) ``as-captured``."""
    out = [Variant("none", lambda r: r.get("original") or r.get("body")),
           Variant("rules", _ruled(make_rules(disabled)))]
    if suggestions:
        from .diff import diff_records

        for s in diff_records(records).suggestions:
            name = f"rules+{s.poison or 'pattern'}@{s.path}"
            if any(v.name == name for v in out):
                name += f"#{len(out)}"
            out.append(Variant(name, _ruled(make_rules(disabled, [s.pattern])), s.pattern))
    if captured:
        out.append(Variant("as-captured", lambda r: r.get("body")))
    return out


# --------------------------------------------------------------------------- rendering


@dataclass
class Prepared:
    """One request as the cache sees it under one variant."""

    rec: dict
    tokens: np.ndarray | None  # None: the server would refuse it (unparseable, over the context)
    prefix_len: int = 0
    marks: tuple[int, ...] = ()  # where a cache that cannot be cut back keeps its state (checkpoints policy)
    reply: tuple[int, ...] = ()  # the answer's tokens, fed back after the prompt
    cut: bool = False  # stopped by max_tokens: the last token is fed back only if it ran batched
    refused: str | None = None


class Tokenizing:
    """The server's renderer over a tokenizer, refusing what the server would refuse."""

    def __init__(self, renderer: Any, context: int = 0) -> None:
        self.renderer = renderer
        self.context = context
        tok = renderer.tokenizer
        ids = getattr(tok, "eos_token_ids", None) or [getattr(tok, "eos_token_id", None)]
        self.eos = next((int(i) for i in ids if i is not None), None)
        self._marker: Any = None

    def prepare(self, rec: dict, body: dict | None, marks: bool) -> Prepared:
        from warmturn.server.render import hermes_call_text
        from warmturn.server.wire import RequestError, ToolUseBlock, parse_messages_request

        if not isinstance(body, dict):
            return Prepared(rec, None, refused="no JSON body")
        try:
            req = parse_messages_request(body)
            r = (self._marking() if marks else self.renderer).render(req)
        except (RequestError, ValueError, TypeError) as e:
            return Prepared(rec, None, refused=f"invalid request: {e}")
        if self.context and len(r.tokens) >= self.context:
            return Prepared(rec, None, refused=f"{len(r.tokens)} tokens: over the {self.context}-token context")
        # the engine's mark points (GenerationRequest.mark_points): system+tools end, history end, prompt end - 1
        points = tuple(sorted({p for p in (r.prefix_len, r.history_len, len(r.tokens) - 1) if 0 < p < len(r.tokens)}))
        reply: list[int] = []
        resp = rec.get("response") or {}
        content = resp.get("content") if isinstance(resp, dict) else None
        if isinstance(content, list) and content:
            parts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
            if not self.renderer.template_tools:
                parts += [hermes_call_text(ToolUseBlock(str(b.get("id", "")), str(b.get("name", "")), b.get("input") or {}))
                          for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
            reply = self.renderer.encode("\n".join(p for p in parts if p))
            out = (rec.get("usage") or {}).get("output_tokens")
            if isinstance(out, int) and out >= 0:
                reply = reply[:out]
            if rec.get("stop_reason") in ("end_turn", "tool_use", "stop_sequence") and self.eos is not None:
                reply.append(self.eos)  # the end-of-turn token is fed back too
        return Prepared(rec, np.asarray(r.tokens, dtype=np.int64), r.prefix_len, points if marks else (),
                        tuple(reply), rec.get("stop_reason") == "max_tokens")

    def _marking(self) -> Any:
        """The renderer that also finds where the history ends, as the server turns it on for
        models whose cache resumes only at marks (a copy: the shared renderer is left as it is)."""
        if self._marker is None:
            self._marker = copy.copy(self.renderer)
            self._marker.history_marks = True
        return self._marker


# --------------------------------------------------------------------------- results


@dataclass
class RequestResult:
    id: str
    session: str
    agent: str
    prompt_tokens: int
    read: int
    refused: str | None = None
    reported_read: int | None = None
    reported_prompt: int | None = None
    evictions: int = 0

    @property
    def prefilled(self) -> int:
        return self.prompt_tokens - self.read


@dataclass
class Totals:
    requests: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    read: int = 0
    evictions: int = 0

    @property
    def prefilled(self) -> int:
        return self.prompt_tokens - self.read

    @property
    def hit_rate(self) -> float:
        return self.read / self.prompt_tokens if self.prompt_tokens else 0.0

    def add(self, r: RequestResult) -> None:
        self.requests += 1
        self.refused += r.refused is not None
        self.prompt_tokens += r.prompt_tokens
        self.read += r.read
        self.evictions += r.evictions

    def as_dict(self, rate: float | None = None) -> dict:
        d = {"requests": self.requests, "refused": self.refused, "prompt_tokens": self.prompt_tokens,
             "read_tokens": self.read, "prefilled_tokens": self.prefilled, "hit_rate": round(self.hit_rate, 4),
             "evictions": self.evictions}
        if rate:
            d["prefill_seconds"] = round(self.prefilled / rate, 2)
            d["seconds_saved"] = round(self.read / rate, 2)
        return d


@dataclass
class VariantResult:
    name: str
    requests: list[RequestResult]
    pattern: str | None = None
    total: Totals = field(default_factory=Totals)
    sessions: dict[str, Totals] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.requests:
            self.total.add(r)
            self.sessions.setdefault(r.session, Totals()).add(r)

    def as_dict(self, rate: float | None = None) -> dict:
        out = {"name": self.name, **self.total.as_dict(rate),
               "sessions": [{"session": s, **t.as_dict(rate)} for s, t in self.sessions.items()]}
        if self.pattern:
            out["pattern"] = self.pattern
            out["set_arg"] = "--set " + shlex.quote(f"volatile_fragments={self.pattern}")
        return out


# --------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Settings:
    cost: KVCost
    ram_bytes: int
    disk_bytes: int = 0
    policy: Policy = "trimmable"
    slots: int | None = None
    dedup_min: int = DEDUP_MIN_TOKENS

    def model(self) -> CacheModel:
        return CacheModel(self.cost, self.ram_bytes, self.disk_bytes, self.policy, self.slots)


def _times(rec: dict, i: int) -> tuple[float, float, float]:
    """(arrival, checkpoint written, end) of a request; sequential when the capture has no times."""
    t = rec.get("t") or {}
    t0 = t.get("request")
    if not isinstance(t0, (int, float)):
        return float(i), float(i) + 0.25, float(i) + 0.5
    if isinstance(rec.get("queue_ms"), (int, float)):  # the engine fetched when the request joined
        t0 += rec["queue_ms"] / 1000
    end = next((t[k] for k in ("end", "first_content", "first_byte") if isinstance(t.get(k), (int, float))), t0)
    mid = next((t[k] for k in ("first_content", "first_byte") if isinstance(t.get(k), (int, float))), end)
    tck = max(float(t0) + 1e-6, float(min(mid, end)))  # each request: fetch, then checkpoint, then store
    return float(t0), tck, max(float(end), tck + 1e-6)


def replay(prepared: Sequence[Prepared], settings: Settings) -> list[RequestResult]:
    """Run the requests through a cache model, in recorded order and timing: one fresh cache per
    arm (A/B arms are separate server runs of the same traffic, never one cache)."""
    arms: dict[str, list[Prepared]] = {}
    for p in prepared:
        arms.setdefault(str(p.rec.get("arm")), []).append(p)
    return [r for group in arms.values() for r in _replay_one(group, settings)]


def _replay_one(prepared: Sequence[Prepared], settings: Settings) -> list[RequestResult]:
    cache = settings.model()
    events: list[tuple[float, int, int]] = []  # (time, phase, index): phase 0 store, 1 checkpoint, 2 fetch
    spans = [_times(p.rec, i) for i, p in enumerate(prepared)]
    for i, (t0, tck, t1) in enumerate(spans):
        events += [(t0, 2, i), (tck, 1, i), (t1, 0, i)]
    events.sort()
    # A request that ran alone is served outside the batch, where the token that hits max_tokens is
    # handed out without being fed back; one that overlapped another ran batched, which feeds it.
    alone = [not any(j != i and s0 < t1 and t0 < s1 for j, (s0, _, s1) in enumerate(spans))
             for i, (t0, _, t1) in enumerate(spans)]
    results: list[RequestResult | None] = [None] * len(prepared)
    in_flight: dict[int, int] = {}  # index -> tokens already computed (for dedup)
    for _t, phase, i in events:
        p = prepared[i]
        rec = p.rec
        if p.tokens is None:
            if phase == 2:
                results[i] = _result(rec, 0, 0, p.refused)
            continue
        q = p.tokens
        if phase == 2:
            reused = cache.fetch(q, _t)
            for j in in_flight:  # the engine parks a request on one in flight that shares its prefix
                shared = min(common_prefix_len(prepared[j].tokens, q), len(q) - 1)
                if settings.policy == "checkpoints":  # the leader can hand over its state at a mark only
                    shared = max((m for m in prepared[j].marks if m <= shared), default=0)
                if shared >= settings.dedup_min and shared > reused:
                    cache.store(prepared[j].tokens[:shared], (), _t)  # the leader shares what it computed
                    reused = shared
            in_flight[i] = reused
            results[i] = _result(rec, len(q), reused, None)
        elif phase == 1:
            if 0 < p.prefix_len < len(q) and in_flight.get(i, 0) < p.prefix_len:
                before = cache.counters.evictions
                cache.store(q[: p.prefix_len], (p.prefix_len,), _t)
                results[i].evictions += cache.counters.evictions - before
        else:
            in_flight.pop(i, None)
            reply = p.reply[:-1] if p.cut and alone[i] else p.reply
            held = np.concatenate([q, np.asarray(reply, dtype=np.int64)]) if reply else q
            cps = [p.prefix_len] if 0 < p.prefix_len < len(q) else []
            reused = results[i].read
            before = cache.counters.evictions
            cache.store(held, cps, _t, marks=[m for m in p.marks if m > reused])  # marks taken while reading
            results[i].evictions += cache.counters.evictions - before
    return [r for r in results if r is not None]


def _result(rec: dict, prompt: int, read: int, refused: str | None) -> RequestResult:
    u = rec.get("usage") or {}
    rep_read = u.get("cache_read_input_tokens") if isinstance(u.get("cache_read_input_tokens"), int) else None
    parts = [u.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
    rep_prompt = sum(x for x in parts if isinstance(x, int)) if isinstance(parts[0], int) else None
    if rep_read is None and rep_prompt is not None:
        rep_read = 0
    return RequestResult(str(rec.get("id")), str(rec.get("session")), str(rec.get("agent") or "main"),
                         prompt, read, refused, rep_read, rep_prompt)


# --------------------------------------------------------------------------- the whole run


def messages_in_order(records: Sequence[dict]) -> list[dict]:
    """The Messages requests with a body, sessions assigned, in recorded order."""
    msgs = [r for r in records if r.get("kind") == "messages" and isinstance(r.get("body") or r.get("original"), dict)]
    assign_sessions(msgs)
    return sorted(msgs, key=order_key)


def prepare_variant(msgs: Sequence[dict], variant: Variant, tok: Tokenizing, marks: bool) -> list[Prepared]:
    return [tok.prepare(r, variant.body(r), marks) for r in msgs]


def run_variants(msgs: Sequence[dict], variants: Sequence[Variant], tok: Tokenizing,
                 settings: Settings) -> list[VariantResult]:
    out = []
    for v in variants:
        prepared = prepare_variant(msgs, v, tok, settings.policy == "checkpoints")
        out.append(VariantResult(v.name, replay(prepared, settings), v.pattern))
    return out


def measured_prefill_rate(msgs: Sequence[dict]) -> float | None:
    """Prompt tokens computed per second of prefill, from the backend's own ``prefill_ms``."""
    toks = secs = 0.0
    for r in msgs:
        u = r.get("usage") or {}
        ms = r.get("prefill_ms")
        if isinstance(ms, (int, float)) and ms > 0 and isinstance(u.get("input_tokens"), int):
            toks += u.get("input_tokens", 0) + (u.get("cache_creation_input_tokens") or 0)
            secs += ms / 1000
    return toks / secs if secs > 0 and toks > 0 else None


# --------------------------------------------------------------------------- reality check


@dataclass
class SessionCheck:
    session: str
    requests: int
    prompt_tokens: int  # as the server reported them
    reported_read: int
    predicted_read: int
    abs_error: int  # sum over requests of |predicted - reported|
    prompt_mismatches: int  # requests whose rendered length differs from the reported prompt

    @property
    def error(self) -> float:
        return self.abs_error / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {"session": self.session, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "reported_read": self.reported_read, "predicted_read": self.predicted_read,
                "abs_error": self.abs_error, "error": round(self.error, 4),
                "prompt_mismatches": self.prompt_mismatches}


def check_against_reported(result: VariantResult) -> list[SessionCheck]:
    """Per session: the predicted cache reads against the server's ``cache_read_input_tokens``
    (requests the server reported usage for)."""
    out: dict[str, SessionCheck] = {}
    for r in result.requests:
        if r.reported_read is None or r.reported_prompt is None:
            continue
        c = out.setdefault(r.session, SessionCheck(r.session, 0, 0, 0, 0, 0, 0))
        c.requests += 1
        c.prompt_tokens += r.reported_prompt
        c.reported_read += r.reported_read
        c.predicted_read += r.read
        c.abs_error += abs(r.read - r.reported_read)
        c.prompt_mismatches += r.prompt_tokens != r.reported_prompt
    return list(out.values())


def default_dtype(model_dir: Path) -> str:
    """The served model's KV dtype: its config's, else float32 for warmturn's own f32 conversion."""
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return str(dtype) if dtype else ("float32" if model_dir.name.endswith("-f32") else "bfloat16")


@dataclass
class Options:
    """What ``python -m analysis whatif`` was asked (the CLI's flags, parsed)."""

    tokenizer: str | None = None
    model: str | None = None  # preset name or model dir (bytes per token, context); default: the tokenizer's
    kv_dtype: str | None = None
    ram_bytes: int | None = None
    disk_bytes: int = 0
    policy: str = "auto"
    slots: int | None = None
    rules_off: tuple[str, ...] = ()
    suggestions: bool = True
    prefill_rate: float | None = None
    prefix_order: str = "tools-first"
    context: int | None = None
    anthropic: bool = False  # every request's usage is Anthropic's own (else: captures with backend=passthrough)


def whatif(records: Sequence[dict], opts: Options, renderer: Any = None, model_dir: Path | None = None) -> dict:
    """The whole what-if run as one JSON-ready dict: ``settings``, ``variants`` (``name``,
    ``hit_rate``, ``prefilled_tokens``, ``evictions``, ``sessions``…) and ``check`` (per session,
    the as-captured prediction against the reported cache reads, when the captures have usage)."""
    from .kvsize import model_cost

    if renderer is None:
        renderer, model_dir = load_renderer(opts.tokenizer, opts.prefix_order)
    spec = opts.model or str(model_dir)
    cost = model_cost(spec, opts.kv_dtype or (default_dtype(model_dir) if not opts.model and model_dir else "bfloat16"))
    policy: Policy = ("trimmable" if cost.trimmable else "checkpoints") if opts.policy == "auto" else opts.policy
    from warmturn.server.cache import default_cache_bytes

    ram = default_cache_bytes() if opts.ram_bytes is None else opts.ram_bytes
    context = opts.context if opts.context is not None else cost.context
    settings = Settings(cost, ram, opts.disk_bytes, policy, opts.slots)
    msgs = messages_in_order(records)
    variants = make_variants(records, opts.rules_off, opts.suggestions, captured=False)
    results = run_variants(msgs, variants, Tokenizing(renderer, context), settings)
    anthropic = [r for r in msgs if opts.anthropic or r.get("backend") == "passthrough"]
    local = [r for r in msgs if not (opts.anthropic or r.get("backend") == "passthrough")]
    if any(r.get("usage") for r in local) and model_dir is not None:
        # the reality check replays what the backend got on the server that recorded it: the served
        # model's own cost, context and family policy, the server's default budget
        served = model_cost(str(model_dir), default_dtype(model_dir))
        check = Settings(served, default_cache_bytes(), 0, "trimmable" if served.trimmable else "checkpoints")
        results += run_variants(local, [Variant("as-captured", lambda r: r.get("body"))],
                                Tokenizing(renderer, served.context), check)
    rate, source = opts.prefill_rate, "given"
    if not rate:
        rate, source = measured_prefill_rate(msgs), "measured: the captures' prefill_ms"
    out = {
        "settings": {"requests": len(msgs), "sessions": len({r["session"] for r in msgs}),
                     "tokenizer": str(model_dir), "prefix_order": opts.prefix_order, "kv": cost.describe(),
                     "bytes_per_token": cost.per_token, "model": cost.name, "ram": fmt_bytes(ram), "ram_bytes": ram,
                     "disk": fmt_bytes(opts.disk_bytes) if opts.disk_bytes else "off",
                     "disk_bytes": opts.disk_bytes, "policy": policy, "slots": opts.slots, "context": context,
                     "rules_off": list(opts.rules_off), "prefill_rate": rate,
                     "prefill_rate_source": source if rate else None},
        "variants": [v.as_dict(rate) for v in results if v.name != "as-captured"],
    }
    captured = next((v for v in results if v.name == "as-captured"), None)
    if captured is not None:
        out["as_captured"] = captured.as_dict(rate)
        out["check"] = [c.as_dict() for c in check_against_reported(captured)]
    if anthropic:
        from . import anthropic as api

        verdicts = api.compare(anthropic)
        out["anthropic"] = {"summary": api.summarize(verdicts), "requests": [v.as_dict() for v in verdicts]}
    return out


class Served:
    """The server's view of a capture, for ``analysis diff``: prompts rendered by its renderer and
    the cache reads of every request (reported when the capture has usage, else replayed)."""

    def __init__(self, renderer: Any, model_dir: Path) -> None:
        from warmturn.server.cache import default_cache_bytes

        from .kvsize import model_cost

        self.renderer = renderer
        self.cost = model_cost(str(model_dir), default_dtype(model_dir))
        self.settings = Settings(self.cost, default_cache_bytes(), 0,
                                 "trimmable" if self.cost.trimmable else "checkpoints")

    def replay(self, records: Sequence[dict], original: bool = False) -> dict[str, tuple[np.ndarray, int, str]]:
        """``{record id: (prompt tokens, tokens read from the cache, "reported" | "predicted")}``."""
        msgs = messages_in_order(records)
        v = Variant("none", lambda r: r.get("original") or r.get("body")) if original else \
            Variant("as-captured", lambda r: r.get("body"))
        prepared = prepare_variant(msgs, v, Tokenizing(self.renderer, self.cost.context),
                                   self.settings.policy == "checkpoints")
        results = {r.id: r for r in replay(prepared, self.settings)}
        out = {}
        for p in prepared:
            r = results.get(str(p.rec.get("id")))
            if p.tokens is None or r is None:
                continue
            if not original and r.reported_read is not None:
                out[r.id] = (p.tokens, r.reported_read, "reported")
            else:
                out[r.id] = (p.tokens, r.read, "predicted")
        return out

    @staticmethod
    def shared(a: np.ndarray, b: np.ndarray) -> int:
        return common_prefix_len(a, b)


@functools.lru_cache(maxsize=4)
def load_renderer(tokenizer: str | None, prefix_order: str = "tools-first") -> tuple[Any, Path]:
    """The server's Renderer over a model's tokenizer (``default``: the default model's), offline.
    Loaded once per process (rendering is pure: one renderer serves every caller)."""
    from mlx_lm.utils import load_tokenizer

    from warmturn.server.convert import resolve_model
    from warmturn.server.render import Renderer

    path = resolve_model(None if tokenizer in (None, "", "default") else tokenizer)
    return Renderer(load_tokenizer(Path(path)), prefix_order=prefix_order), Path(path)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} B"
