#!/usr/bin/env bash
# `make run`: mitmdump with the warmturn addon on 127.0.0.1:$PORT, embedded MLX backend.
# Extra mitmdump arguments can be passed in ARGS, e.g. ARGS="--set normalize=false".
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
MODEL=${MODEL:-}
VENV=${VENV:-.venv}
extra=()
if [[ -n "$MODEL" ]]; then extra+=(--set "embedded_args=--model $MODEL"); fi
cat >&2 <<MSG
warmturn: mitmdump on http://127.0.0.1:${PORT} -> embedded MLX server (starting now; its log: captures/embedded-server.log)
captures: captures/warmturn-$(date +%Y%m%d).jsonl      (make report turns them into report/report.html)

Point Claude Code at it (in another terminal):
  ANTHROPIC_BASE_URL=http://127.0.0.1:${PORT} ANTHROPIC_API_KEY=local \\
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \\
  claude --exclude-dynamic-system-prompt-sections
or intercept api.anthropic.com instead (see docs/addon.md):
  HTTPS_PROXY=http://127.0.0.1:${PORT} NODE_EXTRA_CA_CERTS=\$HOME/.mitmproxy/mitmproxy-ca-cert.pem claude
Stop with Ctrl-C (the embedded server stops with it).
MSG
# shellcheck disable=SC2086
exec "$VENV/bin/mitmdump" -s addons/normalize.py --listen-host 127.0.0.1 --listen-port "$PORT" \
  "${extra[@]}" ${ARGS:-}
