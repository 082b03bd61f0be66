"""Image-text input discovery and streaming: image folders, WebDataset tars, Parquet and NLVR.

``plan_image_units`` runs on the driver and only lists files. ``read_image_chunks`` runs on a
worker and streams one unit as :class:`Chunk`s of :class:`RawItem`s whose payload is a plain dict
(see :func:`new_payload`); the expensive, per-image work (reading folder files, decoding, hashing,
JSON sidecars) happens later in :mod:`pipeline.io.image_records`, on whichever worker gets the
chunk. Tar members are the exception: a tar can only be streamed once, so their bytes travel in
the payload.

Offsets (``RawItem.offset`` and the reject's ``source_offset``), per container:

* ``image_folder``: index of the image in the sorted, recursive listing of image files.
* ``webdataset``: ordinal of the image member in the tar (0 = first member of any type).
* ``parquet``: row number in the file.
* ``nlvr``: ``row * NLVR_OFFSET_STRIDE + n`` where ``row`` is the 0-based line of the JSON file and
  ``n`` the image number in ``<split>-<identifier>-<n>.png``; ``offset // 100`` gives the line back.

``-1`` marks a reject that belongs to no single item (a whole file, a sidecar row naming a file
that is not there).

What counts as an input item: every image file of a folder (by extension) and every sidecar row;
every sample key of a tar (members sharing folder + basename up to the first dot) and every
member that may not be read; every Parquet row; every (row, image) pair of an NLVR file, or the
row itself when it has no image. Loose non-image files in a folder (a README, an orphan ``.txt``)
are not inputs: nothing tells a stray caption from documentation.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from pipeline.io.json_stream import iter_json_elements, loads_json
from pipeline.io.rejects import RecordRejected, Reject
from pipeline.io.units import (
    IMAGE_EXTENSIONS,
    IMAGE_TEXT,
    UTF8_BOM,
    Chunk,
    RawItem,
    ReadLimits,
    Unit,
)

CONTAINERS = ("image_folder", "webdataset", "parquet", "nlvr")
CAPTION_FROM = ("auto", "dirname", "none")
# Option names accepted in ``Unit.options`` for image-text units; anything else is a typo.
OPTION_NAMES = ("caption_from", "image_column", "caption_column")

# Caption sidecars of an image folder, in the order they are consulted.
SIDECAR_NAMES = ("captions.csv", "captions.jsonl", "captions.json", "metadata.jsonl", "metadata.csv")
# Column names that name a sidecar row's image, and its caption (also the caption columns of
# Parquet files), first match wins; matched case-insensitively. ``image_column`` and
# ``caption_column`` options (``--image-column``/``--caption-column``) name others.
SIDECAR_FILE_COLUMNS = ("file_name", "image", "file", "filename", "path", "image_path", "img", "image_file", "file_path")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "sentence", "title", "description", "prompt")
# DataConcept annotation fields (per-box classes/scores/boxes, image-level tags).
DATACONCEPT_FIELDS = ("classes", "scores", "bounding_boxes", "tags")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes")
PARQUET_PATH_COLUMNS = ("image_path", "path", "file_name", "filename")

NLVR_SPLITS = ("train", "dev", "test")
NLVR_OFFSET_STRIDE = 100

_IMAGE_EXTS_NO_DOT = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


# ---------------------------------------------------------------- payload


def new_payload(**fields: Any) -> dict[str, Any]:
    """The dict every image-text RawItem carries; all keys present, unused ones None.

    image            bytes of the encoded image (tar members, Parquet bytes columns)
    image_path       absolute path of the image file, read by the parser instead
    caption          caption text already decoded (sidecar rows, Parquet, NLVR, dirname)
    caption_bytes    raw caption bytes still to decode as UTF-8 (tar ``.txt`` members)
    caption_path     path of a ``.txt`` caption file next to the image, read by the parser
    json_bytes       raw per-sample JSON (tar ``.json`` members)
    json_path        path of a ``<stem>.json`` sidecar next to the image, read by the parser
    metadata         JSON-able dict stored as ``metadata_json``
    dataconcept      DataConcept fields already parsed (Parquet columns, metadata.jsonl rows)
    """
    payload: dict[str, Any] = {
        "image": None,
        "image_path": None,
        "caption": None,
        "caption_bytes": None,
        "caption_path": None,
        "json_bytes": None,
        "json_path": None,
        "metadata": {},
        "dataconcept": None,
    }
    unknown = set(fields) - set(payload)
    if unknown:
        raise TypeError(f"unknown image payload fields: {sorted(unknown)}")
    payload.update(fields)
    return payload


def pick_dataconcept(record: dict[str, Any]) -> dict[str, Any] | None:
    found = {k: record[k] for k in DATACONCEPT_FIELDS if record.get(k) is not None}
    return found or None


# ---------------------------------------------------------------- planning


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def _visible_files(root: Path) -> list[Path]:
    """All files under root, sorted, skipping hidden files and folders (.git, .DS_Store, ...)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(out)


