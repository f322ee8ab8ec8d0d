"""The addon under hostile traffic and faults (issue 12), with a real mitmdump:

- the loopback guard on every way in (HTTP, CONNECT, SOCKS5, raw TCP) from a real non-loopback
  address of this machine, and the self-loop guard for every spelling of the proxy's address;
- a hypothesis fuzz run of hostile bodies with planted secrets through mitmdump to the real
  embedded server: an Anthropic-shaped answer, one valid capture line per flow, no secret in any
  file written;
- faults: the backend killed mid-stream and before answering, mitmdump killed with SIGKILL, and
  an embedded server that exits at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port
from tests.procs import ROOT, VENV_BIN, child_env, port_open, process
from tests.test_server_hardening import FUZZ_BASE, HOSTILE, PATHS, assemble
from warmturn.addons.capture import append_record


def local_non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback (connecting from it gives a non-loopback peer)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", out):
        if not m.group(1).startswith("127."):
            return m.group(1)
    return None


REMOTE_IP = local_non_loopback_ip()


class Echo:
    """A TCP echo server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)


def mitmdump_cmd(port: int, host: str = "127.0.0.1", modes: tuple[str, ...] = (), **options) -> list[str]:
    cmd = [str(VENV_BIN / "mitmdump"), "-s", str(ROOT / "addons" / "normalize.py"),
           "--listen-host", host, "--listen-port", str(port)]
    for m in modes:
        cmd += ["--mode", m]
    for k, v in options.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def connect(src: str | None, port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    if src:
        s.bind((src, 0))
    s.connect((REMOTE_IP if src else "127.0.0.1", port))
    return s


def recv_all(s: socket.socket, limit: int = 1 << 16) -> bytes:
    data = b""
    try:
        while len(data) < limit:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and (b"content-length: 0" in data.lower() or data.endswith(b"}")):
                break
    except (TimeoutError, ConnectionError):
        pass
    return data


def http_connect(src: str | None, port: int, target: str) -> bytes:
    with connect(src, port) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return recv_all(s)


def socks5(src: str | None, port: int, host: str, dport: int, payload: bytes = b"ping") -> bytes | None:
    """A SOCKS5 CONNECT to host:dport, then `payload`; what came back (None: refused/closed)."""
    with connect(src, port) as s:
        s.sendall(b"\x05\x01\x00")
        if s.recv(2) != b"\x05\x00":
            return None
        addr = socket.inet_aton(host) if re.fullmatch(r"[\d.]+", host) else None
        if addr is not None and len(host.split(".")) == 4:
            s.sendall(b"\x05\x01\x00\x01" + addr + struct.pack(">H", dport))
        else:
            name = host.encode()
            s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", dport))
        try:
            reply = s.recv(10)
            if len(reply) < 2 or reply[1] != 0:
                return None
            s.sendall(payload)
            return s.recv(100) or None
        except (TimeoutError, ConnectionError):
            return None


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """mitmdump on every interface: regular HTTP proxy, SOCKS5 and raw TCP reverse to an echo server."""
    if REMOTE_IP is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    tmp = tmp_path_factory.mktemp("guard")
    echo = Echo()
    port, socks_port, tcp_port = free_port(), free_port(), free_port()
    cmd = mitmdump_cmd(port, "0.0.0.0", ("regular", f"socks5@{socks_port}", f"reverse:tcp://127.0.0.1:{echo.port}@{tcp_port}"),
                       backend="http://127.0.0.1:9", capture_file=str(tmp / "cap.jsonl"))
    with process(cmd, port, tmp / "mitm.log") as proc:
        yield {"port": port, "socks": socks_port, "tcp": tcp_port, "echo": echo, "proc": proc, "tmp": tmp}


def test_remote_clients_are_refused_on_every_way_in(guarded):
    g, echo = guarded, guarded["echo"]
    # plain HTTP to the proxy as a base URL: Anthropic's 403
    r = httpx.post(f"http://{REMOTE_IP}:{g['port']}/v1/messages", json={"model": "m"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    before = echo.accepted
    # CONNECT tunnels to anything (the probe's CONNECT 127.0.0.1:22 included)
    for target in (f"127.0.0.1:{echo.port}", "127.0.0.1:22", "api.anthropic.com:443"):
        reply = http_connect(REMOTE_IP, g["port"], target)
        assert reply.startswith(b"HTTP/1.1 403"), (target, reply[:100])
    # SOCKS5 and a raw TCP reverse proxy: the upstream connection is never opened
    assert socks5(REMOTE_IP, g["socks"], "127.0.0.1", echo.port) is None
    with connect(REMOTE_IP, g["tcp"]) as s:
        s.sendall(b"hello")
        try:
            assert s.recv(100) == b""
        except ConnectionError:
            pass
    time.sleep(0.5)
    assert echo.accepted == before, "a remote client reached the echo server through the proxy"
    # the same ways in from loopback work (the guard is not simply closed)
    assert socks5(None, g["socks"], "127.0.0.1", echo.port, b"ping") == b"ping"
    assert http_connect(None, g["port"], f"127.0.0.1:{echo.port}").startswith(b"HTTP/1.1 200")
    with connect(None, g["tcp"]) as s:
        s.sendall(b"hi")
        assert s.recv(10) == b"hi"
    assert echo.accepted > before


SELF_SPELLINGS = ["127.1", "127.0.0.2", "2130706433", "0x7f.1", "0", "0.0.0.0", "localhost", "[::ffff:127.0.0.1]"]


def test_the_proxy_never_connects_to_itself(guarded):
    g, port, pid = guarded, guarded["port"], guarded["proc"].pid
    fds = fd_count(pid)
    targets = [f"{h}:{port}" for h in SELF_SPELLINGS + [REMOTE_IP]]
    for target in targets:
        reply = http_connect(None, port, target)
        assert not reply.startswith(b"HTTP/1.1 200"), (target, reply[:200])
        host = target.rsplit(":", 1)[0]
        r = httpx.get(f"http://127.0.0.1:{port}/loop-probe", headers={"host": target}, timeout=10)
        assert r.status_code < 600 and r.headers.get("content-type", "").startswith("application/json"), target
        if "[" in host:  # httpx writes IPv6 absolute URLs without brackets: mitmproxy rejects the line
            continue
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", timeout=10) as c:
            r = c.get(f"http://{target}/loop-probe")
        assert r.headers.get("content-type", "").startswith("application/json"), (host, r.status_code, r.headers, r.text[:200])
        assert r.json()["type"] == "error", (host, r.text[:200])
    for h in ("127.1", "127.0.0.2", "0.0.0.0"):
        assert socks5(None, g["socks"], h, port) is None
    time.sleep(1.0)
    assert fd_count(pid) < fds + 20, "connections to itself piled up"
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200


# --------------------------------------------------------------------------- the embedded server


SECRETS = [f"planted-secret-{i:02d}-{os.urandom(4).hex()}" for i in range(12)]


def planted_headers() -> dict[str, str]:
    return {"x-api-key": SECRETS[0], "api-key": SECRETS[1], "x-auth-token": SECRETS[2],
            "anthropic-auth-token": SECRETS[3], "cookie": f"session={SECRETS[4]}", "x-client-secret": SECRETS[5],
            "content-type": "application/json"}


def planted_body(base: bytes) -> bytes:
    """A JSON body with secrets under credential-named keys at several depths (still hostile
    wherever `base` is); a non-JSON `base` gets them as form fields."""
    try:
        body = json.loads(base)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        body["api_key"] = SECRETS[6]
        body["metadata"] = {"password": SECRETS[7], "deep": [{"access_token": SECRETS[8]}]}
        try:
            return json.dumps(body).encode()
        except (ValueError, RecursionError):
            return base
    return base + f"&api_key={SECRETS[9]}&password={SECRETS[10]}".encode()


@contextmanager
def embedded_mitmdump(tmp: Path, **options):
    port = free_port()
    cap, slog = tmp / "cap.jsonl", tmp / "server.log"
    cmd = mitmdump_cmd(port, capture_file=str(cap), embedded_log=str(slog), **options)
    # unbuffered: mitmdump's own output is in its log file by the time the test reads it; a wide
    # "terminal": its flow lines show whole URLs, query strings included
    with process(cmd, port, tmp / "mitm.log", env=child_env(PYTHONUNBUFFERED="1", COLUMNS="500")) as proc:
        yield {"base": f"http://127.0.0.1:{port}", "cap": cap, "slog": slog, "proc": proc, "tmp": tmp}


def server_pid(slog: Path) -> int:
    return int(re.findall(r"=== pid (\d+)", slog.read_text())[-1])


def server_port(slog: Path) -> int:
    return int(re.findall(r"--port (\d+)", slog.read_text())[-1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    with embedded_mitmdump(tmp_path_factory.mktemp("embedded")) as e:
        r = httpx.post(e["base"] + "/v1/messages", timeout=600,
                       json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
        assert r.status_code == 200, r.text
        e["flows"] = 1
        yield e


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert body["type"] == "error" and isinstance(body["error"]["message"], str)


def written_files(e) -> list[Path]:
    return [e["cap"], e["slog"], e["tmp"] / "mitm.log"]


@pytest.mark.model
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=st.one_of(
    st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(HOSTILE)), min_size=1, max_size=3)
    .map(lambda holes: assemble(FUZZ_BASE, holes)),
    st.binary(max_size=200),
    st.sampled_from(HOSTILE).map(str.encode),
), path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
def test_fuzz_through_the_addon(embedded, body, path):
    e = embedded
    r = httpx.post(e["base"] + path + "?api_key=" + SECRETS[11], content=planted_body(body), headers=planted_headers(),
                   timeout=120)
    e["flows"] += 1
    check_answer(r)
    lines = e["cap"].read_text().splitlines()
    assert len(lines) == e["flows"]  # exactly one line per flow
    json.loads(lines[-1])
    r = httpx.post(e["base"] + "/v1/messages/count_tokens", timeout=60,
                   json={"model": "m", "messages": [{"role": "user", "content": "Hi."}]})
    e["flows"] += 1
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


@pytest.mark.model
def test_after_the_fuzz_every_line_is_valid_and_no_secret_was_written(embedded):
    e = embedded
    lines = e["cap"].read_bytes().splitlines()
    assert len(lines) == e["flows"]
    for line in lines:
        rec = json.loads(line.decode("utf-8"))
        assert rec["schema"] == 1
    log = (e["tmp"] / "mitm.log").read_text()
    assert "?api_key=%3Credacted%3E" in log  # the log holds mitmdump's flow lines, whole URLs scrubbed
    for path in written_files(e):
        text = path.read_text(errors="replace")
        for secret in SECRETS:  # the query-string one too: the addon redacts URLs before mitmdump prints them
            assert secret not in text, f"{secret} found in {path.name}"


@pytest.mark.model
def test_a_huge_body_is_capped_in_the_capture(embedded):
    e = embedded
    big = json.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x " * 3_000_000}]})
    r = httpx.post(e["base"] + "/v1/messages", content=big, headers={"content-type": "application/json"}, timeout=120)
    e["flows"] += 1
    check_answer(r)
    line = e["cap"].read_bytes().splitlines()[-1]
    rec = json.loads(line)
    assert len(line) < 200_000 and rec["request"]["truncated"]["original_bytes"] == len(big)


@pytest.mark.model
def test_a_body_over_the_servers_limit_gets_its_413_through_mitmdump(embedded):
    """33 MiB against the server's 32 MiB limit, through mitmproxy and the relay (which asks for
    `Connection: close`): the 413 arrives whole, never a reset turned into mitmproxy's 502."""
    e = embedded
    big = json.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * (33 << 20)}]})
    r = httpx.post(e["base"] + "/v1/messages", content=big, headers={"content-type": "application/json"}, timeout=300)
    e["flows"] += 1
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text[:300]
    rec = json.loads(e["cap"].read_bytes().splitlines()[-1])
    assert rec["status"] == 413 and rec["request"]["truncated"]["original_bytes"] == len(big)


