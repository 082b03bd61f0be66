"""The one connected-components helper (pipeline/components.py): batch (scipy), in pieces, and
incremental union-find agree with a plain breadth-first search, and every group is named by its
smallest member whatever order the links arrive in."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from pipeline.components import PairComponents, UnionFind, component_roots


def bfs_roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference: breadth-first search from each unvisited item in increasing order."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for x, y in zip(a.tolist(), b.tolist()):
        adj[x].append(y)
        adj[y].append(x)
    root = np.full(n, -1, dtype=np.int64)
    for start in range(n):
        if root[start] >= 0:
            continue
        root[start] = start
        todo = deque([start])
        while todo:
            for nb in adj[todo.popleft()]:
                if root[nb] < 0:
                    root[nb] = start
                    todo.append(nb)
    return root


@pytest.mark.parametrize("n,m,seed", [(1, 0, 0), (7, 0, 1), (50, 30, 2), (2000, 1500, 3), (3000, 6000, 4)])
def test_every_form_matches_breadth_first_search(n: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    expected = bfs_roots(n, a, b)
    np.testing.assert_array_equal(component_roots(n, a, b), expected)
    np.testing.assert_array_equal(component_roots(n, b[::-1], a[::-1]), expected)  # order-free
    for max_pending in (None, 1, 97):  # 1 and 97 fold the pending links many times
        pieces = PairComponents(n, max_pending=max_pending)
        for lo in range(0, m, 101):
            pieces.add(a[lo:lo + 101], b[lo:lo + 101])
        np.testing.assert_array_equal(pieces.roots(), expected)
    uf = UnionFind(n)
    for x, y in zip(a.tolist(), b.tolist()):
        uf.union(x, y)
    np.testing.assert_array_equal([uf.find(i) for i in range(n)], expected)


def test_union_find_reports_only_joining_links_and_keeps_the_smallest_name() -> None:
    uf = UnionFind(5)
    assert uf.union(3, 1) and uf.union(4, 3)
    assert not uf.union(1, 4)  # already one set: a caller records no merge
    assert [uf.find(i) for i in range(5)] == [0, 1, 2, 1, 1]
    assert uf.union(2, 4) and uf.find(3) == 1


def test_self_links_repeats_and_bad_links() -> None:
    np.testing.assert_array_equal(component_roots(4, [2, 2, 3, 3], [2, 3, 2, 3]), [0, 1, 2, 2])
    assert component_roots(0, [], []).shape == (0,)
    with pytest.raises(ValueError, match="outside"):
        component_roots(3, [0], [3])
    with pytest.raises(ValueError, match="differ in length"):
        component_roots(3, [0, 1], [2])
    pieces = PairComponents(3)
    pieces.add(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    np.testing.assert_array_equal(pieces.roots(), [0, 1, 2])