def _nlvr_json_files(folder: Path) -> list[Path]:
    if not (folder / "images").is_dir():
        return []
    return [folder / f"{s}.json" for s in NLVR_SPLITS if (folder / f"{s}.json").is_file()]


def _validate_options(container: str, options: tuple[tuple[str, Any], ...]) -> None:
    opts = dict(options)
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown image-text option(s) {unknown}; the accepted ones are {list(OPTION_NAMES)}")
    caption_from = opts.get("caption_from", "auto")
    if caption_from not in CAPTION_FROM:
        raise ValueError(f"caption_from={caption_from!r} is not one of {CAPTION_FROM}")
    if caption_from == "dirname" and container != "image_folder":
        raise ValueError(f"caption_from='dirname' only applies to image folders, not to container {container!r}")


def plan_image_units(path: Path, container: str, options: tuple[tuple[str, Any], ...]) -> list[Unit]:
    """List the units (one folder, tar, Parquet or NLVR JSON file each) found at ``path``.

    ``container="auto"`` decides from what is there: an NLVR split file with an ``images/``
    folder beside it; else ``.tar``/``.tar.gz``/``.tgz`` and ``.parquet`` files (their images are
    inside them or referenced by them); else a folder of images.
    """
    path = Path(path)
    if container != "auto" and container not in CONTAINERS:
        raise ValueError(f"unknown image-text container {container!r}; choose auto or one of {CONTAINERS}")

    def unit(p: Path, cont: str) -> Unit:
        _validate_options(cont, options)
        return Unit(str(p), IMAGE_TEXT, cont, "auto", options)

    if path.is_file():
        name = path.name.lower()
        if container == "auto":
            if _is_tar(path):
                container = "webdataset"
            elif name.endswith(".parquet"):
                container = "parquet"
            elif name.endswith((".json", ".jsonl")) and (path.parent / "images").is_dir():
                container = "nlvr"
            else:
                raise ValueError(
                    f"cannot tell the image-text container of {path}; pass a folder of images, a .tar "
                    f"shard, a .parquet file or an NLVR JSON file, or name the container ({CONTAINERS})"
                )
        if container == "image_folder":
            raise ValueError(f"container 'image_folder' needs a folder, got the file {path}")
        return [unit(path, container)]

    if not path.is_dir():
        raise ValueError(f"{path} is neither a file nor a folder")
    files = _visible_files(path)
    if container in ("auto", "nlvr"):
        nlvr = _nlvr_json_files(path)
        if container == "nlvr" and not nlvr:
            nlvr = sorted(p for p in path.glob("*.json") if (path / "images").is_dir())
            if not nlvr:
                raise ValueError(f"{path} holds no NLVR layout: expected dev.json/train.json/test.json and an images/ folder")
        if nlvr:
            return [unit(p, "nlvr") for p in nlvr]
    if container in ("auto", "webdataset", "parquet"):
        shards = [f for f in files if _is_tar(f)] if container in ("auto", "webdataset") else []
        tables = [f for f in files if f.name.lower().endswith(".parquet")] if container in ("auto", "parquet") else []
        if shards or tables:
            return [unit(f, "webdataset") for f in shards] + [unit(f, "parquet") for f in tables]
        if container != "auto":
            raise ValueError(f"{path} holds no {container} files")
    if container == "auto" and not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files):
        raise ValueError(f"{path} holds no images, .tar shards, .parquet files or NLVR split files")
    return [unit(path, "image_folder")]


# ---------------------------------------------------------------- reading


def read_image_chunks(unit: Unit, limits: ReadLimits = ReadLimits()) -> Iterator[Chunk]:
    """Stream one unit as chunks of raw items; bad inputs become rejects, nothing is dropped."""
    readers = {
        "image_folder": _folder_chunks,
        "webdataset": _webdataset_chunks,
        "parquet": _parquet_chunks,
        "nlvr": _nlvr_chunks,
    }
    if unit.container not in readers:
        raise ValueError(f"unknown image-text container {unit.container!r}; choose one of {CONTAINERS}")
    path = Path(unit.uri)
    if not path.exists():
        yield Chunk(unit, rejects=[_reject(unit, "unreadable_file", f"{path} does not exist (moved since planning?)")])
        return
    if path.is_file() and path.stat().st_size == 0:
        yield Chunk(unit, rejects=[_reject(unit, "empty_file", "the file is zero bytes long")])
        return
    yield from readers[unit.container](unit, path, limits)


def _reject(unit: Unit, reason: str, detail: str, offset: int = -1, member: str | None = None,
            raw: bytes | str | None = None) -> Reject:
    return Reject(unit.kind, unit.uri, offset, member, reason, detail, Reject.excerpt(raw))


