"""Supervise: run the embedded backend (``python -m warmturn.server``) while ``backend=embedded``.

Owns the ``embedded_*`` options (validated in ``configure``), starts the supervised child when
mitmproxy is running, swaps it when ``backend`` changes and stops it on exit. The embedded
backend adapter asks it for the current :class:`~addons.supervisor.EmbeddedServer`.
"""

from __future__ import annotations

import shlex

from mitmproxy import ctx, exceptions

from .supervisor import EmbeddedServer, default_python


class Supervise:
    def __init__(self) -> None:
        self.server: EmbeddedServer | None = None
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

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "embedded_args" in updated:
            try:
                shlex.split(o.embedded_args)
            except ValueError as e:
                raise exceptions.OptionsError(f"embedded_args: {e}") from e
        if "embedded_port" in updated and not 0 <= o.embedded_port <= 65535:
            raise exceptions.OptionsError(f"embedded_port must be 0..65535, not {o.embedded_port}")
        if "embedded_start_timeout" in updated and o.embedded_start_timeout <= 0:
            raise exceptions.OptionsError("embedded_start_timeout must be positive")
        if "backend" in updated and self._running:
            self._reconcile()

    def running(self) -> None:
        self._running = True
        self._reconcile()

    def done(self) -> None:
        self._running = False
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _reconcile(self) -> None:
        want = ctx.options.backend.strip() == "embedded"
        if want and self.server is None:
            o = ctx.options
            self.server = EmbeddedServer(o.embedded_python or default_python(), shlex.split(o.embedded_args),
                                         o.embedded_port, o.embedded_log, float(o.embedded_start_timeout))
            self.server.start()
        elif not want and self.server is not None:
            self.server.stop()
            self.server = None
