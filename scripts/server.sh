#!/usr/bin/env bash
# `make server`: only the embedded Anthropic-compatible MLX server (python -m warmturn.server), on 127.0.0.1:8000
# unless ARGS says otherwise. ARGS is parsed with shell quoting rules (never evaluated), e.g.
#   ARGS="--port 8001 --served-model-name 'my model'"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
source scripts/lib.sh
split_words "${ARGS:-}"
args=("${WORDS[@]}")
if [[ -n "${MODEL:-}" ]]; then args=(--model "$MODEL" "${args[@]}"); fi
exec "$PY" -m warmturn.server "${args[@]}"
