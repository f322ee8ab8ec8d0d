"""Relay: a loopback hop between mitmproxy and a backend that always finishes the response in
Anthropic's shape, even when the backend dies mid-request.

mitmproxy answers a backend that closes the connection with its own HTML 502 page, and cuts a
stream short without a word; an Anthropic client then sees no error it understands (an addon's
``error`` hook cannot replace that page). So flows to an ``http://`` or ``https://`` backend (the
embedded server, local engines, an engine behind TLS) go through this relay, which runs on
mitmproxy's event loop (stdlib asyncio, no thread):

- the route addon registers the real target for one flow and gets a one-time token; the flow is
  pointed at the relay with the token in ``x-warmturn-relay`` (removed before forwarding; a
  connection without a known token is refused, so the relay is no open proxy);
- for an ``https://`` backend the relay is the TLS client: certificates are verified against
  mitmproxy's own trust settings (see :func:`make_tls_context`), and a certificate that does not
  verify is a ``502`` Anthropic ``api_error`` that says which option accepts it;
- the request is copied to the backend as it arrives (``Connection: close``: one request per
  connection), the response back as it arrives, whole chunks at a time;
- if the backend cannot be reached or closes before its response headers, mitmproxy receives a
  complete ``502`` Anthropic ``api_error`` JSON answer; if it dies during a chunked SSE stream,
  the stream gets an error event (``event: error`` for Anthropic engines, OpenAI's ``data:
  {"error": …}`` for Chat Completions engines, which the stream translator maps) and a proper end;
- when mitmproxy drops the connection (the client went away) the backend connection is closed
  at once, so the backend cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import ssl
import time
from dataclasses import dataclass

from warmturn.protocol import encode_sse, error_for_status

logger = logging.getLogger(__name__)

TOKEN_HEADER = b"x-warmturn-relay"
HEAD_LIMIT = 1 << 20  # request/response header block
TOKEN_TTL_S = 600.0


class _Cut(Exception):
    """The backend went away; `started` says whether response bytes were already sent."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    api: str  # "anthropic" | "openai": the shape of a stream error event
    tls: bool = False  # an https:// backend: the relay opens TLS to it


@dataclass(frozen=True)
class TlsSettings:
    """What the relay's TLS client takes from mitmproxy's options of the same names, so that a
    backend reached through the relay is trusted exactly as mitmproxy would trust it."""

    insecure: bool = False  # ssl_insecure: no certificate or host name check
    trusted_ca: str | None = None  # ssl_verify_upstream_trusted_ca: a PEM file of trusted CAs
    trusted_confdir: str | None = None  # ssl_verify_upstream_trusted_confdir: a c_rehash directory
    client_certs: str | None = None  # client_certs: a PEM file, or a directory of <host>.pem


def default_ca_file() -> str | None:
    """The CA bundle mitmproxy verifies upstream servers against when no trusted CA is
    configured (certifi's, a dependency of mitmproxy; None: the system's)."""
    try:
        import certifi  # mitmproxy.net.tls verifies against certifi.where() by default
    except ImportError:
        return None
    return certifi.where()


