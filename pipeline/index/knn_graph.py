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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from pipeline.index.faiss_index import (
    FaissIndex,
    IndexSpec,
    VectorInput,
    build_index,
    drop_self,
    open_source,
)


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
) -> KnnGraph:
    """k nearest neighbours (self excluded) of every row of ``index``.

    ``vectors`` are the indexed vectors in row order (array, shard paths, ...; see
    ``open_source``). When omitted they are reconstructed from the index, which is exact for
    flat/HNSW/IVF-Flat and approximate for IVF-PQ. Rows with fewer than k results (tiny or
    sparse IVF lists) get fewer edges. ``symmetrize=True`` returns the union graph.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
