"""Backends reached over TLS, and credentials in URLs, through a real mitmdump (issue 12):

- an ``https://`` backend (a real TLS server on loopback, tests/scripted_backend.py, replaying
  bytes recorded from the real embedded server) SIGKILLed before answering and mid-stream: the
  client gets a ``502`` ``api_error`` JSON / an ``event: error`` and a proper end, mitmdump keeps
  serving, and every flow has exactly one valid capture line;
- the relay's TLS client trusts what mitmproxy would: a certificate that does not verify is
  refused in Anthropic's shape (never HTML) unless ``ssl_insecure`` or
  ``ssl_verify_upstream_trusted_ca`` says otherwise;
- a credential in the query string reaches the backend but neither mitmdump's output nor the
  capture;
- connections to a backend are kept alive and reused: a real loopback backend counts the
  connections it accepts over sequential requests and a burst of 26 ``count_tokens`` calls;
- ``backend=passthrough`` goes through the relay too: a real https upstream that is unreachable,
  or dies, gets the same Anthropic-shaped answers (never mitmproxy's HTML 502).

No model is loaded: the backend is a small real HTTP(S) server of the test's own.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import exceptions
from mitmproxy.test import taddons

from tests.conftest import ROOT, free_port
from tests.procs import VENV_BIN, child_env, process, read_capture
from tests.scripted_backend import Handler, Server
from warmturn.addons.normalize import make_addons
from warmturn.addons.relay import TlsSettings, make_tls_context
from warmturn.protocol import SSEDecoder

BACKEND = ROOT / "tests" / "scripted_backend.py"
STREAM = {"model": "m", "max_tokens": 24, "stream": True, "messages": [{"role": "user", "content": "Capital of France?"}]}
PLAIN = {**STREAM, "stream": False}


def mitmdump(port: int, log: Path, **options):
    """A real mitmdump with the addon, its output unbuffered (the test reads it while it runs)."""
    cmd = [str(VENV_BIN / "mitmdump"), "-s", str(ROOT / "addons" / "normalize.py"),
           "--listen-host", "127.0.0.1", "--listen-port", str(port)]
    for k, v in options.items():
        cmd += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    # unbuffered, and a wide "terminal" so that mitmdump's flow line shows whole URLs
    return process(cmd, port, log, env=child_env(PYTHONUNBUFFERED="1", COLUMNS="500"))


# --------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a leaf for 127.0.0.1/localhost signed by it (PEM files in `folder`)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("warmturn test CA")).issuer_name(_name("warmturn test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "leaf.pem", "key": folder / "leaf.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["key"])
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


# --------------------------------------------------------------------------- the backend process


class Backend:
    """tests/scripted_backend.py in its own process; `expect` reads what it announces on stdout."""

    def __init__(self, port: int, mode: str, certs: dict[str, Path] | None) -> None:
        cmd = [sys.executable, str(BACKEND), "--port", str(port), "--mode", mode]
        if certs:
            cmd += ["--cert", str(certs["cert"]), "--key", str(certs["key"])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env(), bufsize=0)
        self.lines: list[str] = []
        self._buf = b""
        self.expect("listening")

    def _read(self, timeout: float) -> bytes:
        """What the process wrote next (b"" at its exit), read from the pipe itself, unbuffered:
        a buffered reader could hold a line that select() then waits for in vain."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        assert ready, f"backend silent for {timeout:.0f}s (so far: {self.lines})"
        return os.read(self.proc.stdout.fileno(), 4096)

    def expect(self, prefix: str, timeout: float = 60) -> str:
        """The next line it announces that starts with `prefix` (fails after `timeout` s of silence)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self._buf:
                data = self._read(deadline - time.monotonic())
                assert data, f"backend exited ({self.proc.wait()}) before saying {prefix!r}: {self.lines}"
                self._buf += data
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.append(line.decode())
            if self.lines[-1].startswith(prefix):
                return self.lines[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self._buf += self.proc.stdout.read() or b""
            self.lines += self._buf.decode().splitlines()
            self._buf = b""
            self.proc.stdout.close()


@contextmanager
def backend(port: int, mode: str, certs: dict[str, Path] | None = None):
    b = Backend(port, mode, certs)
    try:
        yield b
    finally:
        b.kill()


def events_of(resp: httpx.Response):
    """The stream's events as they arrive (warmturn.protocol's decoder); a cut connection raises."""
    decoder = SSEDecoder()
    for chunk in resp.iter_bytes():
        for event in decoder.feed(chunk):
            yield event.json()


def capture_is_one_valid_line_per_flow(cap: Path, flows: int) -> list[dict]:
    raw = cap.read_bytes().splitlines()
    assert len(raw) == flows, (len(raw), flows)
    records = [json.loads(line) for line in raw]
    assert all(r["schema"] == 1 for r in records)
    return records


# --------------------------------------------------------------------------- TLS backend faults


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory, certs):
    """mitmdump with an https:// backend whose CA it trusts through ssl_verify_upstream_trusted_ca."""
    tmp = tmp_path_factory.mktemp("tls")
    port, bport = free_port(), free_port()
    with mitmdump(port, tmp / "mitm.log", backend=f"https://127.0.0.1:{bport}",
                  ssl_verify_upstream_trusted_ca=str(certs["ca"]), capture_file=str(tmp / "cap.jsonl")) as proc:
        yield {"base": f"http://127.0.0.1:{port}", "bport": bport, "cap": tmp / "cap.jsonl", "proc": proc,
               "flows": 0, "log": tmp / "mitm.log"}


