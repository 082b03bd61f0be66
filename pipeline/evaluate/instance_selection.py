"""Evaluation harness for instance selection (GAIS and any selector with the same signature).

Protocol: stratified k-fold (seeded); a StandardScaler is fit on the training fold only and
applied to both folds; the selector sees only the scaled training fold; 1-NN and logistic
regression are trained on the selected subset and tested on the held-out fold. Every fold also
scores the full training set and random stratified subsets with exactly the selector's
per-class counts (several seeded draws, averaged), so comparisons are paired by fold.
Selectors that choose their own size (``self_sized``: condensed / edited nearest neighbour)
get no random twin; their reduction is reported next to their accuracy. The classical
baselines are in ``pipeline.evaluate.baselines``; the like-for-like table and the verdict of
issue 12 in ``pipeline.evaluate.comparison``.

CLI::

    python -m pipeline.evaluate.instance_selection --datasets iris,wine,breast_cancer,digits \\
        --variants minibatch,hash,multilevel,multiview,knn --folds 5
    python -m pipeline.evaluate.instance_selection --variants multilevel \\
        --scorings same_class,same_class_coverage --baselines all --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

# (scaled training features, training labels, seed) -> boolean mask over the training rows.
Selector = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

DATASETS: tuple[str, ...] = ("iris", "wine", "breast_cancer", "digits")
CLASSIFIERS: tuple[str, ...] = ("1nn", "logreg")
FULL, RANDOM = "full", "random"


@dataclass(frozen=True)
class FoldRecord:
    """One (dataset, method, fold, classifier) measurement."""

    dataset: str
    method: str
    fold: int
    classifier: str
    accuracy: float
    macro_f1: float
    reduction: float
    select_s: float
    n_train: int
    n_selected: int
    seed: int = 0  # the CV split's seed: repeated cross-validation has one per repeat


@dataclass(frozen=True)
class SummaryRow:
    """Mean and standard deviation over folds (of every repeat) for one (dataset, method)."""

    dataset: str
    method: str
    n_folds: int
    reduction: float
    select_s: float
    accuracy: dict[str, tuple[float, float]]
    macro_f1: dict[str, tuple[float, float]]


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One of scikit-learn's bundled data sets (no download): iris, wine, breast_cancer, digits."""
    from sklearn import datasets

    loaders = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(loaders)}")
    X, y = loaders[name](return_X_y=True)
    return np.asarray(X, dtype=np.float64), np.asarray(y)


