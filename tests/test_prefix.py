"""warmturn.prefix.common_prefix_len: the one longest-common-prefix helper, on every input type
its callers pass (token lists, strings, numpy arrays, and mixtures), against the obvious loop."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from warmturn.prefix import common_prefix_len


def naive(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


tokens = st.lists(st.integers(0, 3), max_size=300)  # a small alphabet: long shared runs are common


@settings(max_examples=300, deadline=None)
@given(tokens, tokens, st.integers(0, 300))
def test_matches_the_obvious_loop(head, tail, cut):
    a, b = head, head[:cut] + tail  # a shared prefix of any length, then anything
    want = naive(a, b)
    assert common_prefix_len(a, b) == common_prefix_len(b, a) == want
    assert common_prefix_len(tuple(a), tuple(b)) == want
    assert common_prefix_len(np.array(a, np.int32), np.array(b, np.int32)) == want
    assert common_prefix_len(np.array(a, np.int64), b) == want  # mixed: the array path
    s, t = "".join(map(chr, a)), "".join(map(chr, b))
    assert common_prefix_len(s, t) == want


def test_edges_and_long_inputs():
    assert common_prefix_len([], []) == 0 and common_prefix_len("", "abc") == 0
    assert common_prefix_len([1, 2, 3], [1, 2]) == 2
    x = "a" * 10_000 + "b" + "c" * 50
    assert common_prefix_len(x, "a" * 10_000 + "d") == 10_000 and common_prefix_len(x, x) == len(x)
    long = list(range(100_000))
    for cut in (0, 1, 31, 32, 33, 4095, 65_537, 99_999):
        other = long[:cut] + [-1] + long[cut + 1 :]
        assert common_prefix_len(long, other) == cut
    assert common_prefix_len(np.arange(5)[None, :], np.arange(3)) == 3  # 1-D views of (1, n) arrays
    assert common_prefix_len("é€😀x", "é€😀y") == 3  # characters, not bytes


def test_prefix_module_imports_no_numpy():
    import subprocess
    import sys

    code = "import sys, warmturn.prefix as p; p.common_prefix_len([1], [1]); print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