def test_a_trusted_tls_backend_streams_through_the_relay(tls_proxy, certs):
    p = tls_proxy
    with backend(p["bport"], "replay", certs) as b:
        with httpx.stream("POST", p["base"] + "/v1/messages", json=STREAM, timeout=60) as resp:
            assert resp.status_code == 200
            events = list(events_of(resp))
        b.expect("request POST /v1/messages")
    p["flows"] += 1
    assert [e["type"] for e in events][-1] == "message_stop"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "The capital of France is Paris."
    rec = capture_is_one_valid_line_per_flow(p["cap"], p["flows"])[-1]
    assert rec["status"] == 200 and not rec["error"] and rec["upstream"].startswith("https://127.0.0.1:")


def test_a_tls_backend_killed_before_answering_gives_a_502_api_error(tls_proxy, certs):
    p = tls_proxy
    result: dict = {}
    with backend(p["bport"], "hang", certs) as b:
        t = threading.Thread(target=lambda: result.update(r=httpx.post(p["base"] + "/v1/messages", json=PLAIN,
                                                                        timeout=120)))
        t.start()
        b.expect("request POST /v1/messages")  # it has the whole request, and will never answer
        b.kill()
        t.join(120)
    p["flows"] += 1
    r = result["r"]
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/json"), r.text[:300]
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "closed the connection before answering" in body["error"]["message"]
    rec = capture_is_one_valid_line_per_flow(p["cap"], p["flows"])[-1]
    assert rec["status"] == 502 and rec["error"]["type"] == "api_error"


def test_a_tls_backend_killed_mid_stream_ends_the_stream_with_an_error_event(tls_proxy, certs):
    p = tls_proxy
    with (backend(p["bport"], "cut", certs) as b,
          httpx.stream("POST", p["base"] + "/v1/messages", json=STREAM, timeout=120) as resp):
        assert resp.status_code == 200
        events = []
        for event in events_of(resp):  # to the stream's end: a cut connection would raise here
            events.append(event)
            if event["type"] == "content_block_delta" and b.proc.poll() is None:
                b.expect("streaming")
                b.kill()
    p["flows"] += 1
    types = [e["type"] for e in events]
    assert types[-1] == "error" and "message_stop" not in types and "content_block_delta" in types, types
    assert events[-1]["error"]["type"] == "api_error" and "died mid-stream" in events[-1]["error"]["message"]
    rec = capture_is_one_valid_line_per_flow(p["cap"], p["flows"])[-1]
    assert rec["status"] == 200 and rec["error"]


def test_after_the_faults_mitmdump_still_serves_the_restarted_backend(tls_proxy, certs):
    p = tls_proxy
    assert p["proc"].poll() is None
    with (backend(p["bport"], "replay", certs),
          httpx.stream("POST", p["base"] + "/v1/messages", json=STREAM, timeout=60) as resp):
        events = list(events_of(resp))
    p["flows"] += 1
    assert resp.status_code == 200 and events[-1]["type"] == "message_stop"
    capture_is_one_valid_line_per_flow(p["cap"], p["flows"])
    assert "Traceback" not in p["log"].read_text()


# --------------------------------------------------------------------------- certificate checks


@pytest.mark.parametrize("options, verified", [
    ({}, False),  # our CA is in no trust store mitmproxy uses
    ({"ssl_insecure": True}, True),
])
def test_a_certificate_that_does_not_verify_is_refused_in_anthropics_shape(tmp_path, certs, options, verified):
    port, bport = free_port(), free_port()
    with backend(bport, "replay", certs) as b, \
            mitmdump(port, tmp_path / "mitm.log", backend=f"https://127.0.0.1:{bport}",
                     capture_file=str(tmp_path / "cap.jsonl"), **options):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", json=STREAM, timeout=60)
        if verified:
            b.expect("request POST /v1/messages")
    if verified:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert '"type":"message_stop"' in r.text
    else:
        assert r.status_code == 502 and r.headers["content-type"].startswith("application/json"), r.text[:300]
        err = r.json()["error"]
        assert err["type"] == "api_error" and "did not verify" in err["message"]
        assert "ssl_verify_upstream_trusted_ca" in err["message"] and "ssl_insecure" in err["message"]
        assert not any(line.startswith("request") for line in b.lines)  # nothing was sent to it
    [rec] = capture_is_one_valid_line_per_flow(tmp_path / "cap.jsonl", 1)
    assert rec["status"] == r.status_code


