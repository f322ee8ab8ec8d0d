"""``python -m warmturn.server`` / ``warmturn-server``: the Anthropic Messages API on mlx-lm.

argparse lives in :func:`main` only; everything else is built by small functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from warmturn.machine import is_loopback

log = logging.getLogger("server")

# With the bundled default model (SmolLM2-135M, 8K context) a turn must end: it rambles at Claude
# Code's default temperature (1.0) and max_tokens (64000-128000). So when it is served, requests
# that set no temperature decode greedily and every turn stops after this many output tokens
# (stop_reason max_tokens). Other models keep Anthropic's defaults; both are flags.
DEFAULT_MODEL_TEMPERATURE = 0.0
DEFAULT_MODEL_OUTPUT_CAP = 256


def sampling_defaults(args: argparse.Namespace) -> tuple[float, int]:
    """(default temperature, output-token cap; 0 = none) from the flags, or the served model's defaults."""
    default_model = args.model is None
    temperature = args.default_temperature
    if temperature is None:
        temperature = DEFAULT_MODEL_TEMPERATURE if default_model else 1.0
    cap = args.max_output_tokens
    if cap is None:
        cap = DEFAULT_MODEL_OUTPUT_CAP if default_model else 0
    return temperature, cap


def repetition_guard_on(args: argparse.Namespace) -> bool:
    """--repetition-guard / --no-repetition-guard, else on with the bundled default model only."""
    return args.repetition_guard if args.repetition_guard is not None else args.model is None


def make_store(args: argparse.Namespace, model: Any):
    """The cross-request prefix KV store (``server.cache``), or None for ``--no-cache``."""
    if args.no_cache:
        return None
    try:
        from warmturn.server.cache import PrefixCache
    except ImportError as e:
        log.warning("prefix cache unavailable (%s): every request prefills from scratch", e)
        return None
    return PrefixCache(model, max_bytes=args.cache_bytes, cache_dir=args.cache_dir,
                       max_disk_bytes=args.cache_disk_bytes)


