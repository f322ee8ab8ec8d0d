"""The addon's hooks on mitmproxy test flows: routing, normalization, streaming tap, capture."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from tests.conftest import FIXTURES, ROOT
from warmturn import machine, protocol
from warmturn.addons import backends, contentview
from warmturn.addons.normalize import make_addons
from warmturn.addons.scrub import scrub_query
from warmturn.addons.state import META, FlowState
from warmturn.addons.strip import OFF_LOOP_BYTES

CC = FIXTURES / "claude_code"
ADDON_FX = FIXTURES / "addon"
SSE = (ADDON_FX / "messages_stream.sse").read_bytes()


def recorded(name: str, index: int = 0) -> dict:
    posts = [json.loads(line) for line in (CC / name).read_text().splitlines()]
    posts = [r for r in posts if r["method"] == "POST"]
    return posts[index]


def make_flow(body=None, *, raw: bytes | None = None, headers: dict | None = None, path="/v1/messages?beta=true",
              host="127.0.0.1", port=8080, scheme="http", mode="regular", peer="127.0.0.1",
              sockname=("127.0.0.1", 8080), method="POST") -> http.HTTPFlow:
    content = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    hdrs = http.Headers([(k.encode(), v.encode()) for k, v in (headers or {}).items()])
    req = tutils.treq(method=method.encode(), scheme=scheme.encode(), host=host, port=port, path=path.encode(),
                      headers=hdrs, content=content, authority=b"")
    f = tflow.tflow(req=req)
    f.client_conn.peername = (peer, 50123)
    f.client_conn.sockname = sockname
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    return f


@pytest.fixture
def listener():
    """A real listening socket standing for the backend (the routing hook only checks it accepts)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


class Chain:
    """warmturn's addon chain as mitmproxy runs it: every hook goes through the real AddonManager,
    so each addon sees it in order."""

    def __init__(self, tctx: taddons.context, addons: list) -> None:
        self.tctx, self.addons = tctx, addons
        self.gate, self.capture = addons[0], addons[4]
        self.export = self.capture.export

    def _run(self, hook) -> None:
        asyncio.run(self.tctx.master.addons.handle_lifecycle(hook))

    def http_connect(self, f):
        self._run(http_layer.HttpConnectHook(f))

    def request(self, f):
        self._run(http_layer.HttpRequestHook(f))

    def responseheaders(self, f):
        self._run(http_layer.HttpResponseHeadersHook(f))

    def response(self, f):
        self._run(http_layer.HttpResponseHook(f))

    def error(self, f):
        self._run(http_layer.HttpErrorHook(f))


@pytest.fixture
def wt(tmp_path, listener):
    addons = make_addons()
    cap = tmp_path / "cap.jsonl"
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], backend=f"http://127.0.0.1:{listener}", capture_file=str(cap))
        yield Chain(tctx, addons), tctx, cap, listener


def lines(cap):
    return [json.loads(x) for x in cap.read_text().splitlines()]


def run_request(chain, f):
    chain.request(f)


def finish_streamed(addon, f, data: bytes, chunk: int = 7, ctype="text/event-stream") -> bytes:
    f.response = tutils.tresp(headers=http.Headers(content_type=ctype), content=b"")
    addon.responseheaders(f)
    tap = f.response.stream
    assert callable(tap)
    out = b"".join(b"".join(tap(data[i:i + chunk])) for i in range(0, len(data), chunk)) + b"".join(tap(b""))
    addon.response(f)
    return out


def test_script_loads_and_registers_options():
    with taddons.context() as tctx:
        sc = tctx.script(str(ROOT / "addons" / "normalize.py"))
        assert [type(a).__name__ for a in sc.addons] == ["Gate", "Normalize", "Route", "Tap", "Capture", "Console",
                                                            "Supervise", "Scrub", "Freeze"]
        for name in ("backend", "backend_api", "normalize", "capture_file", "volatile_patterns", "allow_remote",
                     "client_api_key", "backend_api_key", "embedded_python", "embedded_port"):
            assert name in tctx.options
        assert tctx.options.backend == "embedded" and tctx.options.normalize is True


