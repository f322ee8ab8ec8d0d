#!/usr/bin/env bash
# `make test-browser`: the opt-in mitmweb test in a real headless browser. Installs what it needs when
# missing: Debian's chromium (apt, as root or with passwordless sudo; playwright cannot download browsers
# here) and Python playwright (pip, the version pinned in constraints.txt), then runs the test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
say() { echo "[test-browser] $*" >&2; }
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
  say "installing chromium (apt)"
  $SUDO apt-get install -y -q chromium >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
if ! "$PY" -c "import playwright" 2>/dev/null; then
  say "installing playwright (pip)"
  "$PY" -m pip install -q -c constraints.txt "playwright>=1.65,<2"
fi
WARMTURN_BROWSER_TESTS=1 exec bash scripts/test.sh tests/test_browser_mitmweb.py "$@"