def test_tls_settings_follow_mitmproxys_options(certs, tmp_path):
    """The relay's context is made from the same options mitmproxy's own TLS client reads; a CA
    file that cannot be read is an option error at start-up, not a 502 per request."""
    addons = make_addons()
    route = addons[2]
    with taddons.context(*addons) as tctx:
        tctx.configure(route, backend="https://127.0.0.1:9", ssl_verify_upstream_trusted_ca=str(certs["ca"]))
        assert route.relay.tls == TlsSettings(trusted_ca=str(certs["ca"]))
        tctx.configure(route, ssl_insecure=True)
        assert route.relay.tls.insecure
        with pytest.raises(exceptions.OptionsError, match="cannot set up TLS"):
            tctx.configure(route, ssl_insecure=False, ssl_verify_upstream_trusted_ca=str(tmp_path / "missing.pem"))
    assert make_tls_context(TlsSettings(insecure=True), "h").verify_mode == ssl.CERT_NONE
    strict = make_tls_context(TlsSettings(trusted_ca=str(certs["ca"])), "h")
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname


# --------------------------------------------------------------------------- credentials in URLs

SECRET = "sk-query-7f3a9c2e"


def test_a_query_string_credential_reaches_the_backend_but_no_output(tmp_path):
    """mitmdump's own flow line (its Dumper) prints URLs with their query: the addon redacts
    credential-named parameters once the request is sent, for a finished flow and a failed one."""
    port, bport = free_port(), free_port()
    cap, log = tmp_path / "cap.jsonl", tmp_path / "mitm.log"
    with mitmdump(port, log, backend=f"http://127.0.0.1:{bport}", capture_file=str(cap)) as proc:
        assert proc.poll() is None
        url = f"http://127.0.0.1:{port}/v1/messages?beta=true&api_key={SECRET}"
        with backend(bport, "replay") as b:
            r = httpx.post(url, json=STREAM, timeout=60)
            got = b.expect("request POST")
        assert r.status_code == 200 and f"api_key={SECRET}" in got  # the backend received it unchanged
        with backend(bport, "cut") as b:  # a flow that ends in an error: the client leaves mid-stream
            with httpx.stream("POST", url.replace("beta=true", "beta=true&access_token=" + SECRET), json=STREAM,
                              timeout=60) as resp:
                next(resp.iter_bytes())
            got = b.expect("request POST")
            assert f"access_token={SECRET}" in got
            deadline = time.monotonic() + 60
            while len(read_capture(cap)) < 2:  # the error hook has run
                assert time.monotonic() < deadline
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while log.read_text().count("/v1/messages?beta=true") < 2:  # mitmdump printed both flows
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    out = log.read_text()
    assert "api_key=%3Credacted%3E" in out and "access_token=%3Credacted%3E" in out
    assert SECRET not in out
    assert SECRET not in cap.read_text()
    assert next(rec["status"] for rec in read_capture(cap)) == 200 and os.path.getsize(cap) > 0


# --------------------------------------------------------------------------- keep-alive pooling


class CountingBackend(Server):
    """tests/scripted_backend.py's replaying server, in a thread of this process, counting the
    TCP connections it accepts (every one: the adapters' reachability probes too)."""

    request_queue_size = 128  # a listen backlog like uvicorn's (socketserver's 5 drops a burst's SYNs)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.accepted = 0
        self.requests = 0
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def get_request(self) -> tuple[socket.socket, object]:
        conn = super().get_request()
        self.accepted += 1
        return conn


COUNT = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}


