"""Relay: a loopback hop between mitmproxy and a backend that always finishes the response in
Anthropic's shape, even when the backend dies mid-request.

mitmproxy answers a backend that closes the connection with its own HTML 502 page, and cuts a
stream short without a word; an Anthropic client then sees no error it understands (an addon's
``error`` hook cannot replace that page). So API flows to an ``http://`` or ``https://`` backend
(the embedded server, local engines, an engine behind TLS, and with ``backend=passthrough`` the
real API) go through this relay, which runs on mitmproxy's event loop (stdlib asyncio, no thread)
and frames HTTP/1.1 both ways with ``h11`` (a dependency of mitmproxy's):

- the route addon registers the real target for one flow and gets a one-time token; the flow is
  pointed at the relay with the token in ``x-warmturn-relay`` (removed before forwarding; a
  request without a known token is refused, so the relay is no open proxy);
- connections to each backend are kept alive and reused (:class:`Pool`): a burst of requests
  (Claude Code's ``/context`` sends 26 ``count_tokens`` calls) shares a few connections instead
  of opening one each; an idle connection is dropped when the backend closes it or after
  :data:`POOL_IDLE_S`. The adapters' "is the backend up" probe (:meth:`Relay.reachable`) is
  answered by a live pooled connection, or opens the connection the request then uses;
- for an ``https://`` backend the relay is the TLS client: certificates are verified against
  mitmproxy's own trust settings (see :func:`make_tls_context`), and a certificate that does not
  verify is a ``502`` Anthropic ``api_error`` that says which option accepts it;
- the request is copied to the backend as it arrives, the response back as it arrives (a chunked
  body one whole chunk at a time: a chunk cut short is never forwarded);
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

from warmturn.protocol import encode_sse, error_for_status

logger = logging.getLogger(__name__)

TOKEN_HEADER = b"x-warmturn-relay"
HEAD_LIMIT = 1 << 20  # request/response header block
TOKEN_TTL_S = 600.0
READ_SIZE = 1 << 16
#: an idle pooled connection is closed after this long: below uvicorn's default keep-alive
#: timeout (5 s, the embedded server's), so the relay never reuses one the backend is closing
POOL_IDLE_S = 4.0
POOL_MAX_IDLE = 32  # idle connections kept per backend
CONNECT_TIMEOUT_S = 10.0
#: connection-level headers: they describe one hop, not the message (RFC 9110 7.6.1)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", TOKEN_HEADER})


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    api: str = "anthropic"  # "anthropic" | "openai": the shape of a stream error event
    tls: bool = False  # an https:// backend: the relay opens TLS to it

    @property
    def where(self) -> str:
        return f"{'https://' if self.tls else ''}{self.host}:{self.port}"


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


def error_body(status: int, message: str) -> bytes:
    return json.dumps(error_for_status(status, message)).encode()


def stream_error_event(api: str, message: str) -> bytes:
    """The SSE bytes that tell a client its stream failed, in the backend's API."""
    if api == "openai":
        return b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"
    return encode_sse(error_for_status(502, message))


