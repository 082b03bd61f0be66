"""Sparse label graph W for MIG: cosine similarity between label strings, thresholded.

W is K x K, symmetric, float64, CSR with sorted indices, diagonal exactly 1 and off-diagonal
entries only where the similarity is >= the threshold. Similarities are computed in row chunks
over the upper triangle only, so memory stays O(chunk x K + edges) and both halves of the matrix
hold bit-identical values (computing both halves separately can disagree in the last bit and then
fall on different sides of the threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

EmbedFn = Callable[[list[str]], np.ndarray]

EDGE_COLUMNS = ("label_a", "label_b", "similarity")


@dataclass(frozen=True)
class DegreeStats:
    """Neighbours per label (diagonal excluded) of a thresholded graph."""

    threshold: float | None
    n_labels: int
    n_edges: int  # undirected off-diagonal pairs
    mean_degree: float
    median_degree: float
    max_degree: int
    isolated_fraction: float  # labels with no neighbour at all

    def as_row(self) -> str:
        t = "-" if self.threshold is None else f"{self.threshold:.2f}"
        return (
            f"T={t}  labels={self.n_labels}  edges={self.n_edges}  mean deg={self.mean_degree:.2f}  "
            f"median deg={self.median_degree:.1f}  max deg={self.max_degree}  "
            f"isolated={100 * self.isolated_fraction:.1f}%"
        )


@dataclass(frozen=True)
class LabelGraph:
    """Vocabulary (label id -> string) and the K x K similarity graph over it."""

    labels: tuple[str, ...]
    W: sp.csr_matrix
    threshold: float | None = None
    dropped_edges: int = 0  # edge-list rows naming labels outside the vocabulary

    def __post_init__(self) -> None:
        k = len(self.labels)
        if self.W.shape != (k, k):
            raise ValueError(f"W has shape {self.W.shape} but the vocabulary has {k} labels.")

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    def index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def degree_stats(self) -> DegreeStats:
        return degree_stats(self.W, self.threshold)


def degree_stats(W: sp.spmatrix, threshold: float | None = None) -> DegreeStats:
    W = sp.csr_matrix(W)
    k = W.shape[0]
    off = W - sp.diags(W.diagonal())
    off.eliminate_zeros()
    degrees = np.diff(off.indptr)
    if k == 0:
        return DegreeStats(threshold, 0, 0, 0.0, 0.0, 0, 0.0)
    return DegreeStats(
        threshold=threshold,
        n_labels=k,
        n_edges=int(off.nnz // 2),
        mean_degree=float(degrees.mean()),
        median_degree=float(np.median(degrees)),
        max_degree=int(degrees.max()),
        isolated_fraction=float(np.mean(degrees == 0)),
    )


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise TypeError(f"Label at position {i} is {type(label).__name__}, expected str.")
        if label in seen:
            raise ValueError(
                f"Label {label!r} appears twice in the vocabulary (positions {seen[label]} and {i}); "
                "pass distinct labels."
            )
        seen[label] = i
    return labels


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0.0 or threshold > 1.0:
        raise ValueError(
            f"Similarity threshold must be in (0, 1], got {threshold}. A threshold <= 0 would make "
            "the graph dense (every pair of labels connected)."
        )
    return threshold


def normalise_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"Embeddings must be 2-D (labels x dim), got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("Embeddings contain NaN or inf.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        bad = np.flatnonzero(norms[:, 0] == 0)[:5].tolist()
        raise ValueError(f"Embeddings of labels at positions {bad} are all zero; cannot take cosine.")
    return np.ascontiguousarray(x / norms)


def _upper_edges(unit: np.ndarray, threshold: float, chunk_size: int) -> tuple[np.ndarray, ...]:
    k = unit.shape[0]
    rows, cols, vals = [], [], []
    for start in range(0, k, chunk_size):
        stop = min(start + chunk_size, k)
        # Only columns >= start: each unordered pair is computed once, in exactly one chunk.
        sims = unit[start:stop] @ unit[start:].T
        r, c = np.nonzero(sims >= threshold)
        keep = (c + start) > (r + start)
        r, c = r[keep], c[keep]
        rows.append(r + start)
        cols.append(c + start)
        vals.append(np.minimum(sims[r, c].astype(np.float64), 1.0))
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def _assemble(k: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> sp.csr_matrix:
    diag = np.arange(k, dtype=np.int64)
    all_rows = np.concatenate([rows, cols, diag])
    all_cols = np.concatenate([cols, rows, diag])
    all_vals = np.concatenate([vals, vals, np.ones(k, dtype=np.float64)])
    W = sp.csr_matrix((all_vals, (all_rows, all_cols)), shape=(k, k), dtype=np.float64)
    W.sum_duplicates()
    W.sort_indices()
    return W


def label_graph_from_embeddings(
    labels: Sequence[str],
    embeddings: np.ndarray,
    threshold: float,
    chunk_size: int = 2048,
) -> LabelGraph:
    """Graph from one embedding row per label (normalised here if not already)."""
    labels = _check_labels(labels)
    threshold = _check_threshold(threshold)
    unit = normalise_rows(embeddings)
    if unit.shape[0] != len(labels):
        raise ValueError(f"{unit.shape[0]} embedding rows for {len(labels)} labels; they must match.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    rows, cols, vals = _upper_edges(unit, threshold, chunk_size)
    return LabelGraph(labels, _assemble(len(labels), rows, cols, vals), threshold)


def label_graph_from_texts(
    labels: Sequence[str],
    embed: EmbedFn,
    threshold: float,
    chunk_size: int = 2048,
) -> LabelGraph:
    """Embed the label strings with ``embed`` (list[str] -> (K, d) array) and threshold cosine."""
    labels = _check_labels(labels)
    vectors = np.asarray(embed(list(labels)))
    return label_graph_from_embeddings(labels, vectors, threshold, chunk_size)


def stored_label_embedder(store: str | Path | None = None) -> EmbedFn:
    """The default label embedder (the bundled MiniLM) through a stored text-vector cache.

    Label names recur on every run, so their vectors are kept (``pipeline.embed.text_cache``) in
    ``store``, a catalog root, or without one in ``$THRESHER_CACHE`` (``~/.cache/thresher``), and
    the model is loaded only for names the store does not hold yet: a re-run over the same labels
    loads no model at all.
    """

    def embed(texts: list[str]) -> np.ndarray:
        from pipeline.embed.text_cache import text_vectors
        from pipeline.embed.tiers import cache_root

        return text_vectors(cache_root() if store is None else store, texts)

    return embed


def degree_sweep(
    embeddings: np.ndarray, thresholds: Iterable[float], chunk_size: int = 2048
) -> list[DegreeStats]:
    """Degree statistics for several thresholds from one pass of similarities per threshold.

    Use it to choose T for an embedder: similarity scales differ between models (the paper's
    T = 0.9 is for E5-Mistral-7B).
    """
    unit = normalise_rows(embeddings)
    labels = [str(i) for i in range(unit.shape[0])]
    thresholds = sorted(float(t) for t in thresholds)
    if not thresholds:
        return []
    low = _check_threshold(thresholds[0])
    rows, cols, vals = _upper_edges(unit, low, chunk_size)
    out = []
    for t in thresholds:
        keep = vals >= _check_threshold(t)
        W = _assemble(len(labels), rows[keep], cols[keep], vals[keep])
        out.append(degree_stats(W, t))
    return out


def label_graph_from_edges(
    labels: Sequence[str],
    label_a: Sequence[str],
    label_b: Sequence[str],
    similarity: Sequence[float] | np.ndarray,
    threshold: float | None = None,
) -> LabelGraph:
    """Graph over ``labels`` from an explicit edge list (label_a, label_b, similarity).

    Edges are undirected: (a, b) also sets (b, a); if a pair is listed more than once the largest
    similarity wins. Self-edges are ignored (the diagonal is always 1). Rows naming a label not in
    ``labels`` are dropped and counted in ``LabelGraph.dropped_edges``; vocabulary labels with no
    edge become isolated nodes. With ``threshold`` set, edges below it are dropped too.
    """
    labels = _check_labels(labels)
    sims = np.asarray(similarity, dtype=np.float64)
    label_a, label_b = list(label_a), list(label_b)
    if not (len(label_a) == len(label_b) == sims.shape[0]):
        raise ValueError(
            f"Edge columns differ in length: label_a={len(label_a)}, label_b={len(label_b)}, "
            f"similarity={sims.shape[0]}."
        )
    if sims.size and (not np.all(np.isfinite(sims)) or sims.min() < 0.0 or sims.max() > 1.0 + 1e-6):
        raise ValueError("Edge similarities must be finite and in [0, 1] (cosine of a kept edge).")
    if threshold is not None:
        threshold = _check_threshold(threshold)
    lookup = {label: i for i, label in enumerate(labels)}
    a = np.fromiter((lookup.get(x, -1) for x in label_a), dtype=np.int64, count=len(label_a))
    b = np.fromiter((lookup.get(x, -1) for x in label_b), dtype=np.int64, count=len(label_b))
    known = (a >= 0) & (b >= 0)
    dropped = int(np.count_nonzero(~known))
    keep = known & (a != b) & (sims > 0.0)
    if threshold is not None:
        keep &= sims >= threshold
    a, b, s = a[keep], b[keep], np.minimum(sims[keep], 1.0)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    k = len(labels)
    # Collapse repeated pairs to their maximum before mirroring.
    key = lo * k + hi
    order = np.lexsort((-s, key))
    key, s = key[order], s[order]
    first = np.ones(key.shape[0], dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, s = key[first], s[first]
    W = _assemble(k, key // k, key % k, s)
    return LabelGraph(labels, W, threshold, dropped_edges=dropped)


def read_edge_parquet(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read (label_a, label_b, similarity) columns from a Parquet edge list."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in EDGE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: edge list lacks column(s) {missing}; expected columns {list(EDGE_COLUMNS)}, "
            f"found {table.column_names}."
        )
    return (
        [str(x) for x in table.column("label_a").to_pylist()],
        [str(x) for x in table.column("label_b").to_pylist()],
        np.asarray(table.column("similarity").to_numpy(zero_copy_only=False), dtype=np.float64),
    )


def label_graph_from_edge_parquet(
    labels: Sequence[str], path: str | Path, threshold: float | None = None
) -> LabelGraph:
    a, b, s = read_edge_parquet(path)
    return label_graph_from_edges(labels, a, b, s, threshold)
