"""server/building.py: model directories appear whole or not at all, and a build that fails (or
is interrupted) leaves nothing behind."""

import os
import subprocess
import sys

import pytest

from warmturn.server.building import building, stale_siblings


def test_a_build_replaces_the_old_directory_in_one_rename(tmp_path):
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    with building(out) as tmp:
        assert tmp.parent == out.parent and tmp != out and not any(tmp.iterdir())
        (tmp / "model.safetensors").write_text("new")
        assert (out / "old.txt").exists()  # the old one serves until the rename
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_failed_or_interrupted_build_leaves_nothing(tmp_path, exc):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(exc), building(out) as tmp:
        (tmp / "half.bin").write_text("x")
        raise exc()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (out / "old.txt").read_text() == "old"


def test_leftovers_of_gone_processes_are_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    out = tmp_path / "m"
    dead = tmp_path / f"m.tmp{int(gone.stdout)}"
    live = tmp_path / f"m.tmp{os.getppid()}"  # the test runner's parent: running
    other = tmp_path / "mx.tmp1"  # another target's
    for d in (dead, live, other):
        d.mkdir()
    assert stale_siblings(out) == [dead]
    with building(out) as tmp:
        (tmp / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, other.name])
