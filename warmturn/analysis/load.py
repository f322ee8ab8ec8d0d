"""Read captures into records and DataFrames.

Three input shapes are accepted (see docs/analysis.md):

* warmturn capture JSONL (``docs/capture-format.md``, ``schema`` 1), one flow per line;
* raw JSONL of Anthropic Messages request bodies, one request per line (or a JSON array);
* request-log JSONL, one ``{"t", "method", "path", "headers", "body"}`` object per line
  (what ``bench/record.py`` writes);
* HAR files (``log.entries[].request.postData.text``), e.g. exported from a browser,
  mitmweb or Charles.

Every input becomes a *record*: a plain dict with the capture fields the analysis needs
(``body`` is the request body as the backend saw it, ``original`` the body as the client
sent it). Lines that cannot be read are counted, never fatal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from warmturn import protocol, rules

SCHEMA = 1
# A flow is warm when the prefix cache served at least this share of its prompt (cache read /
# prompt tokens). A turn that read 28% from the cache still prefilled 72% of its prompt: cold.
WARM_HIT_RATIO = 0.8
UNLABELLED = "unlabelled"  # the arm of flows without a label (A/B arms come only from labels)
_PROGRESS_BYTES = 8 << 20  # show progress for files larger than this


@dataclass
class LoadStats:
    """What happened while reading: per-file record and bad-line counts."""

    files: dict[str, dict[str, int]] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(f["records"] for f in self.files.values())

    @property
    def bad(self) -> int:
        return sum(f["bad"] for f in self.files.values())

    def _bad(self, source: str, line: int, reason: str) -> None:
        self.files[source]["bad"] += 1
        if len(self.bad_examples) < 10:
            self.bad_examples.append(f"{source}:{line}: {reason}")


@dataclass
class LoadResult:
    records: list[dict]
    stats: LoadStats


# --------------------------------------------------------------------------- restoring

# The addon's own rules module undoes what it stripped (docs/capture-format.md, ``stripped``).
parse_path = rules.parse_path


def restore_original(body: dict | None, headers: dict | None, stripped: Sequence[dict]) -> tuple[dict | None, dict]:
    """The client's original body and headers: the forwarded ones with ``stripped`` put back."""
    return rules.restore(body, headers, stripped)


# --------------------------------------------------------------------------- record building


def _lower_headers(headers) -> dict[str, str]:
    if isinstance(headers, dict):
        return {str(k).lower(): v for k, v in headers.items()}
    if isinstance(headers, list):  # HAR: [{"name":…, "value":…}]
        out: dict[str, str] = {}
        for h in headers:
            if isinstance(h, dict) and "name" in h:
                name = str(h["name"]).lower()
                out[name] = f"{out[name]}, {h.get('value', '')}" if name in out else h.get("value", "")
        return out
    return {}


def _base_record(source: str, line: int) -> dict:
    return {
        "source": source, "line": line, "id": f"{Path(source).name}:{line}", "kind": "messages",
        "label": None, "normalize": None, "session_id": None, "agent_id": None, "is_subagent": False,
        "model": None, "stream": None, "status": None, "error": None, "t": {}, "ttfb_ms": None,
        "queue_ms": None, "prefill_ms": None, "ttft_ms": None, "total_ms": None, "usage": None, "stop_reason": None,
        "prefix_hash": None,
        "stripped": [], "headers": {}, "body": None, "original": None, "original_headers": {},
        "shape": None, "response": None, "backend": None,
    }


