"""Turn one raw image-text item into a ``samples_image_text`` row (and an input concept row).

This is where the per-image cost is paid, on whichever worker receives the chunk: reading the
file (image folders, Parquet paths, NLVR), checking the header size against the limits before
any pixel is decoded, decoding the image once in full to prove it is intact, hashing it, and
reading the caption and the DataConcept sidecar. Anything wrong raises
:class:`RecordRejected` with a stable reason code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from pipeline.io.image_sources import DATACONCEPT_FIELDS
from pipeline.io.instruction_formats import metadata_json
from pipeline.io.json_stream import loads_json
from pipeline.io.rejects import JobError, RecordRejected
from pipeline.io.sample_id import image_text_id
from pipeline.io.units import RawItem, ReadLimits, Unit

INPUT_ANNOTATOR = "input"

# Formats PIL may open here. PIL can also open formats that run external programs (EPS through
# Ghostscript) or are rarely intact in the wild; an allow-list keeps ingest to image-text formats.
# Multi-picture JPEGs (many phone photos) open through the JPEG entry and report format "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_TAG_NAME_KEYS = ("tag", "label", "name", "concept")
_TAG_SCORE_KEYS = ("score", "prob", "confidence", "probability")


def parse_image_item(unit: Unit, item: RawItem, limits: ReadLimits) -> tuple[dict, dict | None]:
    """Return (sample row, concept annotation row or None); raise RecordRejected for a bad item."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this flag PIL pads a cut-off image with grey instead of failing: corrupt images
        # would pass as samples. Some other import set it; ingest must not run that way.
        raise JobError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; image ingest needs it False "
                       "to reject truncated images. Find the module that sets it and keep it local.")
    payload = item.payload
    if not isinstance(payload, dict):
        raise RecordRejected("unknown_layout", f"image-text payload must be a dict, got {type(payload).__name__}")
    # Cheap checks first: an item without a usable caption is refused before its image is read.
    sidecar = _sidecar_json(payload, limits)
    caption = _caption(payload, sidecar, unit.option("caption_from", "auto"), limits)
    data = _image_bytes(payload, limits)
    image_format, width, height = check_image(data, limits)

    digest = hashlib.sha256(data).hexdigest()
    sid = image_text_id(digest, caption)
    metadata = dict(payload.get("metadata") or {})
    dataconcept = dict(payload.get("dataconcept") or {})
    if sidecar is not None:
        dataconcept.update({k: sidecar[k] for k in DATACONCEPT_FIELDS if sidecar.get(k) is not None})
        metadata.update({k: v for k, v in sidecar.items()
                         if k not in DATACONCEPT_FIELDS and k not in ("caption", "text") and k not in metadata})
    sample = {
        "sample_id": sid,
        "caption": caption,
        "image": data,
        "image_sha256": digest,
        "image_format": image_format,
        "width": width,
        "height": height,
        "source_uri": unit.uri,
        "source_offset": item.offset,
        "source_member": item.member,
        "source_format": unit.container,
        "metadata_json": metadata_json(metadata),
    }
    concepts = concept_row(sid, dataconcept) if dataconcept else None
    return sample, concepts


# ---------------------------------------------------------------- image


