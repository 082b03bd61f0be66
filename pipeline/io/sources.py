"""Input discovery and chunked reading: the shard of work that a Beam worker parses.

Reading is split in two so that Beam can spread the expensive part. ``plan_units`` lists the
input files (cheap, on the driver); ``read_chunks`` streams one file into :class:`Chunk`s of raw
items with their offsets (I/O and decompression only); the parsers in ``instruction_records`` and
``image_records`` turn each raw item into a sample or a reject (JSON parsing, normalising,
hashing, image decoding) on whichever worker receives the chunk.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.io.rejects import Reject

INSTRUCTION = "instruction"
IMAGE_TEXT = "image_text"
KINDS = (INSTRUCTION, IMAGE_TEXT)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# Containers an instruction file can be in; the record layout inside is a separate question.
INSTRUCTION_CONTAINERS = ("jsonl", "json", "parquet")


@dataclass(frozen=True)
class Unit:
    """One input file (or image folder) to read, with the container and layout to use."""

    uri: str
    kind: str
    container: str  # jsonl | json | parquet | image_folder | webdataset | nlvr
    layout: str = "auto"  # instruction layout name, or "auto"
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass
class RawItem:
    offset: int
    payload: Any  # bytes (a JSON line), a parsed object, or a dict describing an image pair
    member: str | None = None


@dataclass
class Chunk:
    unit: Unit
    items: list[RawItem] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)  # rejected while reading (file level)

    @property
    def rows_in(self) -> int:
        return len(self.items) + len(self.rejects)


@dataclass(frozen=True)
class ReadLimits:
    max_record_bytes: int = 8 << 20  # one JSON record / caption; larger is rejected as oversized
    max_file_bytes_for_json_array: int = 2 << 30
    max_image_bytes: int = 64 << 20
    max_image_pixels: int = 178_956_970  # PIL's own decompression-bomb limit
    chunk_items: int = 2000  # raw items per chunk (a unit of parallel work)
    chunk_bytes: int = 8 << 20


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def sniff_instruction_container(path: Path) -> str:
    name = _strip_gz(path.name.lower())
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    # .json (or unknown): a JSON array, else one object per line.
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


def _open_binary(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def plan_units(
    inputs: list[str | os.PathLike],
    kind: str,
    container: str = "auto",
    layout: str = "auto",
    options: dict[str, Any] | None = None,
) -> list[Unit]:
    """Expand input paths into sorted, de-duplicated units. Missing paths are an error."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    opts = tuple(sorted((options or {}).items()))
    units: dict[str, Unit] = {}
    for raw in inputs:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"input {raw} does not exist")
        if kind == IMAGE_TEXT:
            from pipeline.io import image_sources  # image discovery lives with the image readers

            for unit in image_sources.plan_image_units(path, container, opts):
                units.setdefault(unit.uri, unit)
            continue
        # In a folder only data files count (READMEs and licences beside them are not records);
        # a file named explicitly is always read, and rejected if it holds no records.
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p)) if path.is_dir() else [path]
        for f in files:
            cont = container if container != "auto" else (
                sniff_instruction_container(f) if f.stat().st_size else "jsonl"
            )
            if cont not in INSTRUCTION_CONTAINERS:
                raise ValueError(f"unknown container {cont!r} for instructions; choose auto or one of {INSTRUCTION_CONTAINERS}")
            units.setdefault(str(f), Unit(str(f), kind, cont, layout, opts))
    return [units[k] for k in sorted(units)]


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def _is_data_file(path: Path) -> bool:
    return not path.name.startswith(".") and _strip_gz(path.name.lower()).endswith(DATA_SUFFIXES)


def read_chunks(unit: Unit, limits: ReadLimits = ReadLimits()) -> Iterator[Chunk]:
    """Stream one unit as chunks of raw items. Never raises for bad content: it rejects it."""
    if unit.kind == IMAGE_TEXT:
        from pipeline.io import image_sources

        yield from image_sources.read_image_chunks(unit, limits)
        return
    path = Path(unit.uri)
    try:
        size = path.stat().st_size
    except OSError as exc:
        yield Chunk(unit, rejects=[_file_reject(unit, "unreadable_file", str(exc))])
        return
    if size == 0:
        yield Chunk(unit, rejects=[_file_reject(unit, "empty_file", "the file is zero bytes long")])
        return
    try:
        if unit.container == "jsonl":
            yield from _jsonl_chunks(unit, path, limits)
        elif unit.container == "json":
            yield from _json_array_chunks(unit, path, size, limits)
        else:
            yield from _parquet_chunks(unit, path, limits)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        # Truncated gzip and the like: what was read before stays; the rest is one reject.
        yield Chunk(unit, rejects=[_file_reject(unit, "unreadable_file", f"{type(exc).__name__}: {exc}")])