@pytest.mark.parametrize("opts, match", [
    ({"volatile_patterns": ["(bad"]}, "volatile_patterns"),
    ({"volatile_headers": ["no spaces"]}, "header name"),
    ({"backend": "ftp://x"}, "backend must be"),
    ({"backend": "http://"}, "backend must be"),
    ({"backend": "http://h:99999"}, "bad port"),
    ({"embedded_args": "'unclosed"}, "embedded_args"),
    ({"embedded_port": 70000}, "embedded_port"),
])
def test_bad_options_are_rejected(opts, match):
    addons = make_addons()
    with taddons.context(*addons) as tctx, pytest.raises(exceptions.OptionsError, match=match):
        tctx.configure(addons[0], **opts)


def test_regular_mode_request_to_proxy_is_normalized_and_routed(wt):
    addon, _tctx, cap, port = wt
    rec = recorded("small_two_turns.jsonl")
    hdrs = {k: v for k, v in rec["headers"].items() if k not in ("content-length", "host")}
    hdrs.update({"host": "127.0.0.1:8080", "x-api-key": "sk-secret-123", "x-stainless-retry-count": "0"})
    f = make_flow(rec["body"], headers=hdrs)
    run_request(addon, f)
    assert f.response is None
    assert (f.request.host, f.request.port, f.request.scheme) == ("127.0.0.1", port)+("http",)
    assert f.request.path == "/v1/messages?beta=true"
    assert f.request.headers["host"] == f"127.0.0.1:{port}"
    sent = json.loads(f.request.content)
    assert not any("x-anthropic-billing-header" in b["text"] for b in sent["system"])
    assert sent["system"] == rec["body"]["system"][1:]
    assert sent["messages"] == rec["body"]["messages"]
    assert "x-stainless-retry-count" not in f.request.headers
    assert f.request.headers["x-claude-code-session-id"] == rec["headers"]["x-claude-code-session-id"]
    assert f.request.headers["x-api-key"] == "sk-secret-123"  # forwarded, never captured
    assert "warmturn stripped: system block 0" in f.comment
    out = finish_streamed(addon, f, SSE)
    assert out == SSE
    [line] = lines(cap)
    assert line["schema"] == 1 and line["kind"] == "messages" and line["status"] == 200
    assert line["session_id"] == rec["headers"]["x-claude-code-session-id"] and line["agent_id"] is None
    assert [e["kind"] for e in line["stripped"]] == ["system_block", "header"]
    assert line["request"]["headers"]["x-api-key"] == "<redacted>"
    assert "sk-secret-123" not in cap.read_text()
    assert line["usage"] == {"input_tokens": 131, "cache_read_input_tokens": 1904,
                             "cache_creation_input_tokens": 131, "output_tokens": 12}
    assert line["stop_reason"] == "tool_use"
    assert line["response"]["content"] == [
        {"type": "text", "text": "Let me read the file — ünïcode."},
        {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {"file_path": "/tmp/notes.txt"}}]
    t = line["t"]
    assert t["request"] <= t["sent"] <= t["response_headers"] <= t["first_byte"] <= t["first_content"] <= t["end"]
    assert line["ttft_ms"] is not None and line["ttfb_ms"] <= line["ttft_ms"] <= line["total_ms"]
    assert line["sizes"]["request_original"] == len(json.dumps(rec["body"]).encode())
    assert line["sizes"]["request_forwarded"] < line["sizes"]["request_original"]
    assert line["sizes"]["response"] == len(SSE)
    assert line["prefix_hash"] and line["prefix_chars"] > 0
    # the mitmweb view has the stream to show
    assert f.response.raw_content == SSE


@pytest.mark.parametrize("chunk", [1, 3, 64, 100000])
def test_tap_passes_bytes_unchanged_whatever_the_chunking(wt, chunk):
    addon, _tctx, cap, _ = wt
    crlf = SSE.replace(b"\n", b"\r\n")
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)
    assert finish_streamed(addon, f, crlf, chunk) == crlf
    assert lines(cap)[-1]["usage"]["output_tokens"] == 12


