"""Normalize: strip cache-busting content from admitted API requests (rules: :mod:`warmturn.rules`).

Parses the request body once (the state keeps it for the route addon), records the client's
identity (session, agent, subagent), applies the ``volatile_*`` rules when ``normalize`` is on,
and notes what it removed on the flow (comment and marker in mitmweb).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, exceptions, http

from warmturn import protocol, rules

from .state import FlowState

logger = logging.getLogger(__name__)

#: bodies larger than this are parsed and re-encoded on a worker thread, not on mitmproxy's loop
OFF_LOOP_BYTES = 512 * 1024


def parse_body(raw: bytes) -> object:
    """The decoded JSON body, or None (not JSON, nested too deep for the decoder, or not UTF-8)."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


class Normalize:
    def __init__(self) -> None:
        self.rules = rules.Rules.make()
        self.enabled = True

    def load(self, loader) -> None:
        loader.add_option("normalize", bool, True,
                          "Strip volatile system blocks, fragments and headers before forwarding. false forwards "
                          "payloads untouched (the A/B 'off' arm); captures are still written.")
        loader.add_option("volatile_patterns", Sequence[str], list(rules.DEFAULT_VOLATILE_PATTERNS),
                          "Regexes (re.search, multiline): a system text block matching one is dropped whole.")
        loader.add_option("volatile_fragments", Sequence[str], list(rules.DEFAULT_VOLATILE_FRAGMENTS),
                          "Regexes: matching text is cut out of the system blocks that stay (and out of a string "
                          "system prompt).")
        loader.add_option("volatile_headers", Sequence[str], list(rules.DEFAULT_VOLATILE_HEADERS),
                          "Request header names dropped before forwarding (case-insensitive). Session and agent "
                          "id headers are kept: routers use them for cache affinity.")
        loader.add_option("canonical_model_identity", bool, True,
                          "Rewrite the model's display name and id where Claude Code writes them into system text, "
                          "tool descriptions and role=system messages ('You are powered by the model named ...', "
                          "'Co-Authored-By: Claude ...') to one stable form, so a changed name (2.1.197's '(1M "
                          "context)' in a first -p turn only, or a model switch) does not bust the prefix cache. "
                          "Only the name and id change; every instruction stays.")

    def configure(self, updated: set[str]) -> None:
        if "normalize" in updated:
            self.enabled = ctx.options.normalize
        if updated & {"volatile_patterns", "volatile_fragments", "volatile_headers", "canonical_model_identity"}:
            o = ctx.options
            try:
                self.rules = rules.Rules.make(o.volatile_patterns, o.volatile_fragments, o.volatile_headers,
                                              o.canonical_model_identity)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e

    async def request(self, flow: http.HTTPFlow) -> None:
        state = FlowState.admitted(flow)
        if state is None:
            return
        state.normalize = self.enabled
        if flow.response or flow.error:
            return
        req = flow.request
        raw = req.get_content(strict=False) or b""
        state.size_original = len(raw)
        big = len(raw) > OFF_LOOP_BYTES
        body: Any = await asyncio.to_thread(parse_body, raw) if big else parse_body(raw)
        try:
            if big:
                await asyncio.to_thread(self._apply, flow, state, body)
            else:
                self._apply(flow, state, body)
        except Exception as e:  # noqa: BLE001 - an odd body is forwarded as the client sent it
            logger.warning("warmturn: not normalizing flow %s (%s: %s); forwarding it unchanged",
                           flow.id, type(e).__name__, e)
            req.content = raw
            state.stripped.clear()
            state.body = body
        if state.stripped:
            tail = f"; stable system+tools prefix now {state.prefix_chars} chars" if state.prefix_chars else ""
            flow.comment = "warmturn stripped: " + rules.describe(state.stripped) + tail
            flow.marked = ":scissors:"

    def _apply(self, flow: http.HTTPFlow, state: FlowState, body: Any) -> None:
        """Identity, normalization and prefix statistics of one parsed body (pure of the loop)."""
        req = flow.request
        state.session_id = protocol.session_id(req.headers, body)
        state.agent_id = protocol.agent_id(req.headers)
        state.is_subagent = protocol.is_subagent(req.headers, body)
        if state.kind == "messages":
            state.side = protocol.side_request(req.headers, body)
        if isinstance(body, dict):
            state.model = body.get("model") if isinstance(body.get("model"), str) else None
            state.stream = bool(body.get("stream", False))
        if state.normalize:
            if state.kind in ("messages", "count_tokens"):
                new_body, stripped = self.rules.apply(body)
                if stripped:
                    body = new_body
                    req.content = rules.encode_body(body)
                    state.stripped.extend(stripped)
            _, dropped = self.rules.apply_headers(req.headers.items(multi=True))
            for e in dropped:
                req.headers.pop(e.name, None)
            state.stripped.extend(dropped)
        state.body = body
        if state.kind in ("messages", "count_tokens"):
            state.prefix_hash, state.prefix_chars = rules.prefix_stats(body)
