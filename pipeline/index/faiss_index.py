"""FAISS vector indexes sized to the data, built by streaming, saved without pickles.

A built index is three files in one folder:

* ``index.faiss`` - the FAISS index (``faiss.write_index``); row ``i`` of the index is the
  ``i``-th vector added, so FAISS labels are row positions.
* ``ids.parquet`` - one string column ``sample_id``; row ``i`` names the sample at position ``i``.
* ``params.json`` - the :class:`IndexSpec`, sizes, measured recall@10 and build timings.

Vectors come from a numpy array, ``.npy`` shards (memory-mapped), Parquet shards with a
list/fixed-size-list float column, or any iterable of batches; see :func:`open_source`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.index.device import (
    describe_device,
    index_to_cpu,
    index_to_device,
    set_search_params,
)

IndexKind = Literal["flat", "ivf_flat", "ivf_pq", "hnsw"]
Metric = Literal["ip", "l2"]

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
PARAMS_FILE = "params.json"
FORMAT_VERSION = 1

# Sizing rules used by choose_spec (documented in docs/index.md).
FLAT_MAX_N = 50_000  # below this an exact scan is fast enough and needs no training
IVF_FLAT_MAX_N = 2_000_000  # above this raw float32 storage dominates: compress with PQ
IVF_FLAT_MAX_BYTES = 4 * 1024**3  # ... or when raw vectors alone would pass 4 GiB
NLIST_PER_SQRT_N = 4  # nlist ~ 4 * sqrt(N), the usual FAISS guideline
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 training points per centroid
NPROBE_FRACTION = 1 / 64  # nprobe ~ nlist / 64, i.e. ~1.6% of the lists scanned per query
MIN_NPROBE = 8

_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
_METRICS = ("ip", "l2")


# --------------------------------------------------------------------------------------------
# Spec and sizing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """How to build an index.

    ``metric="ip"`` with ``normalize`` left at ``None`` means cosine similarity: vectors and
    queries are L2-normalised and compared by inner product. ``metric="l2"`` compares raw vectors
    by squared Euclidean distance (``normalize=None`` resolves to False there).
    """

    kind: IndexKind = "flat"
    metric: Metric = "ip"
    normalize: bool | None = None
    nlist: int = 1024  # IVF lists (k-means centroids)
    pq_m: int | None = None  # PQ sub-quantizers; None: largest divisor of d that is <= d/8
    pq_nbits: int = 8
    nprobe: int = 16  # IVF lists scanned per query
    hnsw_m: int = 32
    ef_search: int = 64
    ef_construction: int = 80
    train_sample: int = 100_000  # vectors drawn (seeded) to train IVF/PQ
    train_niter: int = 10  # k-means iterations for the coarse quantizer
    seed: int = 0

    @property
    def normalizes(self) -> bool:
        return self.metric == "ip" if self.normalize is None else bool(self.normalize)

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf_flat", "ivf_pq")

    def resolved_pq_m(self, d: int) -> int:
        return self.pq_m if self.pq_m is not None else default_pq_m(d)

    def validate(self, n: int, d: int) -> None:
        """Raise ValueError naming the field when this spec cannot index ``n`` vectors of dim ``d``."""
        if self.kind not in _KINDS:
            raise ValueError(f"IndexSpec.kind={self.kind!r}: expected one of {_KINDS}")
        if self.metric not in _METRICS:
            raise ValueError(f"IndexSpec.metric={self.metric!r}: expected one of {_METRICS}")
        if d < 1:
            raise ValueError(f"vector dimension must be >= 1, got {d}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "train_niter"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexSpec.{name} must be >= 1, got {getattr(self, name)}")
        if not self.needs_training:
            return
        n_train = min(n, self.train_sample)
        if self.nlist > n_train:
            raise ValueError(
                f"IndexSpec.nlist={self.nlist} needs at least that many training vectors but only "
                f"{n_train} are available (n={n}, train_sample={self.train_sample}); "
                "use choose_spec(n, d) or a smaller nlist / kind='flat'"
            )
        if self.kind == "ivf_pq":
            m = self.resolved_pq_m(d)
            if m < 1 or d % m:
                raise ValueError(f"IndexSpec.pq_m={m} must divide the dimension d={d}")
            if not 1 <= self.pq_nbits <= 16:
                raise ValueError(f"IndexSpec.pq_nbits={self.pq_nbits}: expected 1..16")
            if n_train < 2**self.pq_nbits:
                raise ValueError(
                    f"ivf_pq with pq_nbits={self.pq_nbits} needs >= {2**self.pq_nbits} training "
                    f"vectors, got {n_train}; lower pq_nbits or use ivf_flat"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown IndexSpec fields {sorted(unknown)} (written by a newer version?)")
        return cls(**data)


def default_pq_m(d: int) -> int:
    """Largest divisor of ``d`` not above ``d / 8``: about one byte per 8 dimensions."""
    target = max(1, d // 8)
    for m in range(target, 0, -1):
        if d % m == 0:
            return m
    return 1


def choose_spec(n: int, d: int, *, metric: Metric = "ip", seed: int = 0) -> IndexSpec:
    """Pick an index for ``n`` vectors of dimension ``d``.

    * ``n < 50_000``: ``flat`` (exact; no training, recall 1.0).
    * up to 2M vectors and 4 GiB of raw float32: ``ivf_flat`` (exact distances inside probed lists).
    * beyond: ``ivf_pq`` with ``pq_m`` = largest divisor of d <= d/8 (~d/8 bytes per vector).

    IVF uses ``nlist = round(4 * sqrt(n))``, ``nprobe = max(8, nlist // 64)`` and trains on
    ``40 * nlist`` vectors (at most n).
    """
    if n < 1 or d < 1:
        raise ValueError(f"choose_spec needs n >= 1 and d >= 1, got n={n}, d={d}")
    if n < FLAT_MAX_N:
        return IndexSpec(kind="flat", metric=metric, seed=seed)
    nlist = max(1, round(NLIST_PER_SQRT_N * math.sqrt(n)))
    nprobe = min(nlist, max(MIN_NPROBE, int(nlist * NPROBE_FRACTION)))
    train_sample = min(n, TRAIN_POINTS_PER_LIST * nlist)
    raw_bytes = n * d * 4
    kind: IndexKind = "ivf_flat" if n <= IVF_FLAT_MAX_N and raw_bytes <= IVF_FLAT_MAX_BYTES else "ivf_pq"
    return IndexSpec(
        kind=kind,
        metric=metric,
        nlist=nlist,
        nprobe=nprobe,
        pq_m=default_pq_m(d) if kind == "ivf_pq" else None,
        train_sample=train_sample,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------
# Vector sources
# --------------------------------------------------------------------------------------------


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new float32 array; all-zero rows stay zero."""
    out = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def as_float32_matrix(x: Any, d: int | None = None, *, what: str = "vectors") -> np.ndarray:
    """C-contiguous float32 (rows, d) view or copy of ``x``; rejects NaN/inf with the row number."""
    arr = np.asarray(x)
    if arr.ndim == 1 and d is not None and arr.shape[0] == d:
        arr = arr.reshape(1, d)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (rows, dim), got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{what} have dimension {arr.shape[1]} but the index expects {d}")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{what} row {bad} contains NaN or inf; clean or drop it before indexing")
    return arr