def test_interception_of_api_anthropic_com_is_rerouted(wt):
    addon, _tctx, cap, port = wt
    body = recorded("subagent_round.jsonl", 1)
    assert "cc_is_subagent=true" in body["body"]["system"][0]["text"]
    f = make_flow(body["body"], headers={"x-claude-code-agent-id": body["headers"]["x-claude-code-agent-id"]},
                  host="api.anthropic.com", port=443, scheme="https", sockname=("127.0.0.1", 8080))
    run_request(addon, f)
    assert (f.request.scheme, f.request.host, f.request.port) == ("http", "127.0.0.1", port)
    finish_streamed(addon, f, SSE)
    line = lines(cap)[-1]
    assert line["is_subagent"] and line["agent_id"] == body["headers"]["x-claude-code-agent-id"]
    assert line["upstream"] == f"http://127.0.0.1:{port}/v1/messages?beta=true"


def test_reverse_mode_is_rerouted(wt):
    addon, _tctx, _cap, port = wt
    f = make_flow({"model": "m", "messages": []}, host="api.anthropic.com", port=443, scheme="https",
                  mode="reverse:https://api.anthropic.com")
    run_request(addon, f)
    assert (f.request.host, f.request.port) == ("127.0.0.1", port)


def test_passthrough_keeps_destination_but_normalizes(wt):
    addon, tctx, _cap, _port = wt
    tctx.configure(addon.gate, backend="passthrough")
    body = recorded("small_two_turns.jsonl")["body"]
    f = make_flow(body, host="api.anthropic.com", port=443, scheme="https")
    run_request(addon, f)
    assert (f.request.host, f.request.port) == ("api.anthropic.com", 443)
    assert len(json.loads(f.request.content)["system"]) == len(body["system"]) - 1
    f2 = make_flow(body)  # addressed to the proxy itself: goes to the real API
    run_request(addon, f2)
    assert f2.request.url == "https://api.anthropic.com/v1/messages?beta=true"


def test_other_hosts_and_paths_pass_untouched(wt):
    addon, _tctx, cap, _ = wt
    raw = json.dumps(recorded("small_two_turns.jsonl")["body"]).encode()
    f = make_flow(raw=raw, host="example.com", port=80)
    run_request(addon, f)
    assert f.request.host == "example.com" and f.request.content == raw and META not in f.metadata
    f.response = tutils.tresp()
    addon.responseheaders(f)
    assert f.response.stream is False
    addon.response(f)
    assert not cap.exists()


def test_normalize_off_forwards_bytes_untouched(wt):
    addon, tctx, cap, port = wt
    tctx.configure(addon.gate, normalize=False, capture_label="normalize-off")
    raw = json.dumps(recorded("small_two_turns.jsonl")["body"], indent=2).encode()
    f = make_flow(raw=raw, headers={"x-stainless-retry-count": "1"})
    run_request(addon, f)
    assert f.request.content == raw and f.request.port == port
    assert f.request.headers["x-stainless-retry-count"] == "1"
    finish_streamed(addon, f, SSE)
    line = lines(cap)[-1]
    assert line["normalize"] is False and line["stripped"] == [] and line["label"] == "normalize-off"


def test_malformed_json_passes_through_and_is_captured(wt):
    addon, _tctx, cap, port = wt
    raw = b'{"model": "m", "system": [{"type": "text", "text": "x-anthropic-billing-header: a"'
    f = make_flow(raw=raw)
    run_request(addon, f)
    assert f.request.content == raw and f.request.port == port
    f.response = tutils.tresp(status_code=400, headers=http.Headers(content_type="application/json"),
                              content=b'{"type":"error","error":{"type":"invalid_request_error","message":"bad json"}}')
    addon.responseheaders(f)
    addon.response(f)
    line = lines(cap)[-1]
    assert line["request"]["body"] is None and line["request"]["body_text"] == raw.decode()
    assert line["error"] == {"type": "invalid_request_error", "message": "bad json"} and line["status"] == 400


def test_non_anthropic_backend_errors_become_anthropic_errors(wt):
    addon, _tctx, _cap, port = wt
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)
    f.response = tutils.tresp(status_code=500, headers=http.Headers(content_type="text/html"), content=b"<h1>boom</h1>")
    addon.responseheaders(f)
    addon.response(f)
    body = json.loads(f.response.content)
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert f"127.0.0.1:{port}" in body["error"]["message"] and "boom" in body["error"]["message"]


