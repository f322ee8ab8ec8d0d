#!/usr/bin/env bash
# Time a newcomer's first run, the way README's Quick start measures it: a fresh clone of this checkout's
# HEAD, a fresh HOME (so empty pip, uv and npm caches and no ~/.cache/warmturn), `make run` in one tmux
# session and, once its banner shows, `make claude` in another (the real Claude Code CLI), then three short
# prompts, each typed as soon as the answer before it has ended. Prints the seconds since the start at
# which each step ended, and the load average; keeps the clone, its HOME and the logs in the work dir.
#
#   scripts/time_first_run.sh [WORKDIR]    (default: a new mktemp -d)   PORT=18399 (default)
#   RESTART=1 scripts/time_first_run.sh WORKDIR    the same in WORKDIR's clone again: make run restarted
#   EXTRA_ENV="WARMTURN_NO_UV=1" ...               environment for make run and make claude
# Needs tmux and what make run needs. Its tmux sessions (wt-first-run-*) are ended at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK=${1:-$(mktemp -d)}
PORT=${PORT:-18399}
CLONE="$WORK/clone" H="$WORK/home" LOG="$WORK/make-run${RESTART:+-restart}.log"
command -v tmux >/dev/null || { echo "time_first_run: needs tmux" >&2; exit 2; }
load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || uptime | sed 's/.*load averages*: *//; s/,.*//'; }
T0=$(date +%s)
SECONDS=0
at() { echo "$(printf '%5d' "$SECONDS") s  $*  (load $(load))"; }
echo "start $(date -u +%FT%TZ), load average $(load)  [$WORK]"
if [[ -z "${RESTART:-}" ]]; then
  mkdir -p "$H"
  git clone -q "$ROOT" "$CLONE"
  at "cloned $(git -C "$CLONE" rev-parse --short HEAD)"
fi
run=wt-first-run-$$-run cc=wt-first-run-$$-cc
trap 'tmux kill-session -t "$cc" 2>/dev/null || true; tmux kill-session -t "$run" 2>/dev/null || true' EXIT
# make run's output, each line stamped with the seconds since the start
tmux new-session -d -s "$run" -x 220 -y 50 "cd '$CLONE' && env HOME='$H' ${EXTRA_ENV:-} make run PORT=$PORT 2>&1 \
  | python3 -u -c 'import sys, time
for line in sys.stdin: print(f\"{time.time() - $T0:7.1f} {line}\", end=\"\", flush=True)' > '$LOG'; sleep 100000"
wait_for() {  # TEXT FILE-OR-PANE [TIMEOUT]
  local deadline=$((SECONDS + ${3:-600}))
  until { if [[ -f "$2" ]]; then cat "$2"; else tmux capture-pane -p -t "$2"; fi; } 2>/dev/null | grep -q -- "$1"; do
    (( SECONDS < deadline )) || { echo "time_first_run: timed out waiting for '$1'; make run's log: $LOG" >&2; exit 1; }
    sleep 0.3
  done
}
wait_for "Point Claude Code at it" "$LOG"
at "make run's banner"
tmux new-session -d -s "$cc" -x 160 -y 50 "cd '$CLONE' && env HOME='$H' ${EXTRA_ENV:-} make claude PORT=$PORT; sleep 100000"
wait_for "shift+tab to cycle" "$cc"
at "make claude's prompt"
n=0
for prompt in "What is 2+2?" "What is the capital of France?" "Name a primary color."; do
  n=$((n + 1))
  tmux send-keys -t "$cc" "$prompt" Enter
  deadline=$((SECONDS + 600))
  until [[ $(grep -c "warmturn: messages 200" "$LOG") -ge $n ]]; do
    (( SECONDS < deadline )) || { echo "time_first_run: turn $n never ended; make run's log: $LOG" >&2; exit 1; }
    sleep 0.3
  done
  at "turn $n answered"
  sleep 1
done
echo "end $(date -u +%FT%TZ), load average $(load). What make run said (seconds since the start):"
grep -E "\[setup\]|\[warmturn\]|proxy listening|server ready|warmed|messages 200" "$LOG" | sed -E 's/ · stripped.*//'
tmux capture-pane -p -t "$cc" > "$WORK/claude-screen.txt"
