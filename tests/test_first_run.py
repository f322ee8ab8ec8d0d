"""The first run (issue 21): every mistake ends at once with one line and a fix, models are found where users
keep them, restarts and the very first turn are warm, a looping answer stops early.

Real parts throughout: the default model's own files laid out as the Hugging Face cache, LM Studio and Ollama
lay out theirs; `make run` (real mitmdump, real embedded server); scripts/claude.sh with the real Claude Code.
make is run with `-o setup` (setup is taken as done)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.procs import ROOT, child_env, claude_bin, claude_code_versions, port_open, read_capture, server
from tests.test_scripts import BANNER, finished, make, wait_until
from warmturn.server.convert import find_default_gguf, resolve_model
from warmturn.server.locate import ModelNotFound, locate
from warmturn.server.repetition import RepetitionGuard, find_loop

HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WARMUP = ROOT / "warmturn" / "server" / "prefixes" / f"claude-code-{claude_code_versions()[0]}.json"
# the plain default model loops on it (greedy); with its Read adapter it answers briefly: the loop test serves it
# without (--no-read-adapter; docs/default-model-tools.md)
LOOPING_PROMPT = "Read notes.txt and tell me the secret word."


# --- models where users keep them --------------------------------------------------------------------------

def hf_cache(root: Path, model_dir: Path, name: str = HF_NAME, commit: str = "0123abcd") -> Path:
    """A Hugging Face hub cache holding `model_dir`'s files as huggingface_hub lays them out: blobs named by
    content, a snapshot of symlinks to them, refs/main naming the snapshot; plus an older snapshot."""
    base = root / f"models--{name.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in model_dir.iterdir():
        if f.name.startswith("warmturn-"):
            continue
        blob = base / "blobs" / f"blob-{f.name}"
        blob.symlink_to(f)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "snapshots" / "old").mkdir()  # an older, incomplete snapshot: refs/main wins
    return snap


def ollama_store(root: Path, gguf: Path, name: str = "smollm2", tag: str = "135m") -> Path:
    """Ollama's model folder: a manifest naming the weights blob (the GGUF itself, no suffix)."""
    digest = "sha256:" + "ab" * 32
    blob = root / "blobs" / digest.replace(":", "-")
    blob.parent.mkdir(parents=True)
    blob.symlink_to(gguf)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": gguf.stat().st_size}]}))
    return blob


@pytest.fixture
def no_user_models(tmp_path, monkeypatch):
    """Every model folder points into tmp_path (empty until a test lays one out)."""
    dirs = {"HF_HUB_CACHE": tmp_path / "hf", "LMSTUDIO_MODELS_DIR": tmp_path / "lmstudio",
            "OLLAMA_MODELS": tmp_path / "ollama"}
    for k, v in dirs.items():
        monkeypatch.setenv(k, str(v))
    return dirs


def test_hf_cache_snapshot_named_by_refs_main(no_user_models, model_dir):
    snap = hf_cache(no_user_models["HF_HUB_CACHE"], model_dir)
    found = locate(HF_NAME)
    assert (found.path, found.kind, found.label, found.source) == (snap, "dir", "SmolLM2-135M-Instruct", "huggingface")


def test_lmstudio_folders_gguf_and_mlx(no_user_models, model_dir):
    root = no_user_models["LMSTUDIO_MODELS_DIR"]
    (root / "lmstudio-community" / "SmolLM2-GGUF").mkdir(parents=True)
    (root / "lmstudio-community" / "SmolLM2-GGUF" / "SmolLM2.Q4_1.gguf").symlink_to(find_default_gguf())
    (root / "mlx-community" / "SmolLM2-mlx").mkdir(parents=True)
    for f in model_dir.iterdir():
        (root / "mlx-community" / "SmolLM2-mlx" / f.name).symlink_to(f)
    gguf = locate("lmstudio-community/SmolLM2-GGUF")
    assert (gguf.kind, gguf.source, gguf.path.name) == ("gguf", "lmstudio", "SmolLM2.Q4_1.gguf")
    mlx = locate("mlx-community/SmolLM2-mlx")
    assert (mlx.kind, mlx.path) == ("dir", root / "mlx-community" / "SmolLM2-mlx")
    (root / "lmstudio-community" / "SmolLM2-GGUF" / "SmolLM2.Q8_0.gguf").symlink_to(find_default_gguf())
    with pytest.raises(ModelNotFound, match=r"several GGUF files .* pass one, MODEL="):
        locate("lmstudio-community/SmolLM2-GGUF")


