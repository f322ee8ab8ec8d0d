"""warmturn's mitmproxy entry script: `mitmdump -s addons/normalize.py`.

Strips cache-busting content from Claude Code's Anthropic API requests, routes them to a
backend (the embedded MLX server by default), streams responses through while timing them,
and appends one capture line per flow. Imports only the standard library and mitmproxy.
"""

import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:
    sys.path.insert(0, _root)

from addons.contentview import register_contentview  # noqa: E402
from addons.core import Warmturn  # noqa: E402

register_contentview()
addons = [Warmturn()]
