"""Model names: which ids are Claude's, /v1/models pages.

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from warmturn.protocol.errors import RequestError

# --------------------------------------------------------------------------- models

#: Claude model ids that stock clients (Claude Code, the SDKs) ask for; a local backend serves
#: all of them with its one model. Newest first.
CLAUDE_MODELS: tuple[str, ...] = (
    "claude-opus-5-5",
    "claude-opus-4-8",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-20250514",
    "claude-3-5-haiku-20241022",
)
MODELS_CREATED_AT = "2025-01-01T00:00:00Z"


def is_claude_model(name: str) -> bool:
    """A Claude model id (any ``claude-*`` name: clients learn new ones before we do)."""
    return isinstance(name, str) and name.startswith("claude-")


def model_info(model_id: str, display_name: str | None = None, created_at: str = MODELS_CREATED_AT) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"type": "model", "id": model_id, "display_name": display_name or model_id, "created_at": created_at}


def page_models(models: Sequence[dict[str, Any]], *, limit: int = 20, after_id: str | None = None,
                before_id: str | None = None) -> dict[str, Any]:
    """Anthropic's paginated list shape over ``models`` (in the order given). Raises RequestError."""
    if limit < 1 or limit > 1000:
        raise RequestError("limit: must be between 1 and 1000")
    ids = [m["id"] for m in models]
    lo, hi = 0, len(models)
    if after_id is not None:
        if after_id not in ids:
            raise RequestError(f"after_id: unknown model {after_id!r}")
        lo = ids.index(after_id) + 1
    if before_id is not None:
        if before_id not in ids:
            raise RequestError(f"before_id: unknown model {before_id!r}")
        hi = ids.index(before_id)
    window = list(models[lo:hi])
    page = window[-limit:] if before_id is not None and after_id is None else window[:limit]
    return {"data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(window) > limit}