def record_from_capture(obj: dict, source: str, line: int) -> dict:
    """A schema-1 capture line -> record. Raises ValueError for other schemas."""
    if obj.get("schema") != SCHEMA:
        raise ValueError(f"unsupported schema {obj.get('schema')!r}")
    rec = _base_record(source, line)
    for k in ("kind", "label", "normalize", "session_id", "agent_id", "model", "stream", "status",
              "error", "ttfb_ms", "ttft_ms", "total_ms", "queue_ms", "prefill_ms", "usage", "stop_reason",
              "prefix_hash", "side", "backend"):
        if k in obj:
            rec[k] = obj[k]
    rec["id"] = str(obj.get("id") or rec["id"])
    rec["t"] = obj.get("t") or {}
    rec["is_subagent"] = bool(obj.get("is_subagent"))
    rec["stripped"] = list(obj.get("stripped") or [])
    req = obj.get("request") or {}
    rec["headers"] = _lower_headers(req.get("headers"))
    body = req.get("body")
    rec["body"] = body if isinstance(body, dict) else None
    rec["original"], rec["original_headers"] = restore_original(rec["body"], rec["headers"], rec["stripped"])
    rec["response"] = obj.get("response") if isinstance(obj.get("response"), dict) else None
    rec["shape"] = "capture"
    return rec


def record_from_body(body: dict, source: str, line: int, headers: dict | None = None) -> dict:
    """A raw Anthropic Messages request body (no timings) -> record."""
    rec = _base_record(source, line)
    rec["headers"] = _lower_headers(headers or {})
    rec["body"] = body
    rec["original"], rec["original_headers"] = body, dict(rec["headers"])
    rec["model"] = body.get("model")
    rec["stream"] = body.get("stream")
    rec["session_id"] = protocol.session_id(rec["headers"], body)
    rec["agent_id"] = protocol.agent_id(rec["headers"])
    rec["is_subagent"] = protocol.is_subagent(rec["headers"], body)
    rec["shape"] = "raw"
    return rec


def records_from_har(har: dict, source: str, stats: LoadStats) -> list[dict]:
    """HAR ``log.entries`` -> records (Messages-shaped POST bodies only; others counted bad)."""
    entries = (har.get("log") or {}).get("entries")
    if not isinstance(entries, list):
        raise ValueError("HAR without log.entries")
    out = []
    for i, entry in enumerate(entries, 1):
        try:
            req = entry["request"]
            text = (req.get("postData") or {}).get("text")
            if not text:
                continue  # GETs, HEADs: nothing to analyse, not an error
            body = json.loads(text)
            if not isinstance(body, dict):
                raise ValueError("postData is not a JSON object")
            url = str(req.get("url", ""))
            path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
            rec = record_from_body(body, source, i, req.get("headers"))
            rec["kind"] = protocol.request_kind(path, body)
            rec["shape"] = "har"
            resp = entry.get("response") or {}
            rec["status"] = resp.get("status")
            started = entry.get("startedDateTime")
            if started:
                t0 = datetime.fromisoformat(str(started).replace("Z", "+00:00")).timestamp()
                tim = entry.get("timings") or {}
                before = sum(max(0.0, float(tim.get(k) or 0)) for k in ("blocked", "dns", "connect", "send"))
                wait = tim.get("wait")
                rec["t"] = {"request": t0}
                if wait is not None and float(wait) >= 0:
                    rec["ttfb_ms"] = before + float(wait)
                if entry.get("time") is not None:
                    rec["total_ms"] = float(entry["time"])
            content = (resp.get("content") or {}).get("text")
            if isinstance(content, str) and content:
                fold = protocol.MessageFold().add_bytes(content.encode("utf-8"))
                rec["usage"], rec["stop_reason"] = fold.usage or None, fold.stop_reason
            out.append(rec)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            stats._bad(source, i, f"HAR entry: {e}")
    return out


def _classify_line(obj, source: str, line: int, stats: LoadStats) -> list[dict]:
    if isinstance(obj, dict) and "schema" in obj:
        return [record_from_capture(obj, source, line)]
    if isinstance(obj, dict) and "log" in obj:
        return records_from_har(obj, source, stats)
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        return [record_from_body(obj, source, line)]
    if isinstance(obj, dict) and "path" in obj and "body" in obj:
        # a request log line: {"t", "method", "path", "headers", "body"} (bench/record.py writes these)
        body = obj["body"]
        if not isinstance(body, dict):
            return []  # HEAD / and other body-less requests: nothing to analyse
        rec = record_from_body(body, source, line, obj.get("headers"))
        rec["kind"] = protocol.request_kind(str(obj.get("path") or ""), body)
        rec["shape"] = "request-log"
        if isinstance(obj.get("t"), (int, float)):
            rec["t"] = {"request": float(obj["t"])}
        return [rec]
    raise ValueError("neither a capture record, a Messages request body nor a HAR")