class VectorSource:
    """Rows of vectors that can be read several times, in order, a bounded batch at a time."""

    n: int
    d: int

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, float32 array of at most batch_size rows)`` in row order."""
        raise NotImplementedError

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at sorted, unique ``positions`` as one float32 array."""
        wanted = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(wanted), self.d), dtype=np.float32)
        filled = 0
        for start, batch in self.iter_batches(65_536):
            lo = np.searchsorted(wanted, start)
            hi = np.searchsorted(wanted, start + len(batch))
            if hi > lo:
                out[lo:hi] = batch[wanted[lo:hi] - start]
                filled += hi - lo
            if filled == len(wanted):
                break
        return out

    def sample_ids(self) -> np.ndarray | None:
        """String ids carried by the source itself (e.g. a Parquet id column), else None."""
        return None

    def close(self) -> None:
        """Release temporary files; sources that own none do nothing."""

    def __enter__(self) -> VectorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(VectorSource):
    """An in-memory or memory-mapped 2-D array."""

    def __init__(self, array: np.ndarray, what: str = "vectors") -> None:
        if array.ndim != 2:
            raise ValueError(f"{what} must be 2-D (rows, dim), got shape {array.shape}")
        self.array = array
        self.n, self.d = int(array.shape[0]), int(array.shape[1])
        self.what = what

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, batch_size):
            yield start, as_float32_matrix(self.array[start : start + batch_size], self.d, what=self.what)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return as_float32_matrix(self.array[np.asarray(positions, dtype=np.int64)], self.d, what=self.what)


