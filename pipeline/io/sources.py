"""Input discovery and chunked reading: the shard of work that a Beam worker parses.

Reading is split in two so that Beam can spread the expensive part. ``plan_units`` lists the
input files (cheap, on the driver); ``read_chunks`` streams one file into :class:`Chunk`s of raw
items with their offsets (I/O and decompression only); the parsers in ``instruction_records`` and
``image_records`` turn each raw item into a sample or a reject (JSON parsing, normalising,
hashing, image decoding) on whichever worker receives the chunk.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import zlib
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
    # The item range [start, stop) of the file this unit covers (stop None: to the end). Big
    # line-oriented files are split into ranges so that several workers parse one file.
    start: int = 0
    stop: int | None = None

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


class _Gunzip:
    """A gzip reader that hands back every byte decoded before a truncation or corruption.

    ``gzip.GzipFile.read`` raises on a cut-off stream and loses the block it was decoding; this
    reader returns all the data it could decode first and raises (EOFError / zlib.error) only on
    the next read, so ingest keeps every complete line before the damage. Concatenated gzip
    members are read one after another, like ``gzip`` does.
    """

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buf = bytearray()
        self._error: Exception | None = None
        self._done = False

    def _fill(self, n: int) -> None:
        while (n < 0 or len(self._buf) < n) and not self._done:
            raw = self._f.read(1 << 16)
            if not raw:
                self._done = True
                if not self._d.eof:
                    self._error = EOFError("compressed file ended before the end-of-stream marker")
                return
            try:
                self._buf += self._d.decompress(raw)
                while self._d.eof and self._d.unused_data:  # the next gzip member
                    rest = self._d.unused_data
                    self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._buf += self._d.decompress(rest)
            except zlib.error as exc:
                self._error, self._done = exc, True

    def read(self, n: int = -1) -> bytes:
        self._fill(n)
        if not self._buf and self._error is not None:
            raise self._error
        take = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:take])
        del self._buf[:take]
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "_Gunzip":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_binary(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return _Gunzip(path) if magic == b"\x1f\x8b" else open(path, "rb")


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
    with _open_binary(path) as f:
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


def split_unit(unit: Unit, ranges: int, min_items: int = 1) -> list[Unit]:
    """Split a JSONL unit into ``ranges`` line ranges of equal size; other units stay whole.

    Counting lines costs one streaming pass (decompression only, in C); it runs on a worker, and
    is what lets the expensive parsing of one large (even gzipped) file use every worker.
    """
    if unit.kind == IMAGE_TEXT or unit.container != "jsonl" or unit.start or unit.stop is not None:
        return [unit]
    try:
        lines, last = 0, b""
        with _open_binary(Path(unit.uri)) as f:
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


def open_binary(path: str | os.PathLike) -> io.BufferedIOBase:
    """Open a file for reading, transparently gunzipping."""
    return _open_binary(Path(path))
