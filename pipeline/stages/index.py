"""Catalog stages over embeddings: FAISS index builds, neighbour look-ups, near-duplicate groups.

* :func:`run_index_build` streams an ``embeddings/<model>/dataset=<d>/`` partition into a FAISS
  index (:func:`pipeline.index.faiss_index.build_index`, sized by ``choose_spec`` unless a
  spec or kind is given), measures recall@10, and commits it to ``indexes/<model>/dataset=<d>/``
  atomically (built in staging, committed by ``pipeline.io.runs.StageRun``).
* :func:`neighbors` answers "what is closest to this sample" from that index.
* :func:`run_near_duplicates` groups near-duplicates with SemDeDup
  (:func:`pipeline.index.semdedup.semdedup`) and writes
  ``annotations/near_dup_<model>/dataset=<d>/``: one row per sample with its group, whether it
  is the kept representative, and its similarity to the nearest other sample. Exact duplicates
  never reach this stage: ingest already dropped them by content id (see ``duplicates/``).

These are not Beam jobs (an index is one global structure), but they keep the stage contract:
a ledger entry per run, and a skip when inputs and parameters are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline.index.faiss_index import (
    MIN_NPROBE,
    NLIST_PER_SQRT_N,
    NPROBE_FRACTION,
    PARAMS_FILE,
    TRAIN_POINTS_PER_LIST,
    FaissIndex,
    IndexSpec,
    arrow_to_vectors,
    build_index,
    choose_spec,
    default_pq_m,
    l2_normalize,
)
from pipeline.index.semdedup import semdedup
from pipeline.io.catalog import (
    Catalog,
    shard_name,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.io.runs import StageRun
from pipeline.stages.shards import input_shards, shard_fingerprint

SOURCE_FILE = "source.json"
PQ_TRAIN_POINTS = 100_000  # spec_for_kind: training rows for a PQ index (all rows when fewer)  # next to the index: which embeddings (and weights) it was built from

NEAR_DUP_SCHEMA = schemas.NEAR_DUP_ANNOTATIONS  # defined in schemas/, the one source of truth


def near_dup_annotator(model: str) -> str:
    return f"near_dup_{model}"


# --------------------------------------------------------------------------------------------
# Shared bookkeeping
# --------------------------------------------------------------------------------------------


def _embedding_shards(cat: Catalog, model: str, dataset: str) -> tuple[Path, list[Path]]:
    partition = cat.embedding_partition(model, dataset)
    if not partition.is_dir():
        have = sorted(p.name for p in (cat.root / "embeddings").glob("*")) if (cat.root / "embeddings").is_dir() else []
        raise FileNotFoundError(
            f"no embeddings for model {model!r} in dataset {dataset!r} ({partition}); run "
            f"`thresher embed --dataset {dataset}` first (embedded models here: {have or 'none'})"
        )
    return partition, input_shards(partition)


def _embedding_meta(shard: Path) -> dict[str, str]:
    meta = pq.read_schema(shard).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def _set_threads(workers: int | None) -> None:
    if workers is not None:
        import faiss

        if workers < 1:
            raise ValueError(f"workers (FAISS threads) must be >= 1, got {workers}")
        faiss.omp_set_num_threads(int(workers))


# --------------------------------------------------------------------------------------------
# Index build
# --------------------------------------------------------------------------------------------


def spec_for_kind(n: int, d: int, kind: str, *, metric: str = "ip", seed: int = 0) -> IndexSpec:
    """An :class:`IndexSpec` of the requested ``kind`` sized for ``n`` vectors.

    Follows ``choose_spec``'s rules (nlist ~ 4 sqrt(n), nprobe ~ nlist/64, 40 training points
    per list) but clamps them so that small collections can still build IVF/PQ indexes, e.g.
    to try a layout on a sample before the full run.
    """
    if kind not in ("flat", "ivf_flat", "ivf_pq", "hnsw"):
        raise ValueError(f"kind={kind!r}: expected one of flat, ivf_flat, ivf_pq, hnsw")
    base = choose_spec(n, d, metric=metric, seed=seed)  # type: ignore[arg-type]
    if kind == base.kind or kind in ("flat", "hnsw"):
        return dataclasses.replace(base, kind=kind)  # type: ignore[arg-type]
    nlist = max(1, min(round(NLIST_PER_SQRT_N * math.sqrt(n)), n // TRAIN_POINTS_PER_LIST or 1))
    nprobe = min(nlist, max(MIN_NPROBE, int(nlist * NPROBE_FRACTION)))
    train = min(n, TRAIN_POINTS_PER_LIST * nlist)
    extra: dict[str, Any] = {}
    if kind == "ivf_pq":
        # PQ codebooks (2**nbits centroids per sub-space) want far more points than the coarse
        # lists do, so small collections train on everything and shrink nbits to fit.
        train = min(n, max(train, PQ_TRAIN_POINTS))
        extra = {"pq_m": default_pq_m(d), "pq_nbits": max(1, min(8, int(math.log2(max(train, 2)))))}
    return IndexSpec(kind=kind, metric=metric, nlist=nlist, nprobe=nprobe, train_sample=train,  # type: ignore[arg-type]
                     seed=seed, **extra)


@dataclass
class IndexBuildResult:
    dataset: str
    model: str
    output: str
    n: int
    d: int
    kind: str
    metric: str
    recall_at_10: float | None
    seconds: float
    skipped: bool
    run_id: str
    spec: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        recall = "n/a" if self.recall_at_10 is None else f"{self.recall_at_10:.4f}"
        state = "up to date (skipped)" if self.skipped else f"built in {self.seconds:.2f}s"
        return (f"indexes/{self.model}/dataset={self.dataset}: {self.kind} ({self.metric}) over "
                f"{self.n:,} x {self.d} vectors, recall@10 {recall}, {state}")


def run_index_build(
    catalog: str | Path,
    dataset: str,
    model: str,
    spec: IndexSpec | None = None,
    *,
    kind: str | None = None,
    workers: int | None = None,
    force: bool = False,
    recall_queries: int = 1_000,
    use_gpu: bool | None = None,
) -> IndexBuildResult:
    """Build the FAISS index of ``embeddings/<model>/dataset=<dataset>``.

    ``spec`` wins; else ``kind`` picks a layout sized by :func:`spec_for_kind`; else
    ``choose_spec`` decides from the size. ``workers`` sets FAISS's thread count (None: all
    cores). Vectors are streamed from the Parquet shards; the index, its ids and parameters
    are written to staging and swapped into ``cat.index_dir(model, dataset)`` in one rename.
    """
    if spec is not None and kind is not None:
        raise ValueError("pass either spec or kind, not both")
    cat = Catalog.at(catalog)
    partition, shards = _embedding_shards(cat, model, dataset)
    fingerprint = shard_fingerprint(shards)
    meta = _embedding_meta(shards[0])
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    emb_type = pq.read_schema(shards[0]).field("embedding").type
    d = emb_type.list_size if pa.types.is_fixed_size_list(emb_type) else int(meta.get("dim", 0))
    if n == 0 or d < 1:
        raise ValueError(f"{partition} holds no vectors (rows={n}, dim={d}); re-run the embedding stage")
    if spec is None:
        spec = spec_for_kind(n, d, kind) if kind else choose_spec(n, d)
    spec.validate(n, d)
    output = cat.index_dir(model, dataset)
    parameters = {"spec": spec.to_dict(), "weights_digest": meta.get("weights_digest"),
                  "recall_queries": recall_queries}
    with StageRun(cat, "index_build", dataset, {"index": output}, parameters, fingerprint, force=force) as run:
        if run.skipped:
            params = json.loads((output / PARAMS_FILE).read_text())
            return IndexBuildResult(dataset, model, str(output), params["n"], params["d"], spec.kind, spec.metric,
                                    params.get("recall_at_10"), 0.0, True, run.state["run_id"], spec.to_dict())
        _set_threads(workers)
        staging = run.staging["index"]
        index = build_index([str(p) for p in shards], spec=spec, column="embedding", id_column="sample_id",
                            recall_queries=recall_queries, use_gpu=use_gpu)
        index.save(staging)
        write_json_atomic({"embeddings": partition.relative_to(cat.root).as_posix(), "model": model,
                           "dataset": dataset, "embedding_metadata": meta, "inputs": fingerprint},
                          staging / SOURCE_FILE)
        info = index.info
        run.commit({"rows_in": n, "vectors": index.n}, {"recall_at_10": info.recall_at_10})
    _forget_cached(output)
    return IndexBuildResult(dataset, model, str(output), index.n, index.d, spec.kind, spec.metric,
                            info.recall_at_10, time.perf_counter() - run.t0, False, run.run_id, spec.to_dict())


# --------------------------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------------------------

_INDEX_CACHE: OrderedDict[tuple[str, int], tuple[FaissIndex, dict[str, int]]] = OrderedDict()
_index_lock = threading.Lock()


def _forget_cached(directory: Path) -> None:
    with _index_lock:
        for key in [k for k in _INDEX_CACHE if k[0] == str(directory)]:
            del _INDEX_CACHE[key]


def open_index(catalog: str | Path, dataset: str, model: str) -> tuple[FaissIndex, dict[str, int]]:
    """The saved index of ``model``/``dataset`` and its sample_id -> row map (cached per process,
    reloaded when the index is rebuilt)."""
    cat = Catalog.at(catalog)
    directory = cat.index_dir(model, dataset)
    params = directory / PARAMS_FILE
    if not params.is_file():
        raise FileNotFoundError(
            f"no index for model {model!r} in dataset {dataset!r} ({directory}); run "
            f"`thresher index --dataset {dataset} --model {model}` first"
        )
    key = (str(directory), params.stat().st_mtime_ns)
    with _index_lock:
        if key in _INDEX_CACHE:
            _INDEX_CACHE.move_to_end(key)
            return _INDEX_CACHE[key]
    index = FaissIndex.load(directory, use_gpu=False)
    rows = {sid: i for i, sid in enumerate(index.sample_ids.tolist())}
    with _index_lock:
        _INDEX_CACHE[key] = (index, rows)
        while len(_INDEX_CACHE) > 4:
            _INDEX_CACHE.popitem(last=False)
    return index, rows


def _stored_vector(cat: Catalog, model: str, dataset: str, sample_id: str) -> np.ndarray | None:
    partition = cat.embedding_partition(model, dataset)
    for shard in sorted(partition.glob("part-*.parquet")) if partition.is_dir() else []:
        table = pq.read_table(shard, columns=["sample_id", "embedding"], filters=[("sample_id", "=", sample_id)])
        if table.num_rows:
            return arrow_to_vectors(table.column("embedding"))[:1]
    return None


def neighbors(
    catalog: str | Path,
    dataset: str,
    model: str,
    sample_id: str,
    k: int = 10,
    *,
    include_self: bool = True,
) -> list[tuple[str, float]]:
    """The ``k`` samples closest to ``sample_id`` as ``(sample_id, score)``, best first.

    Scores are cosine similarities for the default ``ip`` indexes (squared L2 distances for
    ``l2`` indexes, smaller first). With ``include_self`` the sample itself leads the list
    (with its own score, 1.0 for cosine), which also makes a handy sanity check; without it
    the ``k`` nearest *other* samples are returned. The query vector is read exactly from the
    embeddings table (the index copy is lossy for PQ).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cat = Catalog.at(catalog)
    index, rows = open_index(cat.root, dataset, model)
    if sample_id not in rows:
        raise KeyError(
            f"sample {sample_id!r} is not in the {model!r} index of dataset {dataset!r} "
            f"({index.n:,} samples); check the id, or rebuild the index if the dataset changed"
        )
    pos = rows[sample_id]
    query = _stored_vector(cat, model, dataset, sample_id)
    if query is None:
        query = index.reconstruct(pos, pos + 1)
    q = index.prepare(query)
    want = k + 1
    # Identical vectors can outrank the sample itself in FAISS's tie order, so ask for a
    # little more than k+1 and drop the sample by position rather than by rank.
    scores, positions = index.search_positions(q, min(index.n, want + 8), prepared=True)
    out: list[tuple[str, float]] = []
    for s, p in zip(scores[0].tolist(), positions[0].tolist()):
        if p < 0 or p == pos:
            continue
        out.append((str(index.sample_ids[p]), float(s)))
    if include_self:
        own = float(q[0] @ q[0]) if index.metric == "ip" else 0.0
        out.insert(0, (sample_id, own))
    return out[:k]


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------