class NpyShardSource(VectorSource):
    """``.npy`` shards opened with ``mmap_mode="r"``: only the current batch is read into RAM."""

    def __init__(self, paths: Sequence[Path]) -> None:
        if not paths:
            raise ValueError("no .npy shards given")
        self.paths = list(paths)
        self.shards = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self.paths]
        dims = {s.shape[1] if s.ndim == 2 else None for s in self.shards}
        if None in dims or len(dims) != 1:
            shapes = {str(p): s.shape for p, s in zip(self.paths, self.shards)}
            raise ValueError(f".npy shards must all be 2-D with one shared dimension, got {shapes}")
        self.d = int(dims.pop())
        self.n = int(sum(s.shape[0] for s in self.shards))

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        offset = 0
        for path, shard in zip(self.paths, self.shards):
            for lo in range(0, shard.shape[0], batch_size):
                yield offset + lo, as_float32_matrix(shard[lo : lo + batch_size], self.d, what=str(path))
            offset += shard.shape[0]

    def take(self, positions: np.ndarray) -> np.ndarray:
        wanted = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(wanted), self.d), dtype=np.float32)
        offset = 0
        for path, shard in zip(self.paths, self.shards):
            lo = np.searchsorted(wanted, offset)
            hi = np.searchsorted(wanted, offset + shard.shape[0])
            if hi > lo:
                out[lo:hi] = as_float32_matrix(shard[wanted[lo:hi] - offset], self.d, what=str(path))
            offset += shard.shape[0]
        return out


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray, *, what: str = "column") -> np.ndarray:
    """float32 (rows, d) from an Arrow list<float>, large_list<float> or fixed_size_list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{what} has {column.null_count} null vectors; drop or fill them first")
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) == 0:
            return np.empty((0, 0), dtype=np.float32)
        d = int(lengths[0])
        if (lengths != d).any():
            bad = int(np.flatnonzero(lengths != d)[0])
            raise ValueError(f"{what}: row {bad} has {lengths[bad]} values but row 0 has {d}; vectors must share a length")
    else:
        raise TypeError(f"{what} has Arrow type {kind}; expected list<float> or fixed_size_list<float>")
    values = column.flatten()
    if values.null_count:
        raise ValueError(f"{what} contains null values inside vectors")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise TypeError(f"{what} holds {values.type} values; expected floats")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(-1, d) if d else np.empty((len(column), 0), dtype=np.float32)


class ParquetShardSource(VectorSource):
    """Parquet shards with one vector column; only ``batch_size`` rows are decoded at a time."""

    def __init__(self, paths: Sequence[Path], column: str, id_column: str | None = None) -> None:
        if not paths:
            raise ValueError("no Parquet shards given")
        self.paths = list(paths)
        self.column = column
        self.id_column = id_column
        self.counts: list[int] = []
        d: int | None = None
        for path in self.paths:
            meta = pq.ParquetFile(path)
            names = meta.schema_arrow.names
            if column not in names:
                raise ValueError(f"{path} has no column {column!r} (columns: {names}); pass column=")
            if id_column is not None and id_column not in names:
                raise ValueError(f"{path} has no id column {id_column!r} (columns: {names})")
            self.counts.append(meta.metadata.num_rows)
            kind = meta.schema_arrow.field(column).type
            shard_d = kind.list_size if pa.types.is_fixed_size_list(kind) else None
            if shard_d is None and meta.metadata.num_rows:
                first = next(meta.iter_batches(batch_size=1, columns=[column]))
                shard_d = arrow_to_vectors(first.column(0), what=f"{path}:{column}").shape[1]
            if shard_d is not None:
                if d is not None and shard_d != d:
                    raise ValueError(f"{path}:{column} has dimension {shard_d}, earlier shards have {d}")
                d = shard_d
        if d is None:
            raise ValueError("all Parquet shards are empty; nothing to index")
        self.d = d
        self.n = int(sum(self.counts))

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        offset = 0
        for path in self.paths:
            reader = pq.ParquetFile(path)
            for record_batch in reader.iter_batches(batch_size=batch_size, columns=[self.column]):
                vectors = arrow_to_vectors(record_batch.column(0), what=f"{path}:{self.column}")
                if len(vectors) == 0:
                    continue
                yield offset, as_float32_matrix(vectors, self.d, what=f"{path}:{self.column}")
                offset += len(vectors)

    def sample_ids(self) -> np.ndarray | None:
        if self.id_column is None:
            return None
        parts = [pq.read_table(p, columns=[self.id_column]).column(0) for p in self.paths]
        ids = pa.chunked_array([c for part in parts for c in part.chunks], type=parts[0].type)
        return _ids_to_array(ids.cast(pa.string()).to_pylist(), self.n)


class SpooledSource(VectorSource):
    """A one-shot iterable of batches, copied once to a temporary raw file and memory-mapped.

    Training needs a random sample and adding needs every row, so the data must be read twice;
    spooling to disk keeps RAM bounded by one batch where buffering in memory would not.
    """

    def __init__(self, batches: Iterable[Any], spool_dir: str | os.PathLike[str] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="thresher-spool-", dir=spool_dir)
        path = Path(self._tmp.name) / "vectors.f32"
        self.d = 0
        self.n = 0
        ids: list[str] = []
        saw_ids: bool | None = None
        with open(path, "wb") as fh:
            for item in batches:
                batch_ids = None
                if isinstance(item, tuple):
                    if len(item) != 2:
                        raise ValueError("batch tuples must be (vectors, ids)")
                    item, batch_ids = item
                arr = as_float32_matrix(item, self.d or None, what=f"batch at row {self.n}")
                if not self.d:
                    self.d = arr.shape[1]
                has_ids = batch_ids is not None
                if saw_ids is not None and has_ids != saw_ids:
                    raise ValueError("either every batch carries ids (vectors, ids) or none does")
                saw_ids = has_ids
                if has_ids:
                    batch_ids = [str(x) for x in batch_ids]
                    if len(batch_ids) != len(arr):
                        raise ValueError(f"batch at row {self.n}: {len(arr)} vectors but {len(batch_ids)} ids")
                    ids.extend(batch_ids)
                fh.write(arr.tobytes())
                self.n += len(arr)
        if self.n == 0:
            self.close()
            raise ValueError("the batch iterable yielded no vectors")
        self._array = np.memmap(path, dtype=np.float32, mode="r", shape=(self.n, self.d))
        self._inner = ArraySource(self._array)
        self._ids = _ids_to_array(ids, self.n) if saw_ids else None

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        return self._inner.iter_batches(batch_size)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self._inner.take(positions)

    def sample_ids(self) -> np.ndarray | None:
        return self._ids

    def close(self) -> None:
        self._array = None  # type: ignore[assignment]
        self._inner = None  # type: ignore[assignment]
        self._tmp.cleanup()


VectorInput = Any  # np.ndarray | str | Path | Sequence[str | Path] | Iterable[np.ndarray] | VectorSource


def _shard_paths(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.npy")) + sorted(p.glob("*.parquet"))
            if not found:
                raise ValueError(f"directory {p} holds no .npy or .parquet shards")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"vector shard {p} does not exist")
    return paths


def open_source(
    vectors: VectorInput,
    *,
    column: str = "embedding",
    id_column: str | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
) -> VectorSource:
    """Wrap any supported vector input as a re-readable :class:`VectorSource`.

    * ``np.ndarray`` (or ``np.memmap``) of shape (n, d)
    * a path, a directory, or a list of paths to ``.npy`` shards or ``.parquet`` shards
      (Parquet: vectors in ``column``, optional string ids in ``id_column``)
    * any other iterable of 2-D arrays, or of ``(array, ids)`` tuples: spooled to a temp file
    * an existing ``VectorSource``: returned as is
    """
    if isinstance(vectors, VectorSource):
        return vectors
    if isinstance(vectors, np.ndarray):
        return ArraySource(vectors)
    is_path_list = isinstance(vectors, (list, tuple)) and vectors and all(
        isinstance(v, (str, os.PathLike)) for v in vectors
    )
    if isinstance(vectors, (str, os.PathLike)) or is_path_list:
        paths = _shard_paths(vectors)
        suffixes = {p.suffix.lower() for p in paths}
        if suffixes == {".npy"}:
            return NpyShardSource(paths)
        if suffixes == {".parquet"}:
            return ParquetShardSource(paths, column=column, id_column=id_column)
        raise ValueError(f"shards must be all .npy or all .parquet, got suffixes {sorted(suffixes)}")
    if isinstance(vectors, Iterable):
        return SpooledSource(vectors, spool_dir=spool_dir)
    raise TypeError(
        f"cannot read vectors from {type(vectors).__name__}; pass an array, shard paths or an iterable of batches"
    )


def _ids_to_array(ids: Iterable[Any], n: int) -> np.ndarray:
    arr = np.empty(n, dtype=object)
    values = [str(x) for x in ids]
    if len(values) != n:
        raise ValueError(f"got {len(values)} sample ids for {n} vectors; they must match one to one")
    arr[:] = values
    if len(set(values)) != n:
        uniq, counts = np.unique(arr.astype(str), return_counts=True)
        raise ValueError(f"sample ids must be unique; {uniq[counts > 1][0]!r} appears more than once")
    return arr


# --------------------------------------------------------------------------------------------
# Recall measurement
# --------------------------------------------------------------------------------------------


class ExactTopK:
    """Exact k nearest rows of a few queries, accumulated batch by batch over a stream.

    Each query's own row (``query_pos``) is excluded so that recall is measured on true
    neighbours rather than on the trivially found self match.
    """

    def __init__(self, queries: np.ndarray, query_pos: np.ndarray, k: int, metric: Metric) -> None:
        self.queries = queries
        self.query_pos = np.asarray(query_pos, dtype=np.int64)
        self.k = k
        self.metric = metric
        self.q_sq = (queries * queries).sum(axis=1, keepdims=True) if metric == "l2" else None
        nq = len(queries)
        self.best_score = np.full((nq, k), -np.inf, dtype=np.float32)
        self.best_pos = np.full((nq, k), -1, dtype=np.int64)

    def update(self, start: int, batch: np.ndarray, column_block: int = 16_384) -> None:
        rows = np.arange(len(self.queries))
        for lo in range(0, len(batch), column_block):
            block = batch[lo : lo + column_block]
            first = start + lo
            score = self.queries @ block.T
            if self.metric == "l2":
                # larger-is-better score so both metrics share one top-k path
                score = 2 * score - self.q_sq - (block * block).sum(axis=1)[None, :]
            inside = (self.query_pos >= first) & (self.query_pos < first + len(block))
            score[rows[inside], self.query_pos[inside] - first] = -np.inf
            cand_score = np.concatenate([self.best_score, score.astype(np.float32, copy=False)], axis=1)
            cand_pos = np.concatenate(
                [self.best_pos, np.broadcast_to(np.arange(first, first + len(block)), score.shape)], axis=1
            )
            top = np.argpartition(cand_score, -self.k, axis=1)[:, -self.k :]
            self.best_score = np.take_along_axis(cand_score, top, axis=1)
            self.best_pos = np.take_along_axis(cand_pos, top, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) sorted best first; positions are -1 where fewer than k rows exist."""
        order = np.argsort(-self.best_score, axis=1, kind="stable")
        score = np.take_along_axis(self.best_score, order, axis=1)
        pos = np.take_along_axis(self.best_pos, order, axis=1)
        pos[~np.isfinite(score)] = -1
        return score, pos