def test_ollama_manifest_names_the_gguf_blob(no_user_models):
    blob = ollama_store(no_user_models["OLLAMA_MODELS"], find_default_gguf())
    for name in ("smollm2:135m", "library/smollm2:135m"):
        found = locate(name)
        assert (found.path, found.kind, found.label, found.source) == (blob, "gguf", "smollm2-135m", "ollama")
    with pytest.raises(ModelNotFound, match="ollama pull smollm2:latest"):
        locate("smollm2:latest")


def test_absent_names_say_where_it_looked_and_how_to_get_it(no_user_models):
    with pytest.raises(ModelNotFound) as e:
        locate("Qwen/Qwen3-0.6B")
    msg = str(e.value)
    assert "not on this machine" in msg and str(no_user_models["HF_HUB_CACHE"]) in msg and "\n" not in msg
    assert ".venv/bin/hf download Qwen/Qwen3-0.6B" in msg and "models--Qwen--Qwen3-0.6B" in msg
    with pytest.raises(ModelNotFound, match="no such file or directory"):
        locate("~/models/nothing-here")


@pytest.mark.model
def test_ollama_blob_converts_to_the_same_model(no_user_models, monkeypatch, tmp_path, model_dir):
    """An Ollama blob (a GGUF without the suffix) converts like the .gguf it is: same config and tokenizer."""
    ollama_store(no_user_models["OLLAMA_MODELS"], find_default_gguf())
    monkeypatch.setenv("WARMTURN_CACHE", str(tmp_path / "cache"))
    out = resolve_model("smollm2:135m")
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("smollm2-135m-")
    for name in ("config.json", "tokenizer.json"):
        assert json.loads((out / name).read_text()) == json.loads((model_dir / name).read_text())


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory, model_dir):
    """The real server started with MODEL=org/name, found in a Hugging Face cache laid out in a temp dir."""
    tmp = tmp_path_factory.mktemp("hf")
    hf_cache(tmp / "hub", model_dir)
    with server("--model", HF_NAME, log=tmp / "server.log", timeout=300,
                env=child_env(HF_HUB_CACHE=str(tmp / "hub"))) as (_, base):
        yield int(base.rsplit(":", 1)[1])


@pytest.mark.model
def test_model_name_served_from_the_hf_cache(hf_server):
    health = httpx.get(f"http://127.0.0.1:{hf_server}/health", timeout=300).json()
    assert health["model"] == "SmolLM2-135M-Instruct" and health["context_length"] == 8192
    r = httpx.post(f"http://127.0.0.1:{hf_server}/v1/messages", timeout=300, json={
        "model": "claude-opus-5-5", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})  # (a --model: temperature 1 by default)
    assert r.status_code == 200 and "Paris" in r.json()["content"][0]["text"]


@pytest.mark.model
def test_make_claude_refuses_the_full_prompt_on_a_small_context(hf_server, tmp_path):
    if not claude_bin(claude_code_versions()[0]).exists():
        pytest.skip("Claude Code is not installed (make setup)")
    env = {**os.environ, "PORT": str(hf_server), "WARMTURN_FULL_PROMPT": "1",
           "WARMTURN_CLAUDE_CONFIG": str(tmp_path / "config")}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "claude.sh"), "-p", "Hi"], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "WARMTURN_FULL_PROMPT=1 needs a context of 16384 tokens" in lines[0]
    assert "has 8192" in lines[0] and "drop WARMTURN_FULL_PROMPT" in lines[0] and "make run MODEL=" in lines[0]


# --- make run: mistakes end at once ------------------------------------------------------------------------

