"""Anthropic Messages <-> OpenAI Chat Completions, both ways, streaming included. Pure.

Used with `backend_api=openai` so an OpenAI-compatible engine (mlx_lm.server, vLLM, Ollama...)
can sit behind the addon while the client keeps speaking Anthropic's Messages API.
"""

from __future__ import annotations

import json
from typing import Any

from warmturn.protocol import MessageStream, SSEDecoder, encode_sse, new_id

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _user_parts(blocks: list) -> tuple[list[dict], list[dict]]:
    """(tool messages, user content parts) of an Anthropic user content list."""
    tools, parts = [], []
    for b in blocks:
        if not isinstance(b, dict):
            continue
        t = b.get("type")
        if t == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif t == "image":
            src = b.get("source") or {}
            if src.get("type") == "base64":
                parts.append({"type": "image_url",
                              "image_url": {"url": f"data:{src.get('media_type')};base64,{src.get('data')}"}})
            elif src.get("type") == "url":
                parts.append({"type": "image_url", "image_url": {"url": src.get("url")}})
        elif t == "tool_result":
            text = _text_of(b.get("content"))
            if b.get("is_error"):
                text = f"Error: {text}"
            tools.append({"role": "tool", "tool_call_id": b.get("tool_use_id", ""), "content": text})
    return tools, parts


def _flatten(parts: list[dict]) -> str | list[dict]:
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _system_text(system: Any) -> str:
    return system if isinstance(system, str) else "\n\n".join(
        b.get("text", "") for b in system if isinstance(b, dict) and b.get("type") == "text")


def _user_messages(content: Any) -> list[dict]:
    """An Anthropic user turn: its tool results as tool messages first, then the rest as one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools, parts = _user_parts(content if isinstance(content, list) else [])
    return tools + ([{"role": "user", "content": _flatten(parts)}] if parts else [])


def _assistant_message(content: Any) -> dict:
    """An Anthropic assistant turn: its text joined, its tool_use blocks as tool_calls."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for b in content if isinstance(content, list) else []:
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text":
            texts.append(b.get("text", ""))
        elif b.get("type") == "tool_use":
            calls.append({"id": b.get("id", ""), "type": "function",
                          "function": {"name": b.get("name", ""),
                                       "arguments": json.dumps(b.get("input", {}), ensure_ascii=False)}})
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _openai_messages(body: dict) -> list[dict]:
    msgs: list[dict] = []
    if body.get("system"):
        msgs.append({"role": "system", "content": _system_text(body["system"])})
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("messages: field required (a list)")
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError("messages: each message must be an object")
        role, content = m.get("role"), m.get("content")
        if role == "system":
            msgs.append({"role": "system", "content": _text_of(content)})
        elif role == "user":
            msgs.extend(_user_messages(content))
        elif role == "assistant":
            msgs.append(_assistant_message(content))
        else:
            raise ValueError(f"messages: unknown role {role!r}")
    return msgs


TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _tool_choice(tc: dict, req: dict[str, Any]) -> None:
    """Anthropic's tool_choice as OpenAI's tool_choice (and parallel_tool_calls), set on `req`."""
    kind = tc.get("type")
    if kind in TOOL_CHOICES:
        req["tool_choice"] = TOOL_CHOICES[kind]
    elif kind == "tool":
        req["tool_choice"] = {"type": "function", "function": {"name": tc.get("name", "")}}
    if tc.get("disable_parallel_tool_use"):
        req["parallel_tool_calls"] = False


