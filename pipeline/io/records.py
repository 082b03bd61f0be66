"""Parse a chunk of raw items into sample rows, reject rows and input-carried annotation rows.

This is the per-record work of ingest, shared by the Beam job and by the plain-loop baseline in
``benchmarks/ingest.py`` so that both do exactly the same parsing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.annotate.deita import deita_score
from pipeline.io import instruction_formats
from pipeline.io.json_stream import decode_json_line
from pipeline.io.rejects import JobError, RecordRejected, Reject
from pipeline.io.sample_id import conversation_id
from pipeline.io.units import IMAGE_TEXT, Chunk, RawItem, ReadLimits, Unit

# Annotation tables an ingest can fill from what the input itself carries.
INPUT_ANNOTATOR = "input"
ANNOTATION_TABLES = ("annotations_tags", "annotations_quality", "annotations_concepts")
# Annotation rows carry the lineage of their sample until exact duplicates are dropped, so that
# only the kept copy's annotations survive.
LINEAGE_KEYS = ("_source_uri", "_source_offset")


@dataclass
class ParsedChunk:
    samples: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    # table name -> rows keyed by sample_id (kept only for samples that survive dedup)
    annotations: dict[str, list[dict]] = field(default_factory=dict)

    def add_annotation(self, table: str, row: dict, sample: dict) -> None:
        row["_source_uri"], row["_source_offset"] = sample["source_uri"], sample["source_offset"]
        self.annotations.setdefault(table, []).append(row)


def parse_chunk(chunk: Chunk, limits: ReadLimits = ReadLimits()) -> ParsedChunk:
    """Parse every item of a chunk; one bad item is one reject, it never stops the chunk.

    Known problems raise RecordRejected with their reason code. Anything else raised while parsing
    one item (a bug, or an input that trips a library) becomes a ``parse_error`` reject naming the
    exception, and a RecursionError a ``too_deep`` reject. Whole-job problems are not swallowed:
    an unknown layout name is refused before any item is read, and JobError and MemoryError
    propagate.
    """
    out = ParsedChunk(rejects=list(chunk.rejects))
    unit = chunk.unit
    if unit.kind == IMAGE_TEXT:
        parse_item = _parse_image_item
    else:
        parse_item = _parse_instruction_item
        instruction_formats.check_layout_name(unit.layout)
    for item in chunk.items:
        try:
            sample, annotations = parse_item(unit, item, limits)
            _check_encodable(sample, annotations)
        except (JobError, MemoryError):
            raise
        except RecordRejected as rej:
            out.rejects.append(_item_reject(unit, item, rej.reason, rej.detail))
        except RecursionError:
            out.rejects.append(_item_reject(unit, item, "too_deep",
                                            "the record is nested too deep to process (Python's recursion limit)"))
        except Exception as exc:  # noqa: BLE001 - one record must never stop the job
            out.rejects.append(_item_reject(unit, item, "parse_error", f"{type(exc).__name__}: {exc}"[:2000]))
        else:
            out.samples.append(sample)
            for table, row in annotations:
                out.add_annotation(table, row, sample)
    return out


def _item_reject(unit: Unit, item: RawItem, reason: str, detail: str) -> Reject:
    return Reject(unit.kind, unit.uri, item.offset, item.member, reason, detail,
                  Reject.excerpt(item.payload if isinstance(item.payload, (bytes, str)) else None))


def _check_encodable(sample: dict, annotations: list[tuple[str, dict]]) -> None:
    """Refuse text Parquet cannot store: lone surrogates (JSON escapes like "\\udc80") are valid
    Python strings but not UTF-8, and would fail the whole shard at write time."""
    try:
        if sample.get("metadata_json"):
            sample["metadata_json"].encode("utf-8")
        for _, row in annotations:
            json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordRejected("invalid_text", f"text holds a lone surrogate ({exc.reason}); it is not valid "
                             "Unicode and cannot be stored") from None


def _parse_instruction_item(unit: Unit, item: RawItem, limits: ReadLimits) -> tuple[dict, list[tuple[str, dict]]]:
    record = decode_json_line(item.payload) if isinstance(item.payload, bytes) else item.payload
    conv = instruction_formats.normalise(record, unit.layout)
    n_chars = sum(len(m["content"]) for m in conv.messages)
    if n_chars > limits.max_record_bytes:
        raise RecordRejected("oversized_record", f"{n_chars} characters, over the {limits.max_record_bytes} limit")
    try:
        sid = conversation_id(conv.messages)
    except UnicodeEncodeError as exc:
        raise RecordRejected("invalid_text", f"message text holds a lone surrogate ({exc.reason}); it is not "
                             "valid Unicode") from None
    sample = {
        "sample_id": sid,
        "messages": conv.messages,
        "n_turns": sum(1 for m in conv.messages if m["role"] == "user"),
        "n_chars": n_chars,
        "source_uri": unit.uri,
        "source_offset": item.offset,
        "source_member": item.member,
        "source_format": f"{unit.container}/{conv.layout}",
        "metadata_json": instruction_formats.metadata_json(conv.metadata),
    }
    annotations = []
    if conv.tags is not None:
        annotations.append(("annotations_tags", {
            "sample_id": sid,
            "tags": [{"tag": t, "confidence": 1.0} for t in dict.fromkeys(conv.tags)],
            "annotator": INPUT_ANNOTATOR,
        }))
    if conv.quality_per_round is not None or conv.complexity_per_round is not None:
        annotations.append(("annotations_quality", _quality_row(sid, conv)))
    return sample, annotations


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _quality_row(sid: str, conv: instruction_formats.Conversation) -> dict:
    """The input's DEITA ratings as a quality annotation row.

    ``score`` follows the one DEITA rule (:func:`pipeline.annotate.deita.deita_score`: mean over
    the rounds rated by both lists); with no such round it is 0.0, as for a sample without a
    score. The per-round lists are stored as given, so a mismatch stays visible in the table.
    """
    q, c = conv.quality_per_round, conv.complexity_per_round
    try:
        score = deita_score(q, c).score
    except ValueError as exc:
        raise RecordRejected("wrong_type", f"annotation.deita: {exc}") from None
    return {
        "sample_id": sid,
        "quality": _mean(q),
        "complexity": _mean(c),
        "score": score if score is not None else 0.0,
        "quality_per_round": q,
        "complexity_per_round": c,
        "annotator": INPUT_ANNOTATOR,
    }


def _parse_image_item(unit: Unit, item: RawItem, limits: ReadLimits) -> tuple[dict, list[tuple[str, dict]]]:
    from pipeline.io import image_records

    try:
        sample, concepts = image_records.parse_image_item(unit, item, limits)
    except UnicodeEncodeError as exc:
        raise RecordRejected("invalid_text", f"caption holds a lone surrogate ({exc.reason}); it is not "
                             "valid Unicode") from None
    return sample, ([("annotations_concepts", concepts)] if concepts is not None else [])
