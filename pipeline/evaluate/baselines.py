"""Classical instance-selection baselines that GAIS is measured against.

Two kinds (see docs/gais.md, "Baselines"):

* **Size-matched** (take per-class counts, so they compare like-for-like with GAIS):
  :func:`kmeans_nearest_mask` (per-class k-means, the member nearest each centre),
  :func:`kmedoids_mask` (per-class k-medoids, alternating / Voronoi iteration) and
  :func:`herding_mask` (per-class mean-matching herding, as in iCaRL). Random stratified
  subsets live in the harness (``random_stratified_mask``), averaged over several draws.
* **Self-sized** (choose their own reduction): :func:`cnn_mask` (Hart's condensed nearest
  neighbour) and :func:`enn_mask` (Wilson's edited nearest neighbour). Their reduction is
  whatever they produce and is reported next to their accuracy.

Every function takes scaled features ``X`` (N, d) and labels ``y`` and returns a boolean mask
over the rows. All are deterministic for a seed; every tie is broken towards the lower row
index (``np.argmin`` / ``np.argmax`` return the first extremum; sorts are stable), so neither
floating-point ties nor platform sort order can change a selection.

The ``*_selector`` factories wrap them as harness selectors ``(X, y, seed) -> mask``; the
size-matched ones use :func:`pipeline.select.gais.per_class_quota`, the very quota GAIS uses,
so counts match GAIS's class by class.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Selector = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(A), len(B)), clipped at 0 (cancellation can go below)."""
    d = (A * A).sum(1)[:, None] - 2.0 * A @ B.T + (B * B).sum(1)[None, :]
    return np.maximum(d, 0.0)


def quota_counts(y: np.ndarray, reduction: float) -> dict:
    """Per-label counts GAIS keeps at ``reduction`` (``per_class_quota``), keyed by label."""
    from pipeline.select.gais import per_class_quota

    classes, codes = np.unique(y, return_inverse=True)
    quota = per_class_quota(codes.reshape(-1), reduction)
    return {classes[c]: int(q) for c, q in enumerate(quota)}


def _per_class(y: np.ndarray, counts: dict, pick: Callable[[np.ndarray, int], np.ndarray]
               ) -> np.ndarray:
    """Apply ``pick(rows_of_class, k) -> chosen row positions`` class by class."""
    mask = np.zeros(y.shape[0], dtype=bool)
    for label in sorted(counts):
        rows = np.flatnonzero(y == label)
        k = int(counts[label])
        if k > rows.size:
            raise ValueError(f"asked for {k} rows of class {label!r}, only {rows.size}")
        if k <= 0:
            continue
        chosen = rows if k == rows.size else rows[pick(rows, k)]
        if np.unique(chosen).size != k:
            raise AssertionError(f"class {label!r}: picked {np.unique(chosen).size} of {k}")
        mask[chosen] = True
    return mask


def kmeans_centres(Xc: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn KMeans (k-means++, 4 seeded restarts, lloyd) -> (centres, labels)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=seed, algorithm="lloyd").fit(Xc)
    return km.cluster_centers_, km.labels_