def to_openai_request(body: dict, model: str | None = None) -> dict:
    """An Anthropic Messages request as an OpenAI Chat Completions request."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    req: dict[str, Any] = {"model": model or body.get("model", ""), "messages": _openai_messages(body)}
    for k in ("max_tokens", "temperature", "top_p", "top_k"):
        if k in body:
            req[k] = body[k]
    if body.get("stop_sequences"):
        req["stop"] = body["stop_sequences"]
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "input_schema" in t]
    if tools:
        req["tools"] = [{"type": "function", "function": {
            "name": t.get("name", ""), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}} for t in tools]
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        _tool_choice(tc, req)
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return req


def usage_from_openai(usage: Any) -> dict[str, int]:
    """OpenAI usage -> Anthropic usage: cached prompt tokens become cache_read_input_tokens, and
    vLLM's ``created_cache_tokens`` (prompt tokens it has just written to its prefix cache)
    cache_creation_input_tokens; input_tokens is the rest, so the three add up to the prompt."""
    if not isinstance(usage, dict):
        return {}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = int(details.get("cached_tokens") or 0)
    created = max(0, min(int(details.get("created_cache_tokens") or 0), prompt - cached))
    out = {"input_tokens": prompt - cached - created, "output_tokens": int(usage.get("completion_tokens") or 0)}
    if cached or usage.get("prompt_tokens_details") is not None:
        out["cache_read_input_tokens"] = cached
    if "created_cache_tokens" in details:
        out["cache_creation_input_tokens"] = created
    return out


def _tool_input(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def stop_reason(finish_reason: str | None, called_tools: bool) -> str:
    """Anthropic's stop_reason for an OpenAI finish_reason. A turn that called tools is ``tool_use``
    even when the engine says ``stop`` (vLLM does, for a named ``tool_choice``): Claude Code runs the
    tools only on ``tool_use``."""
    stop = STOP_REASONS.get(finish_reason or "stop", "end_turn")
    return "tool_use" if called_tools and stop == "end_turn" else stop


def from_openai_response(resp: dict, model: str) -> dict:
    """A non-streamed Chat Completions response as an Anthropic Message."""
    choice = (resp.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict] = []
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"),
                        "name": fn.get("name", ""), "input": _tool_input(fn.get("arguments"))})
    usage = usage_from_openai(resp.get("usage")) or {"input_tokens": 0, "output_tokens": 0}
    stop = stop_reason(choice.get("finish_reason"), any(b["type"] == "tool_use" for b in content))
    return {"id": f"msg_{resp.get('id')}" if resp.get("id") else new_id("msg_"), "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": stop,
            "stop_sequence": None, "usage": usage}


class StreamTranslator:
    """OpenAI Chat Completions SSE bytes in, Anthropic Messages SSE bytes out (chunk by chunk).

    The Anthropic side is built by the shared event builder (:class:`warmturn.protocol.MessageStream`).
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._dec = SSEDecoder()
        self._msg: MessageStream | None = None
        self._finished = False
        self._block: tuple[str, int | None] | None = None  # ("text", None) | ("tool", openai index)
        self._finish_reason: str | None = None
        self._called_tools = False
        self._usage: dict[str, int] = {}

    def feed(self, chunk: bytes) -> bytes:
        """Translate one chunk (b"" at the end of the stream). The result may be empty: an OpenAI
        chunk can carry nothing Anthropic streams (vLLM's separate ``"choices": []`` usage chunk),
        and the caller must not pass an empty chunk on as one (see addons/tap.py)."""
        events = self._dec.feed(chunk) if chunk else self._dec.flush()
        out = [e for ev in events for e in self._event(ev.data)]
        if not chunk:
            out += self._finish()
        return b"".join(encode_sse(e) for e in out)

    def _message(self, chunk_id: str | None) -> tuple[MessageStream, list[dict]]:
        """The message being built, and its ``message_start`` when this is its first event."""
        if self._msg is None:
            self._msg = MessageStream(self.model, {"input_tokens": 0}, id=f"msg_{chunk_id}" if chunk_id else None)
            return self._msg, self._msg.start(ping=False)
        return self._msg, []

    def _event(self, data: str) -> list[dict]:
        if self._finished:
            return []
        if data.strip() == "[DONE]":
            return self._finish()
        try:
            obj = json.loads(data)
        except ValueError:
            return []
        if not isinstance(obj, dict):
            return []
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            self._finished = True
            stream, out = self._message(None)
            return out + stream.error("api_error", f"backend error: {msg}")
        stream, out = self._message(obj.get("id"))
        if obj.get("usage"):
            self._usage = usage_from_openai(obj["usage"])
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self._block = ("text", None)
                out += stream.text(text)
            for call in delta.get("tool_calls") or []:
                key = ("tool", call.get("index", 0))
                fn = call.get("function") or {}
                if self._block != key:
                    self._block = key
                    self._called_tools = True
                    out += stream.open_tool(fn.get("name", ""), call.get("id") or None)
                out += stream.tool_input(fn.get("arguments") or "")
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return out

    def _finish(self) -> list[dict]:
        if self._finished:
            return []
        self._finished = True
        stream, out = self._message(None)
        stop = stop_reason(self._finish_reason, self._called_tools)
        return out + stream.finish(stop, usage=self._usage or {"output_tokens": 0}, empty_block=False)