def drop_self(positions: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    """From k+1 search results per row, remove the row's own position (or the last result)."""
    labels = np.asarray(positions)
    is_self = labels == np.asarray(self_pos, dtype=np.int64)[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False
    return labels[keep].reshape(len(labels), labels.shape[1] - 1)[:, :k]


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (ignoring -1 padding) found in ``approx``."""
    hits = 0
    total = 0
    for a, e in zip(approx, exact):
        truth = e[e >= 0]
        total += len(truth)
        hits += len(np.intersect1d(a[a >= 0], truth, assume_unique=False))
    return hits / total if total else 1.0


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildInfo:
    """What happened at build time; saved in params.json next to the spec."""

    n: int
    d: int
    kind: str
    metric: str
    recall_at_10: float | None  # None when not measured (recall_queries=0 or n < 2)
    recall_queries: int
    recall_queries_held_out: bool  # queries disjoint from the IVF training sample
    train_seconds: float
    add_seconds: float
    recall_seconds: float
    build_seconds: float
    faiss_version: str
    device: str
    created_at: str


_FAISS_METRIC = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def _new_faiss_index(spec: IndexSpec, d: int) -> faiss.Index:
    metric = _FAISS_METRIC[spec.metric]
    if spec.kind == "flat":
        return faiss.IndexFlatIP(d) if spec.metric == "ip" else faiss.IndexFlatL2(d)
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, metric)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
        return index
    quantizer = faiss.IndexFlatIP(d) if spec.metric == "ip" else faiss.IndexFlatL2(d)
    if spec.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, spec.nlist, metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.resolved_pq_m(d), spec.pq_nbits, metric)
        index.pq.cp.seed = spec.seed
    index.cp.seed = spec.seed
    index.cp.niter = spec.train_niter
    return index


class FaissIndex:
    """A FAISS index plus the sample ids of its rows and how it was built."""

    def __init__(
        self,
        index: faiss.Index,
        spec: IndexSpec,
        sample_ids: np.ndarray,
        info: BuildInfo,
        *,
        on_gpu: bool = False,
    ) -> None:
        if index.ntotal != len(sample_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(sample_ids)} sample ids were given")
        self.index = index
        self.spec = spec
        self.sample_ids = sample_ids
        self.info = info
        self.on_gpu = on_gpu
        self._direct_map_ready = False
        self._cpu_copy: faiss.Index | None = None if on_gpu else index
        set_search_params(index, on_gpu, kind=spec.kind, nprobe=spec.nprobe, ef_search=spec.ef_search)

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> Metric:
        return self.spec.metric

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"FaissIndex(kind={self.spec.kind}, metric={self.metric}, n={self.n}, d={self.d}, "
            f"recall@10={self.info.recall_at_10}, device={'gpu' if self.on_gpu else 'cpu'})"
        )

    def prepare(self, vectors: Any, *, what: str = "queries") -> np.ndarray:
        """float32, checked, and normalised when the spec compares cosines."""
        arr = as_float32_matrix(vectors, self.d, what=what)
        return l2_normalize(arr) if self.spec.normalizes else arr

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change query-time knobs (kept in ``spec``, so a later save records them)."""
        changes: dict[str, int] = {}
        if nprobe is not None:
            if nprobe < 1:
                raise ValueError(f"nprobe must be >= 1, got {nprobe}")
            changes["nprobe"] = int(nprobe)
        if ef_search is not None:
            if ef_search < 1:
                raise ValueError(f"ef_search must be >= 1, got {ef_search}")
            changes["ef_search"] = int(ef_search)
        self.spec = dataclasses.replace(self.spec, **changes)
        set_search_params(self.index, self.on_gpu, kind=self.spec.kind, nprobe=nprobe, ef_search=ef_search)

    def search_positions(self, queries: Any, k: int, *, prepared: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)``, both (nq, k). Positions are row numbers, -1 where the index
        returned fewer than k results. Scores are inner products (cosine when normalised) for
        ``metric="ip"`` and squared L2 distances for ``metric="l2"``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = queries if prepared else self.prepare(queries)
        scores, positions = self.index.search(q, int(k))
        return scores, positions

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, sample_ids)``: float32 (nq, k) and an object array of id strings (None
        where fewer than k results exist). Score meaning as in :meth:`search_positions`."""
        scores, positions = self.search_positions(queries, k)
        return scores, self.ids_at(positions)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.full(positions.shape, None, dtype=object)
        valid = positions >= 0
        out[valid] = self.sample_ids[positions[valid]]
        return out

    def reconstruct(self, start: int, stop: int) -> np.ndarray:
        """Stored vectors of rows [start, stop) (normalised if the spec normalises; lossy for PQ)."""
        stop = min(stop, self.n)
        if start < 0 or start > stop:
            raise ValueError(f"bad row range [{start}, {stop}) for an index of {self.n} rows")
        if self._cpu_copy is None:
            # GPU indexes cannot reconstruct rows: keep one CPU copy for all batches
            self._cpu_copy = index_to_cpu(self.index, self.on_gpu)
        cpu = self._cpu_copy
        ivf = faiss.try_extract_index_ivf(cpu)
        if ivf is not None and not self._direct_map_ready:
            ivf.make_direct_map()  # IVF lists are not in row order without it
            self._direct_map_ready = True
        return cpu.reconstruct_n(start, stop - start)

    # ---------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write index.faiss, ids.parquet and params.json into ``directory``.

        Each file goes to a temporary name first and is moved in with ``os.replace``, and
        params.json goes last, so a reader never sees a half-written index under a final name.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        index_tmp = out / (INDEX_FILE + tag)
        ids_tmp = out / (IDS_FILE + tag)
        params_tmp = out / (PARAMS_FILE + tag)
        try:
            faiss.write_index(index_to_cpu(self.index, self.on_gpu), str(index_tmp))
            pq.write_table(pa.table({"sample_id": pa.array(self.sample_ids.tolist(), type=pa.string())}), ids_tmp)
            params = {
                "format_version": FORMAT_VERSION,
                "spec": self.spec.to_dict(),
                "n": self.n,
                "d": self.d,
                "metric": self.metric,
                "recall_at_10": self.info.recall_at_10,
                "faiss_version": faiss.__version__,
                "build": dataclasses.asdict(self.info),
            }
            params_tmp.write_text(json.dumps(params, indent=2, sort_keys=True))
            os.replace(index_tmp, out / INDEX_FILE)
            os.replace(ids_tmp, out / IDS_FILE)
            os.replace(params_tmp, out / PARAMS_FILE)
        finally:
            for tmp in (index_tmp, ids_tmp, params_tmp):
                tmp.unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, use_gpu: bool | None = False) -> FaissIndex:
        """Read an index written by :meth:`save`. Nothing is unpickled: FAISS's own binary
        format, Parquet and JSON only. ``use_gpu=None`` moves it to GPU when one is present."""
        src = Path(directory)
        missing = [name for name in (INDEX_FILE, IDS_FILE, PARAMS_FILE) if not (src / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{src} is not a saved index: missing {missing}")
        params = json.loads((src / PARAMS_FILE).read_text())
        if params.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{src}/{PARAMS_FILE}: format_version {params.get('format_version')} unsupported")
        spec = IndexSpec.from_dict(params["spec"])
        info = BuildInfo(**params["build"])
        index = faiss.read_index(str(src / INDEX_FILE))
        ids_col = pq.read_table(src / IDS_FILE, columns=["sample_id"]).column(0)
        sample_ids = np.empty(len(ids_col), dtype=object)
        sample_ids[:] = ids_col.to_pylist()
        if index.ntotal != params["n"] or index.d != params["d"] or len(sample_ids) != params["n"]:
            raise ValueError(
                f"{src}: files disagree (index has {index.ntotal}x{index.d}, ids {len(sample_ids)}, "
                f"params {params['n']}x{params['d']}); rebuild the index"
            )
        index, on_gpu = index_to_device(index, use_gpu)
        return cls(index, spec, sample_ids, info, on_gpu=on_gpu)


def build_index(
    vectors: VectorInput,
    ids: Sequence[Any] | np.ndarray | None = None,
    spec: IndexSpec | None = None,
    *,
    column: str = "embedding",
    id_column: str | None = None,
    batch_size: int = 65_536,
    recall_queries: int = 1_000,
    use_gpu: bool | None = None,
) -> FaissIndex:
    """Build an index from any input :func:`open_source` accepts.

    Training (IVF/PQ) uses ``spec.train_sample`` rows drawn with ``spec.seed``; vectors are then
    added ``batch_size`` rows at a time, so beyond the index itself memory stays at one batch
    plus the training sample. ``ids`` (strings, one per row, unique) default to the source's
    id column, else to the row number. ``recall_queries`` rows (disjoint from the training
    sample when possible) are searched against the finished index and compared with exact
    neighbours gathered during the add pass; the result is ``info.recall_at_10``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    source = open_source(vectors, column=column, id_column=id_column)
    try:
        n, d = source.n, source.d
        if n == 0:
            raise ValueError("no vectors to index")
        if ids is not None:
            sample_ids = _ids_to_array(ids, n)
        else:
            carried = source.sample_ids()
            sample_ids = carried if carried is not None else _ids_to_array(map(str, range(n)), n)
        spec = spec or choose_spec(n, d)
        spec.validate(n, d)
        rng = np.random.default_rng(spec.seed)
        n_train = min(n, spec.train_sample) if spec.needs_training else 0
        n_query = min(recall_queries, n) if n >= 2 else 0
        picked = rng.choice(n, size=min(n, n_train + n_query), replace=False)
        train_pos = np.sort(picked[:n_train])
        query_pos = np.sort(picked[n_train : n_train + n_query])
        held_out = len(query_pos) == n_query
        if not held_out:  # too few rows to keep them apart: draw queries from everything
            query_pos = np.sort(rng.choice(n, size=n_query, replace=False))
        wanted = np.union1d(train_pos, query_pos)
        sample = source.take(wanted) if len(wanted) else np.empty((0, d), np.float32)
        if spec.normalizes:
            sample = l2_normalize(sample)
        train_vecs = sample[np.searchsorted(wanted, train_pos)]
        query_vecs = sample[np.searchsorted(wanted, query_pos)]
        del sample

        index, on_gpu = index_to_device(_new_faiss_index(spec, d), use_gpu)
        t0 = time.perf_counter()
        if spec.needs_training:
            index.train(train_vecs)
        del train_vecs
        train_seconds = time.perf_counter() - t0

        k_eval = min(10, n - 1)
        exact = ExactTopK(query_vecs, query_pos, k_eval, spec.metric) if n_query and k_eval else None
        t0 = time.perf_counter()
        recall_seconds = 0.0
        for start, batch in source.iter_batches(batch_size):
            if spec.normalizes:
                batch = l2_normalize(batch)
            index.add(batch)
            if exact is not None:
                t1 = time.perf_counter()
                exact.update(start, batch)
                recall_seconds += time.perf_counter() - t1
        add_seconds = time.perf_counter() - t0 - recall_seconds
        if index.ntotal != n:
            raise RuntimeError(f"source announced {n} rows but yielded {index.ntotal}")

        set_search_params(index, on_gpu, kind=spec.kind, nprobe=spec.nprobe, ef_search=spec.ef_search)
        recall: float | None = None
        if exact is not None:
            t1 = time.perf_counter()
            _, approx = index.search(query_vecs, k_eval + 1)
            recall = recall_at_k(drop_self(approx, query_pos, k_eval), exact.result()[1])
            recall_seconds += time.perf_counter() - t1
        info = BuildInfo(
            n=n,
            d=d,
            kind=spec.kind,
            metric=spec.metric,
            recall_at_10=recall,
            recall_queries=int(n_query if exact is not None else 0),
            recall_queries_held_out=bool(held_out),
            train_seconds=round(train_seconds, 4),
            add_seconds=round(add_seconds, 4),
            recall_seconds=round(recall_seconds, 4),
            build_seconds=round(time.perf_counter() - t_start, 4),
            faiss_version=faiss.__version__,
            device=describe_device().name if on_gpu else "cpu",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return FaissIndex(index, spec, sample_ids, info, on_gpu=on_gpu)
    finally:
        if source is not vectors:
            source.close()