def nearest_distinct(Xc: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For each centre in order, the nearest member not taken by an earlier centre."""
    d = _sq_dists(centres, Xc)
    taken = np.zeros(Xc.shape[0], dtype=bool)
    out = np.empty(centres.shape[0], dtype=np.int64)
    for j in range(centres.shape[0]):
        row = np.where(taken, np.inf, d[j])
        out[j] = int(np.argmin(row))
        taken[out[j]] = True
    return out


def kmeans_nearest_mask(X: np.ndarray, y: np.ndarray, counts: dict, seed: int = 0) -> np.ndarray:
    """Per class: k-means with k = its count; keep the member nearest each centre."""

    def pick(rows: np.ndarray, k: int) -> np.ndarray:
        centres, _ = kmeans_centres(X[rows], k, seed)
        return nearest_distinct(X[rows], centres)

    return _per_class(np.asarray(y), counts, pick)


def kmedoids_indices(Xc: np.ndarray, k: int, seed: int, max_iter: int = 50,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """k-medoids by alternation (assign to nearest medoid, move each medoid to the member
    minimising the (weighted) sum of distances in its cluster), started from the k-means
    nearest-to-centre points. Stops when the medoids stop changing. Euclidean distances."""
    n = Xc.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    D = np.sqrt(_sq_dists(Xc, Xc))
    centres, _ = kmeans_centres(Xc, k, seed)
    medoids = nearest_distinct(Xc, centres)
    for _ in range(max_iter):
        assign = np.argmin(D[:, medoids], axis=1)
        new = medoids.copy()
        for j in range(k):
            members = np.flatnonzero(assign == j)
            if members.size == 0:  # cannot happen (a medoid is nearest to itself); be safe
                continue
            cost = (D[np.ix_(members, members)] * w[members][:, None]).sum(axis=0)
            new[j] = members[int(np.argmin(cost))]
        if np.array_equal(np.sort(new), np.sort(medoids)):
            break
        medoids = new
    return medoids


def kmedoids_mask(X: np.ndarray, y: np.ndarray, counts: dict, seed: int = 0) -> np.ndarray:
    """Per class: k-medoids with k = its count (see :func:`kmedoids_indices`)."""
    return _per_class(np.asarray(y), counts,
                      lambda rows, k: kmedoids_indices(X[rows], k, seed))


def herding_indices(Xc: np.ndarray, k: int) -> np.ndarray:
    """Mean-matching herding (Welling 2009; iCaRL's exemplar rule): greedily add the member
    that brings the mean of the chosen set closest to the class mean."""
    mu = Xc.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(mu)
    available = np.ones(Xc.shape[0], dtype=bool)
    for t in range(1, k + 1):
        gap = ((mu[None, :] - (running[None, :] + Xc) / t) ** 2).sum(axis=1)
        gap[~available] = np.inf
        i = int(np.argmin(gap))
        chosen.append(i)
        available[i] = False
        running += Xc[i]
    return np.asarray(chosen, dtype=np.int64)


def herding_mask(X: np.ndarray, y: np.ndarray, counts: dict, seed: int = 0) -> np.ndarray:
    """Per class: herding with k = its count (deterministic; ``seed`` is unused)."""
    return _per_class(np.asarray(y), counts, lambda rows, k: herding_indices(X[rows], k))


def cnn_mask(X: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hart's condensed nearest neighbour (1968).

    The store starts with the first instance of each class in a seeded random order; passes
    over the data in that order add every instance the store's 1-NN misclassifies, until a
    full pass adds nothing. The result classifies the whole training set correctly (unless
    identical points carry different labels). Each point's nearest stored neighbour is
    updated incrementally, so the cost is O(N * |store|) distance evaluations.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    n = y.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    store = np.zeros(n, dtype=bool)
    best_d = np.full(n, np.inf)
    best_label = np.empty(n, dtype=y.dtype)
    best_row = np.full(n, n, dtype=np.int64)

    def add(i: int) -> None:
        store[i] = True
        d = ((X - X[i]) ** 2).sum(axis=1)
        # Strictly closer wins; at equal distance the lower row index wins (explicit tie rule).
        better = (d < best_d) | ((d == best_d) & (i < best_row))
        best_d[better] = d[better]
        best_label[better] = y[i]
        best_row[better] = i

    _, first = np.unique(y[order], return_index=True)
    for i in order[np.sort(first)]:
        add(int(i))
    changed = True
    while changed:
        changed = False
        for i in order:
            if not store[i] and best_label[i] != y[i]:
                add(int(i))
                changed = True
    return store


def enn_mask(X: np.ndarray, y: np.ndarray, k: int = 3) -> np.ndarray:
    """Wilson's edited nearest neighbour (1972): drop an instance when another class holds
    strictly more of its k nearest neighbours (itself excluded) than its own class does.

    Ties in the vote keep the instance (editing removes only clear noise). A class that
    would lose every instance keeps all of them, so no class disappears.
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    n = y.shape[0]
    if n <= k:
        return np.ones(n, dtype=bool)
    _, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1)
    _, nn = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        # Drop the point itself by identity, not by position: duplicates may come first.
        neigh = [j for j in nn[i] if j != i][:k]
        votes = np.bincount(codes[neigh], minlength=codes.max() + 1)
        own = votes[codes[i]]
        votes[codes[i]] = -1
        keep[i] = own >= votes.max()
    for c in np.unique(codes):
        members = codes == c
        if not keep[members].any():
            keep[members] = True
    return keep


# ------------------------------------------------------------------ harness selectors


def kmeans_nearest_selector(reduction: float = 0.96) -> Selector:
    return lambda X, y, seed: kmeans_nearest_mask(X, y, quota_counts(y, reduction), seed)


def kmedoids_selector(reduction: float = 0.96) -> Selector:
    return lambda X, y, seed: kmedoids_mask(X, y, quota_counts(y, reduction), seed)


def herding_selector(reduction: float = 0.96) -> Selector:
    return lambda X, y, seed: herding_mask(X, y, quota_counts(y, reduction), seed)


def random_selector(reduction: float = 0.96) -> Selector:
    """One seeded random stratified draw with GAIS's per-class counts (the harness's own
    ``random`` rows average several draws; this one exists to time and test a single draw)."""
    from pipeline.evaluate.instance_selection import random_stratified_mask

    return lambda X, y, seed: random_stratified_mask(
        y, quota_counts(y, reduction), np.random.default_rng(seed))


def cnn_selector() -> Selector:
    return lambda X, y, seed: cnn_mask(X, y, seed)


def enn_selector(k: int = 3) -> Selector:
    return lambda X, y, seed: enn_mask(X, y, k)


SIZE_MATCHED: dict[str, Callable[[float], Selector]] = {
    "kmeans_nearest": kmeans_nearest_selector,
    "kmedoids": kmedoids_selector,
    "herding": herding_selector,
}
SELF_SIZED: dict[str, Callable[[], Selector]] = {"cnn": cnn_selector, "enn": enn_selector}