def read_file(path: str | Path, stats: LoadStats, progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """All records of one file (any accepted shape); bad lines are counted in ``stats``."""
    path = Path(path)
    source = str(path)
    stats.files.setdefault(source, {"records": 0, "bad": 0})
    data = path.read_bytes()
    total = len(data)
    text = data.decode("utf-8", errors="replace")
    out: list[dict] = []
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        # A whole-file JSON document (HAR, or an array of bodies)? Try that before lines.
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, list):
            for i, obj in enumerate(doc, 1):
                try:
                    out.extend(_classify_line(obj, source, i, stats))
                except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
                    stats._bad(source, i, str(e))
            stats.files[source]["records"] += len(out)
            return out
        if isinstance(doc, dict) and "log" in doc:
            out = records_from_har(doc, source, stats)
            stats.files[source]["records"] += len(out)
            return out
    done = 0
    next_report = _PROGRESS_BYTES
    for i, raw in enumerate(text.splitlines(), 1):
        done += len(raw) + 1
        if progress and total > _PROGRESS_BYTES and done >= next_report:
            progress(source, done, total)
            next_report += _PROGRESS_BYTES
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            out.extend(_classify_line(obj, source, i, stats))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            stats._bad(source, i, str(e)[:200])
    if progress and total > _PROGRESS_BYTES:
        progress(source, total, total)
    stats.files[source]["records"] += len(out)
    return out


def stderr_progress(source: str, done: int, total: int) -> None:
    """Default progress reporter for long loads: one line per step on stderr."""
    print(f"  reading {Path(source).name}: {done / total:6.1%} of {total / 1e6:.1f} MB", file=sys.stderr)


