"""The instance-selection evaluation harness and GAIS quality on bundled data sets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.instance_selection import (
    evaluate_selectors,
    gais_selector,
    load_dataset,
    main,
    random_stratified_mask,
    summarize,
    to_markdown,
)


def first_per_class(fraction: float):
    """A deterministic toy selector: the first rows of each class."""

    def select(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        mask = np.zeros(y.size, dtype=bool)
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            mask[rows[: max(1, int(fraction * rows.size))]] = True
        return mask

    return select


def one_nn_means(records, method: str) -> float:
    return float(np.mean([r.accuracy for r in records
                          if r.method == method and r.classifier == "1nn"]))


def test_selector_sees_the_training_fold_scaled_on_itself():
    X, y = load_dataset("wine")
    seen = []

    def spy(X_tr: np.ndarray, y_tr: np.ndarray, seed: int) -> np.ndarray:
        seen.append((X_tr.mean(axis=0), X_tr.std(axis=0), X_tr.shape[0], seed))
        return np.ones(y_tr.size, dtype=bool)

    evaluate_selectors(X, y, {"spy": spy}, n_folds=4, seed=7, random_repeats=1)
    assert len(seen) == 4
    for mean, std, n_rows, _ in seen:
        # Exactly standardised: the scaler was fit on these very rows, not on all data.
        np.testing.assert_allclose(mean, 0.0, atol=1e-9)
        np.testing.assert_allclose(std, 1.0, atol=1e-9)
        assert n_rows < X.shape[0]
    assert [s[3] for s in seen] == [7, 8, 9, 10]


def test_records_cover_every_method_fold_and_classifier():
    X, y = load_dataset("iris")
    records = evaluate_selectors(X, y, {"first": first_per_class(0.2)}, dataset="iris",
                                 n_folds=3, random_repeats=2)
    assert len(records) == 3 * 3 * 2  # folds x (full, first, random) x classifiers
    assert {r.method for r in records} == {"full", "first", "random"}
    for fold in range(3):
        first = [r for r in records if r.fold == fold and r.method == "first"]
        rand = [r for r in records if r.fold == fold and r.method == "random"]
        full = [r for r in records if r.fold == fold and r.method == "full"]
        assert first[0].n_selected == rand[0].n_selected
        assert full[0].n_selected == full[0].n_train and full[0].reduction == 0.0
        assert abs(first[0].reduction - 0.8) < 0.03
        for r in records:
            assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.macro_f1 <= 1.0


def test_keeping_everything_scores_like_the_full_set():
    X, y = load_dataset("iris")
    keep_all = lambda X_tr, y_tr, seed: np.ones(y_tr.size, dtype=bool)
    records = evaluate_selectors(X, y, {"all": keep_all}, n_folds=3, random_repeats=1)
    for clf in ("1nn", "logreg"):
        full = [r.accuracy for r in records if r.method == "full" and r.classifier == clf]
        same = [r.accuracy for r in records if r.method == "all" and r.classifier == clf]
        assert full == same


def test_random_baselines_split_when_selectors_keep_different_counts():
    X, y = load_dataset("iris")
    records = evaluate_selectors(X, y, {"a": first_per_class(0.1), "b": first_per_class(0.3)},
                                 n_folds=2, random_repeats=1)
    methods = {r.method for r in records}
    assert {"random~a", "random~b"} <= methods and "random" not in methods


def test_random_stratified_mask_has_exact_counts():
    y = np.array([0] * 10 + [1] * 5 + [2] * 3)
    mask = random_stratified_mask(y, {0: 4, 1: 2, 2: 1}, np.random.default_rng(0))
    assert [int(np.sum(mask & (y == c))) for c in range(3)] == [4, 2, 1]
    with pytest.raises(ValueError, match="only 3"):
        random_stratified_mask(y, {2: 4}, np.random.default_rng(0))


def test_bad_selector_output_is_reported():
    X, y = load_dataset("iris")
    with pytest.raises(ValueError, match="one flag per training row"):
        evaluate_selectors(X, y, {"bad": lambda X_tr, y_tr, s: np.ones(3, bool)}, n_folds=2)
    with pytest.raises(ValueError, match="kept no instances"):
        evaluate_selectors(X, y, {"none": lambda X_tr, y_tr, s: np.zeros(y_tr.size, bool)},
                           n_folds=2)


def test_markdown_table_lists_each_method_once():
    X, y = load_dataset("iris")
    records = evaluate_selectors(X, y, {"first": first_per_class(0.2)}, dataset="iris",
                                 n_folds=2, random_repeats=1)
    table = to_markdown(summarize(records))
    lines = table.splitlines()
    assert lines[0].startswith("| dataset | method | reduction | 1-NN acc")
    assert len(lines) == 2 + 3
    assert any("| iris | first | 0.80" in line for line in lines)


def test_cli_prints_a_table(capsys):
    code = main(["--datasets", "iris", "--variants", "knn", "--scorings", "same_class",
                 "--folds", "3", "--epochs", "5", "--reductions", "0.9",
                 "--random-repeats", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| iris | gais/knn/same_class | 0.900 |" in out
    assert "| iris | random | 0.900 |" in out


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        main(["--datasets", "mnist"])


# Measured before writing these bounds (5 folds, 90% reduction, knn graph, 100 epochs,
# harness seeds 0-3): wine 1-NN same-class 0.927-0.955 vs random 0.881-0.913 vs full
# 0.955-0.961 vs other-class 0.651-0.735; iris same-class 0.853-0.893 vs random 0.864-0.912
# vs other-class 0.667-0.700. On iris GAIS does NOT beat random at this size (12 kept
# instances), so iris is only held to the ablation ordering.


def _quality_records(name: str):
    X, y = load_dataset(name)
    selectors = {s: gais_selector("knn", s, 0.9) for s in ("same_class", "other_class")}
    return evaluate_selectors(X, y, selectors, dataset=name, n_folds=5, seed=0,
                              classifiers=("1nn",))


def test_wine_same_class_subset_beats_random_and_nears_full():
    records = _quality_records("wine")
    same = one_nn_means(records, "same_class")
    assert same >= one_nn_means(records, "random") + 0.01
    assert same >= one_nn_means(records, "full") - 0.05
    assert same >= one_nn_means(records, "other_class") + 0.15


def test_iris_same_class_attention_beats_boundary_attention():
    records = _quality_records("iris")
    same = one_nn_means(records, "same_class")
    assert same >= one_nn_means(records, "other_class") + 0.1
    assert same >= one_nn_means(records, "random") - 0.06


# ------------------------------------------------------------------ classical baselines

from pipeline.evaluate import comparison
from pipeline.evaluate.baselines import (
    SELF_SIZED,
    SIZE_MATCHED,
    cnn_mask,
    enn_mask,
    herding_indices,
    herding_mask,
    kmeans_nearest_mask,
    kmedoids_mask,
    quota_counts,
)
from pipeline.evaluate.instance_selection import SummaryRow, build_selectors


def _three_blobs(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    y = np.repeat([0, 1, 2], [40, 30, 20])
    return centres[y] + rng.normal(size=(y.size, 2)), y


@pytest.mark.parametrize("fn", [kmeans_nearest_mask, kmedoids_mask, herding_mask])
def test_size_matched_baselines_keep_exact_counts_deterministically(fn):
    X, y = _three_blobs()
    counts = {0: 4, 1: 3, 2: 1}
    mask = fn(X, y, counts, 3)
    assert [int(np.sum(mask & (y == c))) for c in range(3)] == [4, 3, 1]
    assert np.array_equal(mask, fn(X, y, counts, 3))
    full = fn(X, y, {0: 40, 1: 30, 2: 20}, 0)
    assert full.all()
    with pytest.raises(ValueError, match="only 20"):
        fn(X, y, {2: 21}, 0)


def test_one_per_class_prototypes_sit_near_the_class_centre():
    X, y = _three_blobs()
    for fn in (kmeans_nearest_mask, kmedoids_mask, herding_mask):
        mask = fn(X, y, {0: 1, 1: 1, 2: 1}, 0)
        for c in range(3):
            kept = X[mask & (y == c)][0]
            dist = np.linalg.norm(X[y == c] - X[y == c].mean(0), axis=1)
            # Within the 25% of the class closest to its mean.
            assert np.linalg.norm(kept - X[y == c].mean(0)) <= np.quantile(dist, 0.25)


def test_herding_picks_the_point_nearest_the_mean_then_matches_the_mean():
    X = np.array([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25
    # 2 is nearest the mean; then 1 (pair mean 1.5 beats 6 with 10); then 10 (triple 4.33).
    assert herding_indices(X, 4).tolist() == [2, 1, 3, 0]


def test_cnn_store_classifies_the_training_set_and_is_small():
    X, y = _three_blobs()
    store = cnn_mask(X, y, seed=0)
    assert 3 <= store.sum() < y.size // 3
    from sklearn.neighbors import KNeighborsClassifier

    pred = KNeighborsClassifier(1).fit(X[store], y[store]).predict(X)
    assert np.array_equal(pred, y)
    assert np.array_equal(store, cnn_mask(X, y, seed=0))


def test_enn_removes_a_planted_mislabel_and_keeps_every_class():
    X, y = _three_blobs()
    y = y.copy()
    y[0] = 1  # a class-0 point labelled 1, deep inside class 0
    keep = enn_mask(X, y, k=3)
    assert not keep[0]
    assert keep.sum() >= y.size - 5
    # A lone instance of a class surrounded by another is never edited away entirely.
    y2 = np.zeros(10, dtype=int)
    y2[4] = 1
    keep2 = enn_mask(np.arange(10.0)[:, None], y2, k=3)
    assert keep2[4]


def test_quota_counts_match_gais_quota():
    from pipeline.select.gais import per_class_quota

    _, y = _three_blobs()
    assert list(quota_counts(y, 0.96).values()) == per_class_quota(y, 0.96).tolist()
    assert sum(quota_counts(y, 0.99).values()) == 3  # at least one per class


def test_harness_runs_every_baseline_on_two_folds():
    X, y = load_dataset("iris")
    selectors, self_sized = build_selectors([], [], [*SIZE_MATCHED, *SELF_SIZED], 0.9)
    assert self_sized == ["cnn", "enn"]
    records = evaluate_selectors(X, y, selectors, dataset="iris", n_folds=2,
                                 random_repeats=1, self_sized=self_sized)
    methods = {r.method for r in records}
    # Self-sized methods get no random twin, so the size-matched ones share one "random".
    assert methods == {"full", "random", *SIZE_MATCHED, *SELF_SIZED}
    by = {(r.method, r.fold, r.classifier): r for r in records}
    for fold in range(2):
        n = by[("random", fold, "1nn")].n_selected
        for m in SIZE_MATCHED:
            assert by[(m, fold, "1nn")].n_selected == n
        assert by[("enn", fold, "1nn")].reduction < 0.2
        assert by[("cnn", fold, "1nn")].reduction > 0.5
    rows = summarize(records)
    assert {r.method: r.n_folds for r in rows}["kmedoids"] == 2
    for m in SIZE_MATCHED:  # prototypes beat chance by far on iris
        assert one_nn_means(records, m) > 0.8
    with pytest.raises(ValueError, match="self_sized names no selector"):
        evaluate_selectors(X, y, {}, self_sized=["cnn"])


def test_repeated_cv_pools_folds_of_every_seed():
    X, y = load_dataset("iris")
    records = []
    for seed in (0, 1):
        records += evaluate_selectors(X, y, {"first": first_per_class(0.2)}, n_folds=2,
                                      seed=seed, random_repeats=1, classifiers=("1nn",))
    rows = summarize(records)
    assert {r.n_folds for r in rows} == {4}


def _row(dataset: str, method: str, acc: float) -> SummaryRow:
    return SummaryRow(dataset, method, 5, 0.96, 0.0, {"1nn": (acc, 0.0)}, {"1nn": (acc, 0.0)})


def test_verdict_needs_the_mean_and_no_big_loss_anywhere():
    base = [_row("a", "b1", 0.90), _row("b", "b1", 0.90), _row("a", "b2", 0.80),
            _row("b", "b2", 0.95)]
    win = comparison.verdict(base + [_row("a", "c", 0.95), _row("b", "c", 0.89)], "c",
                             ["b1", "b2"])
    assert win.best_baseline == "b1" and win.wins
    assert abs(win.per_dataset_gap["b"] + 0.01) < 1e-12
    big_loss = comparison.verdict(base + [_row("a", "c", 0.99), _row("b", "c", 0.87)], "c",
                                  ["b1", "b2"])
    assert not big_loss.wins and "does not win" in big_loss.line()
    low_mean = comparison.verdict(base + [_row("a", "c", 0.90), _row("b", "c", 0.89)], "c",
                                  ["b1", "b2"])
    assert not low_mean.wins
    table = comparison.to_markdown(base, ["b1", "b2"])
    assert "| b2 | 0.800 | 0.950 | 0.875 |" in table
    with pytest.raises(ValueError, match="no results"):
        comparison.verdict(base, "missing", ["b1"])


# Measured before writing these bounds (5 folds, seed 0, 96% reduction, multilevel graph,
# 100 epochs): 1-NN iris coverage 0.920 vs random 0.827; wine 0.916 vs 0.851 (CV seeds 1 and
# 2: iris 0.913 / 0.900 vs 0.813 / 0.812, wine 0.933 / 0.933 vs 0.849 / 0.859).


@pytest.mark.parametrize("name", ["iris", "wine"])
def test_coverage_extension_beats_random_stratified(name):
    X, y = load_dataset(name)
    selectors = {"coverage": gais_selector("multilevel", "same_class_coverage", 0.96)}
    records = evaluate_selectors(X, y, selectors, dataset=name, n_folds=5, seed=0,
                                 classifiers=("1nn",))
    assert one_nn_means(records, "coverage") >= one_nn_means(records, "random") + 0.04
