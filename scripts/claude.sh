#!/usr/bin/env bash
# `make claude` / scripts/claude.sh [claude arguments...]: the Claude Code CLI that setup installed,
# pointed at the running warmturn proxy (make run) on 127.0.0.1:$PORT.
#
# - Its own config dir ($WARMTURN_CLAUDE_CONFIG, default ~/.cache/warmturn/claude-config), seeded so
#   that neither onboarding (it exits offline), the "use this API key?" question (its preselected "No"
#   leads to "Not logged in") nor the folder-trust question (preselected "No, exit") blocks: the
#   folder you start it in is marked trusted, as if you had answered yes.
# - The recommended flags and environment: --exclude-dynamic-system-prompt-sections, no telemetry,
#   no auto-update.
# - With a small model behind the proxy (context <= 16K tokens, e.g. the default SmolLM2-135M), what
#   keeps it usable: the output cap the server announces (CLAUDE_CODE_MAX_OUTPUT_TOKENS), and a short
#   system prompt with only the Read tool, so requests fit the context. Your own --system-prompt or
#   --tools win; WARMTURN_FULL_PROMPT=1 keeps Claude Code's own.
# Arguments (and make's ARGS, parsed with shell quoting) go to claude: scripts/claude.sh -p "Hi".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT=${PORT:-8080}
CACHE=${WARMTURN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warmturn}
PY="$ROOT/.venv/bin/python"; [[ -x "$PY" ]] || PY=python3
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/versions.sh"
say() { echo "warmturn: $*" >&2; }

CLAUDE=${WARMTURN_CLAUDE:-$CACHE/npm-$CLAUDE_CODE_VERSION/node_modules/.bin/claude}
if [[ ! -x "$CLAUDE" ]]; then
  say "Claude Code is not installed at $CLAUDE: run make setup (it installs $CLAUDE_CODE_VERSION with npm),"
  say "or point WARMTURN_CLAUDE at a claude binary."
  exit 1