def test_make_run_with_an_absent_model_ends_before_mitmdump(tmp_path):
    port = free_port()
    rc, out = finished(tmp_path / "make.log", "run", PORT=str(port), MODEL="Qwen/Qwen3-0.6B",
                       HF_HUB_CACHE=str(tmp_path / "hf"), OLLAMA_MODELS=str(tmp_path / "ollama"),
                       LMSTUDIO_MODELS_DIR=str(tmp_path / "lms"))
    assert rc != 0 and BANNER not in out and "proxy listening" not in out
    said = [ln for ln in out.splitlines() if ln.startswith("warmturn:")]
    assert len(said) == 1 and said[0].startswith("warmturn: model 'Qwen/Qwen3-0.6B' is not on this machine")
    assert "hf download Qwen/Qwen3-0.6B" in out and not port_open(port)


@pytest.mark.model
def test_make_run_exits_when_the_backend_cannot_start(tmp_path):
    """A model directory the server cannot load: one line with the reason, exit code non-zero, the port freed."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    port = free_port()
    log = tmp_path / "make.log"
    with make("run", log, PORT=str(port), MODEL=str(bad), WARMTURN_CACHE_DIR=str(tmp_path / "kv"),
              ARGS=f"--set embedded_log={tmp_path}/server.log") as proc:
        proc.wait(300)
    out = log.read_text()
    assert proc.returncode != 0 and "run] Error 1" in out, out  # (make exits 2 when a recipe fails)
    failed = [ln for ln in out.splitlines() if "the embedded server exited with code" in ln]
    assert len(failed) == 1 and "No safetensors found" in failed[0] and "Fix that, then start again" in failed[0]
    assert "Traceback" not in out and "restarting" not in out and not port_open(port)


# --- warm restarts, a warm first turn, the repetition guard ------------------------------------------------

def test_warmup_prefix_is_what_make_claude_sends():
    """The warm-up bodies carry scripts/claude.sh's small-model system prompt, and the two identity lines."""
    bodies = json.loads(WARMUP.read_text())
    script = (ROOT / "scripts" / "claude.sh").read_text()
    prompt = re.search(r'flags\+=\(--system-prompt "([^"]+)"\)', script).group(1)
    assert [b["system"][1]["text"] for b in bodies] == [prompt, prompt]
    assert {b["system"][0]["text"] for b in bodies} == {"You are Claude Code, Anthropic's official CLI for Claude.",
                                                         "You are a Claude agent, built on Anthropic's Claude Agent SDK."}
    assert [t["name"] for t in bodies[0]["tools"]] == ["DeferredToolPlaceholder", "Read"]


def wait_for(log: Path, text: str, proc, timeout: float = 600) -> str:
    wait_until(lambda: text in log.read_text(), proc, log, timeout)
    return log.read_text()


@pytest.mark.model
def test_first_turn_and_restart_are_warm_and_a_loop_stops_early(tmp_path):
    """make run warms make claude's prefix into a private --cache-dir; after a restart it comes from disk, and
    the first real Claude Code turn reads it from the cache. A looping answer ends early as max_tokens, with a
    console line."""
    cc = claude_bin(claude_code_versions()[0])
    kv = tmp_path / "kv"
    port = free_port()
    cap = tmp_path / "cap.jsonl"
    variables = dict(PORT=str(port), WARMTURN_CACHE_DIR=str(kv),
                     ARGS=f"--set capture_file={cap} --set embedded_log={tmp_path}/server.log "
                          "--set embedded_args=--no-read-adapter")
    log1 = tmp_path / "make1.log"
    with make("run", log1, **variables) as proc:
        out = wait_for(log1, "warmed make claude's small-model prompt", proc)
    first = re.search(r"warmed .* \((\d+) tokens read from the cache, (\d+) computed\)", out)
    assert int(first.group(2)) > 700  # cold: the prefix was computed
    assert kv.stat().st_mode & 0o777 == 0o700 and list(kv.glob("*.safetensors"))

    log2 = tmp_path / "make2.log"
    with make("run", log2, **variables) as proc:
        out = wait_for(log2, "warmed make claude's small-model prompt", proc)
        read, computed = map(int, re.search(r"\((\d+) tokens read from the cache, (\d+) computed\)", out).groups())
        assert read > 1500 and computed < 50  # both bodies' prefixes came from disk

        if cc.exists():  # the first real turn: Claude Code's system prompt and Read tool, read from the cache
            env = {**os.environ, "PORT": str(port), "WARMTURN_CLAUDE_CONFIG": str(tmp_path / "config")}
            p = subprocess.run(["bash", str(ROOT / "scripts" / "claude.sh"), "-p", "What is 2+2?"], env=env,
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert p.returncode == 0, p.stderr
            turn = [r for r in read_capture(cap) if r["kind"] == "messages"][-1]
            assert turn["usage"]["cache_read_input_tokens"] >= 780, turn["usage"]

        body = json.loads(WARMUP.read_text())[1]  # claude -p's prefix, a prompt the default model loops on
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=600, json={
            **body, "max_tokens": 4096, "messages": [{"role": "user", "content": LOOPING_PROMPT}]})
        answer = r.json()
        assert answer["stop_reason"] == "max_tokens" and answer["usage"]["output_tokens"] < 256, answer
        assert find_loop(answer["content"][0]["text"]) is not None
        out = wait_for(log2, "repetition guard:", proc, 30)
    line = next(ln for ln in out.splitlines() if "repetition guard:" in ln)
    assert "stop_reason max_tokens" in line and "--no-repetition-guard" in line


