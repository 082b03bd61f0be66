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

A catalog may also live on object storage (``Catalog.at("s3://bucket/cat")``, any fsspec URL):
``root`` is then a local working folder (staging, locks, downloaded inputs; see
``pipeline.io.storage.cache_dir``) whose paths name the same tables, ``url`` is the catalog, and
commits go through one manifest object (``pipeline.io.storage``, ``docs/object_storage.md``).
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


REMOTE_MARKER = "_object_storage.json"  # in a URL catalog's local working folder: which URL


def object_storage_url(path: str | os.PathLike) -> str | None:
    """The URL of the object-storage catalog whose local working folder holds ``path``, if any.

    Code that lists a partition folder directly instead of through ``Catalog.local_input`` finds
    nothing there; this lets it say why (see ``Catalog.require_local``).
    """
    for folder in (Path(path), *Path(path).parents):
        if folder.name == "_inputs":  # downloaded through Catalog.local_input: read as it is
            return None
        marker = folder / REMOTE_MARKER
        if marker.is_file():
            try:
                return json.loads(marker.read_text())["url"]
            except (OSError, ValueError, KeyError):
                return None
    return None


@dataclass(frozen=True)
class Catalog:
    root: Path
    url: str | None = None  # set for a catalog on object storage; root is then its local working folder

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Catalog":
        from pipeline.io.runs import recover
        from pipeline.io.storage import cache_dir, is_url

        if is_url(root):
            url = os.fspath(root).rstrip("/")
            work = cache_dir(url)
            work.mkdir(parents=True, exist_ok=True)
            marker = work / REMOTE_MARKER
            if not marker.is_file():
                write_json_atomic({"url": url}, marker)
            recover(work)  # staging areas of dead local runs (commits there never half-apply)
            return cls(work, url)
        path = Path(root).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"catalog path {path} is a file, not a folder")
        if (path / REMOTE_MARKER).is_file():
            # Code that re-opens ``cat.root`` of a URL catalog gets the URL catalog back, never a
            # local catalog in its working folder.
            return cls.at(json.loads((path / REMOTE_MARKER).read_text())["url"])
        path.mkdir(parents=True, exist_ok=True)
        recover(path)  # finish any commit a crashed run left half-applied
        return cls(path)

    # ------------------------------------------------------------ object storage
    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def location(self) -> str:
        """What to show a user: the URL of an object-storage catalog, else the folder."""
        return self.url or str(self.root)

    @property
    def storage(self):
        from pipeline.io.storage import storage_for

        if self.url is None:
            raise ValueError(f"catalog {self.root} is a local folder, not object storage")
        return storage_for(self.url)

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def local_input(self, partition: Path) -> Path:
        """A local folder holding ``partition``'s committed files, to read as stage input.

        The folder itself for a local catalog; for a URL catalog the current version, downloaded
        once into the working folder (a path that does not exist when nothing is committed).
        """
        if not self.is_remote:
            return Path(partition)
        got = self.storage.download(self.rel(partition), self.root / "_inputs")
        # Nothing committed: a path that does not exist (and is not the plain working-folder path,
        # which object_storage_url recognises as "read without downloading").
        return got if got is not None else self.root / "_inputs" / "none" / self.rel(partition)

    def require_local(self, what: str) -> None:
        """Stop at once, with one clear line, where ``what`` cannot work on object storage yet."""
        if self.is_remote:
            from pipeline.io.storage import ObjectStorageUnsupported

            raise ObjectStorageUnsupported(f"{what} does not support object-storage catalogs yet ({self.url});"
                                           " use a local catalog folder")

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
        if self.is_remote:
            self.storage.write_json(self.rel(self.ledger_path(entry["run_id"])), entry)
            return self.ledger_path(entry["run_id"])
        return write_json_atomic(entry, self.ledger_path(entry["run_id"]))

    def read_state(self, stage: str, dataset: str) -> dict[str, Any] | None:
        path = self.state_path(stage, dataset)
        if self.is_remote:
            return self.storage.read_json(self.rel(path))
        return json.loads(path.read_text()) if path.exists() else None

    def write_state(self, stage: str, dataset: str, state: dict[str, Any]) -> Path:
        if self.is_remote:
            self.storage.write_json(self.rel(self.state_path(stage, dataset)), state)
            return self.state_path(stage, dataset)
        return write_json_atomic(state, self.state_path(stage, dataset))

    def row_count(self, table: str, dataset: str | None = None) -> int:
        base = self.partition(table, dataset) if dataset else self.table_dir(table)
        if self.is_remote:
            storage, prefix = self.storage, self.rel(base)
            total = 0
            for rel, entry in storage.current().items():
                if rel == prefix or rel.startswith(prefix + "/"):
                    for path in storage.folder_files(rel, entry):
                        if path.rsplit("/", 1)[-1].startswith("part-") and path.endswith(".parquet"):
                            with storage.fs.open(path, "rb") as fh:
                                total += pq.ParquetFile(fh).metadata.num_rows
            return total
        if not base.exists():
            return 0
        return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(base.rglob("part-*.parquet")))