def _image_bytes(payload: dict[str, Any], limits: ReadLimits) -> bytes:
    data = payload.get("image")
    if data is None:
        path = payload.get("image_path")
        if not path:
            raise RecordRejected("missing_image", "the record names no image (no bytes and no path)")
        try:
            size = Path(path).stat().st_size
        except FileNotFoundError:
            raise RecordRejected("missing_image", f"image file {path} does not exist") from None
        except OSError as exc:
            raise RecordRejected("unreadable_file", f"image file {path}: {exc}") from None
        # Decided from the size on disk so that an oversized file is never read into memory.
        if size > limits.max_image_bytes:
            raise RecordRejected("oversized_record", f"image file is {size} bytes, over the {limits.max_image_bytes}-byte limit")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise RecordRejected("unreadable_file", f"image file {path}: {exc}") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordRejected("wrong_type", f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise RecordRejected("empty_file", "the image is zero bytes long")
    if len(data) > limits.max_image_bytes:
        raise RecordRejected("oversized_record", f"image is {len(data)} bytes, over the {limits.max_image_bytes}-byte limit")
    return data


def check_image(data: bytes, limits: ReadLimits) -> tuple[str, int, int]:
    """Decode the image once, fully; return (PIL format, width, height) or raise RecordRejected.

    The pixel count comes from the header, before decoding, so that a small file that expands to
    gigapixels (a decompression bomb) is refused without allocating its pixels.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's warning about its default limit is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                width, height = im.size
                if width * height > limits.max_image_pixels:
                    raise RecordRejected("oversized_record", f"image is {width}x{height} = {width * height} pixels, "
                                         f"over the {limits.max_image_pixels}-pixel limit")
                if width <= 0 or height <= 0:
                    raise RecordRejected("corrupt_image", f"image header says {width}x{height}")
                image_format = im.format
                im.load()
    except RecordRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise RecordRejected("oversized_record", f"PIL refused the image as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise RecordRejected("corrupt_image", f"not a readable image in any accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        # PIL reports truncated and broken streams through all of these, depending on the codec.
        raise RecordRejected("corrupt_image", f"image does not decode: {type(exc).__name__}: {exc}") from None
    missing_end = _missing_end_marker(data, image_format)
    if missing_end:
        raise RecordRejected("corrupt_image", missing_end)
    return image_format, width, height


def _missing_end_marker(data: bytes, image_format: str) -> str | None:
    """PIL stops reading once it has every pixel, so a PNG or JPEG cut just after its pixel data
    (the zlib checksum, the IEND chunk, the JPEG EOI marker) decodes without complaint; such a
    file was still cut short in transit and is rejected like any truncated file."""
    if image_format == "PNG":
        end = data.rfind(b"IEND")
        if end < 4 or len(data) < end + 8:
            return "PNG ends without its IEND chunk: the file is truncated"
    elif image_format in ("JPEG", "MPO") and data.rfind(b"\xff\xd9") < 2:
        return "JPEG ends without its end-of-image marker: the file is truncated"
    return None


# ---------------------------------------------------------------- caption and sidecar


def _read_small(path: str, what: str, limit: int) -> bytes:
    try:
        size = Path(path).stat().st_size
        if size > limit:
            raise RecordRejected("oversized_record", f"{what} {path} is {size} bytes, over the {limit}-byte limit")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RecordRejected("unreadable_file", f"{what} {path} disappeared after the folder was listed") from None
    except OSError as exc:
        raise RecordRejected("unreadable_file", f"{what} {path}: {exc}") from None


def _sidecar_json(payload: dict[str, Any], limits: ReadLimits) -> dict[str, Any] | None:
    raw = payload.get("json_bytes")
    if raw is None and payload.get("json_path"):
        raw = _read_small(payload["json_path"], "JSON sidecar", limits.max_record_bytes)
    if raw is None:
        return None
    try:
        data = loads_json(raw.decode("utf-8-sig"))  # too deep: RecordRejected("too_deep")
    except UnicodeDecodeError as exc:
        raise RecordRejected("invalid_utf8", f"JSON sidecar is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecordRejected("malformed_json", f"JSON sidecar: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise RecordRejected("malformed_json", f"JSON sidecar must be an object, got {type(data).__name__}")
    return data


def _caption(payload: dict[str, Any], sidecar: dict[str, Any] | None, caption_from: str, limits: ReadLimits) -> str:
    caption = payload.get("caption")
    raw = payload.get("caption_bytes")
    if caption is None and raw is None and payload.get("caption_path"):
        raw = _read_small(payload["caption_path"], "caption file", limits.max_record_bytes)
    if caption is None and raw is not None:
        if len(raw) > limits.max_record_bytes:
            raise RecordRejected("oversized_record", f"caption is {len(raw)} bytes, over the {limits.max_record_bytes}-byte limit")
        try:
            caption = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RecordRejected("invalid_utf8", f"caption is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if caption is None and sidecar is not None and caption_from != "none":
        # img2dataset-style shards carry the caption in the .json too; used only without a .txt.
        caption = next((sidecar[k] for k in ("caption", "text") if isinstance(sidecar.get(k), str)), None)
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise RecordRejected("wrong_type", f"caption must be text, got {type(caption).__name__}")
    if len(caption) > limits.max_record_bytes:
        raise RecordRejected("oversized_record", f"caption is {len(caption)} characters, over the {limits.max_record_bytes} limit")
    if "\x00" in caption:
        raise RecordRejected("invalid_text", "caption contains NUL characters")
    caption = caption.strip()
    if not caption and caption_from != "none":
        raise RecordRejected("missing_caption", "no caption for this image (empty, or no sidecar row / .txt / "
                             "caption field); use caption_from='none' for image-only data")
    return caption


# ---------------------------------------------------------------- DataConcept annotations


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordRejected("malformed_annotation", f"{what} must be a finite number, got {value!r}")
    return float(value)


def _tags(raw: Any) -> list[dict[str, Any]]:
    """DataConcept tags in any of the shapes seen in the wild, as [{tag, confidence}]:
    ["dog", ...] | [{"tag"|"label": "dog", "score"|"prob": 0.9}, ...] | {"dog": 0.9} | [["dog", 0.9], ...]."""
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        for t in raw:
            if isinstance(t, str):
                pairs.append((t, 1.0))
            elif isinstance(t, dict):
                name = next((t[k] for k in _TAG_NAME_KEYS if k in t), None)
                score = next((t[k] for k in _TAG_SCORE_KEYS if k in t), 1.0)
                pairs.append((name, score))
            elif isinstance(t, (list, tuple)) and len(t) == 2:
                pairs.append((t[0], t[1]))
            else:
                raise RecordRejected("malformed_annotation", f"cannot read the tag {t!r}")
    elif isinstance(raw, str):
        pairs = [(t.strip(), 1.0) for t in raw.split(",")]  # "dog, grass, ball"
    else:
        raise RecordRejected("malformed_annotation", f"'tags' must be a list, an object or a string, got {type(raw).__name__}")
    best: dict[str, float] = {}
    for name, score in pairs:
        if not isinstance(name, str):
            raise RecordRejected("malformed_annotation", f"tag name must be text, got {name!r}")
        name = name.strip()
        if name:
            conf = _number(score if score is not None else 1.0, f"confidence of tag {name!r}")
            best[name] = max(conf, best.get(name, conf))
    return [{"tag": t, "confidence": c} for t, c in best.items()]


def concept_row(sample_id: str, dc: dict[str, Any]) -> dict[str, Any] | None:
    """A ``annotations_concepts`` row from DataConcept fields: one concept instance per box,
    the concept's confidence is its best box score (1.0 where the input gives no scores)."""
    classes, scores, boxes = dc.get("classes"), dc.get("scores"), dc.get("bounding_boxes")
    if classes is None and boxes is not None:
        raise RecordRejected("malformed_annotation", "'bounding_boxes' without 'classes': boxes need labels")
    classes = [] if classes is None else classes
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise RecordRejected("malformed_annotation", "'classes' must be a list of strings (one per box)")
    for name, values in (("scores", scores), ("bounding_boxes", boxes)):
        if values is not None and (not isinstance(values, list) or len(values) != len(classes)):
            raise RecordRejected("malformed_annotation",
                                 f"'{name}' must be a list as long as 'classes' ({len(classes)})")
    box_rows = []
    concepts: dict[str, dict[str, Any]] = {}
    for k, label in enumerate(classes):
        label = label.strip()
        if not label:
            raise RecordRejected("malformed_annotation", f"box {k} has an empty class")
        score = _number(scores[k], f"score of box {k}") if scores is not None else 1.0
        entry = concepts.setdefault(label, {"concept": label, "count": 0, "confidence": score})
        entry["count"] += 1
        entry["confidence"] = max(entry["confidence"], score)
        if boxes is not None:
            box = boxes[k]
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise RecordRejected("malformed_annotation", f"box {k} must be [x1, y1, x2, y2], got {box!r}")
            x1, y1, x2, y2 = (_number(v, f"coordinate of box {k}") for v in box)
            box_rows.append({"label": label, "score": score, "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    tags = _tags(dc["tags"]) if dc.get("tags") is not None else None
    if not concepts and not tags and not box_rows:
        return None
    ordered = sorted(concepts.values(), key=lambda c: (-c["count"], c["concept"]))
    return {
        "sample_id": sample_id,
        "concepts": ordered,
        "boxes": box_rows if boxes is not None else None,
        "tags": tags,
        "annotator": INPUT_ANNOTATOR,
    }