def test_backend_connections_are_kept_alive_and_reused(tmp_path, capsys):
    """Each client request comes on its own client connection (as Claude Code's parallel calls do);
    the relay still reuses its backend connections: 8 requests one after another take one
    connection, and two bursts of 26 count_tokens calls (Claude Code's /context) fewer than one
    each. Before pooling every request took two (the probe and the relayed request)."""
    b = CountingBackend()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        with mitmdump(port, tmp_path / "mitm.log", backend=f"http://127.0.0.1:{b.port}", capture_file=""):
            for _ in range(8):
                with httpx.Client(timeout=60) as c:  # a new client connection each time
                    r = c.post(base + "/v1/messages", json=STREAM)
                assert r.status_code == 200 and '"type":"message_stop"' in r.text
            sequential = b.accepted
            assert sequential == 1, f"8 sequential requests opened {sequential} backend connections"

            def count(_: int) -> tuple[int, str]:
                with httpx.Client(timeout=60) as c:
                    r = c.post(base + "/v1/messages/count_tokens?beta=true", json=COUNT)
                return r.status_code, r.text[:300]

            with concurrent.futures.ThreadPoolExecutor(26) as pool:
                for _ in range(2):
                    answers = list(pool.map(count, range(26)))
                    assert [status for status, _ in answers] == [200] * 26, answers
            burst = b.accepted - sequential
    finally:
        b.shutdown()
        b.server_close()
    with capsys.disabled():
        print(f"\nbackend connections: 8 sequential requests -> {sequential}, 2 x 26 count_tokens -> {burst}")
    # fewer than one per call (typically 21-25 here; a call can open two when another takes the
    # connection its probe opened, and an idle one lapses after 4 s on a loaded machine)
    assert burst < 52, f"52 count_tokens calls opened {burst} backend connections"


# --------------------------------------------------------------------------- passthrough through the relay


def anthropic_resolves() -> bool:
    try:
        socket.getaddrinfo("api.anthropic.com", 443)
    except OSError:
        return False
    return True


def test_passthrough_gets_the_relays_contract(tmp_path, certs):
    """backend=passthrough keeps the real destination but goes through the relay like any http(s)
    backend. One mitmdump, two ways in: interception of https://api.anthropic.com (HTTPS_PROXY;
    the CONNECT is answered by the addon, so mitmproxy never dials Anthropic itself), and reverse
    mode to a real TLS upstream on loopback (trusted through ssl_verify_upstream_trusted_ca)."""
    port, rport, bport = free_port(), free_port(), free_port()
    confdir, cap = tmp_path / "conf", tmp_path / "cap.jsonl"
    cmd = [str(VENV_BIN / "mitmdump"), "-s", str(ROOT / "addons" / "normalize.py"), "--listen-host", "127.0.0.1",
           "--mode", f"regular@{port}", "--mode", f"reverse:https://127.0.0.1:{bport}@{rport}",
           "--set", "backend=passthrough", "--set", f"confdir={confdir}", "--set", f"capture_file={cap}",
           "--set", f"ssl_verify_upstream_trusted_ca={certs['ca']}",
           # reverse mode opens its upstream connection on connect unless lazy (docs/addon.md)
           "--set", "connection_strategy=lazy"]
    with process(cmd, port, tmp_path / "mitm.log", env=child_env(PYTHONUNBUFFERED="1")):
        # 1. the real API through interception: offline it is unreachable; online Anthropic answers
        # our bogus key itself. Either way an Anthropic error in JSON, never mitmproxy's page.
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=str(confdir / "mitmproxy-ca-cert.pem"),
                          timeout=60) as c:
            r = c.post("https://api.anthropic.com/v1/messages", json=PLAIN,
                       headers={"x-api-key": "sk-not-a-key", "anthropic-version": "2023-06-01"})
        assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:300])
        assert r.json()["type"] == "error", r.text[:300]
        if not anthropic_resolves():
            assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
            assert "backend https://api.anthropic.com:443 is unreachable" in r.json()["error"]["message"]
        reverse = f"http://127.0.0.1:{rport}/v1/messages"
        # 2. a real TLS upstream that is not listening
        r = httpx.post(reverse, json=STREAM, timeout=60)
        assert r.status_code == 502 and r.headers["content-type"].startswith("application/json"), r.text[:300]
        assert r.json()["error"]["type"] == "api_error" and "is unreachable" in r.json()["error"]["message"]
        # 3. up: the stream goes through; 4. killed mid-stream: an error event ends it
        with backend(bport, "replay", certs) as b:
            with httpx.stream("POST", reverse, json=STREAM, timeout=60) as resp:
                events = list(events_of(resp))
            b.expect("request POST /v1/messages")
        assert resp.status_code == 200 and events[-1]["type"] == "message_stop"
        with backend(bport, "cut", certs) as b, httpx.stream("POST", reverse, json=STREAM, timeout=60) as resp:
            events = []
            for event in events_of(resp):
                events.append(event)
                if event["type"] == "content_block_delta" and b.proc.poll() is None:
                    b.expect("streaming")
                    b.kill()
        assert events[-1]["type"] == "error" and "died mid-stream" in events[-1]["error"]["message"]
    records = capture_is_one_valid_line_per_flow(cap, 4)
    assert [rec["backend"] for rec in records] == ["passthrough"] * 4
    assert records[0]["upstream"] == "https://api.anthropic.com/v1/messages"
