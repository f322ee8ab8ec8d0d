"""The embedded-server supervisor (warmturn/addons/embedded_server.py) with real processes and a real HTTP listener."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import free_port
from warmturn.addons.embedded_server import EmbeddedServer, http_status


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_reuses_a_server_already_answering(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]

    async def main():
        assert await http_status("127.0.0.1", port, "/health") == 200
        assert await http_status("127.0.0.1", port, "/nope") == 404
        srv = EmbeddedServer("/nonexistent/python", [], port, str(tmp_path / "log"))
        srv.start()
        assert await srv.wait_ready(5)
        assert srv.reused and srv.proc is None and srv.base_url == f"http://127.0.0.1:{port}"
        srv.stop()

    try:
        asyncio.run(main())
    finally:
        httpd.shutdown()
    assert not (tmp_path / "log").exists()


def test_a_crash_looping_child_fails_fast_and_is_given_up(tmp_path):
    """A 'python' that dies at once (issue 12 item 9): waiting requests learn it at once, with the
    exit code and the last log lines; after three exits in a row it is not restarted again."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho started \"$@\" >> {tmp_path}/runs\necho 'boom: no model here' >&2\nexit 3\n")
    fake.chmod(0o755)
    log = tmp_path / "server.log"

    async def main():
        srv = EmbeddedServer(str(fake), ["--model", "/m"], free_port(), str(log), start_timeout_s=600)
        srv.start()
        t0 = time.monotonic()
        assert not await srv.wait_ready(600)
        waited = time.monotonic() - t0
        first_error = srv.last_error
        for _ in range(200):  # the restarts back off 1 s, then 2 s
            if srv.gave_up:
                break
            await asyncio.sleep(0.05)
        assert not await srv.wait_ready(600)
        srv.stop()
        return srv, waited, first_error

    srv, waited, first_error = asyncio.run(main())
    assert waited < 60  # not the 600 s start timeout
    assert "exited with code 3" in first_error and "boom: no model here" in first_error
    runs = (tmp_path / "runs").read_text().splitlines()
    assert srv.gave_up and len(runs) == 3 and srv.restarts == 2
    assert runs[0].startswith("started -m warmturn.server --host 127.0.0.1 --port") and runs[0].endswith("--model /m")
    assert "--parent-fd" in runs[0]
    assert "not restarted" in srv.last_error
    assert "=== pid" in log.read_text()


def test_a_usage_error_is_not_restarted(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho run >> {tmp_path}/runs\necho 'error: cache directory is unsafe' >&2\nexit 2\n")
    fake.chmod(0o755)

    async def main():
        srv = EmbeddedServer(str(fake), [], free_port(), str(tmp_path / "log"))
        srv.start()
        assert not await srv.wait_ready(600)
        for _ in range(100):
            if srv.gave_up:
                break
            await asyncio.sleep(0.02)
        srv.stop()
        return srv

    srv = asyncio.run(main())
    assert srv.gave_up and (tmp_path / "runs").read_text().count("run") == 1
    assert "exited with code 2" in srv.last_error and "cache directory is unsafe" in srv.last_error


def test_child_that_never_gets_healthy_is_terminated(tmp_path):
    sleeper = tmp_path / "python"
    sleeper.write_text(f"#!{sys.executable}\nimport os, time\n"
                       f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    sleeper.chmod(0o755)

    async def main():
        srv = EmbeddedServer(str(sleeper), [], free_port(), str(tmp_path / "log"), start_timeout_s=1.5)
        srv.start()
        assert not await srv.wait_ready(2.5)
        assert "not healthy" in (srv.last_error or "")
        srv.stop()
        assert await srv.stopped(15)
        return srv

    srv = asyncio.run(main())
    pid = int((tmp_path / "pid").read_text())
    assert srv.proc.poll() is not None
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_the_supervise_and_route_addons_meet_only_through_declared_hooks(tmp_path):
    """The whole addon chain (mitmproxy's test master): route announces the parsed `backend`
    (warmturn_backend), supervise starts or stops the embedded server and announces it
    (warmturn_embedded_server), and requests reach that server through the relay. Neither reads
    the other's options nor holds the other. The server is a real /health listener, reused."""
    from mitmproxy import hooks
    from mitmproxy.test import taddons

    from tests.test_addon_flows import make_flow
    from warmturn.addons.normalize import make_addons
    from warmturn.addons.route import Route
    from warmturn.addons.state import FlowState
    from warmturn.addons.supervise import Supervise

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    addons = make_addons()
    [route] = [a for a in addons if isinstance(a, Route)]
    [supervise] = [a for a in addons if isinstance(a, Supervise)]

    async def main(tctx):
        tctx.configure(route, backend="embedded", embedded_port=port, capture_file="")
        await tctx.master.addons.trigger_event(hooks.RunningHook())
        server = supervise.server
        assert server is not None and route.embedded is server
        assert await server.wait_ready(10) and server.reused
        f = make_flow({"model": "m", "messages": []})
        for hook in (addons[0].request, addons[1].request, route.request):
            await hook(f)
        assert f.response is None and (f.request.host, f.request.port) == ("127.0.0.1", route.relay.port)
        assert FlowState.of(f).upstream == f"http://127.0.0.1:{port}/v1/messages?beta=true"
        assert FlowState.of(f).backend == "embedded"
        tctx.configure(route, backend="http://127.0.0.1:9")  # another backend: the server goes
        assert supervise.server is None and route.embedded is None
        tctx.configure(route, backend="embedded")
        assert supervise.server is not None and route.embedded is supervise.server
        await tctx.master.addons.trigger_event(hooks.DoneHook())

    try:
        with taddons.context(*addons) as tctx:
            asyncio.run(main(tctx))
    finally:
        httpd.shutdown()
