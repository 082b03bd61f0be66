"""pipeline.index.faiss_index and pipeline.index.device: sizing, build, recall, persistence, sources."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.index import device
from pipeline.index.faiss_index import (
    IDS_FILE,
    INDEX_FILE,
    PARAMS_FILE,
    FaissIndex,
    IndexSpec,
    NpyShardSource,
    build_index,
    choose_spec,
    default_pq_m,
    l2_normalize,
    open_source,
    recall_at_k,
)


def clustered(n: int, d: int, centers: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centers, d))
    x = mu[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32)


def brute_force_topk(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    xn, qn = l2_normalize(x), l2_normalize(queries)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


# Exact search is exact only up to float rounding: two neighbours whose similarities differ by
# less than this may come back in either order (FAISS, numpy and a GPU round differently), and
# these random test sets do hold pairs within 1e-7 of each other. The checks below accept exactly
# those swaps and nothing else.
TIE = 1e-5


def cosines(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return l2_normalize(queries).astype(np.float64) @ l2_normalize(x).astype(np.float64).T


def assert_topk_up_to_ties(positions: np.ndarray, sims: np.ndarray, k: int) -> None:
    """Row i of ``positions`` holds k distinct rows whose similarities (``sims[i]``) are the k best,
    rank by rank, within TIE: the exact answer with near-tied neighbours in any order."""
    assert positions.shape[1] == k and all(len(set(row)) == k for row in positions.tolist())
    got = np.take_along_axis(sims, positions, axis=1)
    np.testing.assert_allclose(got, -np.sort(-sims, axis=1)[:, :k], rtol=0, atol=TIE)


def tied_slots(x: np.ndarray, k: int, *, include_self: bool = False, queries: np.ndarray | None = None) -> int:
    """Top-k slots, summed over rows, whose neighbour ties (within TIE) with a row just outside the
    top k: the most an exact search can lose against one exact answer list by rounding alone."""
    xn = l2_normalize(x)
    flat = faiss.IndexFlatIP(xn.shape[1])
    flat.add(xn)
    rows = np.arange(len(x)) if queries is None else queries
    extra = 8  # look a little past k+1 so that a run of ties is counted whole
    scores, pos = flat.search(xn[rows], k + extra + (0 if include_self else 1))
    if not include_self:
        keep = ~(pos == rows[:, None])
        keep[~(pos == rows[:, None]).any(axis=1), -1] = False
        scores = scores[keep].reshape(len(rows), -1)
    kth = scores[:, k - 1 : k]
    sure = (scores > kth + TIE).sum(axis=1)  # slots no tie can take
    tied = (np.abs(scores - kth) <= TIE).sum(axis=1)
    return int(np.minimum(k - sure, tied - (k - sure)).sum())


def min_recall(x: np.ndarray, n_queries: int, k: int = 10) -> float:
    """Lower bound of an exact index's recall@k over n_queries of x's rows (self excluded)."""
    return 1.0 - tied_slots(x, k) / (n_queries * k) - 1e-12


# ------------------------------------------------------------------ sizing


def test_choose_spec_follows_documented_thresholds() -> None:
    small = choose_spec(10_000, 384)
    assert small.kind == "flat" and small.metric == "ip" and small.normalizes

    medium = choose_spec(1_000_000, 384)
    assert medium.kind == "ivf_flat"
    assert medium.nlist == 4000  # 4 * sqrt(1e6)
    assert medium.nprobe == 62  # nlist // 64
    assert medium.train_sample == 160_000  # 40 per list

    huge = choose_spec(5_000_000, 384)
    assert huge.kind == "ivf_pq" and huge.resolved_pq_m(384) == 48 and 384 % 48 == 0
    # 1.5M x 1024-d float32 is 5.7 GiB: compressed even though N is under 2M
    assert choose_spec(1_500_000, 1024).kind == "ivf_pq"
    assert choose_spec(60_000, 8).train_sample == 40 * 980  # nlist = round(4 * sqrt(60k)) = 980
    assert default_pq_m(100) == 10 and default_pq_m(7) == 1


def test_spec_validation_names_the_problem() -> None:
    x = clustered(500, 16)
    with pytest.raises(ValueError, match="nlist=1024"):
        build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=1024))
    with pytest.raises(ValueError, match="must divide"):
        build_index(x, spec=IndexSpec(kind="ivf_pq", nlist=4, pq_m=5))
    with pytest.raises(ValueError, match="kind"):
        IndexSpec(kind="annoy").validate(10, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown IndexSpec fields"):
        IndexSpec.from_dict({"kind": "flat", "bogus": 1})


# ------------------------------------------------------------------ build and recall


def test_flat_recall_is_exactly_one_and_matches_numpy() -> None:
    x = clustered(3000, 32, seed=1)
    index = build_index(x, recall_queries=300)
    assert index.spec.kind == "flat"
    assert index.info.recall_queries == 300 and index.info.recall_at_10 >= min_recall(x, 300)
    scores, ids = index.search(x[:50], 10)
    assert ids.dtype == object and ids[0, 0] == "0"  # default ids are row numbers as strings
    positions = np.vectorize(int)(ids)
    sims = cosines(x, x[:50])
    assert_topk_up_to_ties(positions, sims, 10)  # numpy's answer, near-ties aside
    np.testing.assert_allclose(scores, np.take_along_axis(sims, positions, axis=1), atol=TIE)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # cosine with itself


def test_ivf_recall_is_measured_not_assumed() -> None:
    x = clustered(20_000, 32, seed=2)
    good = build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=64, nprobe=8, train_sample=5000))
    exhaustive = build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=64, nprobe=64, train_sample=5000))
    starved = build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=64, nprobe=1, train_sample=5000))
    assert good.info.recall_at_10 is not None and good.info.recall_at_10 >= 0.9
    # probing every list is an exact search (its queries are 1000 of the rows) ...
    assert exhaustive.info.recall_at_10 >= min_recall(x, exhaustive.info.recall_queries)
    q = x[::67]  # ... so it finds numpy's neighbours, near-ties aside
    assert_topk_up_to_ties(exhaustive.search_positions(q, 10)[1], cosines(x, q), 10)
    assert starved.info.recall_at_10 < good.info.recall_at_10
    assert good.info.recall_queries_held_out
    assert good.info.train_seconds > 0 and good.info.build_seconds >= good.info.add_seconds


def test_ivf_pq_and_hnsw_build_and_search() -> None:
    x = clustered(6000, 32, seed=3)
    pq_index = build_index(x, spec=IndexSpec(kind="ivf_pq", nlist=16, nprobe=16, pq_m=8, pq_nbits=6, train_sample=3000))
    hnsw = build_index(x, spec=IndexSpec(kind="hnsw", hnsw_m=16, ef_search=64))
    assert 0.1 < pq_index.info.recall_at_10 < 1.0  # lossy codes: measured, far above chance (0.002)
    flat_bytes = len(faiss.serialize_index(build_index(x, recall_queries=0).index))
    assert len(faiss.serialize_index(pq_index.index)) < flat_bytes / 4  # 8-byte codes vs 128-byte rows
    assert hnsw.info.recall_at_10 >= 0.9
    for idx in (pq_index, hnsw):
        _, ids = idx.search(x[:5], 3)
        assert ids.shape == (5, 3) and all(isinstance(v, str) for v in ids.ravel())


def test_l2_metric_returns_squared_distances_of_raw_vectors() -> None:
    x = clustered(800, 8, seed=4)
    index = build_index(x, spec=IndexSpec(kind="flat", metric="l2"))
    assert not index.spec.normalizes
    scores, positions = index.search_positions(x[:4], 5)
    d2 = ((x[:4, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(positions, np.argsort(d2, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(d2, axis=1)[:, :5], rtol=1e-4, atol=1e-3)


def test_tune_changes_nprobe_and_is_recorded(tmp_path: Path) -> None:
    x = clustered(5000, 16, seed=5)
    index = build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=32, nprobe=1, train_sample=5000))
    q = x[:200]
    truth = brute_force_topk(x, q, 10)
    before = recall_at_k(index.search_positions(q, 10)[1], truth)
    index.tune(nprobe=32)
    after = recall_at_k(index.search_positions(q, 10)[1], truth)
    # every list probed: exact, up to near-ties with the 11th row
    assert after >= 1.0 - tied_slots(x, 10, include_self=True, queries=np.arange(200)) / 2000 - 1e-12
    assert before < after
    index.save(tmp_path / "ix")
    assert FaissIndex.load(tmp_path / "ix").spec.nprobe == 32


def test_rejects_bad_vectors_and_ids() -> None:
    x = clustered(100, 8)
    bad = x.copy()
    bad[37, 2] = np.nan
    with pytest.raises(ValueError, match="row 37"):
        build_index(bad)
    with pytest.raises(ValueError, match="unique"):
        build_index(x, ids=["a"] * 100)
    with pytest.raises(ValueError, match="100 vectors"):
        build_index(x, ids=["a", "b"])
    index = build_index(x)
    with pytest.raises(ValueError, match="dimension 4"):
        index.search(np.zeros((2, 4), np.float32), 3)


# ------------------------------------------------------------------ persistence


def test_save_load_round_trip_keeps_string_ids(tmp_path: Path) -> None:
    x = clustered(4000, 24, seed=6)
    ids = [f"doc-{i:06d}-π" for i in range(len(x))]
    index = build_index(x, ids=ids, spec=IndexSpec(kind="ivf_flat", nlist=16, nprobe=4, train_sample=4000))
    out = index.save(tmp_path / "ix")
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_FILE, IDS_FILE, PARAMS_FILE])  # no temp leftovers

    params = json.loads((out / PARAMS_FILE).read_text())
    assert params["n"] == 4000 and params["d"] == 24 and params["metric"] == "ip"
    assert params["spec"]["kind"] == "ivf_flat" and params["spec"]["nlist"] == 16
    assert params["recall_at_10"] == index.info.recall_at_10
    assert params["faiss_version"] == faiss.__version__ and params["build"]["build_seconds"] > 0
    assert pq.read_table(out / IDS_FILE).column("sample_id").to_pylist() == ids

    loaded = FaissIndex.load(out)
    assert loaded.spec == index.spec and loaded.info == index.info
    s1, i1 = index.search(x[:20], 7)
    s2, i2 = loaded.search(x[:20], 7)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)
    assert i2[3, 0] == ids[3]


def test_load_refuses_incomplete_or_inconsistent_folders(tmp_path: Path) -> None:
    x = clustered(300, 8)
    out = build_index(x).save(tmp_path / "ix")
    (out / IDS_FILE).rename(tmp_path / "ids.bak")
    with pytest.raises(FileNotFoundError, match="ids.parquet"):
        FaissIndex.load(out)
    pq.write_table(pa.table({"sample_id": ["only-one"]}), out / IDS_FILE)
    with pytest.raises(ValueError, match="files disagree"):
        FaissIndex.load(out)


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    x = clustered(500, 8)
    build_index(x[:200]).save(tmp_path / "ix")
    build_index(x).save(tmp_path / "ix")
    assert FaissIndex.load(tmp_path / "ix").n == 500
    assert len(list((tmp_path / "ix").iterdir())) == 3


# ------------------------------------------------------------------ streaming sources


def _same_results(a: FaissIndex, b: FaissIndex, queries: np.ndarray) -> None:
    sa, ia = a.search(queries, 10)
    sb, ib = b.search(queries, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    assert a.info.recall_at_10 == b.info.recall_at_10


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_npy_shards_stream_to_the_same_index_as_memory(tmp_path: Path, kind: str) -> None:
    x = clustered(6000, 16, seed=7)
    for i, (lo, hi) in enumerate([(0, 2500), (2500, 2600), (2600, 6000)]):
        np.save(tmp_path / f"part-{i:03d}.npy", x[lo:hi])
    spec = IndexSpec(kind=kind, nlist=32, nprobe=4, train_sample=3000)  # type: ignore[arg-type]
    in_memory = build_index(x, spec=spec, batch_size=1000)
    streamed = build_index(tmp_path, spec=spec, batch_size=1000)
    _same_results(in_memory, streamed, x[::97])

    source = open_source(sorted(tmp_path.glob("*.npy")))
    assert isinstance(source, NpyShardSource) and source.n == 6000
    assert all(isinstance(s, np.memmap) for s in source.shards)  # never loaded whole
    sizes = [len(b) for _, b in source.iter_batches(1000)]
    assert max(sizes) == 1000 and sum(sizes) == 6000
    picked = np.array([0, 2499, 2500, 2599, 2600, 5999])
    np.testing.assert_array_equal(source.take(picked), x[picked])


@pytest.mark.parametrize("fixed", [True, False])
def test_parquet_shards_stream_with_their_id_column(tmp_path: Path, fixed: bool) -> None:
    x = clustered(3000, 12, seed=8)
    ids = [f"s{i}" for i in range(len(x))]
    value_type = pa.list_(pa.float32(), 12) if fixed else pa.list_(pa.float32())
    for i, (lo, hi) in enumerate([(0, 1000), (1000, 3000)]):
        vectors = pa.array(list(x[lo:hi]), type=value_type)
        table = pa.table({"sample_id": ids[lo:hi], "embedding": vectors, "other": np.arange(lo, hi)})
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=400)
    spec = IndexSpec(kind="ivf_flat", nlist=8, nprobe=2, train_sample=2000)
    in_memory = build_index(x, ids=ids, spec=spec, batch_size=500)
    streamed = build_index(tmp_path, spec=spec, id_column="sample_id", batch_size=500)
    _same_results(in_memory, streamed, x[::41])
    np.testing.assert_array_equal(streamed.sample_ids, np.array(ids, dtype=object))


def test_parquet_errors_are_explicit(tmp_path: Path) -> None:
    pq.write_table(pa.table({"vec": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="column 'embedding'"):
        build_index(tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="row 1 has 1 values"):
        build_index(tmp_path / "ragged.parquet", column="vec")


def test_one_shot_iterator_is_spooled_and_cleaned_up(tmp_path: Path) -> None:
    x = clustered(4000, 16, seed=9)
    ids = [f"id{i}" for i in range(len(x))]
    spec = IndexSpec(kind="ivf_flat", nlist=16, nprobe=4, train_sample=2000)

    def batches():
        for lo in range(0, len(x), 700):
            yield x[lo : lo + 700], ids[lo : lo + 700]

    spool = tmp_path / "spool"
    spool.mkdir()
    source = open_source(batches(), spool_dir=spool)
    assert source.n == 4000 and source.sample_ids()[5] == "id5"
    streamed = build_index(source, spec=spec)
    source.close()
    assert list(spool.iterdir()) == []
    _same_results(build_index(x, ids=ids, spec=spec), streamed, x[::53])


# ------------------------------------------------------------------ device


def test_cpu_device_is_reported_and_auto_stays_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    info = device.describe_device()
    assert info.faiss_version == faiss.__version__
    if info.gpu_available:
        pytest.skip("this machine has a GPU; the CPU-only expectations do not apply")
    assert info.name == "cpu" and not device.resolve_use_gpu(None)
    index = faiss.IndexFlatIP(4)
    with pytest.warns(RuntimeWarning, match="not available"):
        moved, on_gpu = device.index_to_device(index, use_gpu=True)
    assert moved is index and not on_gpu
    monkeypatch.setenv("THRESHER_FAISS_DEVICE", "sometimes")
    with pytest.raises(ValueError, match="THRESHER_FAISS_DEVICE"):
        device.resolve_use_gpu(None)


def test_failed_gpu_move_falls_back_to_a_working_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_clone(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(device, "gpu_available", lambda: True)
    monkeypatch.setattr(device.faiss, "GpuMultipleClonerOptions", lambda: type("Opts", (), {})(), raising=False)
    monkeypatch.setattr(device.faiss, "index_cpu_to_all_gpus", broken_clone)
    x = clustered(1000, 8)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        index = build_index(x, use_gpu=True)
    assert not index.on_gpu and index.info.device == "cpu" and index.info.recall_at_10 >= min_recall(x, 1000)


def test_env_var_forces_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "gpu_available", lambda: True)
    monkeypatch.setenv("THRESHER_FAISS_DEVICE", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.resolve_use_gpu(None) is False


@pytest.mark.skipif(not device.gpu_available(), reason="needs faiss-gpu and a CUDA device")
def test_gpu_index_matches_cpu_and_saves(tmp_path: Path) -> None:
    x = clustered(20_000, 32, seed=10)
    spec = IndexSpec(kind="ivf_flat", nlist=64, nprobe=64, train_sample=10_000)
    gpu = build_index(x, spec=spec, use_gpu=True)
    cpu = build_index(x, spec=spec, use_gpu=False)
    assert gpu.on_gpu and gpu.info.device.startswith("gpu")
    bound = min_recall(x, gpu.info.recall_queries)
    assert gpu.info.recall_at_10 >= bound and cpu.info.recall_at_10 >= bound
    gpu.save(tmp_path / "g")
    loaded = FaissIndex.load(tmp_path / "g", use_gpu=False)
    q = x[:100]
    assert_topk_up_to_ties(loaded.search_positions(q, 10)[1], cosines(x, q), 10)
