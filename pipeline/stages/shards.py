"""Catalog stages after ingest: read a dataset's shards, compute, write a sidecar table atomically.

Every stage after ingest has the same bones, kept here once:

- its input is the set of Parquet shards of one catalog partition (e.g. the samples of a
  dataset); one shard is one unit of parallel work;
- it writes one output shard per input shard (same file name) into a staging folder, and the
  driver commits the whole output partition after the Beam job succeeded;
- locking, the verified skip, the ledger entry and the completion marker are
  :class:`pipeline.io.runs.StageRun`'s: an unchanged stage whose outputs are intact is skipped,
  a crashed or damaged one is redone.

A simple stage is a :class:`ShardFn` (table in, table out) run by :func:`run_shard_stage`. A stage
that needs another shape (e.g. RunInference over rows) passes its own ``expand`` to
:func:`run_stage`, which turns a PCollection of input shard paths into written output shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.catalog import Catalog, object_storage_url, write_parquet_atomic
from pipeline.io.runs import StageRun, check_remote_stage
from pipeline.io.storage import ObjectStorageUnsupported
from pipeline.stages import progress
from pipeline.stages.runner import make_pipeline_options, run_pipeline


class ShardFn:
    """A per-shard computation: ``setup`` once per worker (load a model), then ``__call__``.

    A function that also needs a stored result for the same rows (e.g. the embeddings of the
    samples it annotates, which are sharded and ordered like the samples) names that partition
    in ``companion``; it is then called as ``fn(table, companion_table)`` with the companion's
    shard of the same name, checked to hold the same sample ids in the same order.
    """

    companion: str | None = None
    companion_columns: list[str] | None = None

    def setup(self) -> None:  # noqa: B027 - optional hook
        pass

    def __call__(self, table: pa.Table, companion: pa.Table | None = None) -> pa.Table:
        raise NotImplementedError


class _MapShard(beam.DoFn):
    def __init__(self, fn: ShardFn, staging: str, schema: pa.Schema | None, columns: list[str] | None):
        self.fn, self.staging, self.schema, self.columns = fn, staging, schema, columns

    def setup(self) -> None:
        self.fn.setup()

    def process(self, shard_path: str) -> Iterator[int]:
        table = pq.read_table(shard_path, columns=self.columns)
        if self.fn.companion is None:
            out = self.fn(table)
        else:
            companion = pq.read_table(Path(self.fn.companion) / Path(shard_path).name, columns=self.fn.companion_columns)
            if companion.column("sample_id") != table.column("sample_id"):
                raise RuntimeError(f"{self.fn.companion}/{Path(shard_path).name} does not hold the rows of {shard_path}"
                                   " in the same order; rebuild it (run its stage with force)")
            out = self.fn(table, companion)
        write_parquet_atomic(out, Path(self.staging) / Path(shard_path).name, self.schema)
        progress.tick(self, table.num_rows)  # a whole shard at once: the ShardFn sees the table
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
    if not shards and object_storage_url(partition):  # read in place, not via Catalog.local_input
        raise ObjectStorageUnsupported(f"this stage reads {partition.name} of {object_storage_url(partition)} in place"
                                       " and does not support object-storage catalogs yet")
    if not shards:
        raise FileNotFoundError(f"no shards in {partition}; run the stage that produces it first")
    return shards


def shard_fingerprint(shards: list[Path]) -> list[dict[str, Any]]:
    return [{"uri": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in shards]


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("part-*.parquet"))


def run_stage(
    catalog: str | Path,
    stage: str,
    dataset: str,
    input_partition: Path,
    output_partition: Path | dict[str, Path],
    expand: Callable[[beam.PCollection, Any], Any],
    parameters: dict[str, Any],
    workers: int = 1,
    beam_args: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    """Run ``expand`` over the input shard paths; commit what it wrote into the output partition(s).

    ``expand(shard_paths, staging)`` builds the Beam graph and writes output shards
    (``part-*.parquet``) into ``staging``: one folder when ``output_partition`` is a path, a
    ``{name: folder}`` dict when it is a dict of several outputs (committed together, atomically;
    rows_out counts the first). Skipping, locking, the ledger and the commit follow
    :class:`pipeline.io.runs.StageRun`.
    """
    cat = Catalog.at(catalog)
    check_remote_stage(cat, stage)
    shards = input_shards(cat.local_input(input_partition))  # downloaded first on object storage
    fingerprint = shard_fingerprint(shards)
    outputs = output_partition if isinstance(output_partition, dict) else {"out": output_partition}
    first = next(iter(outputs.values()))
    with StageRun(cat, stage, dataset, outputs, parameters, fingerprint, force=force,
                  ledger_parameters={"workers": workers, "beam_args": beam_args or []}) as run:
        if run.skipped:
            st = run.state
            return StageResult(stage, dataset, str(first), st["run_id"], st["counts"]["rows_in"],
                               st["counts"]["rows_out"], 0.0, skipped=True, extra=st.get("extra", {}))
        staging = run.staging if isinstance(output_partition, dict) else run.staging["out"]
        rows_in = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
        with progress.watch(run.area, rows_in, f"{stage} {dataset}") as watched:
            run_pipeline(lambda p: expand(p | "Shards" >> beam.Create([str(s) for s in shards]), staging),
                         make_pipeline_options(workers, beam_args), progress_dir=watched.folder)
        counts = {"rows_in": rows_in,
                  "rows_out": _rows(next(iter(run.staging.values())))}
        run.commit(counts)
    return StageResult(stage, dataset, str(first), run.run_id, counts["rows_in"], counts["rows_out"],
                       time.perf_counter() - run.t0)


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

    cat = Catalog.at(catalog)
    check_remote_stage(cat, stage)
    if fn.companion is not None:  # on object storage: the companion's committed shards, downloaded
        fn.companion = str(cat.local_input(Path(fn.companion)))

    def expand(shard_paths: beam.PCollection, staging: Path) -> Any:
        return (shard_paths
                | "Spread" >> beam.Reshuffle()
                | f"{stage}" >> beam.ParDo(_MapShard(fn, str(staging), schema, columns)))

    return run_stage(catalog, stage, dataset, input_partition, output_partition, expand, parameters,
                     workers=workers, beam_args=beam_args, force=force)
