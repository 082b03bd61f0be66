"""pipeline.index.knn_graph against brute-force numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.index.faiss_index import IndexSpec, build_index, l2_normalize
from pipeline.index.knn_graph import (
    KnnGraph,
    exact_knn_graph,
    knn_graph,
    read_edges_parquet,
    symmetrize_graph,
    write_edges_parquet,
)


def random_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def similarities(x: np.ndarray, metric: str = "ip") -> np.ndarray:
    """All pairwise similarities in float64: cosine for "ip", negated squared distance for "l2"."""
    if metric == "ip":
        xn = l2_normalize(x).astype(np.float64)
        return xn @ xn.T
    xd = x.astype(np.float64)
    return -((xd[:, None, :] - xd[None, :, :]) ** 2).sum(-1)


def brute_force(x: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, sims) of every row, self excluded, best first."""
    sim = similarities(x, metric)
    np.fill_diagonal(sim, -np.inf)
    nb = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return nb, np.take_along_axis(sim, nb, axis=1)


def assert_neighbours_up_to_ties(x: np.ndarray, dst: np.ndarray, k: int, metric: str = "ip") -> None:
    """Each row's k neighbours (``dst``, best first) are brute force's, rank by rank, except that
    neighbours whose similarities differ by float32 rounding (1e-5) may come in either order.

    Random data holds such near-ties (1e-7 apart here): float32 FAISS and float64 numpy may order
    them differently, and so may FAISS on another BLAS kernel.
    """
    _, best = brute_force(x, k, metric)
    sim = similarities(x, metric)
    nb = dst.reshape(len(x), k)
    assert all(len(set(row)) == k and r not in row for r, row in enumerate(nb.tolist()))
    np.testing.assert_allclose(np.take_along_axis(sim, nb, axis=1), best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_graph_equals_brute_force(metric: str) -> None:
    x = random_vectors(400, 24, seed=1)
    graph = exact_knn_graph(x, k=7, metric=metric, batch_size=64)
    _, sim = brute_force(x, 7, metric)
    assert graph.num_edges == 400 * 7 and graph.metric == metric and not graph.symmetric
    np.testing.assert_array_equal(graph.src, np.repeat(np.arange(400), 7))
    assert_neighbours_up_to_ties(x, graph.dst, 7, metric)
    np.testing.assert_allclose(graph.sim.reshape(400, 7), sim, rtol=1e-4, atol=1e-4)
    assert graph.src.dtype == np.int64 and graph.dst.dtype == np.int64 and graph.sim.dtype == np.float32
    assert not (graph.src == graph.dst).any()


def test_batch_size_does_not_change_the_graph() -> None:
    x = random_vectors(300, 16, seed=2)
    a = exact_knn_graph(x, k=5, batch_size=7)
    b = exact_knn_graph(x, k=5, batch_size=10_000)
    # batch shapes change the GEMM kernel, hence the last bits: same neighbours up to near-ties
    same_rows(a, b, 5)
    np.testing.assert_allclose(a.sim, b.sim, rtol=1e-5, atol=1e-6)


def test_ivf_graph_with_all_lists_probed_is_exact_and_reconstruction_works() -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(10, 16))
    x = (centers[rng.integers(0, 10, 2000)] + 0.4 * rng.normal(size=(2000, 16))).astype(np.float32)
    exact = exact_knn_graph(x, k=10)
    ivf = build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=16, nprobe=16, train_sample=2000))
    # IVF list scans and the flat index's GEMM round differently: same rows up to near-ties
    same_rows(knn_graph(ivf, x, k=10, method="search"), exact, 10)
    # without vectors the rows are reconstructed from the IVF lists (direct map); the stored
    # rows are already normalised, and re-normalising may swap two near-tied neighbours
    rebuilt = knn_graph(ivf, None, k=10, batch_size=333, method="search")
    same_rows(rebuilt, exact, 10)
    np.testing.assert_allclose(rebuilt.sim, exact.sim, atol=1e-5)

    ivf.tune(nprobe=1)
    approx = knn_graph(ivf, x, k=10, method="search")
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx.dst.reshape(-1, 10), exact.dst.reshape(-1, 10))])
    assert 0.3 < overlap < 1.0  # one list per query: approximate, and the comparison notices


def test_exact_duplicates_never_become_self_loops() -> None:
    base = random_vectors(50, 8, seed=4)
    x = np.concatenate([base, base, base])  # every row has two identical twins
    graph = exact_knn_graph(x, k=4)
    assert graph.num_edges == 150 * 4
    assert not (graph.src == graph.dst).any()
    twins = graph.dst.reshape(150, 4)[:, :2] % 50
    np.testing.assert_array_equal(twins, np.repeat(np.arange(150) % 50, 2).reshape(150, 2))
    np.testing.assert_allclose(graph.sim.reshape(150, 4)[:, :2], 1.0, atol=1e-5)


def test_k_larger_than_the_data_gives_every_other_row() -> None:
    x = random_vectors(6, 4, seed=5)
    graph = exact_knn_graph(x, k=10)
    assert graph.num_edges == 6 * 5
    for row in range(6):
        dst, _ = graph.neighbors(row)
        assert sorted(dst.tolist()) == [r for r in range(6) if r != row]