@dataclass
class _Batcher:
    """Collects items and rejects into chunks bounded by item count and payload bytes."""

    unit: Unit
    limits: ReadLimits
    chunk: Chunk = field(init=False)
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.chunk = Chunk(self.unit)

    def add(self, item: RawItem, nbytes: int = 0) -> Chunk | None:
        self.chunk.items.append(item)
        self.nbytes += nbytes
        if len(self.chunk.items) >= self.limits.chunk_items or self.nbytes >= self.limits.chunk_bytes:
            return self.flush()
        return None

    def reject(self, rej: Reject) -> None:
        self.chunk.rejects.append(rej)

    def flush(self) -> Chunk | None:
        if not self.chunk.items and not self.chunk.rejects:
            return None
        done, self.chunk, self.nbytes = self.chunk, Chunk(self.unit), 0
        return done


# ---- image folders


@dataclass
class _SidecarEntry:
    caption: str | None
    metadata: dict[str, Any]
    dataconcept: dict[str, Any] | None


def _sidecar_rows(unit: Unit, sidecar: Path, root: Path,
                  limits: ReadLimits) -> tuple[list[dict[str, Any]], list[str], list[Reject]]:
    """(rows, column names in order of first appearance, rejects) of one caption sidecar.

    A bad line of a JSONL sidecar or a bad element of a JSON one is one reject and the others are
    read; a CSV that breaks off keeps the rows before the damage. Never raises for bad content.
    """
    member = sidecar.relative_to(root).as_posix()
    try:
        raw = sidecar.read_bytes()
    except OSError as exc:
        return [], [], [_reject(unit, "unreadable_file", f"caption sidecar: {exc}", member=member)]
    name = sidecar.name.lower()
    if name.endswith(".json"):
        return _json_sidecar_rows(unit, raw, member, limits)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], [], [_reject(unit, "invalid_utf8", f"caption sidecar is not UTF-8 ({exc.reason} at byte {exc.start})",
                                member=member, raw=raw)]
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        rows: list[dict[str, Any]] = []
        try:
            for r in reader:
                rows.append({(k.strip() if isinstance(k, str) else k): v for k, v in r.items()})
        except csv.Error as exc:
            # What was read before the damage stays; the rest of the file is one reject.
            return rows, _columns(reader.fieldnames, rows), [_reject(
                unit, "malformed_csv", f"caption sidecar line {reader.line_num}: {exc}; the rows after it were not read",
                member=member)]
        return rows, _columns(reader.fieldnames, rows), []
    rows, rejects = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        line = line.removeprefix("\ufeff")
        try:
            rec = loads_json(line)
        except json.JSONDecodeError as exc:
            rejects.append(_reject(unit, "malformed_json", f"caption sidecar line {lineno}: {exc.msg}", member=member, raw=line))
            continue
        except RecordRejected as rej:  # too_deep
            rejects.append(_reject(unit, rej.reason, f"caption sidecar line {lineno}: {rej.detail}", member=member, raw=line))
            continue
        if not isinstance(rec, dict):
            rejects.append(_reject(unit, "malformed_json", f"caption sidecar line {lineno} is not a JSON object",
                                   member=member, raw=line))
            continue
        rows.append(rec)
    return rows, _columns(None, rows), rejects


def _json_sidecar_rows(unit: Unit, raw: bytes, member: str,
                       limits: ReadLimits) -> tuple[list[dict[str, Any]], list[str], list[Reject]]:
    """``captions.json``: an array of row objects, or one object mapping image path -> caption
    (or -> an object of fields). Each broken array element is one reject."""
    rows, rejects = [], []
    for el in iter_json_elements(io.BytesIO(raw), limits.max_record_bytes):
        where = f"caption sidecar element {el.index}" if el.index >= 0 else "caption sidecar"
        if el.reject is not None:
            rejects.append(_reject(unit, el.reject.reason, f"{where}: {el.reject.detail}", member=member, raw=el.raw))
        elif isinstance(el.value, dict) and el.index >= 0 and raw.lstrip(UTF8_BOM + b" \t\r\n").startswith(b"{"):
            # one object: a mapping from image path to caption or fields
            odd = [k for k in el.value if Path(k).suffix.lower() not in IMAGE_EXTENSIONS]
            if odd:
                rejects.append(_reject(unit, "unknown_layout", f"caption sidecar is an object whose keys are not image "
                                       f"file names (e.g. {odd[0]!r}); expected {{\"a.jpg\": \"a caption\", ...}} or "
                                       "an array of rows", member=member, raw=raw[:600]))
                break
            for key, value in el.value.items():
                if isinstance(value, str):
                    rows.append({"file_name": key, "caption": value})
                elif isinstance(value, dict):
                    rows.append({**value, "file_name": key})
                else:
                    rejects.append(_reject(unit, "malformed_json", f"caption sidecar entry {key!r} must be a caption "
                                           f"string or an object, got {type(value).__name__}", member=member))
        elif isinstance(el.value, dict):
            rows.append(el.value)
        else:
            rejects.append(_reject(unit, "malformed_json", f"{where} is not a JSON object", member=member,
                                   raw=json.dumps(el.value, default=str)[:600]))
    return rows, _columns(None, rows), rejects


