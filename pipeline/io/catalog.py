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

    <root>/_staging/, _locks/          private to running stages (see ``pipeline.io.runs``)

Atomicity: a file is written under a temporary name in the same folder and renamed into place;
a stage's outputs are built in its private staging area and swapped in together through a commit
journal (``pipeline.io.runs``), which the next process to open the catalog finishes if a crash cut
it short. User-chosen names are checked, never rewritten, and can never reach the private areas.
"""

from __future__ import annotations

import json
import os
import re
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
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(name: str, what: str = "dataset") -> str:
    """Refuse (never rewrite) a user-chosen name that would not be one plain folder name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be 1-128 letters, digits, '_', '.' or '-', starting"
                         " with a letter or digit (it becomes a folder name)")
    return name


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
        from pipeline.io.runs import recover

        path = Path(root).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"catalog path {path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        recover(path)  # finish any commit a crashed run left half-applied
        return cls(path)

    # ------------------------------------------------------------ paths
    def table_dir(self, table: str) -> Path:
        if table not in TABLE_DIRS:
            raise KeyError(f"unknown catalog table {table!r}; known: {', '.join(TABLE_DIRS)}")
        return self.root / TABLE_DIRS[table]

    def partition(self, table: str, dataset: str) -> Path:
        return self.table_dir(table) / f"dataset={check_name(dataset)}"

    def dataset_partitions(self, dataset: str) -> dict[str, Path]:
        """Every ingest-owned partition of ``dataset`` (written and replaced together)."""
        return {table: self.partition(table, dataset) for table in TABLE_DIRS}

    def ledger_path(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def state_path(self, stage: str, dataset: str) -> Path:
        return self.root / "state" / stage / f"{dataset}.json"

    # ------------------------------------------------------------ stage outputs
    def samples_partition(self, kind: str, dataset: str) -> Path:
        return self.partition(SAMPLE_TABLE[kind], dataset)

    def annotation_partition(self, annotator: str, dataset: str) -> Path:
        return self.root / "annotations" / safe_name(annotator) / f"dataset={check_name(dataset)}"

    def embedding_partition(self, model: str, dataset: str) -> Path:
        return self.root / "embeddings" / safe_name(model) / f"dataset={check_name(dataset)}"

    def index_dir(self, model: str, dataset: str) -> Path:
        return self.root / "indexes" / safe_name(model) / f"dataset={check_name(dataset)}"

    def selection_dir(self, name: str) -> Path:
        return self.root / "selections" / check_name(name, "selection")

    def curated_dir(self, name: str) -> Path:
        return self.root / "curated" / check_name(name, "curated set")

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
