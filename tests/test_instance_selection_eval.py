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
    keep_all = lambda X_tr, y_tr, seed: np.ones(y_tr.size, dtype=bool)  # noqa: E731
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
