"""Catalog stages after ingest: read a dataset's shards, compute, write a sidecar table atomically.

Every stage after ingest has the same bones, kept here once:

- its input is the set of Parquet shards of one catalog partition (e.g. the samples of a
  dataset); one shard is one unit of parallel work;
- it writes one output shard per input shard (same file name) into a staging folder, and the
  driver swaps the whole output partition in after the Beam job succeeded (``commit_dir``);
- it records a ledger entry and a completion marker keyed by the input shards' fingerprint and
  the stage parameters, so an unchanged stage is skipped and a crashed one is redone.

A simple stage is a :class:`ShardFn` (table in, table out) run by :func:`run_shard_stage`. A stage
that needs another shape (e.g. RunInference over rows) passes its own ``expand`` to
:func:`run_stage`, which turns a PCollection of input shard paths into written output shards.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.beam.runner import make_pipeline_options, run_pipeline
from pipeline.io.catalog import Catalog, commit_dir, write_parquet_atomic


class ShardFn:
    """A per-shard computation: ``setup`` once per worker (load a model), then ``__call__``."""

    def setup(self) -> None:  # noqa: B027 - optional hook
        pass

    def __call__(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError


class _MapShard(beam.DoFn):
    def __init__(self, fn: ShardFn, staging: str, schema: pa.Schema | None, columns: list[str] | None):
        self.fn, self.staging, self.schema, self.columns = fn, staging, schema, columns

    def setup(self) -> None:
        self.fn.setup()

    def process(self, shard_path: str) -> Iterator[int]:
        table = pq.read_table(shard_path, columns=self.columns)
        out = self.fn(table)
        write_parquet_atomic(out, Path(self.staging) / Path(shard_path).name, self.schema)
        yield out.num_rows


@dataclass
class StageResult:
    stage: str
    dataset: str
    output: str
    run_id: str
    rows_in: int
    rows_out: int
    seconds: float
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def input_shards(partition: Path) -> list[Path]:
    shards = sorted(partition.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no shards in {partition}; run the stage that produces it first")
    return shards


def shard_fingerprint(shards: list[Path]) -> list[dict[str, Any]]:
    return [{"uri": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in shards]


def run_stage(
    catalog: str | Path,
    stage: str,
    dataset: str,
    input_partition: Path,
    output_partition: Path,
    expand: Callable[[beam.PCollection, Path], Any],
    parameters: dict[str, Any],
    workers: int = 1,
    beam_args: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    """Run ``expand`` over the input shard paths; commit what it wrote into ``output_partition``.

    ``expand(shard_paths, staging_dir)`` builds the Beam graph: it must write output shards
    (``part-*.parquet``) into ``staging_dir``.
    """
    cat = Catalog.at(catalog)
    shards = input_shards(input_partition)
    fingerprint = shard_fingerprint(shards)
    state_key = f"{dataset}@{output_partition.relative_to(cat.root).as_posix().replace('/', '~')}"
    state = cat.read_state(stage, state_key)
    if (not force and state and state.get("inputs") == fingerprint and state.get("parameters") == parameters
            and output_partition.is_dir()):
        return StageResult(stage, dataset, str(output_partition), state["run_id"], state["rows_in"],
                           state["rows_out"], 0.0, skipped=True, extra=state.get("extra", {}))
    run_id = f"{stage}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    staging = cat.staging(run_id) / "out"
    staging.mkdir(parents=True)
    started = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    try:
        run_pipeline(lambda p: expand(p | "Shards" >> beam.Create([str(s) for s in shards]), staging),
                     make_pipeline_options(workers, beam_args))
        rows_out = sum(pq.ParquetFile(p).metadata.num_rows for p in staging.glob("part-*.parquet"))
        commit_dir(staging, output_partition)
    finally:
        cat.clean_staging(run_id)
    seconds = time.perf_counter() - t0
    rows_in = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    counts = {"rows_in": rows_in, "rows_out": rows_out}
    cat.write_ledger({
        "run_id": run_id, "stage": stage, "dataset": dataset, "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(), "code_version": __version__,
        "parameters": {**parameters, "workers": workers, "beam_args": beam_args or [],
                       "output": str(output_partition)},
        "inputs": fingerprint, "counts": counts, "timings_s": {"total": round(seconds, 3)},
        "status": "succeeded",
    })
    cat.write_state(stage, state_key, {"run_id": run_id, "inputs": fingerprint, "parameters": parameters,
                                       "rows_in": rows_in, "rows_out": rows_out})
    return StageResult(stage, dataset, str(output_partition), run_id, rows_in, rows_out, seconds)


def run_shard_stage(
    catalog: str | Path,
    stage: str,
    dataset: str,
    input_partition: Path,
    output_partition: Path,
    fn: ShardFn,
    schema: pa.Schema | None,
    parameters: dict[str, Any],
    columns: list[str] | None = None,
    workers: int = 1,
    beam_args: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    """Apply ``fn`` to every input shard (one output shard each), in parallel across workers."""

    def expand(shard_paths: beam.PCollection, staging: Path) -> Any:
        return (shard_paths
                | "Spread" >> beam.Reshuffle()
                | f"{stage}" >> beam.ParDo(_MapShard(fn, str(staging), schema, columns)))

    return run_stage(catalog, stage, dataset, input_partition, output_partition, expand, parameters,
                     workers=workers, beam_args=beam_args, force=force)
