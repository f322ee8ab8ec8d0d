"""Model directories written whole or not at all (the converted default model, the fused Read
adapter, the Hugging Face export for vLLM).

:func:`building` hands out a temporary sibling to write into and renames it over the target in
one step when the block succeeds. On any failure, Ctrl-C included, the sibling is removed; a
process killed outright leaves its sibling behind, and the next build of the same target removes
those of processes that are no longer running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_MARK = ".tmp"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings of ``out`` left by processes that are gone."""
    prefix = out.name + _MARK
    found = []
    for p in out.parent.glob(prefix + "*") if out.parent.is_dir() else []:
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            found.append(p)
    return found


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``out``; it becomes ``out`` when the block ends normally."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in stale_siblings(out):
        shutil.rmtree(old, ignore_errors=True)
    tmp = out.with_name(f"{out.name}{_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
