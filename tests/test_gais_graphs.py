"""Invariants of the GAIS graph variants (pipeline.select.gais.graphs)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.select.gais.graphs import (
    VARIANTS,
    HashConfig,
    KNNConfig,
    MiniBatchConfig,
    MultiLevelConfig,
    MultiViewConfig,
    build_graph,
    symmetrize,
)

# Small groups so that bucketing, capping, splitting and fallbacks all happen at test sizes.
CONFIGS = {
    "minibatch": MiniBatchConfig(batch_size=100, k=6),
    "hash": HashConfig(target_bucket_size=16, k=6, max_bucket_size=40),
    "multilevel": MultiLevelConfig(coarse_target_size=160, fine_target_size=16, k=6, k_cross=2,
                                   max_bucket_size=40),
    "multiview": MultiViewConfig(n_views=3, target_bucket_size=16, k=4, max_bucket_size=40),
    "knn": KNNConfig(k=6),
}
CAPS = {"minibatch": 100, "hash": 40, "multilevel": 40, "multiview": 40}


def blobs(n: int, d: int = 8, n_classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture: two clusters per class, unequal class sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(2 * n_classes, d))
    cluster = rng.choice(2 * n_classes, size=n, p=np.linspace(1, 2, 2 * n_classes) /
                         np.linspace(1, 2, 2 * n_classes).sum())
    X = centres[cluster] + rng.normal(size=(n, d))
    return X.astype(np.float32), cluster % n_classes


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return blobs(900)


@pytest.mark.parametrize("variant", VARIANTS)
def test_edge_list_is_symmetric_loop_free_and_deduplicated(variant, data):
    X, y = data
    g = build_graph(X, variant, CONFIGS[variant], y=y, seed=3)
    n = X.shape[0]
    assert g.src.dtype == np.int64 and g.dst.dtype == np.int64
    assert g.src.shape == g.dst.shape and g.n_nodes == n
    assert g.src.min() >= 0 and g.dst.max() < n
    assert not np.any(g.src == g.dst)
    keys = g.src * n + g.dst
    assert np.unique(keys).size == keys.size, "duplicate edges"
    assert np.array_equal(np.sort(keys), np.sort(g.dst * n + g.src)), "missing reverse edges"
    assert g.degree().min() >= 1, "isolated node"
    assert g.stats["n_isolated"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_graph(variant, data):
    X, y = data
    a = build_graph(X, variant, CONFIGS[variant], y=y, seed=11)
    b = build_graph(X, variant, CONFIGS[variant], y=y, seed=11)
    assert np.array_equal(a.src, b.src) and np.array_equal(a.dst, b.dst)


@pytest.mark.parametrize("variant", ["minibatch", "hash", "multilevel", "multiview"])
def test_other_seed_other_graph(variant, data):
    X, y = data
    a = build_graph(X, variant, CONFIGS[variant], y=y, seed=1)
    b = build_graph(X, variant, CONFIGS[variant], y=y, seed=2)
    assert a.n_edges != b.n_edges or not np.array_equal(a.src * 10**6 + a.dst,
                                                         b.src * 10**6 + b.dst)


@pytest.mark.parametrize("variant", ["minibatch", "hash", "multilevel", "multiview"])
def test_groups_never_exceed_the_cap(variant, data):
    X, y = data
    g = build_graph(X, variant, CONFIGS[variant], y=y, seed=5)
    assert g.groups is not None and g.groups.shape == (X.shape[0],)
    assert np.bincount(g.groups).max() <= CAPS[variant]
    assert g.stats["max_group_size"] <= CAPS[variant]


@pytest.mark.parametrize("variant", ["minibatch", "hash", "multilevel", "multiview"])
def test_edge_count_grows_linearly(variant):
    """Edges per node stay under a bound that does not depend on N."""
    per_node = []
    for n in (600, 4800):
        X, y = blobs(n, seed=n)
        g = build_graph(X, variant, CONFIGS[variant], y=y, seed=0)
        per_node.append(g.n_edges / n)
    cfg = CONFIGS[variant]
    k_total = cfg.k + getattr(cfg, "k_cross", 0)
    k_total *= getattr(cfg, "n_views", 1)
    # Each node adds at most k_total out-edges (plus k for fallbacks); symmetrising doubles.
    # (Multiview's views overlap less as N grows, so its count rises towards the bound.)
    assert max(per_node) <= 2 * (k_total + cfg.k)


def test_minibatches_are_stratified_and_edges_stay_inside(data):
    X, y = data
    cfg = MiniBatchConfig(batch_size=128, k=5)
    g = build_graph(X, "minibatch", cfg, y=y, seed=0)
    n_batches = int(np.ceil(X.shape[0] / cfg.batch_size))
    assert g.groups.max() + 1 == n_batches
    for c in np.unique(y):
        per_batch = np.bincount(g.groups[y == c], minlength=n_batches)
        share = np.sum(y == c) / n_batches
        assert per_batch.min() >= np.floor(share) and per_batch.max() <= np.ceil(share)
    assert np.bincount(g.groups).max() <= cfg.batch_size
    assert np.all(g.groups[g.src] == g.groups[g.dst])


def test_knn_matches_brute_force():
    X, _ = blobs(300, seed=7)
    k = 5
    g = build_graph(X, "knn", KNNConfig(k=k))
    d = ((X[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    src, dst = symmetrize(nn.reshape(-1), np.repeat(np.arange(300), k), 300)
    got, want = set(zip(g.src.tolist(), g.dst.tolist())), set(zip(src.tolist(), dst.tolist()))
    # FAISS computes float32 |x|^2 + |y|^2 - 2 x.y: rounding of that size may swap a node's k-th
    # and (k+1)-th neighbours where their distances nearly tie, and nothing else may differ.
    sq = (X.astype(np.float64) ** 2).sum(-1)
    tol = 1e-6 * (sq + sq.max())
    kth = np.sort(d, axis=1)[:, k - 1]
    for i, j in got ^ want:
        assert min(abs(d[i, j] - kth[i]) / tol[i], abs(d[j, i] - kth[j]) / tol[j]) <= 1.0, (i, j)
    assert len(got ^ want) <= 8  # at most two swapped pairs (4 directed edges each)


def test_hash_singletons_are_attached_through_coarser_codes():
    X, _ = blobs(60, seed=4)
    # 6 bits for 60 points: most buckets hold one or two points.
    g = build_graph(X, "hash", HashConfig(n_bits=6, k=3, min_neighbors=2), seed=0)
    assert g.stats["n_orphans"] > 0
    assert g.stats["max_fallback_bits_dropped"] >= 1
    assert g.degree().min() >= 2


def test_multilevel_links_neighbouring_fine_buckets(data):
    X, _ = data
    g = build_graph(X, "multilevel", CONFIGS["multilevel"], seed=0)
    assert g.stats["max_fine_bits"] >= 1
    assert g.stats["n_cross_edges"] > 0
    assert np.any(g.groups[g.src] != g.groups[g.dst])
    no_cross = build_graph(X, "multilevel", MultiLevelConfig(
        coarse_target_size=160, fine_target_size=16, k=6, k_cross=0, max_bucket_size=40), seed=0)
    assert no_cross.stats["n_cross_edges"] == 0 and no_cross.n_edges < g.n_edges


def test_hash_neighbours_are_mostly_near():
    """LSH buckets should keep neighbours much closer than random pairs."""
    X, _ = blobs(900, seed=9)
    g = build_graph(X, "hash", CONFIGS["hash"], seed=0)
    edge_d = np.linalg.norm(X[g.src] - X[g.dst], axis=1).mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 900, 5000), rng.integers(0, 900, 5000)
    assert edge_d < 0.5 * np.linalg.norm(X[a] - X[b], axis=1).mean()


def test_symmetrize_drops_loops_and_duplicates():
    src, dst = symmetrize(np.array([0, 1, 2, 2, 0]), np.array([1, 0, 2, 0, 1]), 3)
    assert list(zip(src.tolist(), dst.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]


def test_bad_inputs_are_rejected_with_reasons(data):
    X, y = data
    with pytest.raises(ValueError, match="unknown graph variant"):
        build_graph(X, "lsh", y=y)
    with pytest.raises(TypeError, match="HashConfig"):
        build_graph(X, "hash", KNNConfig())
    with pytest.raises(ValueError, match="needs class labels"):
        build_graph(X, "minibatch")
    with pytest.raises(ValueError, match="at least 2 instances"):
        build_graph(X[:1], "knn")
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_graph(bad, "hash")
    with pytest.raises(ValueError, match="2-D"):
        build_graph(X[:, 0], "hash")