fi
check_port "$PORT"
PORT=$((10#$PORT))
split_words "${ARGS:-}"
args=("${WORDS[@]}" "$@")
has() { local a; for a in "${args[@]}"; do [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0; done; return 1; }

if ! port_listening "$PORT"; then
  say "nothing listens on 127.0.0.1:$PORT. Start the proxy first, in another terminal: make run"
  say "(or, if it runs on another port: make claude PORT=N / PORT=N scripts/claude.sh)"
  exit 1
fi
# What is served: the embedded server's /health (through the proxy) has its context and output cap.
# Other backends answer something else or nothing: then no small-model profile.
read -r MODEL CONTEXT CAP < <("$PY" - "$PORT" <<'PY' || true
import json, sys, threading, urllib.request
waiting = threading.Timer(2.0, lambda: print("warmturn: waiting for the proxy's backend to be ready...", file=sys.stderr))
waiting.daemon = True
waiting.start()
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=600) as r:
        h = json.load(r)
except Exception:
    h = {}
h = h if isinstance(h, dict) else {}
ctx, cap = h.get("context_length"), h.get("max_output_tokens")
print(str(h.get("model") or "?").replace(" ", "_"), ctx if isinstance(ctx, int) else 0, cap if isinstance(cap, int) else 0)
PY
)
MODEL=${MODEL:-?}; CONTEXT=${CONTEXT:-0}; CAP=${CAP:-0}

KEY=${WARMTURN_API_KEY:-warmturn-local}  # what the proxy expects (its client_api_key option), else anything
CONFIG=${WARMTURN_CLAUDE_CONFIG:-$CACHE/claude-config}
mkdir -p "$CONFIG"
"$PY" - "$CONFIG/.claude.json" "$KEY" "$PWD" <<'PY'
import json, os, sys
path, key, cwd = sys.argv[1:4]
try:
    with open(path) as f:
        cfg = json.load(f)
except (OSError, ValueError):
    cfg = {}
cfg["hasCompletedOnboarding"] = True  # no onboarding: its connectivity check exits when offline
responses = cfg.setdefault("customApiKeyResponses", {"approved": [], "rejected": []})
tail = key.strip()[-20:]  # Claude Code remembers a key by its last 20 characters
responses["approved"] = sorted(set(responses.get("approved") or []) | {tail})
responses["rejected"] = [k for k in responses.get("rejected") or [] if k != tail]
cfg.setdefault("projects", {}).setdefault(cwd, {})["hasTrustDialogAccepted"] = True
tmp = path + ".tmp"
with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
    json.dump(cfg, f, indent=2)
os.replace(tmp, path)
PY

flags=()
has --exclude-dynamic-system-prompt-sections || flags+=(--exclude-dynamic-system-prompt-sections)
env_extra=()
profile="Claude Code's own system prompt and tools"
# Claude Code's own system prompt and tools: ~12.5K tokens (2.1.332). A context below 16K cannot hold them and
# a conversation: refuse at once rather than let every turn be refused with advice (/clear, /compact) that can't help.
FULL_PROMPT_MIN_CONTEXT=16384
if [[ "${WARMTURN_FULL_PROMPT:-0}" == 1 ]] && (( CONTEXT > 0 && CONTEXT < FULL_PROMPT_MIN_CONTEXT )); then
  say "WARMTURN_FULL_PROMPT=1 needs a context of $FULL_PROMPT_MIN_CONTEXT tokens or more (Claude Code $CLAUDE_CODE_VERSION's own prompt is ~12.5K tokens), but $MODEL has $CONTEXT. Fix: drop WARMTURN_FULL_PROMPT (the small-model profile fits), or serve a model with a longer context, e.g. make run MODEL=Qwen/Qwen2.5-Coder-1.5B-Instruct (32K; README, 'Use your own model')."
  exit 1
fi
if (( CONTEXT > 0 && CONTEXT <= 16384 )) && [[ "${WARMTURN_FULL_PROMPT:-0}" != 1 ]]; then
  cap=$(( CAP > 0 ? CAP : CONTEXT / 16 ))
  [[ -n "${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-}" ]] || env_extra+=(CLAUDE_CODE_MAX_OUTPUT_TOKENS="$cap")
  # No git-status snapshot (branch, status, the last 5 commit subjects: ~700 tokens in this repository) in
  # the first message: it is new to every conversation, so the first turn would compute it cold.
  [[ -n "${CLAUDE_CODE_DISABLE_GIT_INSTRUCTIONS:-}" ]] || env_extra+=(CLAUDE_CODE_DISABLE_GIT_INSTRUCTIONS=1)
  if ! has --system-prompt && ! has --system-prompt-file; then
    flags+=(--system-prompt "You are Claude Code, a coding assistant, running on a small local model. Answer briefly. To look at a file, use the Read tool.")
  fi
  has --tools || flags+=(--tools "Read")
  profile="small-model profile (short system prompt, only the Read tool unless you pass --tools, no git status, output cap ${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-$cap} tokens)"
fi
# Tell Claude Code the served context, so that it compacts in time instead of failing with "prompt is too long"
# (verified against 2.1.332, docs/claude-code-context.md): it applies CLAUDE_CODE_MAX_CONTEXT_TOKENS only to a
# model id it does not know (for claude-* ids it keeps its own 200K/1M), so every model alias becomes the served
# model's id. It compacts once usage reaches the window - min(output cap, 20K) - 13K, and refuses to send at the
# window - min(output cap, 20K) - 3K; CLAUDE_CODE_AUTO_COMPACT_WINDOW counts as at least 100K and
# CLAUDE_AUTOCOMPACT_PCT_OVERRIDE only lowers the point, so neither can tell it about a smaller window.
if (( CONTEXT > 0 )); then
  if [[ -z "${ANTHROPIC_MODEL:-}" ]] && ! has --model; then
    env_extra+=(ANTHROPIC_MODEL="$MODEL")
    for alias in ANTHROPIC_DEFAULT_OPUS_MODEL ANTHROPIC_DEFAULT_SONNET_MODEL ANTHROPIC_DEFAULT_HAIKU_MODEL; do
      [[ -n "${!alias:-}" ]] || env_extra+=("$alias=$MODEL")
    done
  fi
  window=${CLAUDE_CODE_MAX_CONTEXT_TOKENS:-$CONTEXT}
  (( window <= CONTEXT )) || say "CLAUDE_CODE_MAX_CONTEXT_TOKENS=$window is larger than the served context ($CONTEXT)"
  [[ -n "${CLAUDE_CODE_MAX_CONTEXT_TOKENS:-}" ]] || env_extra+=(CLAUDE_CODE_MAX_CONTEXT_TOKENS="$CONTEXT")
  if [[ -z "${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-}" && -z "${cap:-}" ]]; then  # its default would reserve 20K
    cap=$(( CAP > 0 ? CAP : CONTEXT / 8 )); cap=$(( cap > 32000 ? 32000 : cap ))
    env_extra+=(CLAUDE_CODE_MAX_OUTPUT_TOKENS="$cap")
  fi
  out=${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-$cap}; out=$(( out > 20000 ? 20000 : out ))
  compact_at=$(( window - out - 13000 ))
  if (( compact_at < window / 4 )) && [[ -z "${DISABLE_AUTO_COMPACT:-}" ]]; then
    # too small for its 13K summary reserve: it would compact before every turn; /compact still works
    env_extra+=(DISABLE_AUTO_COMPACT=1)
    profile+="; context window $window tokens, no auto-compaction (too small), Claude Code stops at $(( window - out - 3000 ))"
  else
    profile+="; context window $window tokens, auto-compaction at $compact_at"
  fi
fi
say "Claude Code $CLAUDE_CODE_VERSION -> http://127.0.0.1:$PORT (serving $MODEL${CONTEXT:+, context $CONTEXT tokens}); $profile"
say "config: $CONFIG (CLAUDE_CONFIG_DIR); binary: $CLAUDE"

unset ANTHROPIC_AUTH_TOKEN CLAUDE_CODE_USE_BEDROCK CLAUDE_CODE_USE_VERTEX
export CLAUDE_CONFIG_DIR="$CONFIG" ANTHROPIC_BASE_URL="http://127.0.0.1:$PORT" ANTHROPIC_API_KEY="$KEY" \
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \
  NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
[[ ${#env_extra[@]} -eq 0 ]] || export "${env_extra[@]}"
# The user's arguments first: --tools takes several values and would swallow a prompt after it.
if has -p || has --print; then exec "$CLAUDE" "${args[@]}" "${flags[@]}"; fi
# Interactive: Claude Code's exit hint says `claude --resume ID`, but this claude is not on PATH. Say what works.
started=$(date +%s)
rc=0
"$CLAUDE" "${args[@]}" "${flags[@]}" || rc=$?
session=$("$PY" - "$CONFIG/projects" "$started" <<'PY' || true
import sys
from pathlib import Path
newest = max((p for p in Path(sys.argv[1]).glob("*/*.jsonl") if p.stat().st_mtime >= int(sys.argv[2])),
             key=lambda p: p.stat().st_mtime, default=None)
print(newest.stem if newest else "")
PY
)
if [[ -n "$session" ]]; then
  say "(claude is not on your PATH) to go on with this conversation, in $PWD:  $ROOT/scripts/claude.sh --resume $session"
fi
exit "$rc"
