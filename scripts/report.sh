#!/usr/bin/env bash
# `make report`: build report/ from the captures in ./captures/ (the addon's default capture
# location), or, when there are none, from the sample capture bundled in warmturn/analysis/sample/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="${REPORT_DIR:-report}"
shopt -s nullglob
captures=(captures/*.jsonl)
extra=()
if [[ ${#captures[@]} -eq 0 ]]; then
  captures=("$ROOT"/warmturn/analysis/sample/*.jsonl)
  extra=(--sample)
  if [[ ${#captures[@]} -eq 0 ]]; then
    echo "no captures in $(pwd)/captures and no bundled sample in $ROOT/warmturn/analysis/sample" >&2
    exit 1
  fi
  echo "no captures in $(pwd)/captures: using the bundled sample capture (recorded from a real run)"
fi
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m warmturn.analysis report "${captures[@]}" --out "$OUT" "${extra[@]}"
echo "open $(cd "$OUT" && pwd)/report.html in a browser"