def make_tls_context(settings: TlsSettings, host: str) -> ssl.SSLContext:
    """The relay's TLS client context for one backend host (raises ``OSError``/``ValueError``
    for unreadable CA or client-certificate files). Verification and the host name check are on
    unless ``insecure``; HTTP/1.1 is the only protocol offered, as the relay speaks it."""
    if settings.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.options |= ssl.OP_LEGACY_SERVER_CONNECT  # as mitmproxy does with ssl_insecure
    else:
        cafile, capath = settings.trusted_ca, settings.trusted_confdir
        if cafile is None and capath is None:
            cafile = default_ca_file()
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    if settings.client_certs:
        path = os.path.expanduser(settings.client_certs)
        if os.path.isdir(path):
            path = os.path.join(path, f"{host}.pem")
        if os.path.isfile(path):
            context.load_cert_chain(path)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _headers(block: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = block.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        fields.append((name.strip(), value.strip()))
    return lines[0], fields


def _get(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in fields:
        if k.lower() == name:
            return v
    return None


def _assemble(first: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    out = [first] + [k + b": " + v for k, v in fields if k.lower() != b"connection"] + [b"connection: close", b"", b""]
    return b"\r\n".join(out)


def _json_response(status: int, message: str) -> bytes:
    body = json.dumps(error_for_status(status, message)).encode()
    head = (f"HTTP/1.1 {status} Bad Gateway\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


def stream_error_event(api: str, message: str) -> bytes:
    """The SSE bytes that tell a client its stream failed, in the backend's API."""
    if api == "openai":
        return b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"
    return encode_sse(error_for_status(502, message))


class _Sink:
    """Where a request body goes: a writer that keeps accepting when its peer stops reading. After
    the first error (or with no writer) it drops what it is given, so the body is still read to its
    end (closing a connection with unread bytes resets it, and the answer can be lost with it);
    `error` says what went wrong."""

    def __init__(self, writer: asyncio.StreamWriter | None = None) -> None:
        self.writer = writer
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.writer is not None and self.error is None:
            try:
                self.writer.write(data)
            except OSError as e:
                self.error = e

    async def drain(self) -> None:
        if self.writer is not None and self.error is None:
            try:
                await self.writer.drain()
            except OSError as e:
                self.error = e


async def _copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | _Sink,
                     fields: list[tuple[bytes, bytes]], *, until_eof: bool) -> None:
    """Copy one message body framed by `fields`; chunked bodies one whole chunk at a time (a
    chunk cut short is never forwarded)."""
    if b"chunked" in (_get(fields, b"transfer-encoding") or b"").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                trailer = b""
                while True:
                    line = await reader.readuntil(b"\r\n")
                    trailer += line
                    if line == b"\r\n":
                        break
                writer.write(b"0\r\n" + trailer)
                await writer.drain()
                return
            data = await reader.readexactly(size + 2)
            writer.write(size_line + data)
            await writer.drain()
    length = _get(fields, b"content-length")
    if length is not None:
        remaining = int(length)
        while remaining > 0:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            writer.write(data)
            await writer.drain()
        return
    if until_eof:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()


class Relay:
    """One loopback listener; :meth:`register` a target per flow, then send the flow to
    ``127.0.0.1:port`` with ``x-warmturn-relay: <token>``."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._routes: dict[str, tuple[Target, float]] = {}
        self._tls = TlsSettings()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.rescued = 0  # failures answered in Anthropic's shape (for tests and the log)

    @property
    def tls(self) -> TlsSettings:
        return self._tls

    @tls.setter
    def tls(self, settings: TlsSettings) -> None:
        if settings != self._tls:
            self._tls = settings
            self._contexts.clear()

    def tls_context(self, host: str) -> ssl.SSLContext:
        """The TLS client context for `host`, made once per host and settings."""
        context = self._contexts.get(host)
        if context is None:
            context = self._contexts[host] = make_tls_context(self._tls, host)
        return context

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT)
            self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def register(self, host: str, port: int, api: str = "anthropic", tls: bool = False) -> str:
        now = time.monotonic()
        for tok, (_, at) in list(self._routes.items()):  # tokens of flows that never arrived
            if now - at > TOKEN_TTL_S:
                del self._routes[tok]
        token = secrets.token_urlsafe(18)
        self._routes[token] = (Target(host, port, api, tls), now)
        return token

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        backend_w: asyncio.StreamWriter | None = None
        try:
            head = await client_r.readuntil(b"\r\n\r\n")
            first, fields = _headers(head[:-4])
            token = (_get(fields, TOKEN_HEADER) or b"").decode("latin-1")
            route = self._routes.pop(token, None)
            if route is None:
                await _copy_body(client_r, _Sink(), fields, until_eof=False)
                client_w.write(_json_response(502, "warmturn relay: unknown route"))
                return
            target = route[0]
            fields = [(k, v) for k, v in fields if k.lower() != TOKEN_HEADER]
            method = first.split(b" ", 1)[0].upper()
            where = f"{'https://' if target.tls else ''}{target.host}:{target.port}"
            try:
                backend_r, backend_w = await self._open(target)
            except ssl.SSLCertVerificationError as e:
                self.rescued += 1
                logger.warning("warmturn: backend %s: TLS certificate did not verify (%s)", where, e.verify_message)
                await _copy_body(client_r, _Sink(), fields, until_eof=False)
                client_w.write(_json_response(502, f"warmturn: the TLS certificate of backend {where} did not verify "
                                                   f"({e.verify_message}); trust its CA with --set "
                                                   f"ssl_verify_upstream_trusted_ca=FILE, or --set ssl_insecure=true"))
                return
            except (OSError, ValueError, asyncio.TimeoutError) as e:
                self.rescued += 1
                await _copy_body(client_r, _Sink(), fields, until_eof=False)
                client_w.write(_json_response(502, f"warmturn: backend {where} is unreachable: {e!r}"))
                return
            backend_w.write(_assemble(first, fields))
            sink = _Sink(backend_w)
            await _copy_body(client_r, sink, fields, until_eof=False)
            if sink.error is not None:
                # it answered early and closed, or died: an answer that outlived the reset is forwarded
                # below, else the client gets the 502 JSON (asyncio drops what it buffered on a reset)
                logger.debug("warmturn relay: backend %s stopped reading the request: %r", where, sink.error)
            watch = asyncio.ensure_future(client_r.read(1))  # EOF: mitmproxy (the client) went away
            try:
                await self._answer(backend_r, client_w, method, target, where, watch)
            finally:
                watch.cancel()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError) as e:
            logger.debug("warmturn relay: connection ended: %r", e)
        finally:
            if backend_w is not None:
                backend_w.close()
            with contextlib.suppress(ConnectionError):
                await client_w.drain()
            client_w.close()

    async def _open(self, target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the backend (TLS for an https:// one, with SNI and the host name check)."""
        if not target.tls:
            return await asyncio.wait_for(asyncio.open_connection(target.host, target.port), 10)
        return await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=self.tls_context(target.host),
                                    server_hostname=target.host, ssl_handshake_timeout=10), 15)

    async def _answer(self, backend_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, method: bytes,
                      target: Target, where: str, watch: asyncio.Future) -> None:
        read_head = asyncio.ensure_future(backend_r.readuntil(b"\r\n\r\n"))
        done, _ = await asyncio.wait({read_head, watch}, return_when=asyncio.FIRST_COMPLETED)
        if read_head not in done:  # the client left while the backend was still working
            read_head.cancel()
            return
        try:
            head = read_head.result()
        except (asyncio.IncompleteReadError, OSError) as e:  # OSError: resets, TLS errors (ssl.SSLError)
            self.rescued += 1
            logger.warning("warmturn: backend %s closed the connection before answering (%r)", where, e)
            client_w.write(_json_response(502, f"warmturn: backend {where} closed the connection before "
                                               f"answering (did it crash? see its log)"))
            return
        first, fields = _headers(head[:-4])
        status = int(first.split(b" ", 2)[1]) if len(first.split(b" ")) > 1 else 0
        while 100 <= status < 200 and status != 101:  # interim answers (100 Continue, 103): not forwarded
            first, fields = _headers((await backend_r.readuntil(b"\r\n\r\n"))[:-4])
            status = int(first.split(b" ", 2)[1]) if len(first.split(b" ")) > 1 else 0
        client_w.write(_assemble(first, fields))
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return
        chunked = b"chunked" in (_get(fields, b"transfer-encoding") or b"").lower()
        sse = b"text/event-stream" in (_get(fields, b"content-type") or b"").lower()
        copy = asyncio.ensure_future(_copy_body(backend_r, client_w, fields, until_eof=True))
        done, _ = await asyncio.wait({copy, watch}, return_when=asyncio.FIRST_COMPLETED)
        if copy not in done:
            copy.cancel()
            return
        try:
            copy.result()
        except (asyncio.IncompleteReadError, OSError) as e:  # OSError: resets, TLS errors (ssl.SSLError)
            if not (chunked and sse):
                raise  # a cut JSON body cannot be mended: let the client see it incomplete
            self.rescued += 1
            logger.warning("warmturn: backend %s died mid-stream (%r): ending the stream with an error event",
                           where, e)
            event = b"\n\n" + stream_error_event(target.api, f"warmturn: backend {where} died mid-stream")
            client_w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
