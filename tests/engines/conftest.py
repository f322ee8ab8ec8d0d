"""Opt-in integration tests against a real vLLM (`make test-engines`).

Skipped unless WARMTURN_ENGINE_TESTS=1 (so `make test` and CI never start a 5 GB engine) and unless
the vLLM venv from `make vllm` exists. With VLLM_URL=http://127.0.0.1:PORT they use a vLLM that is
already running (started with `make vllm-serve`); otherwise they start one (2-3 min of warm-up here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.engines.engine_parts import VLLM_VENV
from tests.procs import ROOT

START_TIMEOUT = 900.0


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    reason = None
    if os.environ.get("WARMTURN_ENGINE_TESTS") != "1":
        reason = "opt-in engine tests: run `make test-engines` (needs `make vllm`: a ~3.5 GB vLLM CPU venv)"
    elif not (VLLM_VENV / "bin" / "vllm").exists() and not os.environ.get("VLLM_URL"):
        reason = f"no vLLM venv at {VLLM_VENV}: run `make vllm` first"
    if reason is None:
        return
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.skip(reason=reason))


def wait_health(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vllm exited ({proc.returncode}):\n{log.read_text()[-4000:] if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vLLM at {url} not healthy after {timeout:.0f}s")


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory):
    """Base URL of a real vLLM serving the exported default model (float32, prefix caching on)."""
    url = os.environ.get("VLLM_URL")
    if url:
        wait_health(url.rstrip("/"), None, 60, None)
        yield url.rstrip("/")
        return
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "vllm-cpu.sh"), "serve"], cwd=str(ROOT),
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "VLLM_PORT": str(port)}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, START_TIMEOUT, log)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the vLLM we started and its engine/worker children (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
