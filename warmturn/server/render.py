"""Anthropic request -> prompt tokens, through the model's own chat template. Pure given a tokenizer.

Byte stability is the point: the prefix cache reuses KV state only when the leading tokens
of two requests are identical, so
- the system text and the tools render first (``prefix_order`` chooses which of the two leads
  inside the system turn), before any message, identically in every request;
- a string and a one-block text array render the same; tool_use inputs are rendered with
  sorted keys; parallel tool results are ordered by the assistant's tool_use order, whatever
  order the client echoes them back in; thinking blocks were already dropped by ``wire``;
- mid-conversation ``system`` messages stay where they are (as system turns when the template
  accepts them, else folded into the adjacent user turn), never moved to the front, with one
  exception: notes right after a plain user message (no tool results) render just before it.
  Claude Code 2.1.3xx sends its environment text that way, after the first prompt; rendered in
  place it is the last turn before the answer, and small models answer the note instead of the
  prompt. The swap is the same in every later request (the two stay adjacent in the history),
  so prompts still grow by appending;
- per-request instructions (``tool_choice``, ``output_config.format``) go at the end, after
  the last message, so they never change the prefix.

Templates with tool support get the tools through ``apply_chat_template(tools=...)``
(OpenAI function format); templates without it (SmolLM2's) get a hermes-style description
of the tools appended to the system turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from warmturn.prefix import common_prefix_len
from warmturn.server.encode_memo import EncodeMemo, MemoEncoder
from warmturn.server.wire import Message, MessagesRequest, RequestError, TextBlock, Tool, ToolResultBlock, ToolUseBlock

PrefixOrder = Literal["system-first", "tools-first"]


@dataclass(frozen=True)
class Rendered:
    tokens: list[int]
    prefix_len: int  # tokens of the system+tools prefix (0 if there is none)
    text: str
    # tokens up to the end of the last message, before the assistant's generation prompt (0 if
    # unknown): where the next turn of this conversation parts from this prompt when the chat
    # template re-renders the answer differently from what was generated (reasoning dropped)
    history_len: int = 0


def canonical(obj: Any) -> Any:
    """A JSON value with every object's keys sorted (deterministic rendering)."""
    return json.loads(json.dumps(obj, sort_keys=True, ensure_ascii=False))


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def openai_tool(tool: Tool) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": canonical(tool.input_schema)},
    }


def hermes_tools_text(tools: Sequence[Tool]) -> str:
    """Tool description for templates without tool support (our own wording, hermes markup)."""
    lines = [
        "# Tools",
        "",
        "You can call the functions described below. Their JSON signatures are listed inside <tools></tools>:",
        "<tools>",
        *(dumps(openai_tool(t)) for t in tools),
        "</tools>",
        "",
        "To call a function, write a JSON object with its name and arguments between <tool_call> and "
        "</tool_call> tags, one call per tag:",
        "<tool_call>",
        '{"name": "FUNCTION_NAME", "arguments": {"ARGUMENT": "VALUE"}}',
        "</tool_call>",
    ]
    return "\n".join(lines)


def hermes_call_text(block: ToolUseBlock) -> str:
    return "<tool_call>\n" + dumps({"name": block.name, "arguments": block.input}) + "\n</tool_call>"


def tool_result_text(block: ToolResultBlock) -> str:
    body = ("Error: " if block.is_error else "") + block.content
    return "<tool_response>\n" + body + "\n</tool_response>"


def _texts(blocks: Sequence[Any]) -> str:
    return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))


def tail_instructions(req: MessagesRequest) -> list[str]:
    """Per-request instructions rendered after the last message (never in the prefix)."""
    notes = []
    if req.tools and req.tool_choice.type == "any":
        notes.append("Answer by calling one of the tools.")
    elif req.tools and req.tool_choice.type == "tool":
        notes.append(f"Answer by calling the tool {req.tool_choice.name}.")
    elif req.tools and req.tool_choice.type == "none":
        notes.append("Do not call any tool; answer in text.")
    if req.output_schema is not None:
        notes.append(
            "Reply with only a JSON object, no other text, that satisfies this JSON schema:\n" + dumps(req.output_schema)
        )
    return notes


def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters a byte-level BPE vocabulary spells bytes with (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 on)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [0x100 + i for i in range(256 - len(printable))]
    return frozenset(map(chr, printable + shifted))


