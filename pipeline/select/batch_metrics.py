"""Concept statistics of a training batch, and CABS batches compared with IID batches.

Definitions (all over the batch's concept *instances*, i.e. repeats counted):

* ``distinct_concepts``: number of concepts with at least one instance in the batch.
* ``entropy_bits``: Shannon entropy (base 2) of the batch's instance distribution over concepts,
  p_c = instances of c / instances in the batch. ``normalised_entropy`` divides by
  log2(distinct_concepts) (1.0 = perfectly even over the concepts present; 0.0 with one concept).
* ``gini``: Gini coefficient of the per-concept instance counts over the concepts present in the
  batch (0 = every present concept equally often; towards 1 = a few concepts dominate).
* ``mean_instances``: instances per sample.
* long tail: a concept is in the long tail when its reference frequency (instances in a reference
  set, normally the whole pool or the super-batch) is at or below the ``tail_quantile`` quantile
  (default 0.5, the median) of the frequencies of the concepts that occur in the reference set.
  ``tail_instance_share`` is the share of the batch's instances that belong to tail concepts and
  ``tail_distinct`` the number of distinct tail concepts in the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from pipeline.select.cabs import ConceptTable


@dataclass(frozen=True)
class BatchConceptReport:
    n_samples: int
    n_instances: int
    distinct_concepts: int
    entropy_bits: float
    normalised_entropy: float
    gini: float
    mean_instances: float
    tail_instance_share: float
    tail_distinct: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def concept_frequencies(table: ConceptTable) -> np.ndarray:
    """Instances of each concept id over the whole table (length ``table.n_concepts``)."""
    return np.bincount(table.concept_ids, minlength=table.n_concepts)


def long_tail_mask(frequencies: np.ndarray, quantile: float = 0.5) -> np.ndarray:
    """Concepts whose frequency is > 0 and at or below the given quantile of the non-zero ones."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"tail quantile must lie in [0, 1], got {quantile}")
    freq = np.asarray(frequencies)
    present = freq > 0
    if not present.any():
        return np.zeros(freq.shape, dtype=bool)
    cut = np.quantile(freq[present], quantile)
    return present & (freq <= cut)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0.0 for an empty or all-zero input)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    total = x.sum()
    if x.size == 0 or total == 0:
        return 0.0
    k = x.size
    return float(2.0 * np.dot(np.arange(1, k + 1), x) / (k * total) - (k + 1) / k)


def batch_report(table: ConceptTable, rows: np.ndarray | None = None, tail: np.ndarray | None = None) -> BatchConceptReport:
    """Concept statistics of ``table``'s ``rows`` (all rows when None).

    ``tail`` is a boolean mask over concept ids (see :func:`long_tail_mask`); without one the tail
    is taken from the frequencies inside ``table`` itself.
    """
    sub = table if rows is None else table.take(np.asarray(rows, dtype=np.int64))
    counts = np.bincount(sub.concept_ids, minlength=table.n_concepts)
    if tail is None:
        tail = long_tail_mask(concept_frequencies(table))
    elif tail.shape != (table.n_concepts,):
        raise ValueError(f"tail mask has shape {tail.shape}; expected ({table.n_concepts},), one flag per concept id")
    present = counts[counts > 0]
    n_inst = int(present.sum())
    if n_inst:
        p = present / n_inst
        entropy = float(-(p * np.log2(p)).sum())
    else:
        entropy = 0.0
    k = int(present.size)
    return BatchConceptReport(
        n_samples=sub.n_rows,
        n_instances=n_inst,
        distinct_concepts=k,
        entropy_bits=entropy,
        normalised_entropy=entropy / np.log2(k) if k > 1 else 0.0,
        gini=gini(present),
        mean_instances=n_inst / sub.n_rows if sub.n_rows else 0.0,
        tail_instance_share=float(counts[tail].sum() / n_inst) if n_inst else 0.0,
        tail_distinct=int(np.count_nonzero(counts[tail])),
    )


@dataclass(frozen=True)
class IidComparison:
    """A selected batch against ``n_draws`` IID batches of the same size from the same super-batch."""

    selected: BatchConceptReport
    iid_mean: dict[str, float]
    iid_std: dict[str, float]
    n_draws: int

    def ratio(self, metric: str) -> float:
        """selected / IID mean for one metric (inf when the IID mean is 0 and selected is not)."""
        base = self.iid_mean[metric]
        value = float(getattr(self.selected, metric))
        if base == 0:
            return 1.0 if value == 0 else float("inf")
        return value / base


def compare_to_iid(
    superbatch: ConceptTable,
    selected: np.ndarray,
    *,
    tail: np.ndarray | None = None,
    n_draws: int = 10,
    seed: int = 0,
) -> IidComparison:
    """Report of ``selected`` (positions in ``superbatch``) next to IID batches of equal size."""
    selected = np.asarray(selected, dtype=np.int64)
    if not 0 < selected.size <= superbatch.n_rows:
        raise ValueError(f"selected has {selected.size} rows; it must be a non-empty subset of the {superbatch.n_rows}-row super-batch")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if tail is None:
        tail = long_tail_mask(concept_frequencies(superbatch))
    rng = np.random.default_rng(seed)
    draws = [batch_report(superbatch, rng.choice(superbatch.n_rows, selected.size, replace=False), tail)
             for _ in range(n_draws)]
    names = [f.name for f in fields(BatchConceptReport)]
    values = np.array([[float(getattr(d, n)) for n in names] for d in draws])
    return IidComparison(
        selected=batch_report(superbatch, selected, tail),
        iid_mean=dict(zip(names, values.mean(axis=0).tolist())),
        iid_std=dict(zip(names, values.std(axis=0).tolist())),
        n_draws=n_draws,
    )


TABLE_METRICS = ("distinct_concepts", "entropy_bits", "normalised_entropy", "gini", "mean_instances",
                 "tail_instance_share", "tail_distinct")


def format_reports(reports: dict[str, BatchConceptReport | dict[str, float]]) -> str:
    """A plain-text table, one row per named report (a report or a dict such as ``iid_mean``)."""
    header = f"{'batch':<16}" + "".join(f"{m:>20}" for m in TABLE_METRICS)
    lines = [header]
    for name, rep in reports.items():
        d = rep.as_dict() if isinstance(rep, BatchConceptReport) else rep
        lines.append(f"{name:<16}" + "".join(f"{float(d[m]):>20.4f}" for m in TABLE_METRICS))
    return "\n".join(lines)
