"""Connected components: the one way items joined by pairwise links are grouped.

Two shapes of the same question, one rule for naming a group (its smallest member, so that the
result does not depend on the order in which links arrive):

* All links known before grouping (near-duplicate pairs in :mod:`pipeline.index.semdedup`):
  :func:`component_roots` hands them to scipy's ``connected_components``; :class:`PairComponents`
  does the same for links that arrive in pieces (one cluster tile at a time), with bounded memory.
* Links decided one at a time, where whether a pair is still merged depends on the merges before
  it (the tag and concept vocabularies report each merge that joined two groups, and skip or set
  aside pairs already joined): :class:`UnionFind`. A batch graph algorithm cannot answer "were
  these two already together when this pair came up?", so this one stays incremental.

Numpy and scipy only (the annotate and index libraries both use it).
"""

from __future__ import annotations

import numpy as np


def component_roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest member of the connected component of each of ``n`` items, given links a[k] -- b[k].

    Links are undirected; repeated links and self-links are allowed.
    """
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"link ends differ in length: {a.shape[0]} and {b.shape[0]}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError(f"links name items outside 0..{n - 1}")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if not len(a):
        return np.arange(n, dtype=np.int64)
    # scipy is imported here, not at the top: the vocabularies use only UnionFind and stay light
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    graph = sp.coo_matrix((np.ones(len(a), dtype=np.float64), (a, b)), shape=(n, n))
    n_comp, label = connected_components(graph, directed=False)
    smallest = np.full(n_comp, n, dtype=np.int64)
    np.minimum.at(smallest, label, np.arange(n, dtype=np.int64))
    return smallest[label]


class PairComponents:
    """Components over links added in pieces (:meth:`add`), read once at the end (:meth:`roots`).

    Pending links are folded into the components whenever more than ``max_pending`` of them wait
    (by default 4n, within 64K..16M), so memory stays O(n + max_pending) however many links
    arrive. A fold costs O(n + pending), so up to n = 4M items the total work is proportional to
    the links; past that, folds come every 16M new links. Links already inside a found component
    are dropped on arrival, so dense groups fold rarely.
    """

    def __init__(self, n: int, max_pending: int | None = None) -> None:
        self.n = int(n)
        self.max_pending = (min(max(4 * self.n, 1 << 16), 1 << 24) if max_pending is None
                            else max(1, int(max_pending)))
        self._roots = np.arange(self.n, dtype=np.int64)
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._pending = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"link ends differ in length: {a.shape[0]} and {b.shape[0]}")
        # Links inside a component already found add nothing: drop them here (two gathers), so
        # dense groups, whose pairs are mostly such repeats, fold rarely.
        ra, rb = self._roots[a], self._roots[b]
        fresh = ra != rb
        if not fresh.any():
            return
        self._a.append(ra[fresh])
        self._b.append(rb[fresh])
        self._pending += int(fresh.sum())
        if self._pending > self.max_pending:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        # the components found so far, as one link from each member to its root
        joined = np.flatnonzero(self._roots != np.arange(self.n))
        a = np.concatenate([*self._a, joined])
        b = np.concatenate([*self._b, self._roots[joined]])
        self._a, self._b, self._pending = [], [], 0
        self._roots = component_roots(self.n, a, b)

    def roots(self) -> np.ndarray:
        """Smallest member of the component of every item (a new array)."""
        self._fold()
        return self._roots.copy()


class UnionFind:
    """Incremental union-find over ``n`` items; a set's representative is its smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        """Join the sets of ``a`` and ``b``; False when they were already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return True
