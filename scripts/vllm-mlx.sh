#!/usr/bin/env bash
# Provision vllm-mlx (the continuous-batching peer of `make bench`) in its own virtualenv under
# the user cache, and print the command prefix that serves a model (for VLLM_MLX_CMD).
#   bash scripts/vllm-mlx.sh            # install if needed, print the command
#   VLLM_MLX_CMD="$(bash scripts/vllm-mlx.sh)" make bench
# vllm-mlx 0.6.0 needs mlx-lm < 0.32 and pulls torch (several GB), so it can never share
# warmturn's .venv; it is opt-in and never part of CI. On Linux it runs on MLX's CPU backend
# (`mlx[cpu]`). Idempotent: quick when already installed. Same as `make vllm-mlx`.
set -euo pipefail
CACHE=${WARMTURN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warmturn}
VENV=${VLLM_MLX_VENV:-$CACHE/vllm-mlx}
VLLM_MLX_VERSION=${VLLM_MLX_VERSION:-0.6.0}
MLX_LM_VERSION=${VLLM_MLX_MLX_LM:-0.31.3}  # the newest mlx-lm vllm-mlx 0.6.0 accepts
say() { echo "[vllm-mlx] $*" >&2; }

find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null && pyenv which python3.12 2>/dev/null || true)" python3; do
    [[ -n "$c" ]] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

STAMP="$VENV/.warmturn-vllm-mlx"
WANT="vllm-mlx==$VLLM_MLX_VERSION mlx-lm==$MLX_LM_VERSION"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  PYTHON=$(find_python) || { say "ERROR: Python >= 3.10 not found"; exit 1; }
  [[ -x "$VENV/bin/python" ]] || { say "creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
  PIP=("$VENV/bin/python" -m pip install -q)
  "${PIP[@]}" --upgrade pip >/dev/null 2>&1 || true
  PKGS=("vllm-mlx==$VLLM_MLX_VERSION" "mlx-lm==$MLX_LM_VERSION")
  if [[ "$(uname -s)" == Linux ]]; then
    PKGS+=("mlx[cpu]")
    # optional: VLLM_MLX_TORCH_INDEX=https://download.pytorch.org/whl/cpu installs torch's CPU build
    # first (~1 GB instead of the CUDA one) where that index is reachable
    if [[ -n "${VLLM_MLX_TORCH_INDEX:-}" ]]; then
      say "installing torch from $VLLM_MLX_TORCH_INDEX (pip, slow)"
      "${PIP[@]}" torch --index-url "$VLLM_MLX_TORCH_INDEX" >"$VENV/pip.log" 2>&1 \
        || { tail -20 "$VENV/pip.log" >&2; say "ERROR: torch install failed (log: $VENV/pip.log)"; exit 1; }
    fi
  fi
  say "installing ${PKGS[*]} into $VENV (pip, slow: minutes)"
  "${PIP[@]}" "${PKGS[@]}" >>"$VENV/pip.log" 2>&1 \
    || { tail -20 "$VENV/pip.log" >&2; say "ERROR: pip install failed (log: $VENV/pip.log)"; exit 1; }
  "$VENV/bin/vllm-mlx" --help >/dev/null 2>&1 || { say "ERROR: $VENV/bin/vllm-mlx does not run"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
echo "$VENV/bin/vllm-mlx serve"