async def can_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to host:port opens (closed again at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


class ClientGone(Exception):
    """mitmproxy closed its connection to the relay (its client went away)."""


class Wire:
    """One HTTP/1.1 connection (h11 state machine over an asyncio stream pair), either role.

    ``broken`` is set by the first failed write: later writes are dropped, so that a request body
    is still read to its end from the other side (closing a connection with unread bytes resets
    it, and the answer can be lost with it)."""

    def __init__(self, role: type, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.h11 = h11.Connection(role, max_incomplete_event_size=HEAD_LIMIT)
        self.reader, self.writer = reader, writer
        self.broken: OSError | None = None

    async def receive(self, read: Callable[[], Awaitable[bytes]] | None = None) -> h11.Event:
        """The next event (h11.RemoteProtocolError: the peer broke the protocol or closed mid-message)."""
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await (read or self.read)())
        return event

    async def read(self) -> bytes:
        return await self.reader.read(READ_SIZE)

    def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data and self.broken is None:
            try:
                self.writer.write(data)
            except OSError as e:
                self.broken = e

    async def drain(self) -> None:
        if self.broken is None:
            try:
                await self.writer.drain()
            except OSError as e:
                self.broken = e

    def reusable(self) -> bool:
        """Both messages of the cycle are complete and neither side asked to close."""
        return (self.broken is None and self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
                and not self.h11.trailing_data[0] and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


@dataclass(eq=False)
class _Idle:
    """A pooled connection at rest: a read waits on it so that the backend closing it (or sending
    anything unasked) takes it out of the pool at once; a timer expires it."""

    wire: Wire | None  # None: a fresh TCP connection (a probe's), not yet TLS or HTTP
    tls: bool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peek: asyncio.Task = field(init=False)
    expiry: asyncio.TimerHandle = field(init=False)


class Pool:
    """Keep-alive connections per backend (host, port): reused last-in first-out, at most
    :data:`POOL_MAX_IDLE` idle per backend, each for at most :data:`POOL_IDLE_S`. ``opened``
    counts the connections ever made (for tests and the log)."""

    def __init__(self, tls_context: Callable[[str], ssl.SSLContext]) -> None:
        self._tls_context = tls_context
        self._idle: dict[tuple[str, int], list[_Idle]] = {}
        self.opened = 0

    def has_idle(self, host: str, port: int) -> bool:
        return bool(self._idle.get((host, port)))

    def park(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
             wire: Wire | None) -> None:
        """Keep a connection for reuse (closed instead when the backend has enough idle ones)."""
        idle = self._idle.setdefault((host, port), [])
        if len(idle) >= POOL_MAX_IDLE:
            writer.close()
            return
        item = _Idle(wire, writer.get_extra_info("ssl_object") is not None, reader, writer)
        item.peek = asyncio.ensure_future(reader.read(1))
        item.peek.add_done_callback(lambda task: None if task.cancelled() else self._drop(host, port, item))
        item.expiry = asyncio.get_running_loop().call_later(POOL_IDLE_S, self._drop, host, port, item)
        idle.append(item)

    def _drop(self, host: str, port: int, item: _Idle) -> None:
        idle = self._idle.get((host, port), [])
        if item in idle:
            idle.remove(item)
        item.expiry.cancel()
        item.peek.cancel()
        item.writer.close()

    async def _take(self, target: Target) -> Wire | None:
        """A live idle connection for `target` (TLS set up on a fresh one), or None."""
        idle = self._idle.get((target.host, target.port), [])
        for item in reversed(idle):
            if item.wire is not None and item.tls != target.tls:
                continue
            idle.remove(item)
            item.expiry.cancel()
            item.peek.cancel()
            await asyncio.wait([item.peek])  # the read must be over before anyone else reads
            if item.reader.at_eof() or not item.peek.cancelled():
                item.writer.close()  # closed (or talked) while we looked: not usable
                return await self._take(target)
            if item.wire is not None:
                return item.wire
            if target.tls:
                try:
                    await asyncio.wait_for(item.writer.start_tls(self._tls_context(target.host),
                                                                 server_hostname=target.host), CONNECT_TIMEOUT_S)
                except BaseException:
                    item.writer.close()
                    raise
            return Wire(h11.CLIENT, item.reader, item.writer)
        return None

    async def acquire(self, target: Target) -> Wire:
        """A connection to `target`: an idle one, else a new one (TLS for an https:// target,
        with SNI and the host name check). Raises what connecting raises."""
        wire = await self._take(target)
        if wire is not None:
            return wire
        if target.tls:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port, ssl=self._tls_context(target.host),
                                        server_hostname=target.host, ssl_handshake_timeout=CONNECT_TIMEOUT_S,
                                        limit=HEAD_LIMIT), CONNECT_TIMEOUT_S + 5)
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port, limit=HEAD_LIMIT), CONNECT_TIMEOUT_S)
        self.opened += 1
        return Wire(h11.CLIENT, reader, writer)

    def release(self, target: Target, wire: Wire) -> None:
        """Give a connection back after one exchange: pooled if it can carry another, else closed."""
        if not wire.reusable():
            wire.close()
            return
        wire.h11.start_next_cycle()
        self.park(target.host, target.port, wire.reader, wire.writer, wire)

    async def probe(self, host: str, port: int, timeout: float = 1.0) -> bool:
        """Whether the backend is up: a live idle connection says so; else one is opened, and
        kept for the request that asked."""
        if self.has_idle(host, port):
            return True
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=HEAD_LIMIT), timeout)
        except (TimeoutError, OSError):
            return False
        self.opened += 1
        self.park(host, port, reader, writer, None)
        return True

    def clear(self) -> None:
        for host, port in list(self._idle):
            for item in list(self._idle[(host, port)]):
                self._drop(host, port, item)
        self._idle.clear()