def _columns(header: Any, rows: list[dict[str, Any]]) -> list[str]:
    if header:
        return [h.strip() for h in header if isinstance(h, str)]
    return list(dict.fromkeys(k for r in rows for k in r if isinstance(k, str)))


def _resolve_column(columns: list[str], names: tuple[str, ...], forced: str | None) -> str | None:
    """The column to use: ``forced`` if given (exact, else case-insensitive), else the first of
    ``names`` present (exact, else case-insensitive)."""
    lower = {}
    for c in columns:
        lower.setdefault(c.lower(), c)
    for n in ([forced] if forced else names):
        if n in columns:
            return n
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def _load_sidecars(unit: Unit, root: Path, folder: Path, names: set[str],
                   limits: ReadLimits = ReadLimits()) -> tuple[list[dict[str, _SidecarEntry]], list[Reject]]:
    """Parse the caption sidecars of one folder: a list (in SIDECAR_NAMES order) of rel-path -> entry."""
    tables, rejects = [], []
    lower = {n.lower(): n for n in names}
    forced_image, forced_caption = unit.option("image_column"), unit.option("caption_column")
    for wanted in SIDECAR_NAMES:
        if wanted not in lower:
            continue
        sidecar = folder / lower[wanted]
        member = sidecar.relative_to(root).as_posix()
        rows, columns, bad = _sidecar_rows(unit, sidecar, root, limits)
        rejects.extend(bad)
        if not rows:
            continue
        fcol = _resolve_column(columns, SIDECAR_FILE_COLUMNS, forced_image)
        ccol = _resolve_column(columns, CAPTION_COLUMNS, forced_caption)
        missing = []
        if fcol is None:
            missing.append(f"no column {forced_image!r} (--image-column)" if forced_image else
                           f"no image column (one of {list(SIDECAR_FILE_COLUMNS)})")
        if ccol is None and forced_caption:
            missing.append(f"no column {forced_caption!r} (--caption-column)")
        if missing:
            # One reject for the whole sidecar: its rows cannot be matched to images at all.
            rejects.append(_reject(unit, "unknown_layout",
                                   f"caption sidecar {member} has {' and '.join(missing)}; its columns are {columns}. "
                                   "Name them with --image-column / --caption-column (options image_column, "
                                   f"caption_column); its {len(rows)} row(s) were not used", member=member))
            continue
        table: dict[str, _SidecarEntry] = {}
        for lineno, rec in enumerate(rows, 1):
            fkey = fcol if fcol in rec or forced_image else _resolve_column(list(rec), SIDECAR_FILE_COLUMNS, None)
            ckey = ccol if ccol in rec or forced_caption else _resolve_column(list(rec), CAPTION_COLUMNS, None)
            value = rec.get(fkey) if fkey else None
            if not isinstance(value, str) or not value.strip():
                rejects.append(_reject(unit, "missing_field",
                                       f"caption sidecar row {lineno} names no image (column {fcol!r} is empty or missing)",
                                       member=member, raw=json.dumps(rec, default=str)))
                continue
            rel = os.path.normpath(value.strip().replace("\\", "/"))
            if rel.startswith(("/", "..")) or re.match(r"^[A-Za-z]:", rel):
                rejects.append(_reject(unit, "unsafe_path", f"caption sidecar row {lineno} names {value!r}, outside "
                                       "the sidecar's folder; name images relative to it",
                                       member=member, raw=json.dumps(rec, default=str)))
                continue
            caption = rec.get(ckey) if ckey else None
            meta = {k: v for k, v in rec.items()
                    if k not in (fkey, ckey) and k not in DATACONCEPT_FIELDS and _is_scalar(v)}
            table[rel] = _SidecarEntry(caption if isinstance(caption, str) else None, meta, pick_dataconcept(rec))
        tables.append(table)
    return tables, rejects


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _folder_chunks(unit: Unit, root: Path, limits: ReadLimits) -> Iterator[Chunk]:
    if not root.is_dir():
        yield Chunk(unit, rejects=[_reject(unit, "unreadable_file", f"{root} is not a folder")])
        return
    caption_from = unit.option("caption_from", "auto")
    by_folder: dict[Path, list[str]] = {}
    for f in _visible_files(root):
        by_folder.setdefault(f.parent, []).append(f.name)
    images = sorted(
        (f.relative_to(root).as_posix(), f)
        for folder, names in by_folder.items() for f in (folder / n for n in names)
        if f.suffix.lower() in IMAGE_EXTENSIONS
    )
    batch = _Batcher(unit, limits)
    if not images:
        batch.reject(_reject(unit, "missing_image", f"the folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"))

    # Sidecars apply to images in their folder and below, nearest folder first.
    sidecars: dict[Path, list[dict[str, _SidecarEntry]]] = {}
    if caption_from == "auto":
        for folder, names in sorted(by_folder.items()):
            tables, rejects = _load_sidecars(unit, root, folder, set(names), limits)
            for r in rejects:
                batch.reject(r)
            if tables:
                sidecars[folder] = tables
    consumed: set[tuple[Path, str]] = set()
    files = {f for _, f in images}

    for offset, (rel, image) in enumerate(images):
        folder_names = by_folder[image.parent]
        json_name = image.stem + ".json"
        payload = new_payload(
            image_path=str(image),
            json_path=str(image.parent / json_name) if json_name in folder_names else None,
        )
        if caption_from == "dirname":
            payload["caption"] = image.parent.name.replace("_", " ")
        elif caption_from == "none":
            payload["caption"] = ""
        else:
            entry = _sidecar_entry(sidecars, root, image)
            if entry is not None:
                tables_folder, key, found = entry
                consumed.add((tables_folder, key))
                payload["metadata"] = dict(found.metadata)
                payload["dataconcept"] = found.dataconcept
                if found.caption is not None and found.caption.strip():
                    payload["caption"] = found.caption
            if payload["caption"] is None and image.stem + ".txt" in folder_names:
                payload["caption_path"] = str(image.parent / (image.stem + ".txt"))
        done = batch.add(RawItem(offset, payload, rel))
        if done:
            yield done

    # A sidecar row whose image is not in the folder is an input that produced nothing.
    for folder, tables in sidecars.items():
        for table in tables:
            for key, entry in table.items():
                target = folder / key
                if (folder, key) not in consumed and target not in files:
                    batch.reject(_reject(unit, "missing_image",
                                         f"a caption sidecar in {folder.relative_to(root).as_posix() or '.'} names "
                                         f"{key}, which is not an image file in the folder",
                                         member=target.relative_to(root).as_posix(), raw=entry.caption))
    done = batch.flush()
    if done:
        yield done


