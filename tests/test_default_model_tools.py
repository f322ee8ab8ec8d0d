"""The default model calls make claude's Read tool (its fused LoRA, warmturn/server/readtool.py): the real
server (`python -m warmturn.server`, the default model; a request without a temperature decodes greedily)
and the official anthropic SDK, with the request exactly as make claude's small-model profile sends it
(system blocks and tools from the warm-up prefixes, Claude Code's environment note after the prompt). The
prompts, folder and file names are held out: none of them occurs in scripts/train_toolcall.py's training
data."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import ROOT

from tests import procs
from tests.procs import child_env
from warmturn.server import readtool

pytestmark = pytest.mark.model

PROFILE = json.loads((ROOT / "warmturn" / "server" / "prefixes" / "claude-code-2.1.332.json").read_text())[0]
CWD = "/home/zoe/recipes"
ENV = (
    "# Environment\nYou have been invoked in the following environment: \n"
    f" - Primary working directory: {CWD}\n - Is a git repository: true\n - Platform: linux\n - Shell: bash\n"
    " - OS Version: Linux 6.18.44-fc-v1300\n\nYou are powered by the model SmolLM2-135M-Instruct.\n\n"
    "Today's date is 2026-12-07."
)


def test_adapter_is_the_pinned_file():
    assert readtool.sha256(readtool.ADAPTER) == readtool.ADAPTER_SHA256
    assert readtool.ADAPTER.stat().st_size < 4 << 20


def test_a_changed_adapter_is_refused(tmp_path):
    bad = tmp_path / "adapter.safetensors"
    bad.write_bytes(readtool.ADAPTER.read_bytes()[:-1] + b"\0")
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(ValueError, match="SHA-256"):
        readtool.tuned_model_dir(base, adapter=bad)
    assert not any(p.name.startswith("base-read") for p in tmp_path.iterdir())


def test_a_top_layer_fine_tune_has_its_own_prefix_cache_identity():
    """The adapter changes only the top layers: the KV store's model identity must see it (KV of the plain
    model is never reused for the tuned one)."""
    import mlx.core as mx
    from mlx_lm.models import llama

    from warmturn.server.cache import model_identity

    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=12,
                                        intermediate_size=64, num_attention_heads=4, rms_norm_eps=1e-5,
                                        vocab_size=64, num_key_value_heads=2))
    mx.eval(model.parameters())
    plain = model_identity(model)
    top = model.model.layers[-1]
    for proj in (top.self_attn.q_proj, top.self_attn.v_proj, top.mlp.down_proj):
        proj.weight = proj.weight + 0.01
    assert model_identity(model) != plain


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = child_env()
    env.pop("WARMTURN_NO_READ_ADAPTER", None)  # (conftest.py sets it for the rest of the suite)
    log = tmp_path_factory.mktemp("tuned") / "server.log"
    with procs.server("--log-level", "warning", log=log, env=env) as (_proc, url):
        yield url


def ask(url: str, prompt: str):
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="test-key", max_retries=0, timeout=300)
    return client.messages.create(
        model="claude-opus-5-5", max_tokens=60, system=PROFILE["system"], tools=PROFILE["tools"],
        messages=[{"role": "user", "content": prompt}, {"role": "system", "content": ENV}])


def test_served_under_the_tuned_name(server):
    model = httpx.get(f"{server}/health", timeout=5).json()["model"]
    assert model.endswith("-read" + readtool.ADAPTER_SHA256[:8])


def test_a_read_request_becomes_a_read_tool_use(server):
    msg = ask(server, "peek at tools/parser.lua")
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(calls) == 1, msg.content
    assert calls[0].name == "Read" and calls[0].input == {"file_path": f"{CWD}/tools/parser.lua"}


def test_a_greeting_gets_plain_text(server):
    msg = ask(server, "Good evening!")
    assert msg.stop_reason == "end_turn" and [b.type for b in msg.content] == ["text"], msg.content
    assert msg.content[0].text.strip() and "<tool_call>" not in msg.content[0].text
