"""Input discovery and chunked reading: the shard of work that a Beam worker parses.

Reading is split in two so that Beam can spread the expensive part. ``plan_units`` lists the
input files (cheap, on the driver); ``read_chunks`` streams one file into :class:`Chunk`s of raw
items with their offsets (I/O and decompression only); the parsers in ``instruction_records`` and
``image_records`` turn each raw item into a sample or a reject (JSON parsing, normalising,
hashing, image decoding) on whichever worker receives the chunk.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterator

from pipeline.io.rejects import RecordRejected, Reject

INSTRUCTION = "instruction"
IMAGE_TEXT = "image_text"
KINDS = (INSTRUCTION, IMAGE_TEXT)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# Containers an instruction file can be in; the record layout inside is a separate question.
INSTRUCTION_CONTAINERS = ("jsonl", "json", "parquet")

UTF8_BOM = b"\xef\xbb\xbf"
# Deepest JSON nesting a record may have. Real records stay far below it; deeper ones would
# exhaust Python's recursion limit somewhere (parsing, json.dumps of the metadata, pickling
# between Beam workers) and are rejected as ``too_deep`` before any of that runs.
MAX_JSON_DEPTH = 100


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
    return name.removesuffix(".gz")


def sniff_instruction_container(path: Path) -> str:
    name = _strip_gz(path.name.lower())
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    # .json (or unknown): a JSON array, else one object per line.
    with _open_binary(path) as f:
        head = f.read(4096)
    head = head.removeprefix(UTF8_BOM)
    return "json" if head.lstrip().startswith(b"[") else "jsonl"


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
            from pipeline.io import (
                image_sources,  # image discovery lives with the image readers
            )

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
    """A JSON array file, element by element: a broken element is one reject, the rest are read.

    A file holding one JSON object is a one-record file. Elements are parsed here (the parse
    step then only normalises them), so that a broken one can be told apart and skipped.
    """
    if size > limits.max_file_bytes_for_json_array:
        yield Chunk(unit, rejects=[_file_reject(unit, "oversized_record",
                                                f"JSON array file of {size} bytes; convert it to JSONL")])
        return
    chunk, nbytes = Chunk(unit), 0
    with _open_binary(path) as f:
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


def decode_json_line(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse one JSONL line; raises RecordRejected (invalid_utf8 / malformed_json / blank_line / too_deep).

    A UTF-8 byte-order mark in front of the line is ignored (editors put one at the start of a
    file, and concatenated files carry it into the middle).
    """
    raw = raw.removeprefix(UTF8_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("invalid_utf8", f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise RecordRejected("blank_line", "the line is empty")
    try:
        return loads_json(text, max_depth)
    except json.JSONDecodeError as exc:
        raise RecordRejected("malformed_json", f"{exc.msg} at column {exc.colno}") from None


# ---------------------------------------------------------------- safe JSON

# A JSON string literal (the unrolled form: no backtracking blow-up on long strings).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings not counted (no parsing)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def check_json_depth(text: str, max_depth: int = MAX_JSON_DEPTH, start: int = 0, end: int | None = None) -> None:
    """Raise RecordRejected("too_deep") when ``text[start:end]`` nests deeper than ``max_depth``.

    Counting brackets is done in C; the exact scan runs only when there are more opening brackets
    than the limit, so ordinary records pay almost nothing.
    """
    end = len(text) if end is None else end
    if text.count("[", start, end) + text.count("{", start, end) <= max_depth:
        return
    depth = json_depth(text[start:end])
    if depth > max_depth:
        raise RecordRejected("too_deep", f"JSON nested {depth} levels deep, over the {max_depth}-level limit")


def loads_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses deep nesting as RecordRejected("too_deep") instead of crashing.

    json.JSONDecodeError still propagates, for the caller to word. A RecursionError (the nesting
    check is an estimate on malformed text) becomes ``too_deep`` too.
    """
    check_json_depth(text, max_depth)
    try:
        return json.loads(text)
    except RecursionError:
        raise RecordRejected("too_deep", f"JSON nested too deep to parse (limit {max_depth} levels)") from None


@dataclass
class JsonElement:
    """One element of a JSON array file: its value, or why it was rejected.

    ``index`` is the element's position in the array (every element counts, broken or not), or -1
    for a problem of the whole file (not an array, not closed, text after the closing bracket).
    """

    index: int
    value: Any = None
    reject: RecordRejected | None = None
    raw: str | None = None  # the start of the element's text, for a reject's excerpt
    size: int = 0  # characters of the element's text


_WS = re.compile(r"[ \t\n\r]*")
_STRUCTURE = re.compile(r'[\[\]{}",]')
_STRING_STOP = re.compile(r'["\\\n]')
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, as errors="surrogateescape" keeps them
_DECODER = json.JSONDecoder()
_READ_CHARS = 1 << 20


def _element_end(buf: str, p: int) -> int | None:
    """Index of the ',' or ']' that ends the element starting at ``p`` (at nesting depth 0, outside
    strings), or None when ``buf`` ends first. Used to step over a broken element: it tracks string,
    escape and bracket state only, so it finds the boundary wherever the element's content is bad
    (see :func:`_resync` for what checks its answer).
    """
    depth, i = 0, p
    while True:
        m = _STRUCTURE.search(buf, i)
        if m is None:
            return None
        c, i = m.group(), m.end()
        if c == '"':
            while True:
                m = _STRING_STOP.search(buf, i)
                if m is None:
                    return None
                if m.group() == "\\":
                    i = m.end() + 1  # skip the escaped character
                    continue
                # the closing quote, or a raw newline: a JSON string cannot hold one, so the string
                # was never closed; ending it there keeps the scan in step on the next line
                i = m.end()
                break
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth:
                depth -= 1
            elif c == "]":
                return m.start()
            # a stray '}' at depth 0 is part of the broken element
        elif depth == 0:  # ','
            return m.start()


class _TextStream:
    """UTF-8 text of a binary stream, read on demand into one buffer; the consumed prefix is dropped.

    Undecodable bytes are kept as lone surrogates (errors="surrogateescape") so that only the
    elements holding them are rejected; a leading byte-order mark is dropped; a read error (a
    truncated gzip) ends the stream and is remembered in ``error``.
    """

    def __init__(self, f):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.eof = False
        self.error: Exception | None = None
        self.invalid = False  # some bytes were not UTF-8
        self.started = False

    def more(self, at_least: int = _READ_CHARS) -> bool:
        """Append at least ``at_least`` characters (or up to the end); False at the end."""
        if self.eof:
            return False
        got = 0
        while got < at_least and not self.eof:
            try:
                raw = self.f.read(max(at_least - got, _READ_CHARS))
            except (OSError, EOFError, zlib.error) as exc:
                self.error, raw = exc, b""
            text = self.decoder.decode(raw, final=not raw)
            if not raw:
                self.eof = True
            if not self.started and text:
                self.started = True
                text = text.removeprefix("\ufeff")
            if _SURROGATE.search(text):
                self.invalid = True
            self.buf += text
            got += len(text)
        return True

    def drop(self, pos: int) -> int:
        """Forget the text before ``pos``; returns the new position of that character (0)."""
        if pos > _READ_CHARS:
            self.buf = self.buf[pos:]
            return 0
        return pos

    def skip_ws(self, pos: int) -> int:
        """Position of the next non-whitespace character at or after ``pos`` (== len(buf) at the end)."""
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or not self.more():
                return pos


def iter_json_elements(f, max_element_chars: int, max_depth: int = MAX_JSON_DEPTH) -> Iterator[JsonElement]:
    """Stream the elements of the JSON array in binary file ``f``, each parsed on its own.

    Every element is decoded with ``JSONDecoder.raw_decode`` where it starts; an element that does
    not decode is stepped over to the next top-level ``,`` or ``]`` (see :func:`_element_end`) and
    reported as a reject with its index, and reading goes on. Only the element being read is held
    in memory besides the read buffer. A file holding one object (not an array) yields it as
    element 0. Never raises for bad content.
    """
    ts = _TextStream(f)
    pos = ts.skip_ws(0)
    if pos >= len(ts.buf):
        yield JsonElement(-1, reject=RecordRejected("empty_file", "the file holds only whitespace"))
        yield from _read_error(ts)
        return
    if ts.buf[pos] != "[":
        yield from _single_document(ts, pos, max_element_chars, max_depth)
        return
    pos, index = pos + 1, 0
    pos = ts.skip_ws(pos)
    if pos < len(ts.buf) and ts.buf[pos] == "]":
        yield from _after_array(ts, pos + 1)
        return
    while True:
        pos = ts.skip_ws(ts.drop(pos))
        if pos >= len(ts.buf):
            # "[" or "[ ..., " and then nothing: the file was cut.
            yield JsonElement(-1, reject=RecordRejected(
                "malformed_json", f"the array is not closed: the file ends after {index} element(s) (truncated?)"))
            break
        if ts.buf[pos] == "]" and index:
            yield from _after_array(ts, pos + 1)  # a trailing comma before "]": tolerated
            return
        el, pos, closed = _next_element(ts, pos, index, max_element_chars, max_depth)
        yield el
        index += 1
        if closed is None:  # the file ended inside or right after this element
            if el.reject is None:
                yield JsonElement(-1, reject=RecordRejected(
                    "malformed_json", f"the array is not closed: the file ends after {index} element(s) (truncated?)"))
            break
        if closed == "]":
            yield from _after_array(ts, pos)
            return
    yield from _read_error(ts)


def _next_element(ts: _TextStream, p: int, index: int, max_chars: int,
                  max_depth: int) -> tuple[JsonElement, int, str | None]:
    """Decode the element starting at ``p``: (element, position after its ',' or ']', which of the
    two ended it, or None when the file ended first)."""
    if ts.buf[p] == ",":
        return (JsonElement(index, reject=RecordRejected("malformed_json", "empty array element (two commas in a row)"),
                            raw=","), p + 1, ",")
    while True:
        error: Exception | None = None
        try:
            value, end = _DECODER.raw_decode(ts.buf, p)
        except json.JSONDecodeError as exc:
            error, end = exc, -1
        except RecursionError as exc:
            error, end = exc, -1
        if error is None:
            if end >= len(ts.buf) and ts.more():
                continue  # a number may go on in the next block
            after = ts.skip_ws(end)
            if after < len(ts.buf) and ts.buf[after] in ",]":
                return _checked(ts, index, value, p, end, max_chars, max_depth), after + 1, ts.buf[after]
            if after >= len(ts.buf):
                # the last element, and then the file ends: the caller reports the array not closed
                return _checked(ts, index, value, p, end, max_chars, max_depth), after, None
            error = ValueError(f"expected ',' or ']' after the element, found {ts.buf[after]!r}")
        # A broken element: find where it ends (reading on if need be), reject it, go on.
        q = _element_end(ts.buf, p)
        if q is None and ts.more(len(ts.buf)):
            continue  # the element may simply go on past the buffer: decode it again, whole
        q = _resync(ts, p, q)
        text = ts.buf[p:q] if q is not None else ts.buf[p:]
        if isinstance(error, RecursionError):
            rej = RecordRejected("too_deep", f"JSON nested too deep to parse (limit {max_depth} levels)")
        elif ts.invalid and _SURROGATE.search(text):
            rej = RecordRejected("invalid_utf8", "the element holds bytes that are not UTF-8")
        elif q is None:
            rej = RecordRejected("malformed_json", f"the file ends inside this element (truncated?): {_json_error(error, p)}")
        else:
            rej = RecordRejected("malformed_json", _json_error(error, p))
        el = JsonElement(index, reject=rej, raw=text[:600], size=len(text))
        if q is None:
            return el, len(ts.buf), None
        return el, q + 1, ts.buf[q]


def _resync(ts: _TextStream, p: int, q: int | None) -> int | None:
    """Where the broken element at ``p`` ends: the ',' or ']' before the next element, or None.

    The bracket/string scan (``q``) is right unless the element's own damage misleads it: an
    unterminated string flips every later quote, and the scan then runs on to the end of the
    file. So its answer is checked (a ',' must be followed by what starts an element like this
    one; a ']' only by whitespace) and, when implausible, the next element is found instead
    from the layout: in a file with one element per line (or pretty-printed), the next line that
    opens at the broken element's indentation, after a ','; in a one-line file, the next ','
    after which an element decodes cleanly.
    """
    if q is not None and _plausible_end(ts, p, q):
        return q
    while True:
        r = _layout_boundary(ts, p)
        if r is not None:
            return r
        if not ts.more(len(ts.buf)):
            return q  # nothing better: what the scan found (None: the element runs to the end)


def _plausible_end(ts: _TextStream, p: int, q: int) -> bool:
    if ts.buf[q] == "]":
        return ts.skip_ws(q + 1) >= len(ts.buf)  # only whitespace may follow the array
    nxt = ts.skip_ws(q + 1)
    if nxt >= len(ts.buf) or ts.buf[nxt] == "]":
        return True
    first = ts.buf[p]
    return ts.buf[nxt] == first if first in "[{" else ts.buf[nxt] in '[{"-0123456789tfn'


def _layout_boundary(ts: _TextStream, p: int) -> int | None:
    buf, first = ts.buf, ts.buf[p]
    nl = buf.rfind("\n", 0, p)
    indent = buf[nl + 1:p]
    if nl >= 0 and not indent.strip():
        # JSON strings cannot hold a raw newline, so ",<newline><same indentation><same opener>"
        # only occurs between values: no need to decode the candidate (two broken elements in a
        # row stay two rejects).
        m = re.compile(r",[ \t\r\n]*\n" + re.escape(indent) + re.escape(first)).search(buf, p + 1)
        return m.start() if m is not None else None
    for m in re.compile(r",[ \t\r\n]*" + re.escape(first)).finditer(buf, p + 1):
        start = m.end() - 1
        try:
            _, end = _DECODER.raw_decode(buf, start)
        except (json.JSONDecodeError, RecursionError):
            continue
        after = _WS.match(buf, end).end()
        if after < len(buf) and (buf[after] == "," or (buf[after] == "]" and not buf[after + 1:].strip())):
            return m.start()
    return None


def _checked(ts: _TextStream, index: int, value: Any, p: int, end: int, max_chars: int, max_depth: int) -> JsonElement:
    """A decoded element, or its reject when it holds undecodable bytes, is too long or too deep."""
    rej = None
    if ts.invalid and _SURROGATE.search(ts.buf, p, end):
        rej = RecordRejected("invalid_utf8", "the element holds bytes that are not UTF-8")
    elif end - p > max_chars:
        rej = RecordRejected("oversized_record", f"element is {end - p} characters, over the {max_chars} limit")
    else:
        try:
            check_json_depth(ts.buf, max_depth, p, end)
        except RecordRejected as exc:
            rej = exc
    if rej is not None:
        return JsonElement(index, reject=rej, raw=ts.buf[p:min(end, p + 600)])
    return JsonElement(index, value, size=end - p)


def _json_error(exc: Exception, start: int = 0) -> str:
    if isinstance(exc, json.JSONDecodeError):
        if start:
            return f"{exc.msg} (at character {exc.pos - start} of the element)"
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)


def _single_document(ts: _TextStream, pos: int, max_chars: int, max_depth: int) -> Iterator[JsonElement]:
    """The whole file is one JSON value (not an array): one object is a one-record file."""
    while ts.more():
        pass
    text = ts.buf[pos:]
    if ts.invalid and _SURROGATE.search(text):
        yield JsonElement(-1, reject=RecordRejected("invalid_utf8", "the file holds bytes that are not UTF-8"), raw=text[:600])
    else:
        try:
            value = loads_json(text, max_depth)
        except json.JSONDecodeError as exc:
            yield JsonElement(-1, reject=RecordRejected("malformed_json", f"the file is not valid JSON: {_json_error(exc)}"),
                              raw=text[:600])
        except RecordRejected as rej:
            yield JsonElement(-1, reject=rej, raw=text[:600])
        else:
            if isinstance(value, dict):
                if len(text) > max_chars:
                    yield JsonElement(0, reject=RecordRejected(
                        "oversized_record", f"record is {len(text)} characters, over the {max_chars} limit"), raw=text[:600])
                else:
                    yield JsonElement(0, value, size=len(text))
            else:
                yield JsonElement(-1, reject=RecordRejected("unknown_layout", f"top-level JSON is a {type(value).__name__}"),
                                  raw=text[:600])
    yield from _read_error(ts)


def _after_array(ts: _TextStream, pos: int) -> Iterator[JsonElement]:
    pos = ts.skip_ws(ts.drop(pos))
    if pos < len(ts.buf):
        yield JsonElement(-1, reject=RecordRejected("malformed_json", "text follows the array's closing ']'"),
                          raw=ts.buf[pos:pos + 600])
    yield from _read_error(ts)


def _read_error(ts: _TextStream) -> Iterator[JsonElement]:
    if ts.error is not None:
        yield JsonElement(-1, reject=RecordRejected(
            "unreadable_file", f"reading stopped: {type(ts.error).__name__}: {ts.error}"))


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