@pytest.mark.parametrize("text, unit", [
    ("The secret word is: " * 9, "The secret word is: "),
    ("Sure. " + "I'm ready to help you with your coding. " * 5, "I'm ready to help you with your coding. "),
    ("=" * 200, "="),
    ("ab" * 79 + "a", None),  # 159 characters: under min_chars
    ("A plain answer that says something once and then ends.", None),
    ("x = [0, 1, 2]\n" * 2, None),  # two copies are not a loop
])
def test_find_loop(text, unit):
    loop = find_loop(text)
    assert (loop.unit if loop else None) == unit
    if loop:
        assert text.endswith(loop.unit * loop.repeats) and not text.endswith(loop.unit * (loop.repeats + 1))


def test_guard_fires_on_the_piece_that_completes_the_loop():
    guard = RepetitionGuard()
    pieces = ["Hello", ". ", *(["The secret", " word is: "] * 9)]
    fired = [i for i, p in enumerate(pieces) if guard.feed(p)]
    assert fired and fired[0] == 2 + 2 * 8 - 1  # 8 copies of the 20-character unit reach 160 characters


def test_banner_says_what_the_default_model_cannot_do():
    from warmturn.addons.banner import banner_text

    default = banner_text(8080, "embedded", "", "captures/embedded-server.log", default_model=True)
    assert "calls\nmake claude's Read tool" in default and "knows no other tool" in default
    assert "make run MODEL=org/name" in default
    assert "Read tool" not in banner_text(8080, "embedded", "", "captures/embedded-server.log")


def test_banner_asks_the_addons_what_they_own(capsys, tmp_path):
    """The banner reads no other addon's options: it asks (DescribeHook) and route, capture and
    supervise answer from their own, in the whole addon chain on mitmproxy's test master."""
    from mitmproxy.test import taddons

    from warmturn.addons.banner import Banner
    from warmturn.addons.hooks import DescribeHook, announce
    from warmturn.addons.normalize import make_addons

    addons = make_addons()
    banner = Banner()
    log, cap = tmp_path / "server.log", tmp_path / "cap-{date}.jsonl"
    with taddons.context(*addons, banner) as tctx:
        tctx.options.update(backend="embedded", embedded_log=str(log), capture_file=str(cap), embedded_args="")
        facts: dict = {}
        announce(DescribeHook(facts))
        assert facts == {"backend": "embedded", "capture_file": str(cap), "embedded_log": str(log), "default_model": True}
        banner.show()
        first = capsys.readouterr().err
        tctx.options.update(backend="http://127.0.0.1:9", capture_file="", embedded_args="--model /m")
        banner.show()
        second = capsys.readouterr().err
    assert f"embedded MLX server (starting now; its log: {log})" in first
    assert f"captures: {tmp_path}/cap-2" in first and "make run MODEL=org/name" in first  # the bundled model
    assert "-> http://127.0.0.1:9\n" in second and "captures: off" in second and "MODEL=org/name" not in second
