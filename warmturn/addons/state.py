"""The typed per-flow state the warmturn addons share, under one namespaced ``flow.metadata`` key.

The gate admits an API flow by storing a :class:`FlowState` at ``flow.metadata["warmturn.state"]``;
normalize, route and tap fill its fields, capture and console read them. While the flow is live
the value is the dataclass (with :class:`Live`, the stream objects that are not data); once every
addon is done with the flow, the last one in the chain, :class:`Freeze`, replaces it by its
plain-data form (:meth:`FlowState.to_json`), so ``mitmdump -w`` and mitmweb can save the flow and
:meth:`FlowState.of` reads either shape back (flows loaded from a file are exported the same way
as live ones).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from warmturn.protocol import MessageFold, RequestKind, SSEDecoder
from warmturn.rules import Stripped, stripped_from_json

if TYPE_CHECKING:
    from .backends import BackendAdapter

META = "warmturn.state"
_unfrozen: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()  # admitted flows still holding a dataclass


@dataclass
class Timings:
    """Unix timestamps of one flow (docs/capture-format.md, ``t``)."""

    request: float | None = None
    sent: float | None = None
    response_headers: float | None = None
    first_byte: float | None = None
    first_content: float | None = None
    end: float | None = None


@dataclass
class Live:
    """What only a live flow has: its backend adapter, the stream translator and tap objects."""

    adapter: BackendAdapter | None = None
    translate: Callable[[bytes], bytes] | None = None
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    fold: MessageFold = field(default_factory=MessageFold)
    copy: bytearray = field(default_factory=bytearray)  # the stream, for mitmweb's view (bounded)
    size: int = 0


@dataclass
class FlowState:
    """Everything warmturn learns about one API flow; capture writes it out as one JSONL line."""

    kind: RequestKind = "other"
    path: str = ""
    mode: str = "regular"
    backend: str = ""
    backend_api: str = "anthropic"
    normalize: bool = False
    t: Timings = field(default_factory=Timings)
    session_id: str | None = None
    agent_id: str | None = None
    is_subagent: bool = False
    model: str | None = None
    stream: bool = False
    stripped: list[Stripped] = field(default_factory=list)
    prefix_hash: str | None = None
    prefix_chars: int | None = None
    upstream: str | None = None
    size_original: int | None = None
    size_forwarded: int | None = None
    size_response: int | None = None
    #: the backend's own timings of this request, when it reports them (the embedded server does)
    queue_ms: float | None = None
    side: str | None = None  # a side request (protocol.side_request: "title"), not a conversation turn
    prefill_ms: float | None = None
    #: the normalized Anthropic body when what was forwarded is a translation of it (backend_api=openai)
    translated_from: Any = None
    usage: dict[str, int] | None = None
    stop_reason: str | None = None
    content: list[dict] | None = None
    error: dict[str, str] | None = None
    captured: bool = False
    body: Any = field(default=None, repr=False)  # the parsed request body (live only)
    live: Live = field(default_factory=Live, repr=False)

    _NOT_DATA = ("body", "live")

    @classmethod
    def of(cls, flow: http.HTTPFlow) -> FlowState | None:
        """The flow's state (live dataclass or saved plain data), or None for flows warmturn did not admit."""
        value = flow.metadata.get(META)
        if value is None or isinstance(value, FlowState):
            return value
        if isinstance(value, dict):
            return cls.from_json(value)
        return None

    @classmethod
    def admitted(cls, flow: http.HTTPFlow) -> FlowState | None:
        """The state of a live admitted flow, answered already or not (each addon records its
        part of every admitted flow, a refused one included). None otherwise."""
        return cls.of(flow) if flow.live else None

    def attach(self, flow: http.HTTPFlow) -> FlowState:
        flow.metadata[META] = self
        _unfrozen.add(flow)
        return self

    def freeze(self, flow: http.HTTPFlow) -> None:
        """Replace the live state by its plain-data form (the flow can then be saved)."""
        flow.metadata[META] = self.to_json()
        _unfrozen.discard(flow)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in self._NOT_DATA:
                continue
            value = getattr(self, f.name)
            if f.name == "t":
                value = dataclasses.asdict(value)
            elif f.name == "stripped":
                value = [e.to_json() for e in value]
            out[f.name] = value
        return out

    @classmethod
    def freeze_all(cls) -> None:
        """Freeze every admitted flow that never finished (at shutdown, before mitmproxy's Save
        addon writes unfinished flows: it can only serialize plain data)."""
        for flow in list(_unfrozen):
            state = flow.metadata.get(META)
            if isinstance(state, FlowState):
                state.freeze(flow)
        _unfrozen.clear()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FlowState:
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._NOT_DATA)
        kwargs = {k: v for k, v in data.items() if k in names}
        t = kwargs.pop("t", None) or {}
        kwargs["t"] = Timings(**{k: v for k, v in t.items() if k in {f.name for f in dataclasses.fields(Timings)}})
        kwargs["stripped"] = [stripped_from_json(e) for e in kwargs.get("stripped") or []]
        return cls(**kwargs)


class Freeze:
    """The end of a flow's state: when the flow ends (``response``, ``error``) the live state becomes
    plain data, and at shutdown so does that of every flow that never ended (mitmproxy's Save addon
    writes unfinished flows after every ``done`` hook). Last in the chain, so that every other
    addon reads the live state, in any order."""

    def response(self, flow: http.HTTPFlow) -> None:
        self._freeze(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._freeze(flow)

    def done(self) -> None:
        FlowState.freeze_all()

    @staticmethod
    def _freeze(flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(META)
        if isinstance(state, FlowState) and flow.live:
            state.freeze(flow)