def _file_reject(unit: Unit, reason: str, detail: str, offset: int = -1) -> Reject:
    return Reject(unit.kind, unit.uri, offset, None, reason, detail)


def _jsonl_chunks(unit: Unit, path: Path, limits: ReadLimits) -> Iterator[Chunk]:
    chunk, nbytes, offset = Chunk(unit), 0, 0
    with _open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError) as exc:
                # A truncated or corrupt gzip stream: keep every line read so far, reject the rest.
                chunk.rejects.append(Reject(unit.kind, unit.uri, offset, None, "unreadable_file",
                                            f"reading stopped at line {offset}: {type(exc).__name__}: {exc}"))
                break
            if len(line) > limits.max_record_bytes:
                chunk.rejects.append(
                    Reject(unit.kind, unit.uri, offset, None, "oversized_record",
                           f"line is {len(line)} bytes, over the {limits.max_record_bytes}-byte limit",
                           Reject.excerpt(line))
                )
            else:
                chunk.items.append(RawItem(offset, line))
                nbytes += len(line)
            offset += 1
            if len(chunk.items) >= limits.chunk_items or nbytes >= limits.chunk_bytes:
                yield chunk
                chunk, nbytes = Chunk(unit), 0
    if chunk.items or chunk.rejects:
        yield chunk


def _json_array_chunks(unit: Unit, path: Path, size: int, limits: ReadLimits) -> Iterator[Chunk]:
    if size > limits.max_file_bytes_for_json_array:
        yield Chunk(unit, rejects=[_file_reject(unit, "oversized_record",
                                                f"JSON array file of {size} bytes; convert it to JSONL")])
        return
    with _open_binary(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        yield Chunk(unit, rejects=[_file_reject(unit, "invalid_utf8", str(exc))])
        return
    except json.JSONDecodeError as exc:
        yield Chunk(unit, rejects=[Reject(unit.kind, unit.uri, -1, None, "malformed_json",
                                          f"the file is not valid JSON: {exc}", Reject.excerpt(raw))])
        return
    if isinstance(data, dict):
        data = [data]  # a single object is a one-record file
    if not isinstance(data, list):
        yield Chunk(unit, rejects=[_file_reject(unit, "unknown_layout", f"top-level JSON is a {type(data).__name__}")])
        return
    for start in range(0, len(data), limits.chunk_items):
        yield Chunk(unit, [RawItem(start + k, rec) for k, rec in enumerate(data[start:start + limits.chunk_items])])


def _parquet_chunks(unit: Unit, path: Path, limits: ReadLimits) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        yield Chunk(unit, rejects=[_file_reject(unit, "corrupt_parquet", f"{type(exc).__name__}: {exc}")])
        return
    offset = 0
    for batch in pf.iter_batches(batch_size=limits.chunk_items):
        rows = batch.to_pylist()
        yield Chunk(unit, [RawItem(offset + k, row) for k, row in enumerate(rows)])
        offset += len(rows)


def decode_json_line(raw: bytes) -> Any:
    """Parse one JSONL line; raises RecordRejected with invalid_utf8 / malformed_json / blank_line."""
    from pipeline.io.rejects import RecordRejected

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("invalid_utf8", f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise RecordRejected("blank_line", "the line is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordRejected("malformed_json", f"{exc.msg} at column {exc.colno}") from None


def input_fingerprint(units: list[Unit]) -> list[dict[str, Any]]:
    """Size and mtime of every input: what decides whether a finished stage can be skipped."""
    out = []
    for u in units:
        st = os.stat(u.uri)
        out.append({"uri": u.uri, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "container": u.container, "layout": u.layout})
    return out


def open_binary(path: str | os.PathLike) -> io.BufferedIOBase:
    """Open a file for reading, transparently gunzipping."""
    return _open_binary(Path(path))
