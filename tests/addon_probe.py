"""A mitmdump script (no tests here) for tests/test_packaging.py: loaded after the warmturn addon
chain, it writes every module the process has imported (name -> file, None for none) to ``$WARMTURN_PROBE_OUT``,
once when mitmproxy is running (``<out>.running``) and again when it shuts down (``<out>``), so a
test sees what loading the addon, and serving requests through it, imported."""

from __future__ import annotations

import json
import os
import sys


def _dump(path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}, f)
    os.replace(tmp, path)


class Probe:
    def running(self) -> None:
        _dump(os.environ["WARMTURN_PROBE_OUT"] + ".running")

    def done(self) -> None:
        _dump(os.environ["WARMTURN_PROBE_OUT"])


addons = [Probe()]
