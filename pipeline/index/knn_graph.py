"""k-nearest-neighbour graphs over every row of an index, as sparse edge lists.

Rows are queried ``batch_size`` at a time, so memory is one query batch plus the growing edge
arrays (``n * k`` edges: 20 bytes each). The exact graph (:func:`exact_knn_graph`) is the
baseline that approximate (IVF/HNSW) graphs and graph-based selection (GAIS) are judged against.

Edge weights ``sim``: the inner product (cosine on normalised vectors) for ``metric="ip"``;
for ``metric="l2"`` the negated squared L2 distance, so that larger always means closer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from pipeline.index.faiss_index import (
    FaissIndex,
    IndexSpec,
    VectorInput,
    build_index,
    open_source,
)

GraphMethod = Literal["auto", "search", "ivf_lists"]

# "auto" uses ivf_lists only when lists are long enough for the per-list matrix products to
# beat per-row scans: measured 0.74x at 50k rows (56 rows/list), 2.3x at 200k (112 rows/list)
# and 5.5x at 1M (250 rows/list) on benchmarks/knn_dedup.py.
MIN_MEAN_LIST_SIZE_FOR_LISTS = 100


@dataclass
class KnnGraph:
    """Directed edges ``src -> dst`` with weight ``sim``; ``src`` ascending, then best first.

    After symmetrisation edges are sorted by (src, dst) and every edge has its reverse.
    """

    src: np.ndarray  # int64 (E,)
    dst: np.ndarray  # int64 (E,)
    sim: np.ndarray  # float32 (E,)
    n: int
    k: int
    metric: str
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not (len(self.src) == len(self.dst) == len(self.sim)):
            raise ValueError(f"edge arrays differ in length: {len(self.src)}, {len(self.dst)}, {len(self.sim)}")

    @property
    def num_edges(self) -> int:
        return int(len(self.src))

    def to_csr(self) -> sp.csr_matrix:
        """(n, n) CSR matrix with ``sim`` at (src, dst). Entries with sim == 0 are still stored."""
        return sp.csr_matrix((self.sim, (self.src, self.dst)), shape=(self.n, self.n))

    def neighbors(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(dst, sim) of one row's out-edges."""
        lo, hi = np.searchsorted(self.src, [row, row + 1])
        return self.dst[lo:hi], self.sim[lo:hi]

    def symmetrized(self) -> KnnGraph:
        return symmetrize_graph(self)


