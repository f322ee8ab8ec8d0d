"""Supervise: run the embedded backend (``python -m warmturn.server``) while ``backend=embedded``.

Owns the ``embedded_*`` options (validated in ``configure``), starts the supervised child when
mitmproxy is running and the route addon announces an embedded backend
(:class:`~addons.hooks.BackendHook`), stops it when another is announced and on exit, and
announces the current :class:`~addons.embedded_server.EmbeddedServer` in turn
(:class:`~addons.hooks.EmbeddedServerHook`) for the embedded backend adapter.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

from mitmproxy import ctx, exceptions

from .backends import Backend
from .embedded_server import EmbeddedServer, default_python
from .hooks import EmbeddedServerHook, announce

logger = logging.getLogger(__name__)


def exit_now(reason: str) -> None:
    """The backend cannot start: say why in one line and end mitmproxy with exit code 1 (raised inside
    the supervision task, SystemExit ends the event loop; mitmproxy still runs every addon's done hook)."""
    logger.error("warmturn: %s. Fix that, then start again.", reason)
    sys.exit(1)


def load_warmup(path: str) -> list[dict]:
    """The request bodies in an ``embedded_warmup`` file (a JSON list of objects); [] for no file."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            bodies = json.load(f)
    except (OSError, ValueError) as e:
        raise exceptions.OptionsError(f"embedded_warmup: cannot read {path}: {e}") from e
    if not isinstance(bodies, list) or not all(isinstance(b, dict) and b.get("messages") for b in bodies):
        raise exceptions.OptionsError(f"embedded_warmup: {path} must hold a list of Messages request bodies")
    return bodies


class Supervise:
    def __init__(self) -> None:
        self.server: EmbeddedServer | None = None
        self.warmup: list[dict] = []
        self.wanted = False  # the announced backend is the embedded one
        self._running = False

    def load(self, loader) -> None:
        loader.add_option("embedded_python", str, "",
                          "Python that runs the embedded server; empty means ../.venv/bin/python relative to "
                          "the addon file.")
        loader.add_option("embedded_args", str, "",
                          "Extra arguments for python -m warmturn.server (shell syntax), e.g. '--model /path/to/model'.")
        loader.add_option("embedded_port", int, 0,
                          "Port of the embedded server on 127.0.0.1; 0 picks a free port. If a server already "
                          "answers /health on this port it is reused, not started.")
        loader.add_option("embedded_log", str, "captures/embedded-server.log",
                          "Log file of the embedded server (stdout and stderr).")
        loader.add_option("embedded_start_timeout", int, 600,
                          "Seconds to wait for the embedded server's /health before requests fail.")
        loader.add_option("embedded_exit_on_failure", bool, False,
                          "End mitmproxy (exit code 1, with one line saying why) when the embedded server fails "
                          "before it ever served, instead of retrying and leaving the proxy without a backend "
                          "(make run sets it).")
        loader.add_option("embedded_warmup", str, "",
                          "A JSON file holding a list of Messages request bodies, sent to the embedded server (one "
                          "output token each) once it is ready, so that their prefix is prefilled (and persisted "
                          "with --cache-dir) before the first real turn; empty = none. make run passes make "
                          "claude's small-model prompt (warmturn/server/prefixes/).")

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "embedded_args" in updated:
            try:
                shlex.split(o.embedded_args)
            except ValueError as e:
                raise exceptions.OptionsError(f"embedded_args: {e}") from e
        if "embedded_port" in updated and not 0 <= o.embedded_port <= 65535:
            raise exceptions.OptionsError(f"embedded_port must be 0..65535, not {o.embedded_port}")
        if "embedded_warmup" in updated:
            self.warmup = load_warmup(o.embedded_warmup)
        if "embedded_start_timeout" in updated and o.embedded_start_timeout <= 0:
            raise exceptions.OptionsError("embedded_start_timeout must be positive")

    def warmturn_backend(self, backend: Backend) -> None:
        """:class:`~addons.hooks.BackendHook`: run the embedded server while it is the backend."""
        self.wanted = backend.kind == "embedded"
        if self._running:
            self._reconcile()

    def warmturn_describe(self, facts: dict) -> None:
        """:class:`~addons.hooks.DescribeHook`: the embedded server's log, and whether it serves the
        bundled default model (no ``--model`` in its arguments)."""
        facts["embedded_log"] = ctx.options.embedded_log
        facts["default_model"] = "--model" not in ctx.options.embedded_args

    def running(self) -> None:
        self._running = True
        self._reconcile()

    def done(self) -> None:
        self._running = False
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _reconcile(self) -> None:
        want = self.wanted
        if want and self.server is None:
            o = ctx.options
            self.server = EmbeddedServer(o.embedded_python or default_python(), shlex.split(o.embedded_args),
                                         o.embedded_port, o.embedded_log, float(o.embedded_start_timeout),
                                         on_give_up=exit_now if o.embedded_exit_on_failure else None,
                                         warmup=self.warmup)
            self.server.start()
        elif not want and self.server is not None:
            self.server.stop()
            self.server = None
        announce(EmbeddedServerHook(self.server))
