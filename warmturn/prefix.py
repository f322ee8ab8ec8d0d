"""The one longest-common-prefix helper: token ids (the engine's admission and dedup, the prefix
cache, the renderer's system+tools prefix) and characters (the analysis' divergence point).

Two paths, chosen by the input type, because what is fast differs:

- Python lists, tuples, ``str`` and ``bytes``: slices compared in C, galloping (32, 64, 128...
  elements, so a prompt that differs early costs little), then a bisection inside the first
  unequal slice. Converting lists to numpy arrays first costs more than the whole comparison.
- numpy arrays (and anything else array-like): one vectorised comparison (``np.flatnonzero`` of
  ``a != b``); numpy is imported only then, so this module imports nothing outside the stdlib.

Measured 2026-12-07 on the project's 2-core machine under load (best of 5), two identical token
lists: 8,000 tokens 74 µs, against 910 µs for the engine's per-token loop and 1.87 ms through
``np.asarray``; 128,000 tokens 1.27 ms against 16.2 ms and 27.4 ms; a 100,000-character string
differing at 60,000: 24 µs. Reproduce with::

    python -m timeit -s "from warmturn.prefix import common_prefix_len as f; a=list(range(8000)); b=a[:]" "f(a, b)"
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_SLICEABLE = (list, tuple, str, bytes)
_FIRST_STEP = 32


def common_prefix_len(a: Sequence[Any] | Any, b: Sequence[Any] | Any) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (two sequences of token ids, two
    strings, or numpy arrays)."""
    if isinstance(a, _SLICEABLE) and isinstance(b, _SLICEABLE):
        return _sliced(a, b)
    import numpy as np

    x, y = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    m = min(len(x), len(y))
    diff = np.flatnonzero(x[:m] != y[:m])
    return int(diff[0]) if diff.size else m


def _sliced(a: Sequence[Any], b: Sequence[Any]) -> int:
    m = min(len(a), len(b))
    lo, step = 0, _FIRST_STEP
    while lo < m:
        hi = min(m, lo + step)
        if a[lo:hi] != b[lo:hi]:
            # the first difference is in [lo, hi): keep a[lo:mid] == b[lo:mid] true of lo
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if a[lo:mid] == b[lo:mid]:
                    lo = mid
                else:
                    hi = mid
            return lo
        lo, step = hi, step * 2
    return m


def branch_points(q: Sequence[Any] | Any, lengths: Iterable[int], stored: Iterable[Sequence[Any] | Any],
                  min_len: int) -> set[int]:
    """Where a new checkpoint ``q[:p]`` (p in ``lengths``) parts from a stored checkpoint inside
    both: the shared part becomes a checkpoint of its own (two sessions whose system text ends with
    a different working directory share the tools and the rest). The prefix cache's rule, written
    once for the server's store and the analysis' model of it; shared parts under ``min_len``
    tokens are not worth one."""
    stored = list(stored)
    out: set[int] = set()
    for p in lengths:
        for t in stored:
            cp = common_prefix_len(t, q[:p])
            if min_len <= cp < min(len(t), p):
                out.add(cp)
    return out

