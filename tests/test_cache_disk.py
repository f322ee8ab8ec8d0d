"""--cache-dir files are never trusted (server/cache_disk.py): a content digest over the tensors,
a private directory, leftover temporary files cleaned. Real files written by the real store on a
tiny random llama, then edited the way an attacker or a bad disk would."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from tests.test_cache_logic import put, tiny_model
from warmturn.server.cache import PrefixCache, prefill
from warmturn.server.cache_disk import CacheDirError, DiskCache, ensure_private_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def write_checkpoint(model, directory: Path, toks: list[int], at: int = 20) -> Path:
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=directory, min_checkpoint=4)
    put(store, model, toks, checkpoints=[at])
    (f,) = directory.glob("*.safetensors")
    return f


def rewrite_tensors(path: Path, edit) -> None:
    """Edit every K/V tensor of a saved file in place, keeping its metadata (and so its digest
    field) exactly as written."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), {k: edit(v) for k, v in arrays.items()}, meta)


def logits_after(model, kv, tokens):
    out = model(mx.array([tokens]), cache=kv)
    return np.array(out[0, -1].astype(mx.float32))


TOKS = list(range(1, 24))


def test_a_saved_checkpoint_loads_and_matches_a_cold_prefill(model, tmp_path):
    write_checkpoint(model, tmp_path, TOKS)
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    kv, reused = store.fetch(TOKS)
    assert reused == 20 and store.stats()["disk_loads"] == 1 and store.stats()["disk_errors"] == 0
    cold = make_prompt_cache(model)
    prefill(model, cold, TOKS[:20])
    np.testing.assert_allclose(logits_after(model, kv, TOKS[20:]), logits_after(model, cold, TOKS[20:]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,edit", [
    ("scaled", lambda a: a * 1.5),
    ("zeroed", lambda a: mx.zeros_like(a)),
    ("one value nudged", lambda a: a + (mx.arange(a.size).reshape(a.shape) == 0).astype(a.dtype) * 1e-3),
])
def test_tampered_tensors_are_rejected_with_a_warning(model, tmp_path, caplog, name, edit):
    f = write_checkpoint(model, tmp_path, TOKS)
    # the tampering matters: the edited KV state changes the model's next-token logits
    kv_good, _meta = mx.load(str(f), return_metadata=True)
    rewrite_tensors(f, edit)
    kv_bad = mx.load(str(f))
    assert any(not mx.array_equal(kv_good[k], kv_bad[k]).item() for k in kv_good)
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    with caplog.at_level(logging.WARNING):
        kv, reused = store.fetch(TOKS)
    assert reused == 0 and kv[0].size() == 0
    assert store.stats()["disk_errors"] == 1 and store.stats()["disk_loads"] == 0
    assert any("digest" in r.getMessage() and f.name in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_a_file_without_a_digest_is_rejected(model, tmp_path, caplog):
    f = write_checkpoint(model, tmp_path, TOKS)
    arrays, meta = mx.load(str(f), return_metadata=True)
    meta = {k: v for k, v in meta.items() if not k.endswith("digest")}
    mx.save_safetensors(str(f), arrays, meta)
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    with caplog.at_level(logging.WARNING):
        assert store.fetch(TOKS)[1] == 0
    assert "digest" in caplog.text


def test_directory_is_created_private_and_files_are_0600(model, tmp_path):
    d = tmp_path / "a" / "kv"
    write_checkpoint(model, d, TOKS)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = list(d.iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    d = tmp_path / "kv"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CacheDirError, match="writable by other users"):
        ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == mode  # refused, not silently "fixed"


def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.geteuid() == 0:
        d = tmp_path / "kv"
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)  # nobody
    else:
        d = Path("/")  # owned by root, not by this user
    with pytest.raises(CacheDirError, match="owned by another user"):
        ensure_private_dir(d)


def test_a_parent_others_can_rewrite_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    (parent / "kv").mkdir(mode=0o700)
    parent.chmod(0o777)
    with pytest.raises(CacheDirError, match="without the sticky bit"):
        ensure_private_dir(parent / "kv")
    parent.chmod(0o1777)  # like /tmp: others cannot rename our directory away
    assert ensure_private_dir(parent / "kv") == (parent / "kv").resolve()