def test_redaction_in_bodies_and_headers(wt):
    addon, _tctx, cap, _ = wt
    f = make_flow({"model": "m", "messages": [], "metadata": {"authorization": "Bearer abc", "x": {"Cookie": "c=1"}}},
                  headers={"Authorization": "Bearer sk-live-zzz", "Cookie": "session=qqq"})
    run_request(addon, f)
    f.response = tutils.tresp(headers=http.Headers(content_type="application/json", set_cookie="s=ttt"),
                              content=b'{"type":"message","content":[],"usage":{"input_tokens":3,"output_tokens":1}}')
    addon.responseheaders(f)
    addon.response(f)
    text = cap.read_text()
    for secret in ("sk-live-zzz", "qqq", "ttt", "Bearer abc", "c=1"):
        assert secret not in text
    line = lines(cap)[-1]
    assert line["request"]["body"]["metadata"] == {"authorization": "<redacted>", "x": {"Cookie": "<redacted>"}}
    assert line["response"]["headers"]["set-cookie"] == "<redacted>"
    assert line["usage"] == {"input_tokens": 3, "output_tokens": 1}


def test_remote_clients_refused_unless_allowed(wt):
    addon, tctx, _cap, port = wt
    f = make_flow({"model": "m", "messages": []}, peer="192.168.1.20", sockname=("192.168.1.5", 8080),
                  host="192.168.1.5")
    run_request(addon, f)
    assert f.response.status_code == 403
    assert json.loads(f.response.content)["error"]["type"] == "permission_error"
    tctx.configure(addon.gate, allow_remote=True, client_api_key="club")
    f = make_flow({"model": "m", "messages": []}, peer="192.168.1.20", sockname=("192.168.1.5", 8080),
                  host="192.168.1.5", headers={"x-api-key": "wrong"})
    run_request(addon, f)
    assert f.response.status_code == 401
    assert json.loads(f.response.content)["error"]["type"] == "authentication_error"
    f = make_flow({"model": "m", "messages": []}, peer="192.168.1.20", sockname=("192.168.1.5", 8080),
                  host="192.168.1.5", headers={"authorization": "Bearer club"})
    run_request(addon, f)
    assert f.response is None and f.request.port == port


def test_backend_down_gives_anthropic_error_and_capture(wt):
    addon, tctx, cap, _ = wt
    from tests.conftest import free_port
    dead = free_port()
    tctx.configure(addon.gate, backend=f"http://127.0.0.1:{dead}")
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)
    assert f.response.status_code == 502
    err = json.loads(f.response.content)["error"]
    assert err["type"] == "api_error" and f"127.0.0.1:{dead}" in err["message"]
    addon.responseheaders(f)
    addon.response(f)
    line = lines(cap)[-1]
    assert line["status"] == 502 and line["error"]["type"] == "api_error"


def test_proxy_error_is_captured(wt):
    addon, _tctx, cap, _ = wt
    f = make_flow({"model": "m", "messages": []})
    run_request(addon, f)
    from mitmproxy import flow as mflow
    f.error = mflow.Error("connection reset")
    addon.error(f)
    line = lines(cap)[-1]
    assert line["error"] == {"type": "proxy_error", "message": "connection reset"} and line["status"] is None
    # a stream cut mid-way keeps what the tap saw
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)
    f.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"), content=b"")
    addon.responseheaders(f)
    half = SSE[: SSE.index(b"event: content_block_stop")]
    assert f.response.stream(half) == [half]
    f.error = mflow.Error("client disconnected")
    addon.error(f)
    line = lines(cap)[-1]
    assert line["usage"]["input_tokens"] == 131 and line["response"]["content"][0]["text"].startswith("Let me read")
    assert line["sizes"]["response"] == len(half) and line["t"]["first_content"] is not None