@dataclass
class NearDupResult:
    dataset: str
    model: str
    output: str
    n: int
    n_kept: int
    n_removed: int
    n_groups: int
    threshold: float
    exact_duplicates_at_ingest: int  # dropped by ingest (same content id); never seen here
    seconds: float
    skipped: bool
    run_id: str
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:
            head = "up to date (skipped)"
        else:
            head = f"{self.n_groups:,} groups, {self.n_removed:,} of {self.n:,} samples marked keep=false"
        return (f"annotations/{near_dup_annotator(self.model)}/dataset={self.dataset}: {head} at cosine >= "
                f"{self.threshold}; ingest had already dropped {self.exact_duplicates_at_ingest:,} exact "
                "duplicates")


def _read_vectors(shards: list[Path]) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard in shards:
        table = pq.read_table(shard, columns=["sample_id", "embedding"])
        if table.num_rows:
            ids.extend(table.column("sample_id").to_pylist())
            parts.append(arrow_to_vectors(table.column("embedding"), what=f"{shard}:embedding"))
    if not parts:
        raise ValueError(f"no vectors in {shards[0].parent}")
    return ids, np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def nearest_other_similarity(
    vectors: np.ndarray, index: FaissIndex | None = None, batch_size: int = 4_096
) -> np.ndarray:
    """Cosine of each row to its most similar *other* row (NaN when there is only one row).

    Uses ``index`` when given (it must be a cosine index over exactly these rows in this order;
    IVF/HNSW answers are approximate), else an exact flat inner-product scan.
    """
    import faiss

    n = len(vectors)
    out = np.full(n, np.nan, dtype=np.float32)
    if n < 2:
        return out
    unit = l2_normalize(vectors)
    if index is None:
        search = faiss.IndexFlatIP(unit.shape[1])
        search.add(unit)
        run = search.search
    else:
        def run(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return index.search_positions(q, k, prepared=True)
    k = min(n, 3)  # the row itself plus two: enough when a tie puts a twin ahead of the row
    for start in range(0, n, batch_size):
        q = unit[start : start + batch_size]
        scores, positions = run(q, k)
        own = np.arange(start, start + len(q))[:, None]
        scores = np.where((positions == own) | (positions < 0), -np.inf, scores)
        best = scores.max(axis=1)
        out[start : start + len(q)] = np.where(np.isfinite(best), np.clip(best, -1.0, 1.0), np.nan)
    return out


def run_near_duplicates(
    catalog: str | Path,
    dataset: str,
    model: str,
    threshold: float = 0.95,
    *,
    keep: str = "first",
    assign: int = 2,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    use_gpu: bool | None = None,
) -> NearDupResult:
    """Mark near-duplicate groups among ``dataset``'s ``model`` embeddings.

    Rows whose cosine is >= ``threshold`` are linked (inside SemDeDup's k-means clusters;
    ``assign=2`` also checks each row's second-nearest cluster) and linked rows form a group;
    the first row of each group (catalog order) is kept. ``max_similarity`` is each sample's
    cosine to its nearest other sample, taken from the model's index when one is built (exact
    for flat indexes) and from an exact scan otherwise, so thresholds can be tuned from the
    annotation alone. Exact duplicates were removed at ingest and are counted, not re-found.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    cat = Catalog.at(catalog)
    partition, shards = _embedding_shards(cat, model, dataset)
    fingerprint = shard_fingerprint(shards)
    meta = _embedding_meta(shards[0])
    output = cat.annotation_partition(near_dup_annotator(model), dataset)
    parameters = {"model": model, "threshold": float(threshold), "keep": keep, "assign": assign, "seed": seed,
                  "weights_digest": meta.get("weights_digest")}
    exact_dupes = cat.row_count("duplicates", dataset)
    with StageRun(cat, "near_duplicates", dataset, {"out": output}, parameters, fingerprint, force=force) as run:
        if run.skipped:
            c = run.state.get("counts", {})
            return NearDupResult(dataset, model, str(output), c.get("rows_in", 0), c.get("kept", 0),
                                 c.get("removed", 0), c.get("groups", 0), float(threshold), exact_dupes, 0.0, True,
                                 run.state["run_id"], run.state.get("extra", {}))
        _set_threads(workers)
        ids, vectors = _read_vectors(shards)
        result = semdedup(vectors, threshold, keep=keep, assign=assign, seed=seed, use_gpu=use_gpu)  # type: ignore[arg-type]
        index = _matching_index(cat, model, dataset, ids)
        nearest = nearest_other_similarity(vectors, index)
        id_arr = np.asarray(ids, dtype=object)
        table = pa.Table.from_arrays(
            [pa.array(ids, type=pa.string()), pa.array(id_arr[result.group].tolist(), type=pa.string()),
             pa.array(result.keep, type=pa.bool_()), pa.array(nearest, type=pa.float32(), from_pandas=True)],
            schema=NEAR_DUP_SCHEMA,
        )
        report = result.report.to_dict()
        schema = NEAR_DUP_SCHEMA.with_metadata({
            **{k.decode(): v.decode() for k, v in NEAR_DUP_SCHEMA.metadata.items()},
            "model": model, "threshold": str(threshold), "keep_rule": keep,
            "weights_digest": meta.get("weights_digest", ""), "max_similarity_from": "index" if index else "exact scan",
            "report": json.dumps(report, sort_keys=True),
        })
        write_parquet_atomic(table, run.staging["out"] / shard_name(0, 1), schema)
        run.commit({"rows_in": len(ids), "kept": report["n_kept"], "removed": report["n_removed"],
                    "groups": report["n_groups"]}, report)
    return NearDupResult(dataset, model, str(output), len(ids), report["n_kept"], report["n_removed"],
                         report["n_groups"], float(threshold), exact_dupes, time.perf_counter() - run.t0, False,
                         run.run_id, report)


def _matching_index(cat: Catalog, model: str, dataset: str, ids: list[str]) -> FaissIndex | None:
    """The model's saved index if it is a cosine index over exactly ``ids`` in order, else None."""
    try:
        index, _ = open_index(cat.root, dataset, model)
    except FileNotFoundError:
        return None
    if index.metric != "ip" or not index.spec.normalizes or index.n != len(ids):
        return None
    if index.sample_ids.tolist() != ids:
        return None
    return index


def read_near_duplicates(catalog: str | Path, dataset: str, model: str) -> pa.Table:
    """The near-duplicate annotation of ``model``/``dataset`` (all shards)."""
    cat = Catalog.at(catalog)
    partition = cat.annotation_partition(near_dup_annotator(model), dataset)
    return pa.concat_tables(pq.read_table(p) for p in input_shards(partition))


def duplicate_groups(table: pa.Table) -> dict[str, list[str]]:
    """group_id -> member sample_ids, for groups with at least two members."""
    counts = pc.value_counts(table.column("group_id"))
    multi = {str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1}
    groups: dict[str, list[str]] = {}
    for sid, gid in zip(table.column("sample_id").to_pylist(), table.column("group_id").to_pylist()):
        if gid in multi:
            groups.setdefault(gid, []).append(sid)
    return groups