def test_a_readable_directory_of_ours_is_tightened(tmp_path, caplog):
    d = tmp_path / "kv"
    d.mkdir()
    d.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and "tightening" in caplog.text


def test_a_file_others_can_write_is_skipped(model, tmp_path, caplog):
    f = write_checkpoint(model, tmp_path, TOKS)
    f.chmod(0o666)
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=tmp_path, min_checkpoint=4)
    with caplog.at_level(logging.WARNING):
        assert store.fetch(TOKS)[1] == 0
    assert "writable by other users" in caplog.text


def test_leftover_temporary_files_of_dead_writers_are_removed(model, tmp_path):
    f = write_checkpoint(model, tmp_path, TOKS)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".{f.name}.{dead_pid}.tmp.safetensors"
    live = tmp_path / f".{f.name}.{os.getppid()}.tmp.safetensors"  # a writer still running
    for p in (stale, live):
        p.write_bytes(b"partial")
    DiskCache(tmp_path, model, f.name.split("-")[0], 1 << 24)
    assert not stale.exists() and live.exists() and f.exists()


def test_server_refuses_an_unsafe_cache_dir_at_start_up(tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    d.chmod(0o777)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "warmturn.server", "--cache-dir", str(d), "--port", "0"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert "error: cache directory" in r.stderr and "writable by other users" in r.stderr
    assert "loading" not in r.stderr  # refused before the model was loaded


def test_a_symlink_planted_at_the_temporary_name_is_never_written_through(model, tmp_path):
    """Issue 21: the temporary name was predictable (``.NAME.PID.tmp.safetensors``) and opened by
    path, so a symlink planted there made a checkpoint overwrite its target (and chmod it 0600)."""
    d = tmp_path / "kv"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    store = PrefixCache(model, max_bytes=1 << 24, cache_dir=d, min_checkpoint=4)
    model_id = store._disk.model_id
    from warmturn.server.cache_disk import token_hash

    prefix = np.asarray(TOKS[:20])
    name = f"{model_id}-20-{token_hash(prefix)}.safetensors"
    for pid in {os.getpid(), os.getppid()}:
        (d / f".{name}.{pid}.tmp.safetensors").symlink_to(victim)
    put(store, model, TOKS, checkpoints=[20])
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    written = d / name
    st = os.lstat(written)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert PrefixCache(model, max_bytes=1 << 24, cache_dir=d, min_checkpoint=4).fetch(TOKS)[1] == 20


FAULTS = r"""
import os, subprocess, sys, logging
import numpy as np
sys.path.insert(0, sys.argv[2])
from tests.test_cache_logic import tiny_model
from warmturn.server.cache_disk import DiskCache
from mlx_lm.models.cache import make_prompt_cache
from warmturn.server.cache import prefill

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
d = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k,mode=0700", "tmpfs", d], check=True)
model = tiny_model()
toks = np.arange(1, 40, dtype=np.int32)
kv = make_prompt_cache(model)
prefill(model, kv, [int(t) for t in toks])
disk = DiskCache(d, model, "m" * 16, 1 << 24)
print("full1", disk.save(toks, kv), disk.counters["disk_errors"])
print("full2", disk.save(toks, kv), disk.counters["disk_errors"])  # the same write: not tried again
print("left", sorted(os.listdir(d)))
subprocess.run(["mount", "-o", "remount,ro", d], check=True)
print("ro", disk.save(toks[:30], kv), disk.counters["disk_errors"])
"""


def test_a_full_or_read_only_cache_disk_fails_quietly_once(tmp_path):
    """A full tmpfs, then read-only (a private mount namespace: needs root and unshare): each
    write fails with one warning line, no traceback; the same write is not retried; no leftovers."""
    d = tmp_path / "kv"
    d.mkdir(mode=0o700)
    try:
        subprocess.run(["unshare", "-m", "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs unshare -m (root) for a tmpfs of its own")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", FAULTS, str(d), str(REPO)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "full1 False 1" in out and "full2 False 1" in out and "left []" in out, out
    assert "ro False 2" in out, out
    assert "Traceback" not in out and out.count("could not write") == 2, out
