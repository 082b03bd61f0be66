"""Semantic (near-duplicate) deduplication in the style of SemDeDup (Abbas et al., 2023).

1. Spherical k-means (``faiss.Kmeans``, seeded) splits the data into clusters.
2. Inside each cluster every pair with cosine >= ``threshold`` is found exactly, by blocked
   matrix products (tiles of ``block_size`` x ``block_size``, so memory is bounded by the tile,
   not by the cluster).
3. Those pairs form duplicate groups (connected components, scipy's, through
   :class:`pipeline.components.PairComponents`: a ~ b ~ c puts a and c together even when
   cos(a, c) < threshold).
4. One row per group is kept: the first (lowest position) or the one with the highest quality
   score (ties to the lowest position).

Pairs split across two clusters are missed, as in SemDeDup; ``assign=2`` also places each row
in its second-nearest cluster, which catches most of those at about twice the pair cost.
Exact duplicates by content hash are handled elsewhere; this finds near-duplicates.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

import faiss
import numpy as np

from pipeline.components import PairComponents
from pipeline.index.device import resolve_use_gpu
from pipeline.index.faiss_index import as_float32_matrix, l2_normalize

KeepRule = Literal["first", "quality"]

KMEANS_POINTS_PER_CENTROID = 256  # training sample per centroid, as FAISS defaults to


@dataclass(frozen=True)
class SemDedupReport:
    n_items: int
    n_kept: int
    n_removed: int
    n_groups: int  # duplicate groups: components with at least two rows
    group_size_histogram: dict[int, int]  # group size (>= 2) -> number of such groups
    threshold: float
    keep_rule: str
    n_clusters: int
    assign: int
    cluster_size_max: int
    cluster_size_median: float
    n_pairs: int  # pairs >= threshold found (a pair met in two clusters counts twice)
    kmeans_seconds: float
    pairs_seconds: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["group_size_histogram"] = {str(k): v for k, v in self.group_size_histogram.items()}
        return out


@dataclass
class SemDedupResult:
    keep: np.ndarray  # bool (n,): rows to keep
    group: np.ndarray  # int64 (n,): position of the kept row of each row's group (self if kept)
    cluster: np.ndarray  # int64 (n,): nearest k-means cluster of each row
    report: SemDedupReport

    def duplicate_groups(self) -> list[np.ndarray]:
        """Positions of every group with >= 2 rows, each sorted, groups ordered by kept row."""
        order = np.argsort(self.group, kind="stable")
        grouped = self.group[order]
        bounds = np.flatnonzero(np.diff(grouped)) + 1
        return [g for g in np.split(order, bounds) if len(g) > 1]


def choose_n_clusters(n: int) -> int:
    """~sqrt(n): k-means costs grow with n * clusters and pair search with n^2 / clusters, so
    their sum is smallest near sqrt(n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return max(1, min(n, round(math.sqrt(n))))


def _kmeans_clusters(
    vectors: np.ndarray, n_clusters: int, assign: int, niter: int, seed: int, batch_size: int, use_gpu: bool
) -> np.ndarray:
    n, d = vectors.shape
    rng = np.random.default_rng(seed)
    n_train = min(n, KMEANS_POINTS_PER_CENTROID * n_clusters)
    train_pos = np.sort(rng.choice(n, size=n_train, replace=False))
    train = l2_normalize(as_float32_matrix(vectors[train_pos], d))
    kmeans = faiss.Kmeans(
        d,
        n_clusters,
        niter=niter,
        seed=seed,
        spherical=True,
        max_points_per_centroid=KMEANS_POINTS_PER_CENTROID,
        min_points_per_centroid=1,  # small inputs: let clusters be small rather than warn
        gpu=use_gpu,
    )
    kmeans.train(train)
    del train
    labels = np.empty((n, assign), dtype=np.int64)
    for start in range(0, n, batch_size):
        block = l2_normalize(as_float32_matrix(vectors[start : start + batch_size], d))
        _, labels[start : start + len(block)] = kmeans.index.search(block, assign)
    return labels


def _pairs_in_cluster(
    members: np.ndarray, vectors: np.ndarray, threshold: float, block_size: int, sets: PairComponents
) -> int:
    """Link every pair of ``members`` with cosine >= threshold; returns the pair count."""
    x = l2_normalize(as_float32_matrix(vectors[members], vectors.shape[1]))
    m = len(members)
    found = 0
    for i in range(0, m, block_size):
        a = x[i : i + block_size]
        for j in range(i, m, block_size):
            sims = a @ x[j : j + block_size].T
            hits = sims >= threshold
            if i == j:
                hits = np.triu(hits, k=1)  # each unordered pair once, never (p, p)
            hit_r, hit_c = np.nonzero(hits)
            if len(hit_r):
                sets.add(members[i + hit_r], members[j + hit_c])
                found += len(hit_r)
    return found


def semdedup(
    vectors: np.ndarray,
    threshold: float = 0.95,
    *,
    keep: KeepRule = "first",
    quality: np.ndarray | None = None,
    n_clusters: int | None = None,
    cluster_labels: np.ndarray | None = None,
    assign: int = 1,
    kmeans_iter: int = 20,
    seed: int = 0,
    block_size: int = 2_048,
    batch_size: int = 65_536,
    use_gpu: bool | None = None,
) -> SemDedupResult:
    """Group rows whose embeddings have cosine >= ``threshold`` and keep one per group.

    ``vectors``: (n, d) array (a memmap works; rows are read per cluster). They need not be
    normalised. ``keep="quality"`` needs ``quality`` (n,) - higher is better, NaN is worst.
    ``cluster_labels`` (n,) skips k-means (e.g. reuse an IVF index's list assignment).
    ``n_clusters`` defaults to :func:`choose_n_clusters`.
    """
    t_start = time.perf_counter()
    if not hasattr(vectors, "ndim") or vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (n, d), got {getattr(vectors, 'shape', type(vectors))}")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("no vectors to deduplicate")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if keep not in ("first", "quality"):
        raise ValueError(f"keep={keep!r}: expected 'first' or 'quality'")
    if keep == "quality":
        if quality is None:
            raise ValueError("keep='quality' needs a quality array (one score per row, higher is better)")
        quality = np.asarray(quality, dtype=np.float64)
        if quality.shape != (n,):
            raise ValueError(f"quality has shape {quality.shape}, expected ({n},)")
    if block_size < 1 or batch_size < 1 or assign < 1:
        raise ValueError("block_size, batch_size and assign must all be >= 1")

    t0 = time.perf_counter()
    if cluster_labels is not None:
        labels = np.asarray(cluster_labels, dtype=np.int64).reshape(n, -1)
        if labels.shape[0] != n or (labels < 0).any():
            raise ValueError(f"cluster_labels must hold one non-negative label per row ({n} rows)")
        k_used = int(labels.max()) + 1
    else:
        k_used = choose_n_clusters(n) if n_clusters is None else int(n_clusters)
        if not 1 <= k_used <= n:
            raise ValueError(f"n_clusters={k_used} must be between 1 and the number of rows ({n})")
        assign = min(assign, k_used)
        if k_used == 1:
            labels = np.zeros((n, 1), dtype=np.int64)
        else:
            labels = _kmeans_clusters(vectors, k_used, assign, kmeans_iter, seed, batch_size, resolve_use_gpu(use_gpu))
    kmeans_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    sets = PairComponents(n)
    flat_labels = labels.ravel()
    flat_rows = np.repeat(np.arange(n, dtype=np.int64), labels.shape[1])
    order = np.argsort(flat_labels, kind="stable")  # rows of a cluster stay in position order
    sorted_labels = flat_labels[order]
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    n_pairs = 0
    for members in np.split(flat_rows[order], bounds):
        if len(members) > 1:
            n_pairs += _pairs_in_cluster(members, vectors, threshold, block_size, sets)
    pairs_seconds = time.perf_counter() - t0

    root = sets.roots()  # smallest position of each component
    if keep == "first":
        representative = root
    else:
        q = np.where(np.isnan(quality), -np.inf, quality)  # type: ignore[arg-type]
        by_group = np.lexsort((np.arange(n), -q, root))  # group, best quality, lowest position
        grouped_root = root[by_group]
        first_in_group = np.ones(n, dtype=bool)
        first_in_group[1:] = grouped_root[1:] != grouped_root[:-1]
        best_of_root = np.empty(n, dtype=np.int64)
        best_of_root[grouped_root[first_in_group]] = by_group[first_in_group]
        representative = best_of_root[root]
    keep_mask = representative == np.arange(n)

    sizes = np.bincount(root, minlength=n)
    dup_sizes = sizes[sizes > 1]
    cluster_sizes = np.bincount(labels[:, 0], minlength=k_used)
    report = SemDedupReport(
        n_items=n,
        n_kept=int(keep_mask.sum()),
        n_removed=int(n - keep_mask.sum()),
        n_groups=int(len(dup_sizes)),
        group_size_histogram=dict(sorted(Counter(dup_sizes.tolist()).items())),
        threshold=float(threshold),
        keep_rule=keep,
        n_clusters=k_used,
        assign=int(labels.shape[1]),
        cluster_size_max=int(cluster_sizes.max()),
        cluster_size_median=float(np.median(cluster_sizes)),
        n_pairs=int(n_pairs),
        kmeans_seconds=round(kmeans_seconds, 4),
        pairs_seconds=round(pairs_seconds, 4),
        seconds=round(time.perf_counter() - t_start, 4),
    )
    return SemDedupResult(keep=keep_mask, group=representative, cluster=labels[:, 0].copy(), report=report)