def test_capture_every_line_is_valid_jsonl_with_all_fields(wt):
    addon, _tctx, cap, _ = wt
    for rec in [json.loads(x) for x in (CC / "tool_round.jsonl").read_text().splitlines()]:
        f = make_flow(rec["body"], raw=None if rec["body"] is not None else b"", method=rec["method"],
                      path=rec["path"], headers={k: v for k, v in rec["headers"].items() if k != "content-length"})
        run_request(addon, f)
        if rec["method"] == "POST":
            finish_streamed(addon, f, SSE, 50)
        else:
            f.response = tutils.tresp(status_code=404, content=b"")
            addon.responseheaders(f)
            addon.response(f)
    raw_lines = cap.read_text().splitlines()
    assert len(raw_lines) == len((CC / "tool_round.jsonl").read_text().splitlines())
    fields = {"schema", "id", "kind", "label", "method", "path", "client", "mode", "backend", "backend_api", "upstream",
              "normalize", "session_id", "agent_id", "is_subagent", "model", "stream", "status", "error", "t",
              "ttfb_ms", "ttft_ms", "total_ms", "queue_ms", "prefill_ms", "side", "usage", "stop_reason", "prefix_hash",
              "prefix_chars", "stripped", "sizes", "request", "response"}
    kinds = set()
    for raw in raw_lines:
        rec = json.loads(raw)
        assert set(rec) == fields
        kinds.add(rec["kind"])
    assert kinds == {"messages", "other"}
    hashes = {json.loads(x)["prefix_hash"] for x in raw_lines if json.loads(x)["kind"] == "messages"}
    assert len(hashes) == 1, "same system+tools across turns after stripping"


def test_export_command_writes_capture_lines(wt, tmp_path):
    addon, _tctx, _cap, _ = wt
    f = make_flow({"model": "m", "messages": []})
    run_request(addon, f)
    finish_streamed(addon, f, SSE)
    plain = tflow.tflow(resp=True)
    out = tmp_path / "export.jsonl"
    said = addon.export([f, plain], str(out))
    assert said == f"warmturn.export: appended 2 flows to {out}"
    exported = lines(out)
    assert len(exported) == 2
    assert exported[0]["usage"]["output_tokens"] == 12 and exported[0]["id"] == f.id
    assert exported[1]["kind"] == "other" and exported[1]["status"] == 200


def test_contentview_renders_request_and_stream(wt):
    addon, _tctx, _cap, _ = wt
    body = json.loads((CC / "full_first_turn.json").read_text())["body"]
    f = make_flow(body)
    run_request(addon, f)
    finish_streamed(addon, f, SSE)
    view = contentview.AnthropicContentview()
    assert view.name == "warmturn"
    from mitmproxy.contentviews import Metadata
    meta = Metadata(flow=f, http_message=f.request)
    assert view.render_priority(f.request.content, meta) > 1
    text = view.prettify(f.request.content, meta)
    assert "STRIPPED" in text and "x-anthropic-billing-header" in text
    assert f"tools ({len(body['tools'])}," in text and "  Bash:" in text
    rtext = view.prettify(f.response.raw_content, Metadata(flow=f, http_message=f.response))
    assert "Let me read the file" in rtext and "tool_use Read" in rtext and '"cache_read_input_tokens": 1904' in rtext
    for t in (text, rtext):  # what warmturn measured, on top of both views; lines wrapped for mitmweb
        head = t.splitlines()[:2]
        assert head[0].startswith("warmturn: messages  TTFT ") and " s  total " in head[0] and "queue wait" in head[0]
        assert head[1].startswith("tokens: prompt ") and "cache read 1904" in head[1] and "hit " in head[1]
        assert max(map(len, t.splitlines())) <= contentview.WIDTH
    # a block's size reads the same wherever it is shown (its header, the STRIPPED line's preview)
    main_prompt = json.loads(f.request.content)["system"][1]["text"]  # as forwarded: billing block gone
    assert text.count(f"({len(main_prompt)} chars)") == 2, len(main_prompt)
    other = make_flow(raw=b"x", path="/other")
    assert view.render_priority(b"x", Metadata(flow=other, http_message=other.request)) < 0


def test_routing_helpers():
    assert backends.parse_backend("http://h:8000/base/").url_for("/v1/messages") == "http://h:8000/base/v1/messages"
    assert backends.parse_backend("https://h").url_for("/x") == "https://h/x"
    assert protocol.request_kind("/v1/messages/count_tokens?beta=true") == "count_tokens"
    assert protocol.request_kind("/v1/models") == "models" and protocol.request_kind("/") == "other"
    assert machine.is_loopback("::1") and machine.is_loopback("::ffff:127.0.0.1")
    assert machine.is_loopback("[::1]") and not machine.is_loopback("10.0.0.1")


