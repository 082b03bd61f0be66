"""GAIS selection: build a graph, train a GAT on the labels, keep the most-attended instances.

Importance of instance i = attention it *receives*: the weights alpha[l, h](i -> j) with which
its neighbours j attend to it, summed over its outgoing edges (i is the source) and averaged over
the heads h and layers l of the GAT (so a score is in units of "neighbours' worth of attention",
comparable across graphs of different degree). Self loops are excluded: attention a node pays to
itself says nothing about its value to others. The scoring rule restricts which neighbours count:
``same_class`` (y_j == y_i: class prototypes, the default, which the spec reports works),
``other_class`` (y_j != y_i: boundary points) or ``all``; these three keep the top scorers of
each class (the paper's rule).

``same_class_coverage`` is this project's extension (``coverage.py``): the same same-class
scores, used as importance weights of a per-class weighted k-median instead of a top-k cut, so
the kept instances cover each class rather than bunch up in its densest core.

Features are used as given. Scaling is the caller's job (the evaluation harness fits a
StandardScaler on the training fold only), because scaling here would leak test statistics
whenever a caller passed more than the training data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.select.gais.coverage import coverage_select
from pipeline.select.gais.gat import GATConfig, train_gat
from pipeline.select.gais.graphs import VARIANTS, GraphConfig, build_graph

# Which neighbours' attention counts (attention_scores); each keeps the top scorers per class.
SCORING_RULES: tuple[str, ...] = ("same_class", "other_class", "all")
# Extensions: scoring rule -> attention rule it is built on (selection differs, see coverage.py).
EXTENSIONS: dict[str, str] = {"same_class_coverage": "same_class"}
# Everything gais_select accepts as ``scoring``: the paper's rules, then the extensions.
GAIS_SCORINGS: tuple[str, ...] = SCORING_RULES + tuple(EXTENSIONS)


@dataclass
class GAISResult:
    """Outcome of :func:`gais_select`.

    ``per_class_counts`` maps each original label to the number of instances kept;
    ``timings`` holds seconds for ``graph_s``, ``train_s`` (GAT training), ``attention_s``
    (full-graph attention pass), ``score_s``, ``select_s`` and ``total_s``.
    """

    selected_mask: np.ndarray
    scores: np.ndarray
    per_class_counts: dict[Any, int]
    timings: dict[str, float]
    variant: str
    scoring: str
    reduction: float
    graph_stats: dict[str, float] = field(default_factory=dict)
    gat_train_mode: str = ""
    gat_train_accuracy: float = float("nan")

    @property
    def selected_indices(self) -> np.ndarray:
        return np.flatnonzero(self.selected_mask)

    @property
    def achieved_reduction(self) -> float:
        return 1.0 - float(self.selected_mask.sum()) / self.selected_mask.size


def gais_select(
    X: np.ndarray,
    y: np.ndarray,
    variant: str = "multilevel",
    reduction: float = 0.96,
    scoring: str = "same_class",
    seed: int = 0,
    graph_config: GraphConfig | None = None,
    gat_config: GATConfig | None = None,
) -> GAISResult:
    """Select ``1 - reduction`` of the instances of (X, y), each class keeping its share.

    ``X``: (N, d) numeric features, already scaled by the caller. ``y``: N labels of any
    sortable type. ``variant``: one of :data:`VARIANTS`. ``scoring``: one of
    :data:`GAIS_SCORINGS` (the paper's top-k rules or the ``same_class_coverage`` extension). ``reduction`` in [0, 1): fraction
    removed; per-class quotas come from :func:`per_class_quota` (at least one per class).
    Deterministic for a given seed on a given device.
    """
    total_t0 = time.perf_counter()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if scoring not in GAIS_SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(GAIS_SCORINGS)}")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(
            f"X must be (N, d) and y must hold N labels; got X {X.shape} and y {y.shape}"
        )
    classes, y_codes = np.unique(y, return_inverse=True)
    y_codes = y_codes.reshape(-1).astype(np.int64)
    quota = per_class_quota(y_codes, reduction)
    gat_config = gat_config or GATConfig()

    t0 = time.perf_counter()
    graph = build_graph(X, variant, graph_config, y=y_codes, seed=seed)
    graph_s = time.perf_counter() - t0

    graph_stats = dict(graph.stats)
    gat = train_gat(X, y_codes, graph.src, graph.dst, gat_config, groups=graph.groups, seed=seed)
    del graph  # the GAT result holds its own copy of the edges (with self loops)

    t0 = time.perf_counter()
    rule = EXTENSIONS.get(scoring, scoring)
    scores = attention_scores(gat.attention, gat.src, gat.dst, y_codes, rule)
    score_s = time.perf_counter() - t0
    gat.attention.clear()  # E x heads per layer: the biggest arrays; scores are all we need

    t0 = time.perf_counter()
    if scoring in EXTENSIONS:
        mask = coverage_select(X, scores, y_codes, quota, seed=seed)
    else:
        mask = select_top_per_class(scores, y_codes, quota, seed=seed)
    select_s = time.perf_counter() - t0
    counts = {_plain(classes[c]): int(q) for c, q in enumerate(quota)}
    timings = {
        "graph_s": graph_s,
        "train_s": gat.timings["train_s"],
        "attention_s": gat.timings["attention_s"],
        "score_s": score_s,
        "select_s": select_s,
        "total_s": time.perf_counter() - total_t0,
    }
    return GAISResult(
        selected_mask=mask, scores=scores, per_class_counts=counts, timings=timings,
        variant=variant, scoring=scoring, reduction=reduction, graph_stats=graph_stats,
        gat_train_mode=gat.train_mode, gat_train_accuracy=gat.train_accuracy,
    )


def attention_scores(
    attention: list[np.ndarray],
    src: np.ndarray,
    dst: np.ndarray,
    y_codes: np.ndarray,
    scoring: str = "same_class",
) -> np.ndarray:
    """Attention received by each node: sum over its outgoing non-self edges allowed by the
    scoring rule of alpha(src -> dst), averaged over heads and layers. float64 (N,)."""
    if scoring not in SCORING_RULES:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORING_RULES)}")
    if not attention:
        raise ValueError("attention is empty: expected one (E, heads) array per GAT layer")
    n = y_codes.shape[0]
    keep = src != dst
    if scoring == "same_class":
        keep &= y_codes[src] == y_codes[dst]
    elif scoring == "other_class":
        keep &= y_codes[src] != y_codes[dst]
    weight = np.zeros(int(keep.sum()), dtype=np.float64)
    n_terms = 0
    for layer in attention:
        if layer.shape[0] != src.shape[0]:
            raise ValueError(
                f"attention has {layer.shape[0]} rows but the edge list has {src.shape[0]}"
            )
        weight += layer[keep].sum(axis=1, dtype=np.float64)
        n_terms += layer.shape[1]
    return np.bincount(src[keep], weights=weight / n_terms, minlength=n)


def per_class_quota(y_codes: np.ndarray, reduction: float) -> np.ndarray:
    """Instances to keep per class (index = class code) for a target reduction rate.

    Total kept = max(C, round(N * (1 - reduction))); each class gets at least 1 and at most its
    size, the rest is shared in proportion to class size by largest remainder (ties to the
    smaller class code), so every class keeps its share to within one instance.
    """
    if not 0.0 <= reduction < 1.0:
        raise ValueError(f"reduction must be in [0, 1), got {reduction}")
    y_codes = np.asarray(y_codes)
    sizes = np.bincount(y_codes).astype(np.int64)
    if np.any(sizes == 0):
        raise ValueError("class codes must be 0..C-1 with every class present")
    n, n_classes = int(sizes.sum()), sizes.size
    total = min(n, max(n_classes, round(n * (1.0 - reduction))))
    ideal = sizes * (total / n)
    quota = np.clip(np.floor(ideal).astype(np.int64), 1, sizes)
    # Largest remainder, in two directions: the floor/1-clip can leave the sum below or above.
    while quota.sum() < total:
        room = quota < sizes
        gap = np.where(room, ideal - quota, -np.inf)
        quota[int(np.argmax(gap))] += 1
    while quota.sum() > total:
        spare = quota > 1
        excess = np.where(spare, quota - ideal, -np.inf)
        quota[int(np.argmax(excess))] -= 1
    return quota


def select_top_per_class(
    scores: np.ndarray, y_codes: np.ndarray, quota: np.ndarray, *, seed: int = 0
) -> np.ndarray:
    """Boolean mask keeping, in each class c, the ``quota[c]`` highest-scoring instances.

    Ties (common: many nodes receive no attention under ``other_class``) are broken by a seeded
    random order rather than by index, so position in the file cannot bias the selection.
    """
    n = scores.shape[0]
    tie_break = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tie_break, -scores))
    mask = np.zeros(n, dtype=bool)
    ranked_codes = y_codes[order]
    for c, q in enumerate(np.asarray(quota).tolist()):
        mask[order[ranked_codes == c][:q]] = True
    return mask


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