def _sidecar_entry(sidecars: dict[Path, list[dict[str, _SidecarEntry]]], root: Path,
                   image: Path) -> tuple[Path, str, _SidecarEntry] | None:
    folder = image.parent
    while True:
        for table in sidecars.get(folder, ()):
            key = os.path.normpath(image.relative_to(folder).as_posix())
            entry = table.get(key)
            if entry is not None and (entry.caption or entry.metadata or entry.dataconcept):
                return folder, key, entry
        if folder == root:
            return None
        folder = folder.parent


# ---- WebDataset tars


def _unsafe_member(info: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None. Names are checked although nothing is extracted,
    so that a shard that would be dangerous to untar elsewhere is flagged here."""
    name = info.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "'..' path component"
    if info.issym() or info.islnk():
        return f"link to {info.linkname!r}"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device or FIFO"
    if not info.isreg() and not info.isdir():
        return f"member type {info.type!r}"
    return None


@dataclass
class _Group:
    """Members of one WebDataset sample (same folder + basename up to the first dot)."""

    key: str
    image: tuple[int, str, bytes] | None = None
    caption: bytes | None = None
    json: bytes | None = None
    first: tuple[int, str] | None = None  # ordinal, name of the first member seen
    oversized: tuple[int, str, str] | None = None
    extra_images: list[tuple[int, str]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in (self.image[2] if self.image else None, self.caption, self.json) if b)

    def complete(self, caption_needed: bool) -> bool:
        # A .json member may carry the caption itself, so it counts as one here.
        return self.image is not None and (not caption_needed or self.caption is not None or self.json is not None)


def _member_role(name: str) -> tuple[str, str]:
    """(key, role) of a tar member: key = folder + basename up to the first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    ext = ext.lower()
    if ext in _IMAGE_EXTS_NO_DOT:
        return key, "image"
    if ext == "txt":
        return key, "caption"
    if ext == "json":
        return key, "json"
    return key, "other"


def _webdataset_chunks(unit: Unit, path: Path, limits: ReadLimits) -> Iterator[Chunk]:
    caption_from = unit.option("caption_from", "auto")
    batch = _Batcher(unit, limits)
    # Incomplete groups wait here in case their other members come later (non-adjacent writers);
    # their bytes are capped so that a badly ordered shard cannot fill memory.
    parked: dict[str, _Group] = {}
    parked_bytes = 0
    current: _Group | None = None
    caption_needed = caption_from != "none"
    members_seen = 0

    def unpark(key: str) -> _Group | None:
        nonlocal parked_bytes
        group = parked.pop(key, None)
        if group is not None:
            parked_bytes -= group.nbytes
        return group

    def close(group: _Group) -> Iterator[Chunk]:
        nonlocal parked_bytes
        if not group.complete(caption_needed) and group.oversized is None:
            parked[group.key] = group
            parked_bytes += group.nbytes
            while parked_bytes > limits.chunk_bytes and len(parked) > 1:
                yield from emit(unpark(next(iter(parked))))
            return
        yield from emit(group)

    def emit(group: _Group) -> Iterator[Chunk]:
        for ordinal, name in group.extra_images:
            batch.reject(_reject(unit, "duplicate_member", f"sample {group.key!r} has more than one image; "
                                 "only the first is used", ordinal, name))
        if group.oversized is not None:
            ordinal, name, detail = group.oversized
            batch.reject(_reject(unit, "oversized_record", detail, ordinal, name))
            return
        if group.image is None:
            ordinal, name = group.first
            batch.reject(_reject(unit, "missing_image", f"sample {group.key!r} has no image member "
                                 f"({', '.join(sorted(_IMAGE_EXTS_NO_DOT))})", ordinal, name))
            return
        ordinal, name, data = group.image
        payload = new_payload(image=data, json_bytes=group.json)
        if caption_from == "none":
            payload["caption"] = ""
        else:
            payload["caption_bytes"] = group.caption
        payload["metadata"] = {"webdataset_key": group.key}
        done = batch.add(RawItem(ordinal, payload, name), group.nbytes)
        if done:
            yield done

    try:
        with tarfile.open(path, mode="r|*") as tf:
            ordinal = -1
            while True:
                info = tf.next()
                if info is None:
                    break
                ordinal += 1
                members_seen += 1
                tf.members.clear()  # stream mode keeps every TarInfo otherwise: unbounded on big shards
                unsafe = _unsafe_member(info)
                if unsafe:
                    batch.reject(_reject(unit, "unsafe_tar_member", f"tar member {info.name!r} not read: {unsafe}",
                                         ordinal, info.name))
                    continue
                if info.isdir():
                    continue  # folders are structure, not samples
                key, role = _member_role(info.name)
                if role == "caption" and caption_from == "none":
                    role = "other"
                if current is None or current.key != key:
                    if current is not None:
                        yield from close(current)
                    current = unpark(key) or _Group(key)
                if current.first is None:
                    current.first = (ordinal, info.name)
                if role == "other":
                    continue  # e.g. .cls/.npy: part of a sample, not one; never read
                cap = limits.max_image_bytes if role == "image" else limits.max_record_bytes
                if info.size > cap:
                    current.oversized = (ordinal, info.name,
                                         f"tar member is {info.size} bytes, over the {cap}-byte limit for its type")
                    continue
                if role == "image" and current.image is not None:
                    current.extra_images.append((ordinal, info.name))
                    continue
                handle = tf.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name!r} is cut short ({len(data)} of {info.size} bytes)")
                if role == "image":
                    current.image = (ordinal, info.name, data)
                elif role == "caption":
                    current.caption = data
                else:
                    current.json = data
            missing_end = _missing_end_marker(path, tf.offset)
            if missing_end:
                raise tarfile.ReadError(missing_end)
            if current is not None:
                yield from emit(current)
                current = None
            for key in list(parked):
                yield from emit(unpark(key))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        # What was read stays; complete samples read so far are kept, the rest is one reject.
        lost = []
        for group in ([current] if current is not None else []) + list(parked.values()):
            if group.complete(caption_needed) and group.oversized is None:
                yield from emit(group)
            else:
                lost.append(group.key)
        parked.clear()
        detail = (f"tar stream broke off after {members_seen} member(s) ({type(exc).__name__}: {exc})"
                  if members_seen else f"not a readable tar archive ({type(exc).__name__}: {exc})")
        if lost:
            detail += f"; {len(lost)} partly read sample(s) lost: {', '.join(lost[:10])}"
        batch.reject(_reject(unit, "unreadable_file", detail))
    done = batch.flush()
    if done:
        yield done


