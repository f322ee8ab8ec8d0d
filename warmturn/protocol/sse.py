"""Server-sent events: the incremental decoder and the encoder.

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------- SSE


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: its ``event:`` name (None when absent) and its joined ``data:`` lines."""

    event: str | None
    data: str

    def json(self) -> Any:
        """The data decoded as JSON; None when it is empty or not JSON."""
        if not self.data:
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class SSEDecoder:
    """Feed arbitrary byte chunks; get whole events back.

    Decodes line by line (``\\r\\n``, ``\\n`` or ``\\r``), so an event, a line or a UTF-8
    character may be split across chunks anywhere. Comments (``:``) are skipped; ``id`` and
    ``retry`` fields are ignored (Anthropic sends neither).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            i_n = self._buf.find(b"\n")
            i_r = self._buf.find(b"\r")
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                if i_r == len(self._buf) - 1:
                    break  # maybe the first half of \r\n: wait for more
                end, nxt = i_r, i_r + (2 if self._buf[i_r + 1:i_r + 2] == b"\n" else 1)
            else:
                end, nxt = i_n, i_n + 1
            line = self._buf[:end].decode("utf-8", "replace")
            self._buf = self._buf[nxt:]
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def flush(self) -> list[SSEEvent]:
        """End of stream: a final unterminated line or event is still delivered."""
        out = self.feed(b"\n") if self._buf else []
        ev = self._line("")
        return out + ([ev] if ev else [])

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if self._event is None and not self._data:
                return None
            ev = SSEEvent(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def decode_sse(data: bytes) -> list[SSEEvent]:
    """Every event of a complete SSE body."""
    dec = SSEDecoder()
    return dec.feed(data) + dec.flush()


def encode_sse(event: Mapping[str, Any]) -> bytes:
    """One event on Anthropic's wire: ``event: <type>`` and compact JSON ``data:``."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()
