"""The catalog: one folder of Parquet tables, written atomically, plus the run ledger.

Layout (every table partitioned by ``dataset=<name>`` so a re-ingest replaces exactly its rows)::

    <root>/samples/instruction/dataset=<name>/part-00000-of-00004.parquet
    <root>/samples/image_text/dataset=<name>/...
    <root>/rejects/dataset=<name>/...
    <root>/duplicates/dataset=<name>/...
    <root>/annotations/<annotator table>/dataset=<name>/...
    <root>/embeddings/<model>/..., indexes/<model>/..., selections/<name>/..., curated/<name>/...
    <root>/runs/<run_id>.json          the ledger
    <root>/state/<stage>/<dataset>.json  completion markers: what a finished stage consumed

Atomicity: a file is written under a temporary name in the same folder and renamed into place; a
whole partition is built in a staging folder and swapped in with two renames. A crash leaves
either the old partition or the new one (``recover`` puts back a partition whose swap was cut
short).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import schemas

# table name -> folder under the catalog root
TABLE_DIRS = {
    "samples_instruction": "samples/instruction",
    "samples_image_text": "samples/image_text",
    "rejects": "rejects",
    "duplicates": "duplicates",
    "annotations_tags": "annotations/input_tags",
    "annotations_quality": "annotations/input_quality",
    "annotations_concepts": "annotations/input_concepts",
}

SAMPLE_TABLE = {"instruction": "samples_instruction", "image_text": "samples_image_text"}


def write_parquet_atomic(table: pa.Table, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``table`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is not None:
        table = table.select(schema.names).cast(schema) if table.num_rows else schema.empty_table()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json_atomic(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def commit_dir(staged: Path, final: Path) -> None:
    """Swap folder ``staged`` into ``final``: the old one is renamed away first, then removed.

    After a crash between the two renames only ``final.old`` exists; :func:`recover_dir` puts it
    back, so readers always find either the old or the new complete folder.
    """
    recover_dir(final)
    old = final.with_name(final.name + ".old")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A folder-safe form of a model or annotator name (``org/model`` -> ``org__model``)."""
    out = _SAFE.sub("_", name.replace("/", "__")).strip("._")
    if not out:
        raise ValueError(f"{name!r} does not make a usable folder name")
    return out


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.parquet"


@dataclass(frozen=True)
class Catalog:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Catalog":
        path = Path(root).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    # ------------------------------------------------------------ paths
    def table_dir(self, table: str) -> Path:
        if table not in TABLE_DIRS:
            raise KeyError(f"unknown catalog table {table!r}; known: {', '.join(TABLE_DIRS)}")
        return self.root / TABLE_DIRS[table]

    def partition(self, table: str, dataset: str) -> Path:
        return self.table_dir(table) / f"dataset={dataset}"

    def staging(self, run_id: str) -> Path:
        return self.root / "_staging" / run_id

    def ledger_path(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def state_path(self, stage: str, dataset: str) -> Path:
        return self.root / "state" / stage / f"{dataset}.json"

    # ------------------------------------------------------------ commit
    def commit_partitions(self, staged: dict[str, Path], dataset: str) -> None:
        """Swap each staged partition folder into place.

        Tables not present in ``staged`` lose this dataset's partition: a re-ingest that produced
        no rejects must not keep the rejects of an earlier run.
        """
        self.recover(dataset)
        for table in TABLE_DIRS:
            final = self.partition(table, dataset)
            if table in staged:
                commit_dir(staged[table], final)
            elif final.exists():
                shutil.rmtree(final)

    def recover(self, dataset: str) -> None:
        """Undo swaps that a crash interrupted (an ``.old`` partition with no new one)."""
        for table in TABLE_DIRS:
            recover_dir(self.partition(table, dataset))

    # ------------------------------------------------------------ stage outputs
    def samples_partition(self, kind: str, dataset: str) -> Path:
        return self.partition(SAMPLE_TABLE[kind], dataset)

    def annotation_partition(self, annotator: str, dataset: str) -> Path:
        return self.root / "annotations" / safe_name(annotator) / f"dataset={dataset}"

    def embedding_partition(self, model: str, dataset: str) -> Path:
        return self.root / "embeddings" / safe_name(model) / f"dataset={dataset}"

    def index_dir(self, model: str, dataset: str) -> Path:
        return self.root / "indexes" / safe_name(model) / f"dataset={dataset}"

    def selection_dir(self, name: str) -> Path:
        return self.root / "selections" / safe_name(name)

    def curated_dir(self, name: str) -> Path:
        return self.root / "curated" / safe_name(name)

    def clean_staging(self, run_id: str) -> None:
        shutil.rmtree(self.staging(run_id), ignore_errors=True)
        try:
            self.staging(run_id).parent.rmdir()  # only when no other run is staging
        except OSError:
            pass

    # ------------------------------------------------------------ ledger and state
    def write_ledger(self, entry: dict[str, Any]) -> Path:
        missing = [k for k in schemas.RUN_LEDGER_KEYS if k not in entry]
        if missing:
            raise ValueError(f"ledger entry lacks {missing}")
        return write_json_atomic(entry, self.ledger_path(entry["run_id"]))

    def read_state(self, stage: str, dataset: str) -> dict[str, Any] | None:
        path = self.state_path(stage, dataset)
        return json.loads(path.read_text()) if path.exists() else None

    def write_state(self, stage: str, dataset: str, state: dict[str, Any]) -> Path:
        return write_json_atomic(state, self.state_path(stage, dataset))

    def row_count(self, table: str, dataset: str | None = None) -> int:
        base = self.partition(table, dataset) if dataset else self.table_dir(table)
        if not base.exists():
            return 0
        return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(base.rglob("part-*.parquet")))
