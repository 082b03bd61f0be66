"""Like-for-like comparison of size-matched instance selectors, and issue 12's verdict.

Only methods that keep the same per-class counts are compared here (random stratified,
k-means nearest-to-centre, k-medoids, herding, the GAIS modes); condensed / edited nearest
neighbour choose their own reduction and are reported beside, never ranked against them.

The verdict: a candidate *wins* when its accuracy averaged over the data sets is at least that
of the best baseline (the baseline with the highest such average), and on no data set is it
more than ``tolerance`` below that baseline. Accuracies are compared with a 1e-9 slack so
that a float rounding difference cannot flip a tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluate.instance_selection import SummaryRow

SLACK = 1e-9


@dataclass(frozen=True)
class Verdict:
    candidate: str
    best_baseline: str
    candidate_mean: float
    baseline_mean: float
    per_dataset_gap: dict[str, float]  # candidate - best baseline, per data set
    tolerance: float

    @property
    def wins(self) -> bool:
        return (self.candidate_mean >= self.baseline_mean - SLACK
                and min(self.per_dataset_gap.values()) >= -self.tolerance - SLACK)

    def line(self) -> str:
        gaps = ", ".join(f"{d} {g:+.3f}" for d, g in self.per_dataset_gap.items())
        return (f"{self.candidate}: mean {self.candidate_mean:.3f} vs best baseline "
                f"{self.best_baseline} {self.baseline_mean:.3f} (per data set: {gaps}; "
                f"tolerance {self.tolerance}) -> {'WINS' if self.wins else 'does not win'}")


def accuracy_table(rows: Sequence[SummaryRow], methods: Sequence[str], classifier: str = "1nn"
                   ) -> dict[str, dict[str, float]]:
    """method -> data set -> mean accuracy over folds (methods missing on a data set raise)."""
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    by_key = {(r.dataset, r.method): r for r in rows}
    table: dict[str, dict[str, float]] = {}
    for m in methods:
        table[m] = {}
        for d in datasets:
            if (d, m) not in by_key:
                raise ValueError(f"no results for method {m!r} on data set {d!r}")
            table[m][d] = by_key[(d, m)].accuracy[classifier][0]
    return table


def verdict(rows: Sequence[SummaryRow], candidate: str, baselines: Sequence[str],
            classifier: str = "1nn", tolerance: float = 0.02) -> Verdict:
    table = accuracy_table(rows, [candidate, *baselines], classifier)
    means = {m: float(np.mean(list(v.values()))) for m, v in table.items()}
    # Highest mean wins; on an exact tie the baseline listed first is "best" (explicit rule).
    best = max(baselines, key=lambda m: (means[m], -list(baselines).index(m)))
    gaps = {d: table[candidate][d] - table[best][d] for d in table[candidate]}
    return Verdict(candidate, best, means[candidate], means[best], gaps, tolerance)


def to_markdown(rows: Sequence[SummaryRow], methods: Sequence[str], classifier: str = "1nn"
                ) -> str:
    """One line per method: mean accuracy per data set and averaged over data sets."""
    table = accuracy_table(rows, methods, classifier)
    datasets = list(next(iter(table.values())))
    head = ["method", *datasets, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, per in table.items():
        cells = [m, *(f"{per[d]:.3f}" for d in datasets), f"{np.mean(list(per.values())):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