def _has_type(node: Any, name: str) -> bool:
    """Whether a tokenizers component spec is `name` or a Sequence containing it."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == name:
        return True
    parts = node.get("pretokenizers") or node.get("decoders") or []
    return any(_has_type(p, name) for p in parts)


def longest_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes one token can stand for, when the tokenizer guarantees the bound
    ``tokens >= utf8_bytes(text) / longest`` for any text it encodes: a byte-level BPE
    (``tokenizers`` ByteLevel pre-tokenizer and decoder, no normalizer that could shrink the
    text), every vocabulary entry spelled in the byte alphabet (one character = one byte),
    added tokens by their UTF-8 length. None for anything else (no cheap bound is used then)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(getattr(tokenizer, "_tokenizer", None), "backend_tokenizer", None)
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - not a `tokenizers` tokenizer: no bound
        return None
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or not isinstance(vocab, dict) \
            or not _has_type(spec.get("pre_tokenizer"), "ByteLevel") or not _has_type(spec.get("decoder"), "ByteLevel"):
        return None
    alphabet = _byte_level_alphabet()
    longest = 0
    for piece in vocab:
        if not alphabet.issuperset(piece):
            return None
        longest = max(longest, len(piece))
    for added in spec.get("added_tokens") or []:
        longest = max(longest, len(str(added.get("content", "")).encode("utf-8")))
    return longest or None


class Renderer:
    """Renders :class:`MessagesRequest` objects to tokens with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any, prefix_order: PrefixOrder = "system-first",
                 memo: EncodeMemo | None = None) -> None:
        if prefix_order not in ("system-first", "tools-first"):
            raise ValueError(f"prefix_order must be 'system-first' or 'tools-first', not {prefix_order!r}")
        self.tokenizer = tokenizer
        self.prefix_order = prefix_order
        # earlier prompts' tokens, reused for a prompt that starts with one (server/encode_memo.py);
        # renderers of one server share it
        self.memo = memo if memo is not None else EncodeMemo()
        self.encoder = MemoEncoder(tokenizer, self.memo)
        # whether render() finds where the history ends (Rendered.history_len): the server turns it
        # on for models whose cache resumes only at marked points (server/kvfamily.py)
        self.history_marks = False
        self.longest_token = longest_token_bytes(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        custom = getattr(tokenizer, "_chat_template", None)
        self.template_tools = custom is not None or (isinstance(template, str) and "tools" in template)
        self.leading_system_ok = self._accepts([("system", "S1"), ("user", "U1")], "S1")
        self.inner_system_ok = self.leading_system_ok and self._accepts(
            [("system", "S1"), ("user", "U1"), ("assistant", "A1"), ("system", "S2"), ("user", "U2")], "S2"
        )

    # -- template probing

    def _apply(self, messages: list[dict[str, Any]], *, tools: list[dict] | None, gen: bool) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": gen}
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def _accepts(self, turns: list[tuple[str, str]], marker: str) -> bool:
        try:
            text = self._apply([{"role": r, "content": c} for r, c in turns], tools=None, gen=True)
        except Exception:  # noqa: BLE001 - a template that raises on this shape refuses it
            return False
        return marker in text

    # -- building chat-template messages

    def system_text(self, req: MessagesRequest) -> str:
        system = "\n\n".join(s for s in req.system if s)
        if not req.tools or self.template_tools:
            return system
        tools = hermes_tools_text(req.tools)
        parts = [system, tools] if self.prefix_order == "system-first" else [tools, system]
        return "\n\n".join(p for p in parts if p)

    def _assistant(self, msg: Message) -> dict[str, Any]:
        text = _texts(msg.blocks)
        calls = [b for b in msg.blocks if isinstance(b, ToolUseBlock)]
        if not calls:
            return {"role": "assistant", "content": text}
        if self.template_tools:
            return {
                "role": "assistant",
                "content": text,
                "tool_calls": [
                    {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": canonical(b.input)}}
                    for b in calls
                ],
            }
        return {"role": "assistant", "content": "\n".join([text] * bool(text) + [hermes_call_text(b) for b in calls])}

    def _user(self, msg: Message, order: dict[str, int]) -> list[dict[str, Any]]:
        results = [b for b in msg.blocks if isinstance(b, ToolResultBlock)]
        results.sort(key=lambda b: order.get(b.tool_use_id, len(order)))
        text = _texts(msg.blocks)
        if self.template_tools:
            out: list[dict[str, Any]] = [
                {"role": "tool", "tool_call_id": b.tool_use_id,
                 "content": ("Error: " if b.is_error else "") + b.content}
                for b in results
            ]
            if text or not results:
                out.append({"role": "user", "content": text})
            return out
        parts = [tool_result_text(b) for b in results] + ([text] if text or not results else [])
        return [{"role": "user", "content": "\n".join(parts)}]

    def chat_messages(self, req: MessagesRequest) -> tuple[list[dict[str, Any]], str | None]:
        """Template messages for ``req`` and the assistant prefill text (last assistant turn), if any."""
        msgs = list(req.messages)
        prefill = None
        if msgs and msgs[-1].role == "assistant" and all(isinstance(b, TextBlock) for b in msgs[-1].blocks):
            prefill = _texts(msgs[-1].blocks).rstrip()
            msgs = msgs[:-1]
        out: list[dict[str, Any]] = []
        system = self.system_text(req)
        if system:
            out.append({"role": "system", "content": system})
        order: dict[str, int] = {}
        anchor: int | None = None  # index of a plain user turn: system notes that follow go before it
        for m in msgs:
            if m.role == "assistant":
                order = {b.id: i for i, b in enumerate(b for b in m.blocks if isinstance(b, ToolUseBlock))}
                out.append(self._assistant(m))
                anchor = None
            elif m.role == "user":
                out.extend(self._user(m, order))
                plain = not any(isinstance(b, ToolResultBlock) for b in m.blocks)
                anchor = len(out) - 1 if plain else None
            elif anchor is not None:
                out.insert(anchor, {"role": "system", "content": _texts(m.blocks)})
                anchor += 1
            else:
                out.append({"role": "system", "content": _texts(m.blocks)})
        notes = tail_instructions(req)
        if notes:
            out.append({"role": "system", "content": "\n\n".join(notes)})
        return self._fold_systems(out), prefill

    def _fold_systems(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fold system turns the template refuses into the adjacent user turn, in place."""
        folded: list[dict[str, Any]] = []
        pending: list[str] = []
        for i, m in enumerate(out):
            allowed = self.leading_system_ok if i == 0 else self.inner_system_ok
            if m["role"] == "system" and not allowed:
                pending.append(m["content"])
                continue
            if pending and m["role"] == "user":
                m = dict(m, content="\n\n".join(pending + [m["content"]]))
                pending = []
            folded.append(m)
        if pending:  # trailing system notes: fold into the last user turn (or make one)
            for j in range(len(folded) - 1, -1, -1):
                if folded[j]["role"] == "user":
                    folded[j] = dict(folded[j], content="\n\n".join([folded[j]["content"]] + pending))
                    break
            else:
                folded.append({"role": "user", "content": "\n\n".join(pending)})
        return folded

    # -- tokens

    def min_tokens(self, req: MessagesRequest) -> int:
        """A lower bound on ``len(self.render(req).tokens)`` computed without tokenizing (0 when
        the tokenizer offers no bound, see :func:`longest_token_bytes`). It counts only text every
        chat template keeps, stripped (templates may ``trim``): the system strings, user text and
        tool results. Assistant history is left out (reasoning templates drop parts of it); so
        are tool schemas (templates serialise them their own way)."""
        if not self.longest_token:
            return 0
        n = sum(len(s.strip().encode("utf-8")) for s in req.system)
        for m in req.messages:
            if m.role != "user":
                continue
            for b in m.blocks:
                if isinstance(b, TextBlock):
                    n += len(b.text.strip().encode("utf-8"))
                elif isinstance(b, ToolResultBlock):
                    n += len(b.content.strip().encode("utf-8"))
        return n // self.longest_token

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    def render(self, req: MessagesRequest) -> Rendered:
        """Prompt tokens for ``req`` plus the length of its system+tools prefix."""
        messages, prefill = self.chat_messages(req)
        tools = [openai_tool(t) for t in req.tools] if (req.tools and self.template_tools) else None
        try:
            text = self._apply(messages, tools=tools, gen=True)
        except Exception as e:  # jinja raise_exception(...) in a template: the client's request shape
            raise RequestError(f"the model's chat template rejected this conversation: {e}") from e
        if prefill:
            text += prefill
        # the system turn alone first: on a first turn, the whole prompt then reuses its tokens
        head = self._head(messages[:1], tools) if messages and messages[0]["role"] == "system" else None
        tokens = self.encode(text)
        history = self._history_len(messages, tools, tokens) if self.history_marks else 0
        return Rendered(tokens, common_prefix_len(head, tokens) if head else 0, text, history)

    def _history_len(self, messages: list[dict[str, Any]], tools: list[dict] | None, tokens: list[int]) -> int:
        return min(self._shared_with(messages, tools, tokens), max(len(tokens) - 1, 0)) if messages else 0

    def _shared_with(self, messages: list[dict[str, Any]], tools: list[dict] | None, tokens: list[int]) -> int:
        """Tokens ``messages`` rendered alone (no generation prompt) share with ``tokens``."""
        head = self._head(messages, tools)
        return common_prefix_len(head, tokens) if head else 0

    def _head(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> list[int] | None:
        """Tokens of ``messages`` rendered alone (no generation prompt); None when the template
        refuses that shape (no known boundary)."""
        try:
            return self.encode(self._apply(messages, tools=tools, gen=False))
        except Exception:  # noqa: BLE001 - templates that refuse this shape: no known boundary
            return None
