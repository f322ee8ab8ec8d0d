"""The warmturn addon: normalize Claude Code requests, route them, tap responses, capture."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from collections.abc import Sequence
from typing import Any

import mitmproxy.types
from mitmproxy import command, ctx, exceptions, flow, http

from . import capture, openai_translate, routing, rules
from .sse import MessageFold, SSEDecoder
from .supervisor import EmbeddedServer, can_connect, default_python

logger = logging.getLogger(__name__)

META = capture.META
VIEW_COPY_LIMIT = 8 * 1024 * 1024
MODEL_ALIASES = ("claude-opus-4-8", "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "claude-haiku-4-5")


def error_response(status: int, kind: str, message: str) -> http.Response:
    """An Anthropic-shaped error response."""
    body = json.dumps(openai_translate.anthropic_error(kind, message)).encode()
    return http.Response.make(status, body, {"content-type": "application/json"})


def json_response(obj: Any, status: int = 200) -> http.Response:
    return http.Response.make(status, json.dumps(obj).encode(), {"content-type": "application/json"})


def models_listing() -> dict:
    data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in MODEL_ALIASES]
    return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}


def session_ids(req: http.Request, body: Any) -> tuple[str | None, str | None]:
    sid = req.headers.get("x-claude-code-session-id")
    if sid is None and isinstance(body, dict):
        uid = (body.get("metadata") or {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
        if isinstance(uid, str):
            try:
                parsed = json.loads(uid)
                if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str):
                    sid = parsed["session_id"]
            except ValueError:
                pass
    return sid, req.headers.get("x-claude-code-agent-id")


class _Live:
    """Per-flow objects that are not plain data (kept out of flow.metadata)."""

    def __init__(self, translator: openai_translate.StreamTranslator | None) -> None:
        self.translator = translator
        self.decoder = SSEDecoder()
        self.fold = MessageFold()
        self.copy = bytearray()
        self.size = 0


class Warmturn:
    def __init__(self) -> None:
        self.rules = rules.make_rules()
        self.backend = routing.parse_backend("embedded")
        self.server: EmbeddedServer | None = None
        self._live: dict[str, _Live] = {}
        self._running = False

    # ----- options -----------------------------------------------------------------------
    def load(self, loader) -> None:
        loader.add_option("backend", str, "embedded",
                          "Where Anthropic API requests go: 'embedded' (start and supervise the project's MLX "
                          "server, python -m server), 'passthrough' (keep the original destination: capture and "
                          "normalize only), or a base URL such as http://127.0.0.1:8000.")
        loader.add_option("backend_api", str, "anthropic",
                          "API the backend speaks: 'anthropic' (Messages API) or 'openai' (Chat Completions; "
                          "the addon translates requests and streamed responses both ways).",
                          choices=("anthropic", "openai"))
        loader.add_option("normalize", bool, True,
                          "Strip volatile system blocks, fragments and headers before forwarding. false forwards "
                          "payloads untouched (the A/B 'off' arm); captures are still written.")
        loader.add_option("capture_file", str, "captures/warmturn-{date}.jsonl",
                          "JSONL capture log, one line per API flow (docs/capture-format.md). '{date}' becomes "
                          "YYYYMMDD; relative paths are relative to the working directory; empty disables.")
        loader.add_option("capture_label", str, "",
                          "Free-form label written into every capture record (e.g. normalize-off).")
        loader.add_option("volatile_patterns", Sequence[str], list(rules.DEFAULT_VOLATILE_PATTERNS),
                          "Regexes (re.search, multiline): a system text block matching one is dropped whole.")
        loader.add_option("volatile_fragments", Sequence[str], list(rules.DEFAULT_VOLATILE_FRAGMENTS),
                          "Regexes: matching text is cut out of the system blocks that stay (and out of a string "
                          "system prompt).")
        loader.add_option("volatile_headers", Sequence[str], list(rules.DEFAULT_VOLATILE_HEADERS),
                          "Request header names dropped before forwarding (case-insensitive). Session and agent "
                          "id headers are kept: routers use them for cache affinity.")
        loader.add_option("backend_api_key", str, "",
                          "Credential sent to the backend instead of the client's (x-api-key for anthropic, "
                          "Authorization: Bearer for openai). Empty forwards the client's.")
        loader.add_option("backend_model", str, "",
                          "Model name sent to the backend instead of the client's claude-* name (e.g. "
                          "'default_model' for mlx_lm.server). Empty forwards the client's.")
        loader.add_option("allow_remote", bool, False,
                          "Serve non-loopback clients. Off by default: others get 403 permission_error.")
        loader.add_option("client_api_key", str, "",
                          "If set, API requests must carry this key (x-api-key or Authorization: Bearer), "
                          "else 401 authentication_error.")
        loader.add_option("embedded_python", str, "",
                          "Python that runs the embedded server; empty means ../.venv/bin/python relative to "
                          "the addon file.")
        loader.add_option("embedded_args", str, "",
                          "Extra arguments for python -m server (shell syntax), e.g. '--model /path/to/model'.")
        loader.add_option("embedded_port", int, 0,
                          "Port of the embedded server on 127.0.0.1; 0 picks a free port. If a server already "
                          "answers /health on this port it is reused, not started.")
        loader.add_option("embedded_log", str, "captures/embedded-server.log",
                          "Log file of the embedded server (stdout and stderr).")
        loader.add_option("embedded_start_timeout", int, 600,
                          "Seconds to wait for the embedded server's /health before requests fail.")

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if updated & {"volatile_patterns", "volatile_fragments", "volatile_headers"}:
            try:
                self.rules = rules.make_rules(o.volatile_patterns, o.volatile_fragments, o.volatile_headers)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
        if "backend" in updated:
            try:
                self.backend = routing.parse_backend(o.backend)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
            if self._running:
                self._reconcile_server()
        if "backend_api" in updated and o.backend_api not in ("anthropic", "openai"):
            raise exceptions.OptionsError(f"backend_api must be 'anthropic' or 'openai', not {o.backend_api!r}")
        if "embedded_args" in updated:
            try:
                shlex.split(o.embedded_args)
            except ValueError as e:
                raise exceptions.OptionsError(f"embedded_args: {e}") from e
        if "embedded_port" in updated and not 0 <= o.embedded_port <= 65535:
            raise exceptions.OptionsError(f"embedded_port must be 0..65535, not {o.embedded_port}")
        if "embedded_start_timeout" in updated and o.embedded_start_timeout <= 0:
            raise exceptions.OptionsError("embedded_start_timeout must be positive")

    # ----- lifecycle ---------------------------------------------------------------------
    def running(self) -> None:
        self._running = True
        self._reconcile_server()

    def done(self) -> None:
        self._running = False
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _reconcile_server(self) -> None:
        want = self.backend.kind == "embedded"
        if want and self.server is None:
            o = ctx.options
            self.server = EmbeddedServer(o.embedded_python or default_python(), shlex.split(o.embedded_args),
                                         o.embedded_port, o.embedded_log, float(o.embedded_start_timeout))
            self.server.start()
        elif not want and self.server is not None:
            self.server.stop()
            self.server = None

    # ----- interception (HTTPS_PROXY) ----------------------------------------------------
    def _rerouting(self, host: str | None) -> bool:
        return self.backend.kind != "passthrough" and (host or "").lower() in routing.ANTHROPIC_HOSTS

    def http_connect(self, f: http.HTTPFlow) -> None:
        """CONNECT api.anthropic.com while rerouting: answer it ourselves, so mitmproxy's eager
        strategy does not dial Anthropic (which fails offline and is never needed)."""
        if f.response or not self._rerouting(f.request.host):
            return
        peer = f.client_conn.peername
        if not ctx.options.allow_remote and peer and not routing.is_loopback(peer[0]):
            f.response = http.Response.make(403, b"warmturn serves loopback clients only")
            return
        now = time.time()
        f.response = http.Response(f.request.data.http_version, 200, b"Connection established", http.Headers(),
                                   b"", None, now, now)

    def tls_clienthello(self, data) -> None:
        """Likewise, no server TLS handshake first for api.anthropic.com when it is rerouted."""
        if self._rerouting(data.client_hello.sni):
            data.establish_server_tls_first = False

    # ----- request -----------------------------------------------------------------------
    async def request(self, f: http.HTTPFlow) -> None:
        if f.response or f.error:
            return
        o = ctx.options
        peer = f.client_conn.peername
        if not o.allow_remote and peer and not routing.is_loopback(peer[0]):
            logger.warning("warmturn: refused non-loopback client %s (set allow_remote=true to serve it)", peer[0])
            f.response = error_response(403, "permission_error",
                                        "warmturn serves loopback clients only (addon option allow_remote)")
            return
        if not routing.is_api_flow(f):
            return
        req = f.request
        now = time.time()
        kind = routing.api_kind(req.path)
        st: dict[str, Any] = {
            "kind": kind, "path": req.path, "mode": routing.mode_of(f), "backend": o.backend.strip(),
            "backend_api": o.backend_api, "normalize": o.normalize, "stripped": [],
            "t": {"request": req.timestamp_end or now},
        }
        f.metadata[META] = st
        if o.client_api_key and not self._client_key_ok(req, o.client_api_key):
            f.response = error_response(401, "authentication_error", "invalid x-api-key for this warmturn proxy")
            return

        raw = req.get_content(strict=False) or b""
        st["size_original"] = len(raw)
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        bill = rules.find_billing(body)
        st["session_id"], st["agent_id"] = session_ids(req, body)
        st["is_subagent"] = bool(st["agent_id"]) or bill.is_subagent
        if isinstance(body, dict):
            st["model"] = body.get("model") if isinstance(body.get("model"), str) else None
            st["stream"] = bool(body.get("stream", False))

        if o.normalize:
            if kind in ("messages", "count_tokens") and isinstance(body, dict):
                new_body, stripped = rules.strip_body(body, self.rules)
                if stripped:
                    body = new_body
                    req.content = rules.encode_body(body)
                    st["stripped"].extend(stripped)
            kept, hdr_stripped = rules.strip_headers(list(req.headers.items(multi=True)), self.rules)
            if hdr_stripped:
                for e in hdr_stripped:
                    req.headers.pop(e["name"], None)
                st["stripped"].extend(hdr_stripped)
        if kind in ("messages", "count_tokens"):
            st["prefix_hash"], st["prefix_chars"] = rules.prefix_stats(body)
        if st["stripped"]:
            self._annotate(f, st)

        await self._route(f, st, kind, body)
        st["size_forwarded"] = len(req.raw_content or b"")
        st["t"]["sent"] = time.time()

    @staticmethod
    def _client_key_ok(req: http.Request, key: str) -> bool:
        if req.headers.get("x-api-key") == key:
            return True
        auth = req.headers.get("authorization", "")
        return auth.lower().startswith("bearer ") and auth[7:].strip() == key

    def _annotate(self, f: http.HTTPFlow, st: dict) -> None:
        parts = []
        for e in st["stripped"]:
            if e["kind"] == "system_block":
                parts.append(f"system block {e['index']} ({len(e['block'].get('text', ''))} chars)")
            elif e["kind"] == "fragment":
                parts.append(f"{len(e['text'])} chars from {e['path']}")
            else:
                parts.append(f"header {e['name']}")
        prefix = st.get("prefix_chars")
        tail = f"; stable system+tools prefix now {prefix} chars" if prefix else ""
        f.comment = "warmturn stripped: " + ", ".join(parts) + tail
        f.marked = ":scissors:"

    async def _route(self, f: http.HTTPFlow, st: dict, kind: str, body: Any) -> None:
        o = ctx.options
        backend = self.backend
        if backend.kind == "passthrough":
            st["upstream"] = routing.route(f, backend)
            return
        if backend.kind == "embedded":
            server = self.server
            if server is None:
                f.response = error_response(503, "api_error", "warmturn: embedded backend is not running")
                return
            for _ in range(3):
                if not server.is_ready() and not await server.wait_ready(float(o.embedded_start_timeout)):
                    break
                if await can_connect(server.host, server.port):
                    break
                await asyncio.sleep(1.0)  # a dead child is noticed (and restarted) within 0.5 s
            if not server.is_ready() or not await can_connect(server.host, server.port):
                f.response = error_response(529, "overloaded_error",
                                            f"warmturn: embedded backend {server.base_url} is not ready: "
                                            f"{server.last_error or 'still starting'}")
                return
            backend = routing.parse_backend(server.base_url)
        name = o.backend.strip() if self.backend.kind == "url" else backend.url_for("")
        if o.backend_api == "openai":
            if kind == "models":
                f.response = json_response(models_listing())
                return
            if kind == "count_tokens":
                # OpenAI engines have no count endpoint: a rough estimate (~4 chars/token), documented.
                f.response = json_response({"input_tokens": max(1, len(f.request.raw_content or b"") // 4)})
                return
            if kind == "messages":
                if not isinstance(body, dict):
                    f.response = error_response(400, "invalid_request_error", "request body is not a JSON object")
                    return
                try:
                    oa = openai_translate.to_openai_request(body, o.backend_model or None)
                except ValueError as e:
                    f.response = error_response(400, "invalid_request_error", str(e))
                    return
                st["body"] = body  # the normalized Anthropic body (the forwarded one is its translation)
                f.request.content = json.dumps(oa, ensure_ascii=False).encode()
                f.request.headers["content-type"] = "application/json"
                for h in [h for h in f.request.headers if h.lower().startswith("anthropic-")]:
                    f.request.headers.pop(h, None)
                key = o.backend_api_key or f.request.headers.get("x-api-key")
                f.request.headers.pop("x-api-key", None)
                if key:
                    f.request.headers["authorization"] = f"Bearer {key}"
                st["upstream"] = routing.route(f, backend, "/v1/chat/completions")
                self._live[f.id] = _Live(openai_translate.StreamTranslator(st.get("model") or ""))
            else:
                st["upstream"] = routing.route(f, backend)
        else:
            if kind == "messages" and o.backend_model and isinstance(body, dict):
                f.request.content = rules.encode_body({**body, "model": o.backend_model})
            if o.backend_api_key:
                f.request.headers.pop("authorization", None)
                f.request.headers["x-api-key"] = o.backend_api_key
            st["upstream"] = routing.route(f, backend)
        if self.backend.kind == "url" and not await can_connect(backend.host, backend.port):
            f.response = error_response(502, "api_error", f"warmturn: backend {name} is unreachable")

    # ----- response ----------------------------------------------------------------------
    def responseheaders(self, f: http.HTTPFlow) -> None:
        st = f.metadata.get(META)
        if st is None or f.response is None:
            return
        st["t"]["response_headers"] = time.time()
        live = self._live.setdefault(f.id, _Live(None))
        if "text/event-stream" in f.response.headers.get("content-type", "") and f.response.status_code < 400:
            f.response.headers.pop("content-length", None)
            f.response.stream = self._make_tap(st, live)
        else:
            live.translator = None if f.response.status_code >= 400 else live.translator

    def _make_tap(self, st: dict, live: _Live):
        t = st["t"]

        def tap(chunk: bytes) -> bytes:
            now = time.time()
            if chunk and t.get("first_byte") is None:
                t["first_byte"] = now
            out = live.translator.feed(chunk) if live.translator is not None else chunk
            try:
                events = live.decoder.feed(out) if chunk else live.decoder.feed(out) + live.decoder.flush()
                for ev in events:
                    if live.fold.add(ev) and t.get("first_content") is None:
                        t["first_content"] = now
            except Exception:  # the tap must never break the stream
                logger.exception("warmturn: SSE tap failed")
            live.size += len(out)
            if len(live.copy) + len(out) <= VIEW_COPY_LIMIT:
                live.copy += out
            return out

        return tap

    def response(self, f: http.HTTPFlow) -> None:
        st = f.metadata.get(META)
        if st is None or f.response is None:
            return
        live = self._live.pop(f.id, None) or _Live(None)
        resp = f.response
        t = st["t"]
        t["end"] = time.time()
        t.setdefault("response_headers", resp.timestamp_start)
        if resp.stream:
            if live.copy:
                resp.stream = False
                resp.raw_content = bytes(live.copy)  # keep the stream for mitmweb's view
            st["size_response"] = live.size
        else:
            self._finish_buffered(f, st, live)
            t.setdefault("first_byte", resp.timestamp_start)
            if t.get("first_byte") is None:
                t["first_byte"] = resp.timestamp_start
            st["size_response"] = len(resp.raw_content or b"")
        fold = live.fold
        st["usage"] = fold.usage or None
        st["stop_reason"] = fold.stop_reason
        st["content"] = fold.content if st.get("kind") == "messages" else None
        if fold.error:
            st["error"] = fold.error
        if st.get("kind") == "messages" and fold.content and t.get("first_content") is None:
            t["first_content"] = t["end"]
        self._write(f)

    def _finish_buffered(self, f: http.HTTPFlow, st: dict, live: _Live) -> None:
        resp = f.response
        kind = st.get("kind")
        raw = resp.get_content(strict=False) or b""
        openai = st.get("backend_api") == "openai" and "body" in st
        if kind == "models" and resp.status_code >= 400:
            f.response = resp = json_response(models_listing())
            return
        if resp.status_code >= 400:
            try:
                body = json.loads(raw)
                anthropic_shaped = isinstance(body, dict) and body.get("type") == "error"
            except ValueError:
                anthropic_shaped = False
            if not anthropic_shaped:
                err = openai_translate.error_from_openai(resp.status_code, raw, st.get("upstream") or "?")
                resp.content = json.dumps(err).encode()
                resp.headers["content-type"] = "application/json"
                raw = resp.content
        elif openai and kind == "messages":
            try:
                translated = openai_translate.from_openai_response(json.loads(raw), st.get("model") or "")
            except (ValueError, AttributeError, TypeError) as e:
                translated = openai_translate.anthropic_error(
                    "api_error", f"backend {st.get('upstream')} sent an unreadable response: {e}")
                resp.status_code = 502
            resp.content = json.dumps(translated).encode()
            resp.headers["content-type"] = "application/json"
            raw = resp.content
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if kind == "messages" or resp.status_code >= 400:
            live.fold.add_body(parsed)
        elif kind == "count_tokens" and isinstance(parsed, dict) and isinstance(parsed.get("input_tokens"), int):
            live.fold.usage["input_tokens"] = parsed["input_tokens"]

    def error(self, f: http.HTTPFlow) -> None:
        st = f.metadata.get(META)
        if st is None:
            return
        live = self._live.pop(f.id, None)
        st["t"]["end"] = time.time()
        st["error"] = {"type": "proxy_error", "message": f.error.msg if f.error else "unknown error"}
        if live is not None and live.size:  # a stream cut short: keep what was seen
            st["size_response"] = live.size
            st["usage"] = live.fold.usage or None
            st["content"] = live.fold.content if st.get("kind") == "messages" else None
        self._write(f)

    def _write(self, f: http.HTTPFlow) -> None:
        st = f.metadata.get(META) or {}
        if st.get("captured"):
            return
        st["captured"] = True
        path = ctx.options.capture_file
        if not path:
            return
        try:
            capture.append_record(capture.expand_path(path), capture.build_record(f, ctx.options.capture_label))
        except OSError as e:
            logger.error("warmturn: cannot write capture %s: %s", path, e)

    # ----- commands ----------------------------------------------------------------------
    @command.command("warmturn.export")
    def export(self, flows: Sequence[flow.Flow], path: mitmproxy.types.Path) -> None:
        """Append the selected HTTP flows to a capture file (docs/capture-format.md)."""
        n = 0
        try:
            for fl in flows:
                if isinstance(fl, http.HTTPFlow):
                    capture.append_record(str(path), capture.build_record(fl, ctx.options.capture_label))
                    n += 1
        except OSError as e:
            raise exceptions.CommandError(f"cannot write {path}: {e}") from e
        logger.info("warmturn: exported %d flows to %s", n, path)