def _missing_end_marker(path: Path, end_offset: int) -> str | None:
    """tarfile treats a plain tar cut at a header boundary as a clean end; a real tar ends with a
    zero block. Compressed tars fail on their own (the decompressor sees the stream cut)."""
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED_MAGIC):
            return None
        f.seek(end_offset)
        block = f.read(512)
    if len(block) == 512 and block.count(0) == 512:
        return None
    return f"the tar has no end-of-archive marker after byte {end_offset}: it was truncated"


# ---- Parquet


@dataclass(frozen=True)
class _ParquetLayout:
    image: str | None  # bytes, HF struct {bytes, path}, or string path column
    image_kind: str  # "bytes" | "struct" | "path" | "none"
    path: str | None  # a separate path column (fallback when the bytes are null)
    caption: str | None
    dataconcept: tuple[str, ...]
    metadata: tuple[str, ...]


def _parquet_layout(schema, unit: Unit) -> _ParquetLayout:
    import pyarrow as pa

    names = list(schema.names)
    types = {n: schema.field(n).type for n in names}

    def is_binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)

    def is_string(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    forced_image, forced_caption = unit.option("image_column"), unit.option("caption_column")
    for forced in (forced_image, forced_caption):
        if forced is not None and forced not in names:
            raise KeyError(f"column {forced!r} is not in the file; its columns are {names}")
    image, kind = None, "none"
    for n in ([forced_image] if forced_image else list(PARQUET_IMAGE_COLUMNS)):
        if n not in types:
            continue
        t = types[n]
        if is_binary(t):
            image, kind = n, "bytes"
        elif pa.types.is_struct(t) and any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields)):
            image, kind = n, "struct"
        elif is_string(t):
            image, kind = n, "path"
        if image:
            break
    path = next((n for n in PARQUET_PATH_COLUMNS if n in types and is_string(types[n]) and n != image), None)
    if image is None and path is not None:
        image, kind, path = path, "path", None
    caption = forced_caption or next((n for n in CAPTION_COLUMNS if n in types), None)
    if caption is None:
        lower = {n.lower(): n for n in names}
        caption = next((lower[c.lower()] for c in CAPTION_COLUMNS if c.lower() in lower), None)
    dataconcept = tuple(n for n in DATACONCEPT_FIELDS if n in types)
    used = {image, path, caption, *dataconcept}
    metadata = tuple(
        n for n in names if n not in used
        and (pa.types.is_integer(types[n]) or pa.types.is_floating(types[n]) or pa.types.is_boolean(types[n])
             or is_string(types[n]) or pa.types.is_temporal(types[n]) or pa.types.is_decimal(types[n]))
    )
    if path is not None:
        metadata = (*metadata, path)  # also kept in the lineage of the sample, it is small
    return _ParquetLayout(image, kind, path, caption, dataconcept, metadata)


