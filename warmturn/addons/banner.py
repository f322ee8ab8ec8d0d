"""`make run`'s start-up banner (mitmdump -s addons/normalize.py -s warmturn/addons/banner.py): how to point
Claude Code at the proxy, printed only once mitmproxy is up for good.

mitmproxy exits right after its servers start when an error was logged during start-up (its
errorcheck addon runs after every `running` hook); the banner waits a moment past that point, so a
failed start-up never tells the user to connect. What it says of the proxy it asks the warmturn
addons for (:class:`~warmturn.addons.hooks.DescribeHook`): each reads only its own options.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import sys

from mitmproxy import ctx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, above warmturn/
if ROOT not in sys.path:  # loaded by mitmdump as a script (-s), like addons/normalize.py
    sys.path.insert(0, ROOT)

from warmturn.addons.hooks import DescribeHook, announce  # noqa: E402

DELAY_S = 0.5


# What the bundled default model cannot do, said before anyone finds out the hard way (README, Quick start).
DEFAULT_MODEL_NOTE = """

The default model (SmolLM2-135M, 8K context) is for trying warmturn: it answers short questions and calls
make claude's Read tool on a file you name (a small adapter taught it that: docs/default-model-tools.md),
but it knows no other tool, files over ~6K tokens do not fit its context, and it often loops (the server
stops a loop early). For real work serve a bigger model: make run MODEL=org/name   (README, "Use your own model")"""


def banner_text(port: int, backend: str, capture_file: str, embedded_log: str, web: str = "",
                root: str = ROOT, default_model: bool = False) -> str:
    """The banner for a proxy listening on 127.0.0.1:port (pure); `web` is mitmweb's UI URL, if any;
    `default_model`: the embedded server serves the bundled default model (say what it cannot do)."""
    served = f"embedded MLX server (starting now; its log: {embedded_log})" if backend == "embedded" else backend
    capture = datetime.datetime.now().strftime(capture_file.replace("{date}", "%Y%m%d")) if capture_file else "off"
    web_line = f"\nmitmweb: {web}      (flows, the warmturn view, warmturn.export)" if web else ""
    return f"""
warmturn: listening on http://127.0.0.1:{port} -> {served}
captures: {capture}      (make report turns them into report/report.html){web_line}

Point Claude Code at it, in another terminal:
  make claude PORT={port}      (or {root}/scripts/claude.sh from your project's folder)
By hand, with your own claude (README, "Claude Code by hand"):
  ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_API_KEY=warmturn-local \\
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \\
  CLAUDE_CONFIG_DIR=~/.cache/warmturn/claude-config claude --exclude-dynamic-system-prompt-sections
Stop with Ctrl-C (the embedded server stops with it).{DEFAULT_MODEL_NOTE if default_model else ""}
"""


class Banner:
    def running(self) -> None:
        asyncio.get_running_loop().call_later(DELAY_S, self.show)

    def show(self) -> None:
        o = ctx.options
        web = ""
        if "web_port" in o:  # mitmweb: its URL (with the token when it was fixed with web_password)
            token = o.web_password if o.web_password and not o.web_password.startswith("$") else ""
            web = f"http://{o.web_host}:{o.web_port}/" + (f"?token={token}" if token else "  (the token: see above)")
        facts: dict = {}
        announce(DescribeHook(facts))  # each warmturn addon adds what it owns (addons/hooks.py)
        backend = facts.get("backend", "embedded")
        print(banner_text(o.listen_port or 8080, backend, facts.get("capture_file", ""), facts.get("embedded_log", ""),
                          web, default_model=backend == "embedded" and facts.get("default_model", False)),
              file=sys.stderr, flush=True)


addons = [Banner()]
