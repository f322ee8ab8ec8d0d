#!/usr/bin/env bash
# Run the suite. pytest's exit code 5 (no tests collected) is turned into a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "ERROR: no tests were collected" >&2; exit 1; fi
exit $rc