def test_symmetrize_is_the_union_without_duplicates() -> None:
    x = random_vectors(200, 12, seed=6)
    graph = exact_knn_graph(x, k=3)
    sym = exact_knn_graph(x, k=3, symmetrize=True)
    assert sym.symmetric
    a = graph.to_csr()
    s = sym.to_csr()
    assert s.shape == (200, 200)
    assert abs(s - s.T).max() < 1e-6
    union = ((a != 0) + (a.T != 0)).astype(bool)
    assert s.nnz == union.nnz == sym.num_edges
    assert (s.astype(bool) != union).nnz == 0
    keys = sym.src * 200 + sym.dst
    assert len(np.unique(keys)) == len(keys) and np.all(np.diff(keys) > 0)
    np.testing.assert_array_equal(symmetrize_graph(sym).dst, sym.dst)  # idempotent


def test_csr_holds_the_similarities() -> None:
    x = random_vectors(100, 8, seed=7)
    graph = exact_knn_graph(x, k=4)
    csr = graph.to_csr()
    nb, sim = brute_force(x, 4)
    for row in (0, 55, 99):
        np.testing.assert_allclose(csr[row, nb[row]].toarray().ravel(), sim[row], rtol=1e-4, atol=1e-4)


def test_graph_from_npy_shards_and_mismatch_error(tmp_path: Path) -> None:
    x = random_vectors(500, 10, seed=8)
    np.save(tmp_path / "a.npy", x[:123])
    np.save(tmp_path / "b.npy", x[123:])
    from_shards = exact_knn_graph(tmp_path, k=6, batch_size=100)
    same_rows(from_shards, exact_knn_graph(x, k=6), 6)  # other batch shapes: near-ties may swap
    index = build_index(x[:400])
    with pytest.raises(ValueError, match="same order"):
        knn_graph(index, x, k=3)


def test_edges_parquet_round_trip(tmp_path: Path) -> None:
    x = random_vectors(150, 8, seed=9)
    index = build_index(x, ids=[f"row-{i}" for i in range(150)])
    graph = knn_graph(index, x, k=5, symmetrize=True)
    path = write_edges_parquet(graph, tmp_path / "graph" / "edges.parquet", sample_ids=index.sample_ids)
    assert [p.name for p in path.parent.iterdir()] == ["edges.parquet"]
    table = pq.read_table(path)
    assert table.schema.names == ["src", "dst", "sim", "src_id", "dst_id"]
    assert table.column("src_id")[0].as_py() == f"row-{graph.src[0]}"
    back = read_edges_parquet(path)
    assert isinstance(back, KnnGraph) and back.symmetric and back.n == 150 and back.k == 5
    np.testing.assert_array_equal(back.src, graph.src)
    np.testing.assert_array_equal(back.dst, graph.dst)
    np.testing.assert_array_equal(back.sim, graph.sim)


def same_rows(a: KnnGraph, b: KnnGraph, k: int) -> None:
    """Same similarities per row, and the same neighbours except where two candidates tie
    within float rounding at the k-th place (GEMM and FAISS round differently)."""
    np.testing.assert_array_equal(a.src, b.src)
    sa, sb = a.sim.reshape(-1, k), b.sim.reshape(-1, k)
    np.testing.assert_allclose(np.sort(sa), np.sort(sb), rtol=1e-4, atol=1e-4)
    differ = (np.sort(a.dst.reshape(-1, k)) != np.sort(b.dst.reshape(-1, k))).any(axis=1)
    for row in np.flatnonzero(differ):
        only_a = np.setdiff1d(a.dst.reshape(-1, k)[row], b.dst.reshape(-1, k)[row])
        boundary = sb[row].min()
        swapped = sa[row][np.isin(a.dst.reshape(-1, k)[row], only_a)]
        assert np.all(np.abs(swapped - boundary) < 1e-5), f"row {row}: {only_a} are not tied neighbours"
    assert differ.mean() < 0.01


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_lists_method_with_every_list_probed_is_exact(metric: str) -> None:
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(8, 12))
    x = (centers[rng.integers(0, 8, 1500)] + 0.5 * rng.normal(size=(1500, 12))).astype(np.float32)
    spec = IndexSpec(kind="ivf_flat", metric=metric, nlist=12, nprobe=2, train_sample=1500)  # type: ignore[arg-type]
    ivf = build_index(x, spec=spec)
    exact = exact_knn_graph(x, k=6, metric=metric)
    # small blocks force the row and column tiling and the self column to move between tiles
    lists = knn_graph(ivf, k=6, method="ivf_lists", list_probes=12, batch_size=7)
    same_rows(lists, exact, 6)
    assert not (lists.src == lists.dst).any()
    # the default probes (spec.nprobe = 2 of 12 lists) is approximate; with 125 rows per list
    # on average "auto" chooses the list method
    auto = knn_graph(ivf, x, k=6)
    np.testing.assert_array_equal(auto.dst, knn_graph(ivf, k=6, method="ivf_lists").dst)
    hit = np.mean([len(np.intersect1d(a, b)) / 6 for a, b in zip(auto.dst.reshape(-1, 6), exact.dst.reshape(-1, 6))])
    assert 0.6 < hit < 1.0


def test_auto_uses_per_row_search_when_lists_are_short() -> None:
    x = random_vectors(1000, 8, seed=13)
    ivf = build_index(x, spec=IndexSpec(kind="ivf_flat", nlist=20, nprobe=3, train_sample=1000))  # 50 rows/list
    np.testing.assert_array_equal(knn_graph(ivf, x, k=4).dst, knn_graph(ivf, x, k=4, method="search").dst)


def test_ivf_lists_refuses_other_index_kinds() -> None:
    x = random_vectors(300, 8, seed=12)
    flat = build_index(x)
    with pytest.raises(ValueError, match="ivf_flat"):
        knn_graph(flat, x, k=3, method="ivf_lists")
    np.testing.assert_array_equal(knn_graph(flat, x, k=3).dst, exact_knn_graph(x, k=3).dst)  # auto: search
