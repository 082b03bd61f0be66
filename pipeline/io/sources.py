"""Input discovery and chunked reading: the shard of work that a Beam worker parses.

Reading is split in two so that Beam can spread the expensive part. ``plan_units`` lists the
input files (cheap, on the driver); ``read_chunks`` streams one file into :class:`Chunk`s of raw
items with their offsets (I/O and decompression only); the parsers in ``instruction_records`` and
``image_records`` turn each raw item into a sample or a reject (JSON parsing, normalising,
hashing, image decoding) on whichever worker receives the chunk.

This module holds the instruction readers (JSONL, JSON arrays, Parquet) and the dispatch by kind;
image-text units go to :mod:`pipeline.io.image_sources`. The types both share live in
:mod:`pipeline.io.units`, the JSON helpers in :mod:`pipeline.io.json_stream`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

# image discovery and reading live with the image readers (which import only units/json_stream)
from pipeline.io import image_sources
from pipeline.io.json_stream import iter_json_elements
from pipeline.io.rejects import Reject
from pipeline.io.units import (
    IMAGE_TEXT,
    KINDS,
    UTF8_BOM,
    Chunk,
    RawItem,
    ReadLimits,
    Unit,
    open_binary,
)

# Containers an instruction file can be in; the record layout inside is a separate question.
INSTRUCTION_CONTAINERS = ("jsonl", "json", "parquet")


def _strip_gz(name: str) -> str:
    return name.removesuffix(".gz")


def sniff_instruction_container(path: Path) -> str:
    name = _strip_gz(path.name.lower())
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    # .json (or unknown): a JSON array, else one object per line.
    with open_binary(path) as f:
        head = f.read(4096)
    head = head.removeprefix(UTF8_BOM)
    return "json" if head.lstrip().startswith(b"[") else "jsonl"


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


def _iter_lines(f, start: int, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (line number, line without newline or None if oversized, line length) from ``start``.

    Reads 1 MiB blocks and splits them in C: far faster than readline on a gzip stream, and lines
    before ``start`` are skipped a block at a time. An over-long line is never held in memory:
    only its length is kept, and it is yielded as ``None``.
    """
    offset, head, head_len = 0, b"", 0  # head: the unfinished line carried from earlier blocks
    while True:
        block = f.read(1 << 20)
        if not block:
            if head_len and offset >= start:
                yield offset, (head if head_len <= max_bytes else None), head_len
            return
        parts = block.split(b"\n")
        tail = parts.pop()
        if parts:
            if offset + len(parts) <= start:
                offset += len(parts)
            else:
                first_len = head_len + len(parts[0])
                parts[0] = head + parts[0] if first_len <= max_bytes else None
                for k, line in enumerate(parts):
                    length = first_len if k == 0 else len(line)
                    if offset >= start:
                        yield offset, (line if line is not None and length <= max_bytes else None), length
                    offset += 1
            head, head_len = b"", 0
        head_len += len(tail)
        head = head + tail if head_len <= max_bytes else b""


def _jsonl_chunks(unit: Unit, path: Path, limits: ReadLimits) -> Iterator[Chunk]:
    chunk, nbytes, offset = Chunk(unit), 0, unit.start
    with open_binary(path) as f:
        lines = _iter_lines(f, unit.start, limits.max_record_bytes)
        while True:
            try:
                offset, line, length = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as exc:
                # A truncated or corrupt gzip stream: keep every line read so far, reject the rest.
                chunk.rejects.append(Reject(unit.kind, unit.uri, offset, None, "unreadable_file",
                                            f"reading stopped near line {offset}: {type(exc).__name__}: {exc}"))
                break
            if unit.stop is not None and offset >= unit.stop:
                break
            if line is None:
                chunk.rejects.append(Reject(unit.kind, unit.uri, offset, None, "oversized_record",
                                            f"line is {length} bytes, over the {limits.max_record_bytes}-byte limit"))
            else:
                chunk.items.append(RawItem(offset, line))
                nbytes += length
            if len(chunk.items) >= limits.chunk_items or nbytes >= limits.chunk_bytes:
                yield chunk
                chunk, nbytes = Chunk(unit), 0
            offset += 1
    if chunk.items or chunk.rejects:
        yield chunk


def _json_array_chunks(unit: Unit, path: Path, size: int, limits: ReadLimits) -> Iterator[Chunk]:
    """A JSON array file, element by element: a broken element is one reject, the rest are read.

    A file holding one JSON object is a one-record file. Elements are parsed here (the parse
    step then only normalises them), so that a broken one can be told apart and skipped.
    """
    if size > limits.max_file_bytes_for_json_array:
        yield Chunk(unit, rejects=[_file_reject(unit, "oversized_record",
                                                f"JSON array file of {size} bytes; convert it to JSONL")])
        return
    chunk, nbytes = Chunk(unit), 0
    with open_binary(path) as f:
        for el in iter_json_elements(f, limits.max_record_bytes):
            if el.reject is not None:
                chunk.rejects.append(Reject(unit.kind, unit.uri, el.index, None, el.reject.reason,
                                            el.reject.detail, Reject.excerpt(el.raw)))
            else:
                chunk.items.append(RawItem(el.index, el.value))
                nbytes += el.size
            if len(chunk.items) >= limits.chunk_items or nbytes >= limits.chunk_bytes:
                yield chunk
                chunk, nbytes = Chunk(unit), 0
    if chunk.items or chunk.rejects:
        yield chunk


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


def split_unit(unit: Unit, ranges: int, min_items: int = 1) -> list[Unit]:
    """Split a JSONL unit into ``ranges`` line ranges of equal size; other units stay whole.

    Counting lines costs one streaming pass (decompression only, in C); it runs on a worker, and
    is what lets the expensive parsing of one large (even gzipped) file use every worker.
    """
    if unit.kind == IMAGE_TEXT or unit.container != "jsonl" or unit.start or unit.stop is not None:
        return [unit]
    try:
        lines, last = 0, b""
        with open_binary(Path(unit.uri)) as f:
            while block := f.read(1 << 20):
                lines += block.count(b"\n")
                last = block
        if last and not last.endswith(b"\n"):
            lines += 1  # a last line without a trailing newline is a line too
    except (OSError, EOFError):
        return [unit]  # read_chunks will reject what cannot be read, with the reason
    if ranges <= 1 or lines < max(min_items, 2) * 2:
        return [unit]
    step = -(-lines // ranges)
    bounds = list(range(0, lines, step))
    ranges = [dataclasses.replace(unit, start=a, stop=b) for a, b in zip(bounds, bounds[1:])]
    # the last range is open-ended so that nothing after the counted lines can be missed
    return ranges + [dataclasses.replace(unit, start=bounds[-1], stop=None)]


def input_fingerprint(units: list[Unit]) -> list[dict[str, Any]]:
    """Size and mtime of every input: what decides whether a finished stage can be skipped.

    A folder's own mtime does not change when a file inside it is rewritten, so folders are
    fingerprinted over their whole listing (file count, total size, newest mtime).
    """
    out = []
    for u in units:
        path = Path(u.uri)
        if path.is_dir():
            files = [p.stat() for p in path.rglob("*") if p.is_file()]
            size, mtime = sum(st.st_size for st in files), max((st.st_mtime_ns for st in files), default=0)
            extra = {"files": len(files)}
        else:
            st = path.stat()
            size, mtime, extra = st.st_size, st.st_mtime_ns, {}
        out.append({"uri": u.uri, "size": size, "mtime_ns": mtime, "container": u.container,
                    "layout": u.layout, "start": u.start, "stop": u.stop, **extra})
    return out
