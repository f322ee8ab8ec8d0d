"""warmturn's mitmproxy entry script: `mitmdump -s addons/normalize.py` (a launcher for this file).

Strips cache-busting content from Claude Code's Anthropic API requests, routes them to a
backend (the embedded MLX server by default), streams responses through while timing them,
and appends one capture line per flow. Imports only the standard library, mitmproxy and the
project's stdlib-only `warmturn/` package (found through the repository root below).

Small addons, in hook order: gate (who and what), normalize (strip), route (the backend
adapter), tap (stream timing and usage), capture (JSONL), console (one line per flow), supervise (the
embedded server), scrub (credentials out of URLs once sent, before mitmdump prints the flow), freeze
(the flow's state made plain data, once every other addon is done with it). Each reads only its own
options; they share per-flow facts through FlowState and announce the rest with declared hooks
(addons/hooks.py).
"""

import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above warmturn/
if _root not in sys.path:
    sys.path.insert(0, _root)

from warmturn.addons.capture import Capture  # noqa: E402
from warmturn.addons.console import Console  # noqa: E402
from warmturn.addons.contentview import register_contentview  # noqa: E402
from warmturn.addons.gate import Gate  # noqa: E402
from warmturn.addons.route import Route  # noqa: E402
from warmturn.addons.scrub import Scrub  # noqa: E402
from warmturn.addons.state import Freeze  # noqa: E402
from warmturn.addons.strip import Normalize  # noqa: E402
from warmturn.addons.supervise import Supervise  # noqa: E402
from warmturn.addons.tap import Tap  # noqa: E402


def make_addons() -> list:
    """The addon chain, in the order mitmproxy must call its hooks."""
    return [Gate(), Normalize(), Route(), Tap(), Capture(), Console(), Supervise(), Scrub(), Freeze()]


register_contentview()
addons = make_addons()