class Relay:
    """One loopback listener; :meth:`register` a target per flow, then send the flow to
    ``127.0.0.1:port`` with ``x-warmturn-relay: <token>``."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._starting: asyncio.Future | None = None
        self._routes: dict[str, tuple[Target, float]] = {}
        self._tls = TlsSettings()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.pool = Pool(self.tls_context)
        self.rescued = 0  # failures answered in Anthropic's shape (for tests and the log)

    @property
    def tls(self) -> TlsSettings:
        return self._tls

    @tls.setter
    def tls(self, settings: TlsSettings) -> None:
        if settings != self._tls:
            self._tls = settings
            self._contexts.clear()
            self.pool.clear()  # connections made under the old trust settings

    def tls_context(self, host: str) -> ssl.SSLContext:
        """The TLS client context for `host`, made once per host and settings."""
        context = self._contexts.get(host)
        if context is None:
            context = self._contexts[host] = make_tls_context(self._tls, host)
        return context

    async def start(self) -> None:
        """Listen (once: concurrent and later calls wait for the same start)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._listen())
        await self._starting

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.pool.clear()
        if self._server is not None:
            self._server.close()
        self._server = self._starting = None
        self.port = 0

    async def reachable(self, host: str, port: int) -> bool:
        """The backend accepts connections (a pooled one counts; a new one is kept for the request)."""
        if not self.port:  # not running (no event loop of its own to pool on): a plain probe
            return await can_connect(host, port)
        return await self.pool.probe(host, port)

    def register(self, host: str, port: int, api: str = "anthropic", tls: bool = False) -> str:
        now = time.monotonic()
        for tok, (_, at) in list(self._routes.items()):  # tokens of flows that never arrived
            if now - at > TOKEN_TTL_S:
                del self._routes[tok]
        token = secrets.token_urlsafe(18)
        self._routes[token] = (Target(host, port, api, tls), now)
        return token

    # -- mitmproxy's side ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection from mitmproxy: requests one after another while both sides keep it alive."""
        client = Wire(h11.SERVER, reader, writer)
        try:
            while isinstance(request := await client.receive(), h11.Request):
                if not await self._exchange(client, request) or not client.reusable():
                    break
                client.h11.start_next_cycle()
        except (TimeoutError, ClientGone, h11.ProtocolError, OSError, ValueError) as e:
            logger.debug("warmturn relay: connection ended: %r", e)
        finally:
            with contextlib.suppress(ConnectionError):
                await client.drain()
            client.close()

    async def _refuse(self, client: Wire, message: str) -> bool:
        """Read the rest of the request and answer a complete 502 ``api_error`` JSON."""
        await _copy_body(client, None)
        body = error_body(502, message)
        client.send(h11.Response(status_code=502, reason=b"Bad Gateway", headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]))
        client.send(h11.Data(data=body))
        client.send(h11.EndOfMessage())
        await client.drain()
        return True

    async def _exchange(self, client: Wire, request: h11.Request) -> bool:
        """Relay one request and its response; False when mitmproxy's connection must close."""
        token = next((v for k, v in request.headers if k == TOKEN_HEADER), b"")
        route = self._routes.pop(token.decode("latin-1"), None)
        if route is None:
            return await self._refuse(client, "warmturn relay: unknown route")
        target = route[0]
        try:
            backend = await self.pool.acquire(target)
        except ssl.SSLCertVerificationError as e:
            self.rescued += 1
            logger.warning("warmturn: backend %s: TLS certificate did not verify (%s)", target.where, e.verify_message)
            return await self._refuse(client, f"warmturn: the TLS certificate of backend {target.where} did not verify "
                                              f"({e.verify_message}); trust its CA with --set "
                                              f"ssl_verify_upstream_trusted_ca=FILE, or --set ssl_insecure=true")
        except (TimeoutError, OSError, ValueError) as e:
            self.rescued += 1
            return await self._refuse(client, f"warmturn: backend {target.where} is unreachable: {e!r}")
        keep = False
        try:
            try:
                backend.send(h11.Request(method=request.method, target=request.target,
                                         headers=_forwarded(request.headers.raw_items(), target)))
            except h11.LocalProtocolError as e:  # framing h11 will not forward (e.g. a transfer-coding)
                return await self._refuse(client, f"warmturn relay: cannot forward this request: {e}")
            await _copy_body(client, backend)
            if backend.broken is not None:
                # it answered early and closed, or died: an answer that outlived the reset is forwarded
                # below, else the client gets the 502 JSON (asyncio drops what it buffered on a reset)
                logger.debug("warmturn relay: backend %s stopped reading the request: %r", target.where,
                             backend.broken)
            keep = await self._answer(client, backend, target)
        finally:
            if keep:
                self.pool.release(target, backend)
            else:
                backend.close()
        return keep

    async def _answer(self, client: Wire, backend: Wire, target: Target) -> bool:
        """Copy the backend's response to mitmproxy, or finish it in Anthropic's shape; True when
        both connections can carry another request."""
        watch = _Watch(client)
        try:
            try:
                response = await backend.receive(watch.read_racing(backend))
                while isinstance(response, h11.InformationalResponse):  # 100 Continue, 103: not forwarded
                    response = await backend.receive(watch.read_racing(backend))
                if not isinstance(response, h11.Response):
                    raise h11.RemoteProtocolError(f"no response but {type(response).__name__}")
            except (h11.RemoteProtocolError, OSError) as e:  # OSError: resets, TLS errors (ssl.SSLError)
                self.rescued += 1
                logger.warning("warmturn: backend %s closed the connection before answering (%r)", target.where, e)
                await self._refuse(client, f"warmturn: backend {target.where} closed the connection before "
                                           f"answering (did it crash? see its log)")
                return False
            headers = response.headers
            chunked = b"chunked" in b",".join(v for k, v in headers if k == b"transfer-encoding").lower()
            sse = b"text/event-stream" in b",".join(v for k, v in headers if k == b"content-type").lower()
            client.send(h11.Response(status_code=response.status_code, reason=response.reason,
                                     headers=[(k, v) for k, v in headers.raw_items() if k.lower() not in HOP_BY_HOP]))
            pending = bytearray()
            try:
                while not isinstance(event := await backend.receive(watch.read_racing(backend)), h11.EndOfMessage):
                    if not isinstance(event, h11.Data):
                        continue
                    if chunked:  # whole chunks only: a chunk cut short is never forwarded
                        pending += event.data
                        if not event.chunk_end:
                            continue
                        data, pending = bytes(pending), bytearray()
                    else:
                        data = bytes(event.data)
                    client.send(h11.Data(data=data))
                    await client.drain()
            except (h11.RemoteProtocolError, OSError) as e:
                if not (chunked and sse):
                    raise  # a cut JSON body cannot be mended: let the client see it incomplete
                self.rescued += 1
                logger.warning("warmturn: backend %s died mid-stream (%r): ending the stream with an error event",
                               target.where, e)
                event_bytes = stream_error_event(target.api, f"warmturn: backend {target.where} died mid-stream")
                client.send(h11.Data(data=b"\n\n" + event_bytes))
                client.send(h11.EndOfMessage())
                await client.drain()
                return False
            client.send(h11.EndOfMessage(headers=event.headers))
            await client.drain()
            return backend.reusable()
        finally:
            await watch.stop()