def _drop_self(
    scores: np.ndarray, positions: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row remove the row itself, or the worst result when the row is
    absent (approximate indexes, or exact duplicates outranking it), leaving k per row."""
    is_self = positions == rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False
    width = positions.shape[1] - 1
    return (
        scores[keep].reshape(len(rows), width)[:, :k],
        positions[keep].reshape(len(rows), width)[:, :k],
    )


def knn_graph(
    index: FaissIndex,
    vectors: VectorInput | None = None,
    k: int = 10,
    *,
    batch_size: int = 8_192,
    symmetrize: bool = False,
    column: str = "embedding",
    method: GraphMethod = "auto",
    list_probes: int | None = None,
) -> KnnGraph:
    """k nearest neighbours (self excluded) of every row of ``index``.

    ``method="search"`` asks the index for each row's k+1 nearest rows, ``batch_size`` rows at a
    time. ``vectors`` are then the indexed vectors in row order (array, shard paths, ...; see
    ``open_source``); when omitted they are reconstructed from the index, which is exact for
    flat/HNSW/IVF-Flat and approximate for IVF-PQ.

    ``method="ivf_lists"`` (IVF-Flat on CPU only) works list by list instead: the rows of one
    inverted list are compared, by one matrix product, with every row of the ``list_probes``
    lists nearest to that list's centroid (default ``spec.nprobe``). Same candidates per row as
    probing by list rather than by row, but compute-bound GEMMs instead of memory-bound scans;
    ``vectors`` is ignored because the lists hold the vectors. ``method="auto"`` picks it
    when it applies and lists hold at least 100 rows on average (shorter lists make GEMMs
    too small to pay off), else ``"search"``.

    Rows with fewer than k candidates get fewer edges. ``symmetrize=True`` returns the union graph.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if method not in ("auto", "search", "ivf_lists"):
        raise ValueError(f"method={method!r}: expected 'auto', 'search' or 'ivf_lists'")
    lists_ok = index.spec.kind == "ivf_flat" and not index.on_gpu
    if method == "ivf_lists" and not lists_ok:
        raise ValueError(
            f"method='ivf_lists' needs an ivf_flat index on CPU, got kind={index.spec.kind}, "
            f"on_gpu={index.on_gpu}; use method='search'"
        )
    long_lists = lists_ok and index.n >= MIN_MEAN_LIST_SIZE_FOR_LISTS * index.spec.nlist
    if method == "ivf_lists" or (method == "auto" and long_lists):
        graph = _ivf_list_graph(index, k, list_probes or index.spec.nprobe, row_block=batch_size)
        return symmetrize_graph(graph) if symmetrize else graph
    n = index.n
    src_parts: list[np.ndarray] = []
    dst_parts: list[np.ndarray] = []
    sim_parts: list[np.ndarray] = []

    def batches() -> Any:
        if vectors is None:
            for start in range(0, n, batch_size):
                yield start, index.reconstruct(start, start + batch_size)
            return
        source = open_source(vectors, column=column)
        try:
            if source.n != n or source.d != index.d:
                raise ValueError(
                    f"vectors are {source.n}x{source.d} but the index holds {n}x{index.d}; "
                    "pass the same vectors, in the same order, that were indexed"
                )
            yield from source.iter_batches(batch_size)
        finally:
            if source is not vectors:
                source.close()

    for start, batch in batches():
        rows = np.arange(start, start + len(batch), dtype=np.int64)
        scores, positions = index.search_positions(batch, k + 1)
        scores, positions = _drop_self(scores, positions, rows, k)
        valid = positions >= 0
        src_parts.append(np.broadcast_to(rows[:, None], positions.shape)[valid])
        dst_parts.append(positions[valid].astype(np.int64, copy=False))
        sim = scores[valid].astype(np.float32, copy=False)
        sim_parts.append(-sim if index.metric == "l2" else sim)

    graph = KnnGraph(
        src=np.concatenate(src_parts) if src_parts else np.empty(0, np.int64),
        dst=np.concatenate(dst_parts) if dst_parts else np.empty(0, np.int64),
        sim=np.concatenate(sim_parts) if sim_parts else np.empty(0, np.float32),
        n=n,
        k=k,
        metric=index.metric,
    )
    return symmetrize_graph(graph) if symmetrize else graph


def _topk_merge(
    best_s: np.ndarray, best_i: np.ndarray, new_s: np.ndarray, new_i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k largest of a running best set and a new block, row by row."""
    cand_s = np.concatenate([best_s, new_s], axis=1)
    cand_i = np.concatenate([best_i, new_i], axis=1)
    if cand_s.shape[1] <= k:
        return cand_s, cand_i
    top = np.argpartition(cand_s, -k, axis=1)[:, -k:]  # no negated copy of the block
    return np.take_along_axis(cand_s, top, axis=1), np.take_along_axis(cand_i, top, axis=1)


def _ivf_list_graph(index: FaissIndex, k: int, probes: int, *, row_block: int, col_block: int = 32_768) -> KnnGraph:
    ivf = faiss.extract_index_ivf(index.index)
    invlists = ivf.invlists
    nlist, d = ivf.nlist, ivf.d
    probes = max(1, min(probes, nlist))
    metric = index.metric
    # zero-copy views of each list's vectors and row ids (IVF-Flat codes are raw float32 rows)
    sizes = np.array([invlists.list_size(lst) for lst in range(nlist)], dtype=np.int64)
    vecs: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for lst in range(nlist):
        size = int(sizes[lst])
        if size == 0:
            vecs.append(np.empty((0, d), np.float32))
            ids.append(np.empty(0, np.int64))
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size)
        vecs.append(codes.view(np.float32).reshape(size, d))
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).view(np.int64))
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    _, near = ivf.quantizer.search(centroids, probes)
    sq = [(v * v).sum(axis=1) for v in vecs] if metric == "l2" else None

    src_parts: list[np.ndarray] = []
    dst_parts: list[np.ndarray] = []
    sim_parts: list[np.ndarray] = []
    for lst in np.flatnonzero(sizes):
        # own list first, so that row r of this list sits at candidate column r (self-exclusion)
        others = [int(p) for p in near[lst] if p >= 0 and p != lst and sizes[p]]
        order = [int(lst)] + others
        cand = np.concatenate([vecs[p] for p in order]) if others else vecs[lst]
        cand_ids = np.concatenate([ids[p] for p in order]) if others else ids[lst]
        cand_sq = np.concatenate([sq[p] for p in order]) if sq is not None else None
        q_all = vecs[lst]
        for r0 in range(0, len(q_all), row_block):
            q = q_all[r0 : r0 + row_block]
            m = len(q)
            best_s = np.full((m, 0), -np.inf, np.float32)
            best_i = np.full((m, 0), -1, np.int64)
            for c0 in range(0, len(cand), col_block):
                sims = q @ cand[c0 : c0 + col_block].T
                if cand_sq is not None:  # larger-is-better: negated squared distance
                    sims = 2 * sims - cand_sq[c0 : c0 + col_block][None, :] - sq[lst][r0 : r0 + m, None]
                rows = np.arange(m)
                self_col = r0 + rows - c0
                inside = (self_col >= 0) & (self_col < sims.shape[1])
                sims[rows[inside], self_col[inside]] = -np.inf
                col_ids = np.broadcast_to(cand_ids[c0 : c0 + col_block], sims.shape)
                best_s, best_i = _topk_merge(best_s, best_i, sims.astype(np.float32, copy=False), col_ids, k)
            valid = np.isfinite(best_s)
            src_parts.append(np.broadcast_to(ids[lst][r0 : r0 + m, None], best_s.shape)[valid])
            dst_parts.append(best_i[valid])
            sim_parts.append(best_s[valid])

    src = np.concatenate(src_parts) if src_parts else np.empty(0, np.int64)
    dst = np.concatenate(dst_parts) if dst_parts else np.empty(0, np.int64)
    sim = np.concatenate(sim_parts) if sim_parts else np.empty(0, np.float32)
    order = np.lexsort((-sim, src))  # same layout as the search path: by row, best first
    return KnnGraph(src=src[order], dst=dst[order], sim=sim[order], n=index.n, k=k, metric=metric)


def exact_knn_graph(
    vectors: VectorInput,
    k: int = 10,
    *,
    metric: str = "ip",
    normalize: bool | None = None,
    batch_size: int = 8_192,
    symmetrize: bool = False,
    column: str = "embedding",
) -> KnnGraph:
    """Exact (brute-force, FAISS flat) kNN graph: the reference for approximate graphs."""
    source = open_source(vectors, column=column)
    try:
        spec = IndexSpec(kind="flat", metric=metric, normalize=normalize)  # type: ignore[arg-type]
        index = build_index(source, spec=spec, recall_queries=0, use_gpu=None)
        return knn_graph(index, source, k, batch_size=batch_size, symmetrize=symmetrize)
    finally:
        if source is not vectors:
            source.close()


def symmetrize_graph(graph: KnnGraph) -> KnnGraph:
    """Union of the graph and its reverse: i~j when either lists the other. A pair listed both
    ways keeps the larger sim (equal anyway up to float rounding for exact indexes)."""
    src = np.concatenate([graph.src, graph.dst])
    dst = np.concatenate([graph.dst, graph.src])
    sim = np.concatenate([graph.sim, graph.sim])
    order = np.lexsort((-sim, dst, src))  # per (src, dst): best sim first
    src, dst, sim = src[order], dst[order], sim[order]
    first = np.ones(len(src), dtype=bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    return KnnGraph(
        src=src[first], dst=dst[first], sim=sim[first], n=graph.n, k=graph.k, metric=graph.metric, symmetric=True
    )


def write_edges_parquet(
    graph: KnnGraph,
    path: str | os.PathLike[str],
    *,
    sample_ids: np.ndarray | None = None,
    row_group_size: int = 1_000_000,
) -> Path:
    """Write columns src, dst (int64), sim (float32) and, given ``sample_ids``, src_id/dst_id
    strings. Graph facts (n, k, metric, symmetric) go in the file's key-value metadata.
    Written to a temporary name and moved into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, pa.Array] = {
        "src": pa.array(graph.src, type=pa.int64()),
        "dst": pa.array(graph.dst, type=pa.int64()),
        "sim": pa.array(graph.sim, type=pa.float32()),
    }
    if sample_ids is not None:
        ids = np.asarray(sample_ids, dtype=object)
        if len(ids) != graph.n:
            raise ValueError(f"{len(ids)} sample ids for a graph over {graph.n} rows")
        columns["src_id"] = pa.array(ids[graph.src].tolist(), type=pa.string())
        columns["dst_id"] = pa.array(ids[graph.dst].tolist(), type=pa.string())
    meta = {"n": graph.n, "k": graph.k, "metric": graph.metric, "symmetric": graph.symmetric}
    table = pa.table(columns).replace_schema_metadata({"thresher.knn_graph": json.dumps(meta)})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_edges_parquet(path: str | os.PathLike[str]) -> KnnGraph:
    """Inverse of :func:`write_edges_parquet` (id columns, if any, are not loaded)."""
    table = pq.read_table(path, columns=["src", "dst", "sim"])
    raw = (table.schema.metadata or {}).get(b"thresher.knn_graph")
    if raw is None:
        raise ValueError(f"{path} was not written by write_edges_parquet (no thresher.knn_graph metadata)")
    meta = json.loads(raw)
    return KnnGraph(
        src=table.column("src").to_numpy(),
        dst=table.column("dst").to_numpy(),
        sim=table.column("sim").to_numpy(),
        n=int(meta["n"]),
        k=int(meta["k"]),
        metric=str(meta["metric"]),
        symmetric=bool(meta["symmetric"]),
    )
