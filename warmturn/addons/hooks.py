"""The hooks warmturn's addons declare for each other (mitmproxy custom hooks).

Each addon reads only its own options. What one addon decides and another needs is announced as a
mitmproxy event, delivered in addon order by ``ctx.master.addons.trigger`` to every addon with a
method of the hook's name, like mitmproxy's own hooks; per-flow facts go through the flow's
:class:`~addons.state.FlowState` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, hooks

if TYPE_CHECKING:
    from .backends import Backend
    from .embedded_server import EmbeddedServer


@dataclass
class BackendHook(hooks.Hook):
    """The route addon parsed the ``backend`` option (on start-up and when it changes): the
    supervise addon runs the embedded server only while ``backend.kind == "embedded"``."""

    name = "warmturn_backend"
    backend: Backend


@dataclass
class EmbeddedServerHook(hooks.Hook):
    """The supervise addon started (or stopped: None) the embedded server; the route addon's
    embedded adapter sends requests to it."""

    name = "warmturn_embedded_server"
    server: EmbeddedServer | None


@dataclass
class DescribeHook(hooks.Hook):
    """The start-up banner (addons/banner.py) asks what a user should know: each addon adds what
    it owns, read from its own options (route: ``backend``; capture: ``capture_file``; supervise:
    ``embedded_log`` and ``default_model``, whether the embedded server serves the bundled model)."""

    name = "warmturn_describe"
    facts: dict[str, Any]


def announce(event: hooks.Hook) -> None:
    """Deliver `event` to every loaded addon (synchronously, in addon order)."""
    ctx.master.addons.trigger(event)