def context_length(model_dir: Path, tokenizer: Any) -> int:
    """The served model's context window: config.json's max_position_embeddings (or the like)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions", "model_max_length"):
        text_cfg = config.get("text_config") or {}
        for cfg in (config, text_cfg):
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**7 else 4096


def setup_logging(level: str, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    # transformers warns that a long prompt "will result in indexing errors": it never reaches the model,
    # the server refuses it first with its own message (http.py), so the warning only misleads.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def build_state(args: argparse.Namespace):
    """Load the model and wire renderer, engine and store into a ServerState."""
    import mlx.core as mx
    from mlx_lm import load

    from warmturn.server.blas import blas_in_use
    from warmturn.server.convert import resolve_model
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.metrics import Metrics
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import format_for_tokenizer

    model_dir = resolve_model(args.model, read_adapter=False if args.no_read_adapter else None)
    log.info("MLX device %s, BLAS: %s", mx.default_device(), blas_in_use())
    log.info("loading %s", model_dir)
    model, tokenizer = load(str(model_dir))
    engine = Engine(model, tokenizer, make_store(args, model), max_queue=args.max_queue,
                    decode_concurrency=args.decode_concurrency, prompt_concurrency=args.prompt_concurrency,
                    prefill_step_size=args.prefill_step_size, dedup_min_tokens=args.dedup_min_tokens,
                    progress_every=args.prefill_progress_seconds, arrival_window=args.arrival_window_ms / 1000,
                    arrival_grace=args.arrival_grace_ms / 1000,
                    prefill_order=args.prefill_order, solo=not args.no_solo, metrics=Metrics())
    renderer = Renderer(tokenizer, prefix_order=args.prefix_order)
    family = engine.cache_family
    layers = ", ".join(f"{n} {k}" for k, n in family.layers.items())
    if engine.store is None:
        log.info("model cache: %s (%s); prefix cache off (--no-cache): every request prefills in full",
                 family.name, layers)
    else:
        log.info("model cache: %s (%s): %s", family.name, layers, family.policy)
    # stateful caches resume only at marked points: render() finds where each history ends
    renderer.history_marks = engine.store is not None and engine.store.stateful
    fmt = format_for_tokenizer(tokenizer)
    ctx = context_length(model_dir, tokenizer)
    # (a Hugging Face cache snapshot is named after its commit: serve it under the repository's name)
    hf_snapshot = model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--")
    name = args.served_model_name or (model_dir.parent.parent.name.split("--")[-1] if hf_snapshot else model_dir.name)
    temperature, cap = sampling_defaults(args)
    log.info("serving %s: context %d tokens, tool calls %s, tools via %s, prefix order %s", name, ctx,
             fmt.name, "chat template" if renderer.template_tools else "system prompt (hermes)", args.prefix_order)
    log.info("requests without a temperature use %s; output %s; repetition guard %s", "greedy decoding"
             if temperature == 0 else f"temperature {temperature:g}",
             f"capped at {cap} tokens per turn" if cap else "limited by the context only",
             "on" if repetition_guard_on(args) else "off")
    return ServerState(engine=engine, renderer=renderer, model_id=name, context_length=ctx, tool_format=fmt,
                       api_key=args.api_key, bind_host=args.host, allowed_hosts=tuple(args.allowed_hosts),
                       max_body_bytes=args.max_body_bytes,
                       request_timeout=args.request_timeout, default_temperature=temperature,
                       max_output_tokens=cap, ping_interval=args.ping_interval,
                       repetition_guard=repetition_guard_on(args))


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmturn-server",
        description="Anthropic Messages API (/v1/messages, streaming, tools, count_tokens) on an mlx-lm model.",
    )
    p.add_argument("--model", default=None,
                   help="mlx-lm model directory or GGUF file (default: the bundled SmolLM2-135M-Instruct, "
                        "converted once into ~/.cache/warmturn)")
    p.add_argument("--no-read-adapter", action="store_true",
                   help="serve the bundled default model without the LoRA that teaches it make claude's Read tool "
                        "call (docs/default-model-tools.md; $WARMTURN_NO_READ_ADAPTER=1 too); ignored with --model")
    p.add_argument("--served-model-name", default=None,
                   help="id listed first in /v1/models (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; a non-loopback address requires --api-key (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("WARMTURN_API_KEY"),
                   help="require this key in x-api-key or Authorization: Bearer on /v1/* and /metrics "
                        "(default: $WARMTURN_API_KEY, else no key; an empty key is refused)")
    p.add_argument("--allowed-hosts", type=lambda v: [h for h in v.split(",") if h.strip()], default=[],
                   help="comma-separated extra names the Host header may carry (the bound address, loopback "
                        "names and IP literals are always accepted; other names are refused as DNS rebinding); "
                        "'*' accepts any (default: none)")
    p.add_argument("--prefix-order", choices=["system-first", "tools-first"], default="tools-first",
                   help="inside the system turn, render the system text before the tools, or the tools first "
                        "(Anthropic's cache order: a new session whose system text ends differently still reuses "
                        "the tools; measured in docs/cache.md) (default: tools-first)")
    p.add_argument("--cache-bytes", type=int, default=None,
                   help="prefix KV cache budget in bytes (default: a third of the available memory)")
    p.add_argument("--cache-dir", default=None,
                   help="persist prefix-cache checkpoints, and conversations evicted from memory, in this private "
                        "directory, created 0700; one that other users can write is refused (default: memory only)")
    p.add_argument("--cache-disk-bytes", type=int, default=None,
                   help="disk budget of --cache-dir; the least recently used files go first (default: 4 x --cache-bytes)")
    p.add_argument("--no-cache", action="store_true", help="disable the cross-request prefix KV cache")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests allowed to wait for a place in the batch; more get 529 with retry-after "
                        "(default: 8)")
    p.add_argument("--decode-concurrency", type=int, default=8,
                   help="requests generating at once in one batch; more wait in the queue (as mlx_lm.server's "
                        "flag; measured in docs/server.md) (default: 8)")
    p.add_argument("--prompt-concurrency", type=int, default=4,
                   help="most prompts read in one step, interleaved with decoding (as mlx_lm.server's flag); "
                        "several share a step only while their padded chunks fit --prefill-step-size, shortest "
                        "remaining prompt first (docs/server.md) (default: 4)")
    p.add_argument("--prefill-step-size", "--prefill-chunk", dest="prefill_step_size", type=int, default=256,
                   help="prompt tokens read per step, in all (padding included): smaller keeps decoding streams "
                        "flowing while a long prompt is read, larger prefills a lone prompt a little faster (as "
                        "mlx_lm.server's flag; --prefill-chunk is the old name) (default: 256)")
    p.add_argument("--prefill-order", choices=("shortest", "arrival"), default="shortest",
                   help="who reads its prompt first: shortest (the shortest remaining prompt first, short prompts "
                        "sharing a step, a title request after the turns; docs/server.md) or arrival (every "
                        "admitted prompt at once, one chunk each per step, as mlx_lm.server) (default: shortest)")
    p.add_argument("--no-solo", action="store_true",
                   help="serve a lone request in the batch too, as concurrent ones, instead of outside it the way "
                        "mlx-lm's generate_step serves one (for A/B measurements: make bench --families)")
    p.add_argument("--arrival-window-ms", type=float, default=100.0,
                   help="an idle engine waits up to this long, before admitting anything, for requests still being "
                        "read and tokenized at that moment, so requests sent together start together; 0 = never "
                        "wait (default: 100)")
    p.add_argument("--arrival-grace-ms", type=float, default=0.0,
                   help="an idle engine starts a request no sooner than this long after it began to arrive "
                        "(reading and rendering it count), so that requests sent together, which a proxy passes "
                        "on a few ms apart, read their prompts in one step; it costs a lone request what is left "
                        "of it (a warm turn waits ~13 ms of 15); 0 = start at once (default: 0)")
    p.add_argument("--dedup-min-tokens", type=int, default=32,
                   help="a request that shares at least this many not-yet-cached prompt tokens with one being "
                        "prefilled waits for that prefill and reads them from the cache (default: 32)")
    p.add_argument("--prefill-progress-seconds", type=float, default=5.0,
                   help="log a prefill's progress (tokens done/total, rate, ETA) every this many seconds "
                        "(default: 5)")
    p.add_argument("--default-temperature", type=float, default=None,
                   help="sampling temperature for requests that set none (Claude Code's main turns send none); "
                        "0 = greedy (default: 0 with the bundled default model, else 1.0, Anthropic's default)")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help="stop every turn after this many output tokens, with stop_reason max_tokens, whatever "
                        "max_tokens the request asks for; 0 = no cap beyond the context (default: "
                        f"{DEFAULT_MODEL_OUTPUT_CAP} with the bundled default model, else 0)")
    p.add_argument("--repetition-guard", action=argparse.BooleanOptionalAction, default=None,
                   help="end an answer that has started to loop (the same text repeated back to back, 3 times or "
                        "more over 160+ characters) at once, with stop_reason max_tokens and a warning in the log "
                        "(default: on with the bundled default model, else off)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queue wait included (default: 600)")
    p.add_argument("--ping-interval", type=_positive_seconds, default=5.0,
                   help="seconds between Anthropic `ping` events while a streamed request waits in the queue or "
                        "reads its prompt; a stream still waiting after one interval gets its headers and "
                        "message_start at once (default: 5; Claude Code drops a stream idle for 300 s)")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024,
                   help="larger request bodies get 413 (default: 33554432 = 32 MiB)")
    p.add_argument("--log-file", default=None,
                   help="also append the log, with one JSON line per request, to this file (default: stderr only)")
    p.add_argument("--parent-fd", type=int, default=None,
                   help="exit when this inherited pipe closes: the embedded-server launcher passes the read end "
                        "of a pipe only it can write, so the server never outlives it, even after kill -9 "
                        "(default: none)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="(default: info)")
    return p


class _Server:
    """uvicorn's server, shutting down in an order that suits the MLX worker (built lazily: see
    ``_Server.__new__``)."""

    def __new__(cls, config: Any, engine: Any) -> Any:
        import signal
        import threading
        from contextlib import contextmanager

        import uvicorn

        class Server(uvicorn.Server):
            # On SIGTERM/SIGINT uvicorn waits for requests in flight, then (since 0.29) raises
            # the signal again once it is done: SIGTERM's default action then kills the process
            # before main() can stop the engine, with the worker anywhere, in an MLX step or a
            # checkpoint write. Instead: the engine starts stopping at the signal (its requests
            # end within a step, so the graceful wait is short), the signal is not raised again,
            # and main() waits for the worker.
            def handle_exit(self, sig: int, frame: Any) -> None:
                super().handle_exit(sig, frame)
                threading.Thread(target=engine.stop, name="engine-stop", daemon=True).start()

            @contextmanager
            def capture_signals(self):  # type: ignore[override]
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in before.items():
                        signal.signal(sig, handler)

        return Server(config)


SERVER_MODULES = ("mlx", "mlx_lm", "starlette", "uvicorn", "anyio", "prometheus_client")


def missing_server_extra() -> str | None:
    """The error to print when the ``[server]`` extra is not installed (``pip install warmturn`` is
    the addon alone), else None. Checked before anything imports them, so the message is one line
    (which the addon's supervisor shows for an embedded backend), not a traceback."""
    import importlib.util

    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"error: the embedded server needs warmturn's [server] extra ({', '.join(missing)} not installed): "
            f"pip install 'warmturn[server]' ('warmturn[server,cpu]' on Linux), or point the addon at another "
            f"backend (--set backend=URL)")


