#!/usr/bin/env bash
# Run the suite. pytest's exit code 5 (no tests collected) is turned into a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
# MLX's Linux CPU wheel bundles a slow reference BLAS; the model tests run in this process,
# so preload Debian's OpenBLAS here (the server arranges it for itself when it starts). Where it
# lives, and the opt-out, are warmturn.machine's (the one place).
PRELOAD=$(.venv/bin/python -c 'from warmturn.machine import openblas_env; print(openblas_env().get("LD_PRELOAD", ""))')
[[ -n "$PRELOAD" ]] && export LD_PRELOAD="$PRELOAD"
export PYTHONUNBUFFERED=1
# make exports the variables given on its command line (make test ARGS=-x): the scripts the tests run
# (claude.sh, run.sh, ...) would read test's ARGS, MODEL or PORT as their own. The pytest arguments are
# "$@" by now (exec_args.sh); the tests set every variable they mean.
unset ARGS MODEL PORT WEB_PORT WEB_TOKEN
# The linter and the type checker (config in pyproject.toml: [tool.ruff], [tool.mypy]) run with the
# whole suite, i.e. unless test paths are given.
lint_rc=0
paths=0
for a in "$@"; do [[ "$a" != -* && -e "${a%%::*}" ]] && paths=1; done
if [[ $paths -eq 0 && "${WARMTURN_SKIP_LINT:-0}" != 1 ]]; then
  .venv/bin/python -m ruff check . || { lint_rc=$?; echo "ERROR: ruff check failed (see above)" >&2; }
  .venv/bin/python -m mypy || { lint_rc=$?; echo "ERROR: mypy failed (see above)" >&2; }
fi
.venv/bin/python -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "ERROR: no tests were collected" >&2; exit 1; fi
if [[ $rc -eq 0 && $lint_rc -ne 0 ]]; then exit "$lint_rc"; fi
exit $rc
