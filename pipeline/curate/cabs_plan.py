"""CABS batch plans over a catalog dataset: which samples each training step keeps, and why.

The algorithm and its sampler live in ``pipeline.select.cabs`` / ``cabs_schedule`` (pure); this
module gathers the concept lists of a dataset (instances repeated by count), plans S steps, writes
``(step, position, sample_id, gain)`` and reports batch statistics against IID batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.curate import annotations
from pipeline.io.catalog import Catalog
from pipeline.select import batch_metrics
from pipeline.select.cabs import REFERENCE_CAP
from pipeline.select.cabs_schedule import as_concept_table, iter_plan


@dataclass
class ConceptPool:
    sample_ids: list[str]
    concepts: list[list[str]]  # one entry per instance (a concept repeats once per box/count)
    source: str


def concepts_from_catalog(catalog: str | Path, dataset: str, source: str = "auto",
                          near_duplicates: str | None = None) -> ConceptPool:
    """Concept lists of every image-text sample of ``dataset`` (samples without any: empty).

    With ``near_duplicates`` (e.g. ``near_dup_<model>``) near-copies leave the pool.
    """
    cat = Catalog.at(catalog)
    samples = cat.samples_partition("image_text", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no image-text samples for dataset {dataset!r} in {cat.root}")
    ids = sorted(pq.read_table(samples, columns=["sample_id"]).column("sample_id").to_pylist())
    if near_duplicates:
        removed = annotations.near_copies(cat, dataset, near_duplicates)
        ids = [s for s in ids if s not in removed]
    part = annotations.require(cat, dataset, source, annotations.CONCEPT_SOURCES,
                               "run `thresher concepts annotate` first")
    rows = pq.read_table(part, columns=["sample_id", "concepts"]).to_pylist()
    by_id = {r["sample_id"]: [c["concept"] for c in r["concepts"] or [] for _ in range(max(1, c["count"] or 1))]
             for r in rows}
    return ConceptPool(ids, [by_id.get(s, []) for s in ids], part.parent.name)


def concepts_from_file(path: str | Path, column: str = "concepts", id_column: str = "sample_id") -> ConceptPool:
    """A Parquet file with a list<string> concept column (instances repeated) and an id column."""
    table = pq.read_table(path)
    for c in (column, id_column):
        if c not in table.column_names:
            raise ValueError(f"{path} has no column {c!r}; columns: {table.column_names}")
    concepts = [[x["concept"] if isinstance(x, dict) else x for x in (row or [])]
                for row in table.column(column).to_pylist()]
    return ConceptPool([str(x) for x in table.column(id_column).to_pylist()], concepts, str(path))


@dataclass
class PlanReport:
    steps: int
    superbatch: int
    batch: int
    mode: str
    dm_mode: str
    concept_source: str
    zero_gain_picks: int
    padded_picks: int
    cabs: dict[str, float]
    iid: dict[str, float]
    iid_std: dict[str, float] = field(default_factory=dict)  # spread of the IID draws (mean per-step std)
    iid_draws: int = 0  # IID batches drawn per step

    def lines(self) -> list[str]:
        out = [f"{self.steps} steps, super-batch {self.superbatch} -> batch {self.batch}, CABS-{self.mode.upper()}"
               f"{' (' + self.dm_mode + ')' if self.mode == 'dm' else ''}, concepts from {self.concept_source}",
               f"picks with zero gain: {self.zero_gain_picks}, padded: {self.padded_picks}",
               f"{'per-batch mean':<22}{'CABS':>12}{'IID':>12}{'IID std':>10}{'ratio':>8}"
               f"   (IID: {self.iid_draws} draws per step)"]
        for k in batch_metrics.TABLE_METRICS:
            ratio = self.cabs[k] / self.iid[k] if self.iid[k] else float("nan")
            out.append(f"{k:<22}{self.cabs[k]:>12.4f}{self.iid[k]:>12.4f}{self.iid_std.get(k, float('nan')):>10.4f}"
                       f"{ratio:>8.2f}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(pool: ConceptPool, mode: str = "dm", filter_ratio: float = 0.8, superbatch: int = 20_480,
         steps: int = 1, seed: int = 0, dm_mode: str = "paper", cap: int = REFERENCE_CAP,
         power_of_two: bool = False, iid_draws: int = 5) -> tuple[pa.Table, PlanReport]:
    n = len(pool.sample_ids)
    if n == 0:
        raise ValueError(f"{pool.source}: no samples to plan from")
    if superbatch > n:
        raise ValueError(f"super-batch {superbatch} is larger than the dataset ({n} samples); "
                         f"use --superbatch {n} or less")
    if iid_draws < 1:
        raise ValueError(f"iid_draws must be >= 1 (IID batches per step to compare with), got {iid_draws}")
    table = as_concept_table(pool.concepts)
    steps_col, pos_col, ids_col, gain_col = [], [], [], []
    cabs_reports, iid_reports, iid_stds = [], [], []
    zero = padded = 0
    batch_size = 0
    for planned in iter_plan(table, mode, filter_ratio, superbatch, steps, seed, dm_mode=dm_mode, cap=cap,
                             power_of_two=power_of_two):
        batch_size = len(planned.batch)
        zero += planned.result.zero_gain_count
        padded += planned.result.padded_count
        for pos, (i, g) in enumerate(zip(planned.batch.tolist(), planned.result.gains.tolist())):
            steps_col.append(planned.step)
            pos_col.append(pos)
            ids_col.append(pool.sample_ids[i])
            gain_col.append(g)
        sb = table.take(planned.superbatch)
        cmp = batch_metrics.compare_to_iid(sb, planned.result.indices, n_draws=iid_draws, seed=seed + planned.step)
        cabs_reports.append(cmp.selected.as_dict())
        iid_reports.append(cmp.iid_mean)
        iid_stds.append(cmp.iid_std)
    plan_table = pa.table({"step": steps_col, "position": pos_col, "sample_id": ids_col, "gain": gain_col},
                          schema=schemas.CABS_PLAN)
    keys = batch_metrics.TABLE_METRICS
    report = PlanReport(steps, superbatch, batch_size, mode, dm_mode, pool.source, int(zero), int(padded),
                        {k: float(np.mean([r[k] for r in cabs_reports])) for k in keys},
                        {k: float(np.mean([r[k] for r in iid_reports])) for k in keys},
                        {k: float(np.mean([r[k] for r in iid_stds])) for k in keys}, iid_draws)
    return plan_table, report


class CABSSelector:
    """CABS batch plans behind the selector protocol (``pipeline.select.protocol``)."""

    name = "cabs"
    schema = schemas.CABS_PLAN

    def from_catalog(self, cat: Catalog, dataset: str, params: dict[str, Any]) -> ConceptPool:
        return concepts_from_catalog(cat.root, dataset, params["concepts"], near_duplicates=params["near_dups"])

    def from_file(self, path: Path, params: dict[str, Any]) -> ConceptPool:
        return concepts_from_file(path)

    def sources(self, cat: Catalog, dataset: str | None, path: Path | None, params: dict[str, Any]) -> list[Path]:
        if dataset is None:
            return [path]  # type: ignore[list-item]
        samples = cat.samples_partition("image_text", dataset)
        if not samples.is_dir():
            raise FileNotFoundError(f"no image-text samples for dataset {dataset!r} in {cat.root}")
        near = params["near_dups"]
        return [samples, *([cat.annotation_partition(near, dataset)] if near else []),
                annotations.require(cat, dataset, params["concepts"], annotations.CONCEPT_SOURCES,
                                    "run `thresher concepts annotate` first")]

    def notes(self, pool: ConceptPool, params: dict[str, Any]) -> list[str]:
        return []

    def run(self, pool: ConceptPool, params: dict[str, Any]) -> tuple[pa.Table, PlanReport]:
        superbatch = params["superbatch"]
        if params["fit_superbatch"]:
            superbatch = min(superbatch, len(pool.sample_ids))
        return plan(pool, params["mode"], params["filter_ratio"], superbatch, params["steps"], params["seed"],
                    params["dm_mode"], params["cap"], params["power_of_two"], params["iid_draws"])