def main(argv: list[str] | None = None) -> int:
    from warmturn.server.blas import maybe_reexec

    args = make_parser().parse_args(argv)
    if (missing := missing_server_extra()) is not None:
        print(missing, file=sys.stderr)
        return 2
    if args.api_key is not None and not args.api_key.strip():
        given = argv if argv is not None else sys.argv[1:]
        src = "--api-key" if any(a.startswith("--api-key") for a in given) else "WARMTURN_API_KEY"
        print(f"error: {src} is set but empty: every request would be refused. Set a key, or unset "
              f"{src} to run without one.", file=sys.stderr)
        return 2
    if args.api_key is not None:
        args.api_key = args.api_key.strip()  # headers are compared stripped
    if not is_loopback(args.host) and not args.api_key:
        print(f"error: refusing to bind {args.host} (not loopback) without --api-key: anyone on the network "
              f"could use the model. Pass --api-key KEY or bind 127.0.0.1.", file=sys.stderr)
        return 2
    if argv is None:
        maybe_reexec()  # only for a real command line: re-exec replays sys.orig_argv
    setup_logging(args.log_level, args.log_file)
    if args.parent_fd is not None:
        from warmturn.server.lifeline import watch_parent

        watch_parent(args.parent_fd)  # before the model loads: a dead parent stops that too
    if args.cache_dir and not args.no_cache:
        from warmturn.server.cache_disk import CacheDirError, ensure_private_dir

        try:  # before loading the model: a directory others can write is refused at once
            args.cache_dir = str(ensure_private_dir(args.cache_dir))
        except CacheDirError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    import threading

    import uvicorn

    from warmturn.server.http import make_app

    state = build_state(args)
    state.engine.start()
    # every renderer's tokenizer copy now, beside start-up, not in the first concurrent requests
    threading.Thread(target=state.renderers.fill, name="renderer-copies", daemon=True).start()
    config = uvicorn.Config(make_app(state), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = _Server(config, state.engine)
    log.info("listening on http://%s:%d", args.host, args.port)
    try:
        server.run()
    finally:
        stopped = state.engine.stop()
    if not stopped:
        # The worker thread is still inside an MLX step (a long prefill chunk on a loaded CPU).
        # Finalizing the interpreter around it aborts the process ("terminate called without an
        # active exception", exit 134); leave without finalizing instead. Every disk checkpoint
        # was written when its prefill reached it (a half-written one is only a temp file).
        log.warning("exiting with the MLX worker still busy")
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
