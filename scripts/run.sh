#!/usr/bin/env bash
# `make run`: mitmdump with the warmturn addon on 127.0.0.1:$PORT, embedded MLX backend.
# Extra mitmdump arguments go in ARGS, parsed with shell quoting rules (never evaluated), e.g.
#   ARGS="--set normalize=false"   or   ARGS="--set embedded_args='--default-temperature 0.7'"
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
MODEL=${MODEL:-}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
source scripts/lib.sh

check_port "$PORT"
PORT=$((10#$PORT))
split_words "${ARGS:-}"
extra=("${WORDS[@]}")
if [[ -n "$MODEL" ]]; then extra=(--set "embedded_args=--model $("$PY" -c 'import shlex, sys; print(shlex.quote(sys.argv[1]))' "$MODEL")" "${extra[@]}"); fi
if ! port_free "$PORT"; then
  next=$(( PORT < 65535 ? PORT + 1 : 8082 ))
  echo "warmturn: port $PORT on 127.0.0.1 is already in use (another make run, or another program)." >&2
  echo "warmturn: start on another port:  make run PORT=$next    and then:  make claude PORT=$next" >&2
  exit 1
fi

# addons/banner.py prints how to point Claude Code at it, once mitmdump is up for good (not after a
# failed start-up); exec keeps Ctrl-C going straight to mitmdump.
exec "$VENV/bin/mitmdump" -s addons/normalize.py -s addons/banner.py --listen-host 127.0.0.1 --listen-port "$PORT" \
  "${extra[@]}"