def stream_events(resp: httpx.Response):
    buf = ""
    for text in resp.iter_text():
        buf += text
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            data = [ln[6:] for ln in block.splitlines() if ln.startswith("data: ")]
            if data:
                yield json.loads("\n".join(data))


@pytest.mark.model
def test_backend_killed_mid_stream_ends_the_stream_with_an_error_event(embedded):
    e = embedded
    body = {"model": "m", "max_tokens": 400, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}
    types = []
    with httpx.stream("POST", e["base"] + "/v1/messages", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        for ev in stream_events(resp):
            types.append(ev["type"])
            if ev["type"] == "content_block_delta" and types.count("content_block_delta") == 2:
                os.kill(server_pid(e["slog"]), signal.SIGKILL)
    e["flows"] += 1
    assert types[-1] == "error" and "message_stop" not in types, types[-5:]
    rec = json.loads(e["cap"].read_bytes().splitlines()[-1])
    assert rec["error"] and rec["status"] == 200


@pytest.mark.model
def test_backend_killed_before_answering_gives_an_anthropic_error_then_recovers(embedded):
    e = embedded
    deadline = time.monotonic() + 300
    while not port_open(server_port(e["slog"])):  # restarted after the previous test
        assert time.monotonic() < deadline
        time.sleep(0.3)
    result = {}

    def ask():
        result["r"] = httpx.post(e["base"] + "/v1/messages", timeout=300, json={
            "model": "m", "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]})

    t = threading.Thread(target=ask)
    t.start()
    port = server_port(e["slog"])
    while not httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("busy"):
        assert t.is_alive() and time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(server_pid(e["slog"]), signal.SIGKILL)
    t.join(120)
    e["flows"] += 1
    r = result["r"]
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/json")
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    r = httpx.post(e["base"] + "/v1/messages", timeout=600,
                   json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
    e["flows"] += 1
    assert r.status_code == 200  # the supervisor restarted it and the request waited


@pytest.mark.model
def test_sigkill_of_mitmdump_stops_the_embedded_server_within_seconds(tmp_path):
    with embedded_mitmdump(tmp_path) as e:
        r = httpx.post(e["base"] + "/v1/messages/count_tokens", timeout=600,
                       json={"model": "m", "messages": [{"role": "user", "content": "Hi."}]})
        assert r.status_code == 200
        pid = server_pid(e["slog"])
        assert pid_alive(pid)
        e["proc"].send_signal(signal.SIGKILL)
        e["proc"].wait()
        t0 = time.monotonic()
        while pid_alive(pid) and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        assert not pid_alive(pid), "the embedded server outlived mitmdump by 15 s"
    assert "parent process is gone" in e["slog"].read_text()


def test_a_server_that_exits_at_once_fails_fast_with_its_exit_code(tmp_path):
    with embedded_mitmdump(tmp_path, embedded_args="--no-such-flag", embedded_start_timeout=600) as e:
        t0 = time.monotonic()
        r = httpx.post(e["base"] + "/v1/messages", timeout=600,
                       json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
        waited = time.monotonic() - t0
    assert r.status_code >= 500 and r.json()["type"] == "error"
    msg = r.json()["error"]["message"]
    assert "exited with code 2" in msg and "unrecognized arguments: --no-such-flag" in msg
    assert waited < 120  # not the 600 s start timeout
    assert e["slog"].read_text().count("=== pid") == 1  # a usage error is not restarted


@pytest.mark.model
def test_round_two_secret_names_reach_neither_capture_nor_logs(embedded):
    """Issue 21: names the first list missed, through the real mitmdump, in headers, the body and
    the query string (which mitmdump's own flow line prints)."""
    e = embedded
    s = [f"planted-round2-{i:02d}-{os.urandom(4).hex()}" for i in range(9)]
    headers = {"content-type": "application/json", "X-Access-Tokens": s[0], "X-Refresh-Tokens": s[1],
               "x-amz-signature": s[2]}
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}],
            "metadata": {"privkey": s[3], "creds": s[4], "api_tokens": s[5],
                         "database_url": f"postgres://app:{s[6]}@db.internal:5432/app"}}
    r = httpx.post(e["base"] + f"/v1/messages?access_tokens={s[7]}&Signature={s[8]}", json=body, headers=headers,
                   timeout=300)
    e["flows"] += 1
    assert r.status_code == 200, r.text
    rec = json.loads(e["cap"].read_text().splitlines()[-1])
    assert rec["request"]["body"]["max_tokens"] == 2  # counts stay
    mitm_log = e["tmp"] / "mitm.log"
    deadline = time.monotonic() + 30
    while "access_tokens=" not in mitm_log.read_text():  # mitmdump prints its flow line after the response
        assert time.monotonic() < deadline, "no flow line"
        time.sleep(0.1)
    assert "access_tokens=%3Credacted%3E" in mitm_log.read_text()
    for path in written_files(e):
        text = path.read_text(errors="replace")
        assert not [x for x in s if x in text], path.name


# --------------------------------------------------------------------------- capture units


@pytest.mark.parametrize("name,secret", [
    ("x-api-key", True), ("api-key", True), ("x-auth-token", True), ("anthropic-auth-token", True),
    ("api_key", True), ("password", True), ("access_token", True), ("refreshToken", True), ("client_secret", True),
    ("Cookie", True), ("PHPSESSID", True), ("X-Goog-Api-Key", True), ("oauth", True),
    ("max_tokens", False), ("input_tokens", False), ("cache_read_input_tokens", False), ("budget_tokens", False),
    ("model", False), ("keyboard", False), ("author", False), ("x-claude-code-session-id", False),
    ("anthropic-version", False), ("signature", False), ("tokenizer", False),
    # issue 21: names the `*tokens` exemption and the word list missed
    ("X-Access-Tokens", True), ("X-Refresh-Tokens", True), ("access_tokens", True), ("api_tokens", True),
    ("apiTokens", True), ("privkey", True), ("x-amz-signature", True), ("Signature", True), ("creds", True),
    ("aws_creds", True), ("ssh_private_key", True),
    ("output_tokens", False), ("maxTokens", False), ("max_new_tokens", False), ("tokens", False),
    ("cache_creation_input_tokens", False), ("anthropic-ratelimit-input-tokens-remaining", False),
    ("anthropic-ratelimit-tokens-limit", False), ("count_tokens", False), ("database_url", False),
])
def test_secret_names_by_pattern(name, secret):
    from warmturn.protocol import is_secret_name

    assert is_secret_name(name) is secret


@pytest.mark.parametrize("text,kept", [
    ("postgres://app:hunter2@db.internal:5432/x", "postgres://app:<redacted>@db.internal:5432/x"),
    ("see redis://:s3cr3t@cache/0 and https://example.com:8080/a@b", "see redis://:<redacted>@cache/0 and "
                                                                     "https://example.com:8080/a@b"),
    ("ssh://git@github.com/x.git", "ssh://git@github.com/x.git"),
])
def test_passwords_in_urls_are_redacted(text, kept):
    from warmturn.protocol import redact_json

    assert redact_json({"database_url": text, "list": [text]}) == {"database_url": kept, "list": [kept]}


def test_a_record_with_planted_secrets_keeps_none_of_them():
    from mitmproxy.test import tflow

    from warmturn.addons.capture import build_record, encode_line
    from warmturn.addons.state import FlowState

    f = tflow.tflow(resp=True)
    f.request.path = f"/v1/messages?api_key={SECRETS[0]}&beta=true"
    for i, h in enumerate(("x-api-key", "api-key", "x-auth-token", "anthropic-auth-token", "cookie")):
        f.request.headers[h] = SECRETS[i + 1]
    f.request.content = json.dumps({"model": "m", "api_key": SECRETS[6], "nested": [{"deep": {
        "password": SECRETS[7], "accessToken": {"value": SECRETS[8]}}}], "max_tokens": 5}).encode()
    FlowState(kind="messages", path=f.request.path).attach(f)
    line = encode_line(build_record(f)).decode()
    assert not [s for s in SECRETS[:9] if s in line]
    rec = json.loads(line)
    assert rec["request"]["body"]["max_tokens"] == 5 and rec["request"]["body"]["api_key"] == "<redacted>"
    # a form body and a body too deep to parse are kept as text, redacted the same way
    for content in (f"a=1&api_key={SECRETS[9]}&password={SECRETS[10]}".encode(),
                    ("[" * 3000 + f'{{"access_token": "{SECRETS[11]}"}}' + "]" * 3000).encode()):
        g = tflow.tflow(resp=True)
        g.request.content = content
        FlowState(kind="messages").attach(g)
        line = encode_line(build_record(g)).decode()
        assert not [s for s in SECRETS if s in line] and "<redacted>" in line


def test_a_capture_line_survives_lone_surrogates_and_huge_bodies():
    from mitmproxy.test import tflow

    from warmturn.addons.capture import build_record, encode_line
    from warmturn.addons.state import FlowState

    f = tflow.tflow(resp=True)
    f.request.content = b'{"model": "m\\ud800", "system": "\\udfff"}'
    st = FlowState(kind="messages", model="m\ud800").attach(f)
    st.content = [{"type": "text", "text": "\udc80"}]
    line = encode_line(build_record(f))
    assert json.loads(line.decode("utf-8"))["request"]["body"]["system"] == "\udfff"
    g = tflow.tflow(resp=True)
    g.request.content = b"x" * (5 << 20)
    FlowState(kind="messages").attach(g)
    rec = json.loads(encode_line(build_record(g, max_body=1 << 20)))
    assert rec["request"]["truncated"]["original_bytes"] == 5 << 20 and len(rec["request"]["body_text"]) <= 64 * 1024


def test_a_short_write_is_continued_or_reported(tmp_path):
    """RLIMIT_FSIZE makes the kernel write only part of a line: the writer must not return as if
    the whole line had been written (child process: the limit applies per process)."""
    script = f"""
import os, resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from warmturn.addons.capture import append_record
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    append_record({str(tmp_path / 'cap.jsonl')!r}, {{"pad": "x" * 10000}})
except OSError as e:
    print("raised", e.errno)
else:
    print("returned")
"""
    out = subprocess.run([str(VENV_BIN / "python"), "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().startswith("raised"), out.stdout + out.stderr
    assert (tmp_path / "cap.jsonl").stat().st_size == 0  # what the kernel took is cut off again


def test_a_line_torn_by_a_full_disk_does_not_swallow_the_next_record(tmp_path):
    """Issue 21: after a write failed half-way, the next record was appended to the torn line and
    lost with it as invalid JSON. A full disk (RLIMIT_FSIZE, child process), then space again;
    and a torn tail left by a process that died mid-write (no chance to cut it)."""
    cap = tmp_path / "cap.jsonl"
    script = f"""
import os, resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from warmturn.addons.capture import append_record
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
append_record({str(cap)!r}, {{"n": 1}})
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize({str(cap)!r}) + 100, resource.RLIM_INFINITY))
try:
    append_record({str(cap)!r}, {{"n": 2, "pad": "x" * 10000}})
except OSError as e:
    print("full", e.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
append_record({str(cap)!r}, {{"n": 3}})
"""
    out = subprocess.run([str(VENV_BIN / "python"), "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("full"), out.stdout + out.stderr
    assert [json.loads(line)["n"] for line in cap.read_text().splitlines()] == [1, 3]
    with cap.open("ab") as f:  # a writer killed mid-line
        f.write(b'{"n": 4, "pad": "xxx')
    append_record(str(cap), {"n": 5})
    assert [json.loads(line)["n"] for line in cap.read_text().splitlines()] == [1, 3, 5]
    assert cap.read_bytes().endswith(b"\n")