def load_records(paths: Iterable[str | Path], labels: Sequence[str] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> LoadResult:
    """Read every file; the arm of each record is ``labels[i]``, else its own capture label, else
    ``unlabelled``. Arms come only from labels: files are not arms (two files of one unlabelled
    run are one arm), and unlabelled flows never become an A/B arm of their own."""
    paths = list(paths)
    if labels and len(labels) not in (1, len(paths)):
        raise ValueError(f"{len(labels)} labels for {len(paths)} files: give one, or one per file")
    stats = LoadStats()
    records: list[dict] = []
    for i, p in enumerate(paths):
        recs = read_file(p, stats, progress)
        forced = (labels[i] if len(labels) == len(paths) else labels[0]) if labels else None
        for r in recs:
            r["arm"] = forced or r.get("label") or UNLABELLED
            r["labelled"] = bool(forced or r.get("label"))
        records.extend(recs)
    return LoadResult(records, stats)


# --------------------------------------------------------------------------- flows DataFrame


def _num(x) -> float:
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def flows_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per Messages flow: timings, tokens, hit ratio, session turn, arm, cold/warm class."""
    from .sessions import assign_sessions

    msgs = [r for r in records if r.get("kind") == "messages"]
    assign_sessions(msgs)
    rows = []
    for r in msgs:
        u = r.get("usage") or {}
        t = r.get("t") or {}
        inp, read = _num(u.get("input_tokens")), _num(u.get("cache_read_input_tokens"))
        cre = _num(u.get("cache_creation_input_tokens"))
        prompt = float("nan") if pd.isna(inp) else sum(x for x in (inp, read, cre) if not pd.isna(x))
        rows.append({
            "arm": r.get("arm"), "labelled": bool(r.get("labelled", r.get("label"))), "source": Path(r["source"]).name,
            "line": r["line"], "id": r["id"], "session": r.get("session"), "agent": r.get("agent") or "main",
            "side": r.get("side"), "is_subagent": bool(r.get("is_subagent")),
            "model": r.get("model"), "status": r.get("status"),
            "error_type": (r.get("error") or {}).get("type") if isinstance(r.get("error"), dict) else None,
            "normalize": r.get("normalize"), "t_request": _num(t.get("request")),
            "ttfb_ms": _num(r.get("ttfb_ms")), "ttft_ms": _num(r.get("ttft_ms")), "total_ms": _num(r.get("total_ms")),
            "queue_ms": _num(r.get("queue_ms")), "prefill_ms": _num(r.get("prefill_ms")),
            "input_tokens": inp, "output_tokens": _num(u.get("output_tokens")),
            "cache_read_tokens": read, "cache_creation_tokens": cre, "prompt_tokens": prompt,
            "prefix_hash": r.get("prefix_hash"), "stripped_count": len(r.get("stripped") or []),
        })
    cols = ["arm", "labelled", "source", "line", "id", "session", "agent", "side", "is_subagent", "model", "status",
            "error_type", "normalize", "t_request", "ttfb_ms", "ttft_ms", "total_ms", "queue_ms", "prefill_ms",
            "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "prompt_tokens", "prefix_hash",
            "stripped_count"]
    df = pd.DataFrame(rows, columns=cols)
    return add_derived(df)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``uncached_tokens``, ``hit_ratio``, ``turn`` and ``cls`` to a flows frame.

    Pure over the columns, so tests can build frames from literal rows. ``cls`` is ``warm`` when
    the cache served at least 80% of the prompt (``hit_ratio`` >= ``WARM_HIT_RATIO``), ``cold``
    otherwise; when the backend reports no cache usage, ``cold`` is the first request of its
    prefix hash within its arm (the first of its session when there is no hash either). Side
    requests (``side``: Claude Code's title request) have no turn number and ``cls`` ``side``.
    """
    df = df.copy()
    for c in ("input_tokens", "cache_read_tokens", "cache_creation_tokens", "prompt_tokens", "t_request", "ttft_ms"):
        if c not in df:
            df[c] = float("nan")
        df[c] = pd.to_numeric(df[c], errors="coerce")
    missing_prompt = df["prompt_tokens"].isna()
    df.loc[missing_prompt, "prompt_tokens"] = (
        df.loc[missing_prompt, ["input_tokens", "cache_read_tokens", "cache_creation_tokens"]].sum(axis=1, min_count=1))
    df["uncached_tokens"] = df["prompt_tokens"] - df["cache_read_tokens"].fillna(0)
    df["hit_ratio"] = (df["cache_read_tokens"] / df["prompt_tokens"]).where(df["prompt_tokens"] > 0)
    if "agent" not in df:
        df["agent"] = "main"
    if "session" not in df:
        df["session"] = "s1"
    df["_order"] = range(len(df))
    if "arm_order" not in df:  # arms keep the order they first appear in (file order)
        first = {a: i for i, a in reversed(list(enumerate(df["arm"])))}
        df["arm_order"] = df["arm"].map(first)
    df = df.sort_values(["arm_order", "t_request", "_order"], na_position="last", kind="stable")
    side = df["side"].notna() if "side" in df else pd.Series(False, index=df.index)
    df["turn"] = (df[~side].groupby(["arm", "session", "agent"], dropna=False).cumcount() + 1).astype("Int64")
    key = df["prefix_hash"] if "prefix_hash" in df else pd.Series([None] * len(df), index=df.index)
    key = key.where(key.notna(), df["session"].astype(str) + "/" + df["agent"].astype(str))
    first_of_prefix = ~pd.DataFrame({"arm": df["arm"], "k": key}).duplicated()
    cold = (df["hit_ratio"] < WARM_HIT_RATIO).where(df["hit_ratio"].notna(), first_of_prefix)
    df["cls"] = cold.map({True: "cold", False: "warm"}).where(~side, "side")
    return df.drop(columns="_order").sort_values(["arm_order", "session", "agent", "turn"],
                                                 kind="stable").reset_index(drop=True)