def test_connect_to_anthropic_is_answered_locally(wt):
    """Rerouted or not: with passthrough the relay, not mitmproxy, makes the connection to
    Anthropic (tests/test_addon_relay.py has that path through a real mitmdump)."""
    addon, tctx, _cap, _ = wt
    for backend in (None, "passthrough"):
        if backend:
            tctx.configure(addon.gate, backend=backend)
        f = make_flow(method="CONNECT", host="api.anthropic.com", port=443, path="")
        addon.http_connect(f)
        assert f.response is not None and f.response.status_code == 200, backend
        other = make_flow(method="CONNECT", host="example.com", port=443, path="")
        addon.http_connect(other)
        assert other.response is None, backend


def test_count_tokens_is_normalized_and_its_count_captured(wt):
    addon, _tctx, cap, _ = wt
    body = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hi"}],
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.abc; cch=12345;"}]}
    f = make_flow(body, path="/v1/messages/count_tokens?beta=true")
    run_request(addon, f)
    assert json.loads(f.request.content)["system"] == []
    f.response = tutils.tresp(headers=http.Headers(content_type="application/json"), content=b'{"input_tokens": 42}')
    addon.responseheaders(f)
    addon.response(f)
    line = lines(cap)[-1]
    assert line["kind"] == "count_tokens" and line["usage"] == {"input_tokens": 42} and len(line["stripped"]) == 1


def test_state_is_typed_while_live_then_plain_data_that_mitmproxy_can_save(wt, tmp_path):
    addon, _tctx, cap, _ = wt
    f = make_flow(recorded("small_two_turns.jsonl")["body"], headers={"x-stainless-retry-count": "0"})
    run_request(addon, f)
    state = f.metadata[META]
    assert isinstance(state, FlowState) and [e.kind for e in state.stripped] == ["system_block", "header"]
    finish_streamed(addon, f, SSE)
    assert isinstance(f.metadata[META], dict), "frozen once captured"
    from mitmproxy import io
    saved = tmp_path / "flows"
    with open(saved, "wb") as fh:
        io.FlowWriter(fh).add(f)  # tnetstring: fails on anything but plain data
    with open(saved, "rb") as fh:
        [loaded] = list(io.FlowReader(fh).stream())
    assert FlowState.of(loaded).stripped == state.stripped and FlowState.of(loaded).usage["output_tokens"] == 12
    # a flow loaded from a file is not live: the chain leaves it alone (no second capture line)
    assert not loaded.live
    addon.request(loaded)
    addon.response(loaded)
    assert len(lines(cap)) == 1
    out = tmp_path / "export.jsonl"
    addon.export([loaded], str(out))
    assert lines(out)[0]["stripped"] == lines(cap)[0]["stripped"]


def test_unfinished_flows_are_saveable_at_shutdown(wt, tmp_path):
    addon, tctx, cap, _ = wt
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)  # the stream never ends: mitmproxy shuts down mid-flow
    from mitmproxy import hooks, io
    asyncio.run(tctx.master.addons.trigger_event(hooks.DoneHook()))
    with open(tmp_path / "flows", "wb") as fh:
        io.FlowWriter(fh).add(f)
    assert FlowState.of(f).kind == "messages" and not cap.exists()


def test_backend_model_is_mapped_on_every_route(wt):
    addon, tctx, _cap, _port = wt
    tctx.configure(addon.gate, backend_model="local-model")
    for path in ("/v1/messages?beta=true", "/v1/messages/count_tokens?beta=true"):
        f = make_flow({"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hi"}]}, path=path)
        run_request(addon, f)
        assert json.loads(f.request.content)["model"] == "local-model", path


def test_non_loopback_connect_is_refused(wt):
    addon, _tctx, _cap, _ = wt
    f = make_flow(method="CONNECT", host="127.0.0.1", port=22, path="", peer="192.168.1.20")
    addon.http_connect(f)
    assert f.response is not None and f.response.status_code == 403
    ok = make_flow(method="CONNECT", host="api.anthropic.com", port=443, path="")
    addon.http_connect(ok)
    assert ok.response.status_code == 200 and "content-length" not in ok.response.headers