class _Watch:
    """Notices mitmproxy closing its connection while the backend works: the backend's reads
    race a read on mitmproxy's side; its end raises :class:`ClientGone` (bytes that arrive, which
    mitmproxy does not send before the response ends, are kept for h11)."""

    def __init__(self, client: Wire) -> None:
        self.client = client
        self.task: asyncio.Task | None = None

    def read_racing(self, backend: Wire) -> Callable[[], Awaitable[bytes]]:
        async def read() -> bytes:
            backend_read = asyncio.ensure_future(backend.read())
            while True:
                if self.task is None:
                    self.task = asyncio.ensure_future(self.client.read())
                await asyncio.wait({backend_read, self.task}, return_when=asyncio.FIRST_COMPLETED)
                if backend_read.done():
                    return backend_read.result()
                task, self.task = self.task, None
                try:
                    data = task.result()
                except OSError:
                    data = b""
                if not data:
                    backend_read.cancel()
                    raise ClientGone()
                self.client.h11.receive_data(data)

        return read

    async def stop(self) -> None:
        """End the watching read before anyone reads mitmproxy's side again; what it got is kept."""
        task, self.task = self.task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            try:
                data = task.result()
            except OSError:
                data = b""
            self.client.h11.receive_data(data)  # b"": mitmproxy closed, the next receive says so


def _forwarded(raw: list[tuple[bytes, bytes]], target: Target) -> list[tuple[bytes, bytes]]:
    """The request headers for the backend: hop-by-hop ones and the relay token removed, a Host
    added when mitmproxy sent none."""
    out = [(k, v) for k, v in raw if k.lower() not in HOP_BY_HOP]
    if not any(k.lower() == b"host" for k, _ in out):
        out.insert(0, (b"host", f"{target.host}:{target.port}".encode()))
    return out


async def _copy_body(client: Wire, backend: Wire | None) -> None:
    """Read the request body from mitmproxy to its end, forwarding it to `backend` while the
    backend takes it (None or broken: dropped). Nothing to do once it was read."""
    while client.h11.their_state is h11.SEND_BODY:
        event = await client.receive()
        if backend is not None and isinstance(event, (h11.Data, h11.EndOfMessage)):
            backend.send(event)
            await backend.drain()
        if isinstance(event, h11.ConnectionClosed):
            raise ClientGone()