def _safe_join(folder: Path, rel: str) -> Path | None:
    """folder/rel without following symlinks, or None when rel leaves the folder."""
    rel = rel.replace("\\", "/")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return None
    joined = os.path.normpath(os.path.join(folder, rel))
    return Path(joined) if joined.startswith(str(folder) + os.sep) else None


def _parquet_chunks(unit: Unit, path: Path, limits: ReadLimits) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        yield Chunk(unit, rejects=[_reject(unit, "corrupt_parquet", f"{type(exc).__name__}: {exc}")])
        return
    try:
        layout = _parquet_layout(pf.schema_arrow, unit)
    except KeyError as exc:
        yield Chunk(unit, rejects=[_reject(unit, "unknown_layout", str(exc.args[0]))])
        return
    if layout.image is None:
        yield Chunk(unit, rejects=[_reject(unit, "unknown_layout",
                                           f"no image column: expected one of {list(PARQUET_IMAGE_COLUMNS)} (bytes or "
                                           f"{{bytes, path}}) or a path column {list(PARQUET_PATH_COLUMNS)}; the file "
                                           f"has {pf.schema_arrow.names}")])
        return
    caption_from = unit.option("caption_from", "auto")
    folder = path.parent
    # Rows with image bytes are large: size batches from the file's own bytes-per-row figure.
    meta = pf.metadata
    row_bytes = max(1, meta.row_group(0).total_byte_size // max(1, meta.row_group(0).num_rows)) if meta.num_row_groups else 1
    batch_size = max(1, min(limits.chunk_items, limits.chunk_bytes // row_bytes))
    columns = [c for c in dict.fromkeys((layout.image, layout.path, layout.caption, *layout.dataconcept, *layout.metadata)) if c]
    offset = 0
    try:
        for record_batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            chunk = Chunk(unit)
            for row in record_batch.to_pylist():
                _parquet_item(unit, chunk, offset, row, layout, folder, caption_from)
                offset += 1
            yield chunk
    except Exception as exc:  # a corrupt page surfaces here as ArrowInvalid/OSError
        yield Chunk(unit, rejects=[_reject(unit, "unreadable_file",
                                           f"reading stopped at row {offset}: {type(exc).__name__}: {exc}", offset)])


def _parquet_item(unit: Unit, chunk: Chunk, offset: int, row: dict[str, Any], layout: _ParquetLayout,
                  folder: Path, caption_from: str) -> None:
    value = row.get(layout.image)
    data, rel = None, None
    if layout.image_kind == "bytes":
        data = value
    elif layout.image_kind == "struct" and isinstance(value, dict):
        data, rel = value.get("bytes"), value.get("path")
    elif layout.image_kind == "path":
        rel = value
    if data is None and rel is None and layout.path is not None:
        rel = row.get(layout.path)
    payload = new_payload(
        image=bytes(data) if data is not None else None,
        caption="" if caption_from == "none" else (row.get(layout.caption) if layout.caption else None),
        metadata={k: row[k] for k in layout.metadata if row.get(k) is not None},
        dataconcept=pick_dataconcept({k: row.get(k) for k in layout.dataconcept}),
    )
    member = rel if isinstance(rel, str) else None
    if data is None and isinstance(rel, str) and rel.strip():
        target = _safe_join(folder, rel.strip())
        if target is None:
            chunk.rejects.append(_reject(unit, "unsafe_path", f"image path {rel!r} leaves the Parquet file's folder "
                                         f"{folder}; store paths relative to it", offset, member))
            return
        payload["image_path"] = str(target)
    chunk.items.append(RawItem(offset, payload, member))


# ---- NLVR


def _nlvr_records(path: Path, unit: Unit, limits: ReadLimits = ReadLimits()) -> Iterator[tuple[int, Any, bytes]]:
    """(row, record or a Reject, raw line) for each row of a JSONL (or JSON array) NLVR file.

    A bad row (not UTF-8, not JSON, nested too deep) is a reject of that row only.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    head = head.removeprefix(UTF8_BOM)
    if head.lstrip().startswith(b"["):
        with open(path, "rb") as f:
            for el in iter_json_elements(f, limits.max_record_bytes):
                if el.reject is not None:
                    offset = el.index * NLVR_OFFSET_STRIDE if el.index >= 0 else -1
                    yield el.index, _reject(unit, el.reject.reason, el.reject.detail, offset, raw=el.raw), b""
                else:
                    yield el.index, el.value, b""
        return
    with open(path, "rb") as f:
        for row, line in enumerate(f):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield row, _reject(unit, "invalid_utf8", f"line is not UTF-8 ({exc.reason} at byte {exc.start})",
                                   row * NLVR_OFFSET_STRIDE, raw=line), line
                continue
            text = text.removeprefix("\ufeff")
            if not text.strip():
                yield row, _reject(unit, "blank_line", "the line is empty", row * NLVR_OFFSET_STRIDE), line
                continue
            try:
                yield row, loads_json(text), line
            except json.JSONDecodeError as exc:
                yield row, _reject(unit, "malformed_json", f"{exc.msg} at column {exc.colno}",
                                   row * NLVR_OFFSET_STRIDE, raw=line), line
            except RecordRejected as rej:  # too_deep
                yield row, _reject(unit, rej.reason, rej.detail, row * NLVR_OFFSET_STRIDE, raw=line), line


class _NlvrImages:
    """Index of ``images/<directory>/<split>-<identifier>-<n>.png``, one folder listing at a time."""

    def __init__(self, images: Path, split: str):
        self.images, self.split = images, split
        self.pattern = re.compile(rf"^{re.escape(split)}-(.+)-(\d{{1,2}})\.png$")
        self.by_folder: dict[str, dict[str, list[tuple[int, str]]]] = {}

    def find(self, directory: str | None, identifier: str) -> list[tuple[int, Path]]:
        sub = directory if directory is not None else ""
        if sub not in self.by_folder:
            index: dict[str, list[tuple[int, str]]] = {}
            folder = self.images / sub
            names = sorted(os.listdir(folder)) if folder.is_dir() else []
            for name in names:
                m = self.pattern.match(name)
                if m:
                    index.setdefault(m.group(1), []).append((int(m.group(2)), name))
            self.by_folder[sub] = index
        folder = self.images / sub
        return [(n, folder / name) for n, name in sorted(self.by_folder[sub].get(identifier, []))]


def _nlvr_chunks(unit: Unit, path: Path, limits: ReadLimits) -> Iterator[Chunk]:
    caption_from = unit.option("caption_from", "auto")
    split = path.name.split(".", 1)[0]
    base = path.parent
    images = _NlvrImages(base / "images", split)
    batch = _Batcher(unit, limits)
    for row, rec, raw in _nlvr_records(path, unit, limits):
        if isinstance(rec, Reject):
            batch.reject(rec)
            continue
        offset = row * NLVR_OFFSET_STRIDE
        if not isinstance(rec, dict):
            batch.reject(_reject(unit, "unknown_layout", f"row is a {type(rec).__name__}, not an object", offset, raw=raw))
            continue
        identifier, directory = rec.get("identifier"), rec.get("directory")
        if not isinstance(identifier, str) or (directory is not None and not isinstance(directory, (str, int))):
            batch.reject(_reject(unit, "missing_field", "an NLVR row needs a string 'identifier' (and 'directory')",
                                 offset, raw=raw))
            continue
        directory = str(directory) if directory is not None else None
        if directory is not None and (".." in PurePosixPath(directory).parts or directory.startswith("/")):
            batch.reject(_reject(unit, "unsafe_path", f"'directory' {directory!r} leaves the images folder", offset, raw=raw))
            continue
        found = images.find(directory, identifier)
        if not found:
            where = f"images/{directory}/" if directory is not None else "images/"
            batch.reject(_reject(unit, "missing_image", f"no {where}{split}-{identifier}-<n>.png exists for this row",
                                 offset, raw=raw))
            continue
        sentence = rec.get("sentence")
        meta_base = {k: v for k, v in rec.items() if k != "sentence"}
        for n, image in found:
            payload = new_payload(
                image_path=str(image),
                caption="" if caption_from == "none" else sentence,
                metadata={**meta_base, "split": split, "image_index": n},
            )
            done = batch.add(RawItem(offset + n, payload, image.relative_to(base).as_posix()))
            if done:
                yield done
    done = batch.flush()
    if done:
        yield done