def test_embedded_backend_not_running_is_a_503_overloaded_error(wt):
    addon, tctx, cap, _ = wt
    tctx.configure(addon.gate, backend="embedded")  # mitmproxy is not "running" here: no server started
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["type"] == protocol.error_type_for(503) == "overloaded_error"
    addon.response(f)
    assert lines(cap)[-1]["error"]["type"] == "overloaded_error"


def test_backend_queue_wait_and_prefill_are_captured(wt):
    addon, _tctx, cap, _ = wt
    f = make_flow({"model": "m", "messages": [], "stream": True})
    run_request(addon, f)
    f.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream", x_warmturn_queue_ms="1520.5",
                                                   x_warmturn_prefill_ms="310.25"), content=b"")
    addon.responseheaders(f)
    f.response.stream(SSE)
    f.response.stream(b"")
    addon.response(f)
    line = lines(cap)[-1]
    assert (line["queue_ms"], line["prefill_ms"]) == (1520.5, 310.25)
    g = make_flow({"model": "m", "messages": []})
    run_request(addon, g)
    g.response = tutils.tresp(headers=http.Headers(content_type="application/json", x_warmturn_queue_ms="nan"),
                              content=b'{"type":"message","content":[],"usage":{"input_tokens":1,"output_tokens":1}}')
    addon.responseheaders(g)
    addon.response(g)
    assert (lines(cap)[-1]["queue_ms"], lines(cap)[-1]["prefill_ms"]) == (None, None)


def test_title_request_is_captured_as_a_side_request(wt):
    addon, _tctx, cap, _ = wt
    recs = [json.loads(x) for x in (CC / "interactive_title_capture.jsonl").read_text().splitlines()]
    title, turn = [r for r in recs if r["kind"] == "messages"][:2]
    for rec in (title, turn):
        f = make_flow(rec["request"]["body"])
        run_request(addon, f)
        finish_streamed(addon, f, SSE)
    assert [x["side"] for x in lines(cap)[-2:]] == ["title", None]


@pytest.mark.parametrize("padding, off_loop", [(1_000, False), (2 * OFF_LOOP_BYTES, True)])
def test_a_big_body_is_parsed_and_normalized_off_the_event_loop(wt, padding, off_loop):
    """Over OFF_LOOP_BYTES the normalize hook hands the body to a worker thread and mitmproxy's
    loop is free meanwhile: the hook's first step returns with its work still pending. A small
    body is handled within that first step, on the loop (which shows the check can tell)."""
    addon, _tctx, _cap, _port = wt
    rec = recorded("small_two_turns.jsonl")
    body = json.loads(json.dumps(rec["body"]))
    body["messages"][0]["content"] = [{"type": "text", "text": "x" * padding}]
    hdrs = {k: v for k, v in rec["headers"].items() if k not in ("content-length", "host")}
    f = make_flow(body, headers=hdrs)
    gate, normalize = addon.addons[0], addon.addons[1]

    async def handle() -> bool:
        await gate.request(f)
        hook = asyncio.ensure_future(normalize.request(f))
        await asyncio.sleep(0)  # the hook's first step runs before this task resumes
        left_the_loop_free = not hook.done()
        await hook
        return left_the_loop_free

    assert asyncio.run(handle()) is off_loop
    sent = json.loads(f.request.content)  # normalized all the same, wherever it ran
    assert sent["system"] == rec["body"]["system"][1:] and sent["messages"][0] == body["messages"][0]
    assert "warmturn stripped: system block 0" in f.comment


@pytest.mark.parametrize("path, shown", [
    ("/v1/messages?beta=true&api_key=sk-q-1&x=1", "/v1/messages?beta=true&api_key=%3Credacted%3E&x=1"),
    ("/v1/messages?access_token=t0k&key=k&max_tokens=5", "/v1/messages?access_token=%3Credacted%3E&key=%3Credacted%3E"
                                                          "&max_tokens=5"),
    ("/v1/messages?beta=true&a=%20b", "/v1/messages?beta=true&a=%20b"),  # nothing secret: left byte for byte
    ("/v1/messages", "/v1/messages"),
])
def test_scrub_redacts_credential_query_parameters_only(path, shown):
    f = make_flow({"model": "m"}, path=path)
    assert scrub_query(f.request) is (path != shown)
    assert f.request.path == shown
