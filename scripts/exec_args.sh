#!/usr/bin/env bash
# exec_args.sh COMMAND...: run COMMAND with the words of $ARGS appended, split by POSIX shell quoting
# rules (never evaluated: $, globs and backticks stay literal). The Makefile's targets that hand make's
# ARGS to a Python entry point (bench, bench-smoke, soak, test, ...) go through here, so
# ARGS="--out 'my results'" arrives as two words, like run.sh/server.sh/claude.sh parse it.
set -euo pipefail
PY=${PY:-.venv/bin/python}
source "$(dirname "$0")/lib.sh"
split_words "${ARGS:-}"
exec "$@" "${WORDS[@]}"
