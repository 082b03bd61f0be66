"""What the input readers hand to the parsers: units of work, raw items, chunks, read limits.

Shared by the instruction readers (:mod:`pipeline.io.sources`), the image-text readers
(:mod:`pipeline.io.image_sources`) and the parsers and stages downstream; it imports neither
reader module, so the two readers never import each other in a circle.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io.rejects import Reject

INSTRUCTION = "instruction"
IMAGE_TEXT = "image_text"
KINDS = (INSTRUCTION, IMAGE_TEXT)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

UTF8_BOM = b"\xef\xbb\xbf"


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



def open_binary(path: str | os.PathLike) -> io.BufferedIOBase | _Gunzip:
    """Open a file for reading, transparently gunzipping (recognised by its magic bytes)."""
    path = Path(path)
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return _Gunzip(path) if magic == b"\x1f\x8b" else open(path, "rb")
