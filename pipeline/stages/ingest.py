"""The ingest Beam pipeline: input files -> samples, rejects, duplicates and input annotations.

    instructions: plan_units (driver) -> SplitUnit -> Reshuffle -> ReadAndParse -> GroupByKey(shard) -> WriteShard
    image-text:   plan_units (driver) -> ReadChunks -> Reshuffle -> ParseChunks  -> GroupByKey(shard) -> WriteShard

Work travels as file ranges (thousands of records each) and parsed rows travel as Arrow IPC
batches keyed by output shard, so the runner's per-element overhead is paid per range, not per row.
Sharding by ``sample_id`` sends every copy of a sample to one shard, where exact duplicates are
dropped deterministically (the copy with the smallest source URI and offset is kept and the
others are written to ``duplicates/``). Shards are written into a staging folder; the caller
(``run_ingest``) swaps them into the catalog only after the whole pipeline succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

import schemas
from pipeline.io.catalog import (
    SAMPLE_TABLE,
    Catalog,
    check_name,
    shard_name,
    table_from_rows,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.io.records import ANNOTATION_TABLES, LINEAGE_KEYS, parse_chunk
from pipeline.io.runs import StageRun, failpoint
from pipeline.io.sample_id import shard_of
from pipeline.io.sources import input_fingerprint, plan_units, read_chunks, split_unit
from pipeline.io.units import IMAGE_TEXT, Chunk, ReadLimits, Unit
from pipeline.stages import progress
from pipeline.stages.runner import make_pipeline_options, run_pipeline

log = logging.getLogger(__name__)



def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blobs: Iterable[bytes]) -> pa.Table | None:
    tables = [pa.ipc.open_stream(b).read_all() for b in blobs]
    return pa.concat_tables(tables) if tables else None


def _with_lineage(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("_source_uri", pa.string())).append(pa.field("_source_offset", pa.int64()))


class SplitUnit(beam.DoFn):
    """Cut a large line-oriented file into one range per worker so all of them parse it.

    Exactly ``ranges`` pieces, not more: a gzip stream cannot seek, so every range re-reads the
    file up to its start, and few ranges keep that repeated decompression small.
    """

    def __init__(self, ranges: int, min_items: int = 4096):
        self.ranges = ranges
        self.min_items = min_items

    def process(self, unit: Unit) -> Iterator[Unit]:
        if self.ranges <= 1:
            yield unit
            return
        yield from split_unit(unit, self.ranges, self.min_items)


class ReadChunks(beam.DoFn):
    """Stream one unit as chunks of raw items (I/O only), counting every input row.

    The count of each unit (or line range) is written to ``<staging>/_reads/`` once the unit has
    been read whole, so rows in are counted from what the job wrote, on any runner (some report
    no metrics); a retried unit rewrites the same file.
    """

    def __init__(self, limits: ReadLimits, staging: str):
        self.limits = limits
        self.staging = staging

    def process(self, unit: Unit) -> Iterator[Chunk]:
        rows_in = 0
        for chunk in read_chunks(unit, self.limits):
            rows_in += chunk.rows_in
            yield chunk
        name = f"{hashlib.sha1(unit.uri.encode()).hexdigest()[:20]}-{unit.start}.json"  # one file per unit range
        write_json_atomic({"uri": unit.uri, "start": unit.start, "stop": unit.stop, "rows_in": rows_in},
                          Path(self.staging) / "_reads" / name)


class ParseChunks(beam.DoFn):
    """Parse chunks and emit (shard, (table, Arrow IPC bytes)) for every table they touch."""

    def __init__(self, num_shards: int, limits: ReadLimits):
        self.num_shards = num_shards
        self.limits = limits

    def process(self, chunk: Chunk) -> Iterator[tuple[int, tuple[str, bytes]]]:
        yield from self.parse(chunk)

    def parse(self, chunk: Chunk) -> Iterator[tuple[int, tuple[str, bytes]]]:
        failpoint("ingest:parse")
        parsed = parse_chunk(chunk, self.limits)
        kind = chunk.unit.kind
        by_shard: dict[tuple[int, str], list[dict]] = defaultdict(list)
        for row in parsed.samples:
            by_shard[(shard_of(row["sample_id"], self.num_shards), SAMPLE_TABLE[kind])].append(row)
        for table, rows in parsed.annotations.items():
            for row in rows:
                by_shard[(shard_of(row["sample_id"], self.num_shards), table)].append(row)
        for rej in parsed.rejects:
            # crc32, not hash(): string hashes differ between worker processes.
            shard = zlib.crc32(f"{rej.source_uri}\0{rej.source_offset}".encode()) % self.num_shards
            by_shard[(shard, "rejects")].append(rej.as_row())
        for (shard, table), rows in by_shard.items():
            schema = schemas.TABLES[table]
            if table in ANNOTATION_TABLES:
                schema = _with_lineage(schema)
            yield shard, (table, _ipc(table_from_rows(rows, schema)))
        progress.tick(self, chunk.rows_in)  # rows read and parsed (ReadAndParse or ParseChunks)


class ReadAndParse(ParseChunks):
    """Read one unit (or line range) and parse it in one step.

    For instruction files reading and parsing are fused, so raw records never cross a shuffle:
    only compact Arrow batches of parsed rows travel to the shard writers.
    """

    def __init__(self, num_shards: int, limits: ReadLimits, staging: str):
        super().__init__(num_shards, limits)
        self.reader = ReadChunks(limits, staging)

    def process(self, unit: Unit) -> Iterator[tuple[int, tuple[str, bytes]]]:
        for chunk in self.reader.process(unit):
            yield from self.parse(chunk)


@dataclass
class ShardStats:
    samples: int = 0
    duplicates: int = 0
    rejects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    annotations: dict[str, int] = field(default_factory=dict)


class WriteShard(beam.DoFn):
    """Deduplicate one shard by sample_id, then write each of its tables to the staging folder."""

    def __init__(self, staging: str, num_shards: int, kind: str):
        self.staging = staging
        self.num_shards = num_shards
        self.kind = kind

    def process(self, element: tuple[int, Iterable[tuple[str, bytes]]]) -> Iterator[dict]:
        shard, values = element
        blobs: dict[str, list[bytes]] = defaultdict(list)
        for table, blob in values:
            blobs[table].append(blob)
        stats = ShardStats()
        name = shard_name(shard, self.num_shards)
        sample_table = SAMPLE_TABLE[self.kind]
        kept_lineage = None
        samples = _from_ipc(blobs.pop(sample_table, []))
        if samples is not None and samples.num_rows:
            samples, dupes = _dedup(samples, self.kind)
            stats.samples, stats.duplicates = samples.num_rows, dupes.num_rows
            self._write(sample_table, samples, name)
            if dupes.num_rows:
                self._write("duplicates", dupes, name)
            kept_lineage = set(zip(samples.column("sample_id").to_pylist(),
                                   samples.column("source_uri").to_pylist(),
                                   samples.column("source_offset").to_pylist()))
        rejects = _from_ipc(blobs.pop("rejects", []))
        if rejects is not None and rejects.num_rows:
            rejects = rejects.sort_by([("source_uri", "ascending"), ("source_offset", "ascending"),
                                       ("source_member", "ascending")])
            stats.rejects = rejects.num_rows
            stats.reject_reasons = dict(Counter(rejects.column("reason").to_pylist()))
            self._write("rejects", rejects, name)
        for table, parts in blobs.items():
            ann = _from_ipc(parts)
            if ann is None or kept_lineage is None:
                continue
            # Keep the annotation of the kept copy only, so annotations never outnumber samples.
            mask = [key in kept_lineage for key in zip(ann.column("sample_id").to_pylist(),
                                                        ann.column("_source_uri").to_pylist(),
                                                        ann.column("_source_offset").to_pylist())]
            ann = ann.filter(pa.array(mask, pa.bool_())).drop_columns(list(LINEAGE_KEYS)).sort_by("sample_id")
            stats.annotations[table] = ann.num_rows
            self._write(table, ann, name)
        write_json_atomic(asdict(stats), Path(self.staging) / "_stats" / f"{shard:05d}.json")
        failpoint("ingest:write_shard")
        progress.tick(self, 1, "shards")
        yield asdict(stats)

    def _write(self, table: str, data: pa.Table, name: str) -> None:
        write_parquet_atomic(data, Path(self.staging) / table / name, schemas.TABLES[table])


def _dedup(samples: pa.Table, kind: str) -> tuple[pa.Table, pa.Table]:
    order = samples.sort_by([("sample_id", "ascending"), ("source_uri", "ascending"),
                             ("source_offset", "ascending"), ("source_member", "ascending")])
    ids = order.column("sample_id")
    # A row is a duplicate when its id equals the previous row's id (ids are sorted).
    prev = pa.concat_arrays([pa.array([None], pa.string()), ids.combine_chunks()[:-1]])
    is_dup = pc.fill_null(pc.equal(ids.combine_chunks(), prev), False)
    kept = order.filter(pc.invert(is_dup))
    dupes = order.filter(is_dup)
    if not dupes.num_rows:
        return kept, schemas.DUPLICATES.empty_table()
    first = {sid: (uri, off) for sid, uri, off in zip(
        kept.column("sample_id").to_pylist(), kept.column("source_uri").to_pylist(),
        kept.column("source_offset").to_pylist())}
    dupe_ids = dupes.column("sample_id").to_pylist()
    dup_table = pa.table({
        "kind": [kind] * dupes.num_rows,
        "sample_id": dupe_ids,
        "source_uri": dupes.column("source_uri"),
        "source_offset": dupes.column("source_offset"),
        "source_member": dupes.column("source_member"),
        "kept_source_uri": [first[s][0] for s in dupe_ids],
        "kept_source_offset": [first[s][1] for s in dupe_ids],
    })
    return kept, dup_table


@dataclass
class IngestResult:
    run_id: str
    dataset: str
    kind: str
    catalog: str
    counts: dict[str, Any]
    timings_s: dict[str, float]
    skipped: bool = False
    rebuilt: str | None = None  # why a run that looked unchanged was redone (damaged output)

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"dataset {self.dataset!r} ({self.kind}) in {self.catalog}"
            + (" — unchanged, verified, skipped" if self.skipped else "")
            + (f" — rebuilt: {self.rebuilt}" if self.rebuilt else ""),
            f"  rows in      {c['rows_in']:>10,}",
            f"  samples      {c['samples']:>10,}",
            f"  rejects      {c['rejects']:>10,}",
            f"  duplicates   {c['duplicates']:>10,}",
        ]
        for reason, n in sorted(c.get("reject_reasons", {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason:<22}{n:>8,}")
        return "\n".join(lines)


def build_pipeline(p: beam.Pipeline, units: list[Unit], staging: Path, kind: str, num_shards: int,
                   limits: ReadLimits, ranges_per_file: int = 1) -> beam.PCollection:
    units_pc = p | "Units" >> beam.Create(units, reshuffle=False)
    if kind == IMAGE_TEXT:
        # Image chunks carry file paths (or tar member bytes) and decoding dominates: spread the
        # chunks of one folder or tar across workers, then decode.
        parsed = (units_pc
                  | "ReadChunks" >> beam.ParDo(ReadChunks(limits, str(staging)))
                  | "SpreadChunks" >> beam.Reshuffle()
                  | "ParseChunks" >> beam.ParDo(ParseChunks(num_shards, limits)))
    else:
        # Split big files into line ranges and spread those (tiny) descriptors; the data itself
        # is read where it is parsed.
        parsed = (units_pc
                  | "SplitUnit" >> beam.ParDo(SplitUnit(ranges_per_file))
                  | "SpreadRanges" >> beam.Reshuffle()
                  | "ReadAndParse" >> beam.ParDo(ReadAndParse(num_shards, limits, str(staging))))
    return (parsed
            | "ByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShard(str(staging), num_shards, kind)))


def default_num_shards(units: list[Unit]) -> int:
    # Deterministic from the inputs (so a re-run writes the same files): ~256 MB of input per
    # shard, and at least 2 so that two workers can write in parallel.
    total = sum(Path(u.uri).stat().st_size for u in units if Path(u.uri).is_file())
    return max(2, -(-total // (256 << 20)))


def run_ingest(
    inputs: list[str],
    catalog: str | Path,
    dataset: str,
    kind: str = "instruction",
    container: str = "auto",
    layout: str = "auto",
    options: dict[str, Any] | None = None,
    num_shards: int | None = None,
    workers: int = 1,
    beam_args: list[str] | None = None,
    limits: ReadLimits = ReadLimits(),
    force: bool = False,
) -> IngestResult:
    """Ingest ``inputs`` into ``catalog`` as dataset ``dataset``; idempotent and resumable.

    A dataset whose inputs and parameters match the last completed ingest, and whose committed
    partitions are still intact, is skipped (unless ``force``); otherwise its partitions are
    rebuilt and swapped in together, atomically (:class:`pipeline.io.runs.StageRun`).
    """
    check_name(dataset)
    cat = Catalog.at(catalog)
    t0 = time.perf_counter()
    units = plan_units(inputs, kind, container, layout, options)
    if not units:
        raise ValueError(f"no input files found under {inputs}")
    shards = num_shards or default_num_shards(units)
    params = {"kind": kind, "container": container, "layout": layout, "options": options or {},
              "num_shards": shards, "limits": asdict(limits)}
    fingerprint = input_fingerprint(units)
    outputs = cat.dataset_partitions(dataset)
    with StageRun(cat, "ingest", dataset, outputs, params, fingerprint, force=force, key=f"dataset={dataset}",
                  ledger_parameters={"workers": workers, "beam_args": beam_args or []}) as run:
        if run.skipped:
            return IngestResult(run.state["run_id"], dataset, kind, cat.location, run.state["counts"], {},
                                skipped=True)
        staging = run.area / "out"  # WriteShard writes <staging>/<table>/, i.e. run.staging[table]
        plan_s = time.perf_counter() - t0
        expected = progress.estimate_rows(units)  # for the progress bar only
        t1 = time.perf_counter()
        with progress.watch(run.area, expected, f"ingest {dataset}", exact=False,
                            extras={"shards": shards}) as watched:
            run_pipeline(lambda p: build_pipeline(p, units, staging, kind, shards, limits, ranges_per_file=workers),
                         make_pipeline_options(workers, beam_args), progress_dir=watched.folder)
        beam_s = time.perf_counter() - t1
        counts = _sum_stats(staging)
        accounted = counts["samples"] + counts["rejects"] + counts["duplicates"]
        if counts["rows_in"] != accounted:
            raise RuntimeError(
                f"ingest lost rows: {counts['rows_in']} in, but {counts['samples']} samples + {counts['rejects']}"
                f" rejects + {counts['duplicates']} duplicates = {accounted}; nothing was committed")
        t2 = time.perf_counter()
        run.commit(counts, timings={"plan": round(plan_s, 3), "beam": round(beam_s, 3)},
                   absent=tuple(t for t, folder in run.staging.items() if not any(folder.iterdir())))
        timings = {"plan": round(plan_s, 3), "beam": round(beam_s, 3), "commit": round(time.perf_counter() - t2, 3),
                   "total": round(time.perf_counter() - t0, 3)}
    return IngestResult(run.run_id, dataset, kind, cat.location, counts, timings, rebuilt=run.rebuild_reason)


def _sum_stats(staging: Path) -> dict[str, Any]:
    counts: dict[str, Any] = {"rows_in": 0, "samples": 0, "duplicates": 0, "rejects": 0,
                              "reject_reasons": Counter(), "annotations": Counter()}
    for path in sorted((staging / "_reads").glob("*.json")):
        counts["rows_in"] += json.loads(path.read_text())["rows_in"]
    for path in sorted((staging / "_stats").glob("*.json")):
        s = json.loads(path.read_text())
        counts["samples"] += s["samples"]
        counts["duplicates"] += s["duplicates"]
        counts["rejects"] += s["rejects"]
        counts["reject_reasons"].update(s["reject_reasons"])
        counts["annotations"].update(s["annotations"])
    counts["reject_reasons"] = dict(counts["reject_reasons"])
    counts["annotations"] = dict(counts["annotations"])
    return counts
