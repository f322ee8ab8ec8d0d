#!/usr/bin/env bash
# `make run`: mitmdump with the warmturn addon on 127.0.0.1:$PORT, embedded MLX backend.
# `make web` (scripts/run.sh web): the same in mitmweb, its UI on 127.0.0.1:$WEB_PORT (default 8081),
# protected by $WEB_TOKEN (default: a random token mitmweb prints in the UI's URL).
# Extra mitmproxy arguments go in ARGS, parsed with shell quoting rules (never evaluated), e.g.
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
tool=(mitmdump)
if [[ "${1:-}" == web ]]; then
  WEB_PORT=${WEB_PORT:-8081}
  check_port "$WEB_PORT"
  WEB_PORT=$((10#$WEB_PORT))
  tool=(mitmweb --web-host 127.0.0.1 --web-port "$WEB_PORT" --set web_open_browser=false)
  if [[ -n "${WEB_TOKEN:-}" ]]; then tool+=(--set "web_password=$WEB_TOKEN"); fi
  if ! port_free "$WEB_PORT"; then
    echo "warmturn: port $WEB_PORT on 127.0.0.1 (mitmweb's UI) is already in use: make web WEB_PORT=$((WEB_PORT + 1))" >&2
    exit 1
  fi
fi
split_words "${ARGS:-}"
extra=("${WORDS[@]}")
if [[ -n "$MODEL" ]]; then extra=(--set "embedded_args=--model $("$PY" -c 'import shlex, sys; print(shlex.quote(sys.argv[1]))' "$MODEL")" "${extra[@]}"); fi
if ! port_free "$PORT"; then
  next=$(( PORT < 65534 ? PORT + 2 : 8082 ))  # +2: 8081 is mitmweb's UI port (make web)
  echo "warmturn: port $PORT on 127.0.0.1 is already in use (another make run, or another program)." >&2
  echo "warmturn: start on another port:  make ${1:-run} PORT=$next    and then:  make claude PORT=$next" >&2
  exit 1
fi

# warmturn/addons/banner.py prints how to point Claude Code at it, once mitmproxy is up for good (not after a
# failed start-up); exec keeps Ctrl-C going straight to mitmproxy.
exec "$VENV/bin/${tool[0]}" "${tool[@]:1}" -s addons/normalize.py -s warmturn/addons/banner.py \
  --listen-host 127.0.0.1 --listen-port "$PORT" "${extra[@]}"