def gais_selector(
    variant: str,
    scoring: str = "same_class",
    reduction: float = 0.96,
    *,
    graph_config: object | None = None,
    gat_config: object | None = None,
) -> Selector:
    """A :data:`Selector` running :func:`pipeline.select.gais.gais_select`."""
    from pipeline.select.gais import gais_select

    def select(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        return gais_select(
            X, y, variant=variant, reduction=reduction, scoring=scoring, seed=seed,
            graph_config=graph_config, gat_config=gat_config,
        ).selected_mask

    return select


def random_stratified_mask(
    y: np.ndarray, counts: dict, rng: np.random.Generator
) -> np.ndarray:
    """Uniformly random subset holding exactly ``counts[label]`` rows of each label."""
    mask = np.zeros(y.shape[0], dtype=bool)
    for label, count in counts.items():
        members = np.flatnonzero(y == label)
        if count > members.size:
            raise ValueError(f"asked for {count} rows of class {label!r}, only {members.size}")
        mask[rng.choice(members, size=count, replace=False)] = True
    return mask


def evaluate_selectors(
    X: np.ndarray,
    y: np.ndarray,
    selectors: dict[str, Selector],
    *,
    dataset: str = "data",
    n_folds: int = 5,
    seed: int = 0,
    random_repeats: int = 5,
    classifiers: Sequence[str] = CLASSIFIERS,
    self_sized: Iterable[str] = (),
) -> list[FoldRecord]:
    """Run the protocol described in the module docstring; one record per fold, method and
    classifier. Random baselines are named ``random`` when every size-matched selector kept
    the same per-class counts in a fold, else ``random~<selector>``; selectors named in
    ``self_sized`` choose their own size and get no random twin."""
    self_sized = set(self_sized)
    unknown = self_sized - set(selectors)
    if unknown:
        raise ValueError(f"self_sized names no selector: {', '.join(sorted(unknown))}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (N, d) with one label per row; got {X.shape} and {y.shape}")
    for clf in classifiers:
        if clf not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {clf!r}; choose from {', '.join(CLASSIFIERS)}")
    if random_repeats < 1:
        raise ValueError(f"random_repeats must be at least 1, got {random_repeats}")
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    records: list[FoldRecord] = []
    for fold, (train, test) in enumerate(folds.split(X, y)):
        scaler = StandardScaler().fit(X[train])
        X_tr, X_te = scaler.transform(X[train]), scaler.transform(X[test])
        y_tr, y_te = y[train], y[test]
        n_train = train.size

        def record(method: str, mask: np.ndarray, select_s: float,
                   scores: dict[str, tuple[float, float]], fold: int = fold,
                   n_train: int = n_train) -> None:
            for clf in classifiers:
                acc, f1 = scores[clf]
                records.append(FoldRecord(
                    dataset=dataset, method=method, fold=fold, classifier=clf,
                    accuracy=acc, macro_f1=f1, reduction=1.0 - mask.sum() / n_train,
                    select_s=select_s, n_train=n_train, n_selected=int(mask.sum()), seed=seed,
                ))

        full = np.ones(n_train, dtype=bool)
        record(FULL, full, 0.0, _fit_score(X_tr, y_tr, full, X_te, y_te, classifiers))

        counts_of: dict[str, dict] = {}
        for name, selector in selectors.items():
            t0 = time.perf_counter()
            mask = np.asarray(selector(X_tr, y_tr, seed + fold), dtype=bool)
            select_s = time.perf_counter() - t0
            if mask.shape != (n_train,):
                raise ValueError(
                    f"selector {name!r} returned a mask of shape {mask.shape}; expected "
                    f"({n_train},), one flag per training row"
                )
            if not mask.any():
                raise ValueError(f"selector {name!r} kept no instances in fold {fold}")
            if name not in self_sized:
                counts_of[name] = {lab: int(np.sum(mask & (y_tr == lab)))
                                   for lab in np.unique(y_tr)}
            record(name, mask, select_s, _fit_score(X_tr, y_tr, mask, X_te, y_te, classifiers))

        distinct = {tuple(sorted(c.items())) for c in counts_of.values()}
        targets = ([(RANDOM, next(iter(counts_of.values())))] if len(distinct) == 1
                   else [(f"{RANDOM}~{name}", c) for name, c in counts_of.items()])
        for method, counts in targets:
            rng = np.random.default_rng([seed, fold])
            draws = [_fit_score(X_tr, y_tr, random_stratified_mask(y_tr, counts, rng),
                                X_te, y_te, classifiers) for _ in range(random_repeats)]
            mean_scores = {clf: (float(np.mean([d[clf][0] for d in draws])),
                                 float(np.mean([d[clf][1] for d in draws])))
                           for clf in classifiers}
            # Time one draw, so the table's time column is measured for random too.
            t0 = time.perf_counter()
            mask = random_stratified_mask(y_tr, counts, np.random.default_rng(0))
            record(method, mask, time.perf_counter() - t0, mean_scores)
    return records


def summarize(records: Iterable[FoldRecord]) -> list[SummaryRow]:
    """Mean and std over folds per (dataset, method), in first-seen order."""
    grouped: dict[tuple[str, str], list[FoldRecord]] = defaultdict(list)
    for r in records:
        grouped[(r.dataset, r.method)].append(r)
    rows = []
    for (dataset, method), recs in grouped.items():
        clfs = list(dict.fromkeys(r.classifier for r in recs))
        acc = {c: _mean_std([r.accuracy for r in recs if r.classifier == c]) for c in clfs}
        f1 = {c: _mean_std([r.macro_f1 for r in recs if r.classifier == c]) for c in clfs}
        rows.append(SummaryRow(
            dataset=dataset, method=method, n_folds=len({(r.seed, r.fold) for r in recs}),
            reduction=float(np.mean([r.reduction for r in recs])),
            select_s=float(np.median([r.select_s for r in recs])), accuracy=acc, macro_f1=f1,
        ))
    return rows


def to_markdown(rows: Sequence[SummaryRow]) -> str:
    """Markdown table: mean ± std over folds; selection time is the median over folds.
    ``reduction`` is each method's own (mean over folds): self-sized methods differ."""
    if not rows:
        return ""
    clfs = list(rows[0].accuracy)
    label = {"1nn": "1-NN", "logreg": "LR"}
    head = ["dataset", "method", "reduction"]
    for c in clfs:
        head += [f"{label.get(c, c)} acc", f"{label.get(c, c)} macro-F1"]
    head.append("select s (median)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.dataset, r.method, f"{r.reduction:.3f}"]
        for c in clfs:
            cells += [_pm(r.accuracy[c]), _pm(r.macro_f1[c])]
        cells.append(f"{r.select_s:.3f}" if r.select_s < 0.1 else f"{r.select_s:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fit_score(
    X_tr: np.ndarray, y_tr: np.ndarray, mask: np.ndarray, X_te: np.ndarray, y_te: np.ndarray,
    classifiers: Sequence[str],
) -> dict[str, tuple[float, float]]:
    out = {}
    for clf in classifiers:
        model = (KNeighborsClassifier(n_neighbors=1) if clf == "1nn"
                 else LogisticRegression(max_iter=2000))
        with warnings.catch_warnings():
            # A handful of instances per class is often linearly separable: lbfgs then keeps
            # growing the weights until max_iter. The fit is still usable; the warning is noise.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X_tr[mask], y_tr[mask])
        pred = model.predict(X_te)
        out[clf] = (float(accuracy_score(y_te, pred)),
                    float(f1_score(y_te, pred, average="macro", zero_division=0)))
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def _pm(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_selectors(variants: Sequence[str], scorings: Sequence[str], baselines: Sequence[str],
                    reduction: float, gat_config: object | None = None
                    ) -> tuple[dict[str, Selector], list[str]]:
    """GAIS selectors named ``gais/<variant>/<scoring>`` plus the named baselines; returns
    (selectors, names of the self-sized ones)."""
    from pipeline.evaluate.baselines import SELF_SIZED, SIZE_MATCHED

    selectors: dict[str, Selector] = {
        f"gais/{v}/{s}": gais_selector(v, s, reduction, gat_config=gat_config)
        for v in variants for s in scorings
    }
    for b in baselines:
        if b in SIZE_MATCHED:
            selectors[b] = SIZE_MATCHED[b](reduction)
        elif b in SELF_SIZED:
            selectors[b] = SELF_SIZED[b]()
        else:
            raise ValueError(f"unknown baseline {b!r}; choose from "
                             f"{', '.join([*SIZE_MATCHED, *SELF_SIZED])}")
    return selectors, [b for b in baselines if b in SELF_SIZED]


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.evaluate import comparison
    from pipeline.evaluate.baselines import SELF_SIZED, SIZE_MATCHED
    from pipeline.select.gais import (
        EXTENSIONS,
        GAIS_SCORINGS,
        SCORING_RULES,
        VARIANTS,
        GATConfig,
    )

    all_baselines = [*SIZE_MATCHED, *SELF_SIZED]
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate.instance_selection",
        description="Cross-validated evaluation of GAIS instance selection against the full "
                    "training set, random stratified subsets of the same size and (with "
                    "--baselines) classical instance-selection methods.",
    )
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated graph variants from {','.join(VARIANTS)}")
    parser.add_argument("--scorings", default=",".join(SCORING_RULES),
                        help=f"comma-separated scoring rules from {','.join(GAIS_SCORINGS)}")
    parser.add_argument("--baselines", default="",
                        help=f"comma-separated baselines from {','.join(all_baselines)}, "
                             "or 'all' (default: none)")
    parser.add_argument("--reductions", default="0.96",
                        help="comma-separated reduction rates, each in [0, 1)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", default="0",
                        help="comma-separated CV seeds: one full k-fold run per seed (repeated "
                             "cross-validation); tables pool every fold of every run")
    parser.add_argument("--epochs", type=int, default=GATConfig().epochs,
                        help="GAT training epochs")
    parser.add_argument("--random-repeats", type=int, default=5,
                        help="random stratified draws averaged per fold")
    parser.add_argument("--json", default=None, help="also write every fold record here")
    args = parser.parse_args(argv)

    datasets = _split_list(args.datasets)
    variants = _split_list(args.variants)
    scorings = _split_list(args.scorings)
    baselines = all_baselines if args.baselines == "all" else _split_list(args.baselines)
    reductions = [float(r) for r in _split_list(args.reductions)]
    try:
        seeds = [int(x) for x in _split_list(args.seeds)]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    for bad, allowed, what in ((datasets, DATASETS, "data set"), (variants, VARIANTS, "variant"),
                               (scorings, GAIS_SCORINGS, "scoring rule"),
                               (baselines, all_baselines, "baseline")):
        unknown = [b for b in bad if b not in allowed]
        if unknown:
            parser.error(f"unknown {what}(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(allowed)}")
    gat_config = GATConfig(epochs=args.epochs)
    all_records: list[FoldRecord] = []
    for reduction in reductions:
        print(f"\n### reduction {reduction}\n", flush=True)
        records: list[FoldRecord] = []
        for name in datasets:
            X, y = load_dataset(name)
            selectors, self_sized = build_selectors(variants, scorings, baselines, reduction,
                                                    gat_config)
            t0 = time.perf_counter()
            for seed in seeds:
                records += evaluate_selectors(X, y, selectors, dataset=name,
                                              n_folds=args.folds, seed=seed,
                                              random_repeats=args.random_repeats,
                                              self_sized=self_sized)
            print(f"<!-- {name}: {time.perf_counter() - t0:.0f} s -->", file=sys.stderr,
                  flush=True)
        rows = summarize(records)
        print(to_markdown(rows), flush=True)
        methods = {r.method for r in rows}
        matched = [RANDOM] if RANDOM in methods else []
        matched += [b for b in baselines if b in SIZE_MATCHED]
        gais = [f"gais/{v}/{s}" for v in variants for s in scorings]
        if matched and len(datasets) > 1:
            print(f"\nSize-matched methods, 1-NN accuracy (reduction {reduction}):\n")
            print(comparison.to_markdown(rows, [*matched, *gais]), flush=True)
            for cand in [g for g in gais if g.rsplit("/", 1)[1] in EXTENSIONS] or gais:
                print("\n" + comparison.verdict(rows, cand, matched).line(), flush=True)
        all_records += records
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in all_records], fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
