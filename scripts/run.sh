#!/usr/bin/env bash
# `make run`: mitmdump with the warmturn addon on 127.0.0.1:$PORT, embedded MLX backend.
# `make web` (scripts/run.sh web): the same in mitmweb, its UI on 127.0.0.1:$WEB_PORT (default 8081),
# protected by $WEB_TOKEN (default: a random token mitmweb prints in the UI's URL).
# Extra mitmproxy arguments go in ARGS, parsed with shell quoting rules (never evaluated), e.g.
#   ARGS="--set normalize=false"   or   ARGS="--set embedded_args='--default-temperature 0.7'"
# It ends at once, with one line and a fix, when MODEL is not on this machine or the embedded server
# cannot start (exit code 1). The server keeps its prefix cache in $WARMTURN_CACHE_DIR (default
# ~/.cache/warmturn/kv, private), so a restart is warm.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
MODEL=${MODEL:-}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
CACHE=${WARMTURN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warmturn}
CACHE_DIR=${WARMTURN_CACHE_DIR:-$CACHE/kv}
source scripts/lib.sh
source scripts/versions.sh
WARMUP=${WARMTURN_WARMUP:-warmturn/server/prefixes/claude-code-$CLAUDE_CODE_VERSION.json}

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
# MODEL is checked before anything starts: a name that is not on this machine ends here, with one
# line saying how to get it (warmturn/server/locate.py: the Hugging Face cache, LM Studio, Ollama).
if [[ -n "$MODEL" ]]; then "$PY" -m warmturn.server.locate "$MODEL" >/dev/null || exit 1; fi
split_words "${ARGS:-}"
# The embedded server's arguments: ours first (the model, a private prefix-cache directory under
# ~/.cache/warmturn, so restarts stay warm), then the user's own embedded_args (the last flag wins).
embedded=(--cache-dir "$CACHE_DIR")
if [[ -n "$MODEL" ]]; then embedded=(--model "$MODEL" "${embedded[@]}"); fi
extra=()
user_embedded=""
for ((i = 0; i < ${#WORDS[@]}; i++)); do
  if [[ "${WORDS[i]}" == --set && "${WORDS[i+1]:-}" == embedded_args=* ]]; then
    user_embedded=${WORDS[i+1]#embedded_args=}; i=$((i + 1))
  else
    extra+=("${WORDS[i]}")
  fi
done
embedded_args=$("$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${embedded[@]}")
embedded_args+="${user_embedded:+ $user_embedded}"
# With the default model, the small-model profile's prefix (make claude's system prompt and Read tool)
# is prefilled as soon as the server is up, and persisted in the cache directory: the first turn is warm.
warm=()
if [[ -z "$MODEL" ]]; then warm=(--set "embedded_warmup=$WARMUP"); fi
extra=(--set "embedded_args=$embedded_args" --set embedded_exit_on_failure=true "${warm[@]}" "${extra[@]}")
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
