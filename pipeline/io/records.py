"""Parse a chunk of raw items into sample rows, reject rows and input-carried annotation rows.

This is the per-record work of ingest, shared by the Beam job and by the plain-loop baseline in
``benchmarks/ingest.py`` so that both do exactly the same parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.io import instruction_formats
from pipeline.io.rejects import Reject, RecordRejected
from pipeline.io.sample_id import conversation_id
from pipeline.io.sources import IMAGE_TEXT, Chunk, RawItem, ReadLimits, Unit, decode_json_line

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
    out = ParsedChunk(rejects=list(chunk.rejects))
    parse_item = _parse_image_item if chunk.unit.kind == IMAGE_TEXT else _parse_instruction_item
    for item in chunk.items:
        try:
            parse_item(chunk.unit, item, limits, out)
        except RecordRejected as rej:
            out.rejects.append(
                Reject(chunk.unit.kind, chunk.unit.uri, item.offset, item.member, rej.reason, rej.detail,
                       Reject.excerpt(item.payload if isinstance(item.payload, (bytes, str)) else None))
            )
    return out


def _parse_instruction_item(unit: Unit, item: RawItem, limits: ReadLimits, out: ParsedChunk) -> None:
    record = decode_json_line(item.payload) if isinstance(item.payload, bytes) else item.payload
    conv = instruction_formats.normalise(record, unit.layout)
    n_chars = sum(len(m["content"]) for m in conv.messages)
    if n_chars > limits.max_record_bytes:
        raise RecordRejected("oversized_record", f"{n_chars} characters, over the {limits.max_record_bytes} limit")
    sid = conversation_id(conv.messages)
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
    out.samples.append(sample)
    if conv.tags is not None:
        out.add_annotation("annotations_tags", {
            "sample_id": sid,
            "tags": [{"tag": t, "confidence": 1.0} for t in dict.fromkeys(conv.tags)],
            "annotator": INPUT_ANNOTATOR,
        }, sample)
    if conv.quality_per_round is not None or conv.complexity_per_round is not None:
        out.add_annotation("annotations_quality", _quality_row(sid, conv), sample)


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _quality_row(sid: str, conv: instruction_formats.Conversation) -> dict:
    q, c = conv.quality_per_round, conv.complexity_per_round
    if q and c and len(q) == len(c):
        score = sum(a * b for a, b in zip(q, c)) / len(q)  # DEITA: mean over rounds of q x c
    else:
        # One of the two is missing or their rounds disagree: use what is there, say nothing more.
        score = _mean(q) if q else _mean(c)
    return {
        "sample_id": sid,
        "quality": _mean(q),
        "complexity": _mean(c),
        "score": score if score is not None else 0.0,
        "quality_per_round": q,
        "complexity_per_round": c,
        "annotator": INPUT_ANNOTATOR,
    }


def _parse_image_item(unit: Unit, item: RawItem, limits: ReadLimits, out: ParsedChunk) -> None:
    from pipeline.io import image_records

    sample, concepts = image_records.parse_image_item(unit, item, limits)
    out.samples.append(sample)
    if concepts is not None:
        out.add_annotation("annotations_concepts", concepts, sample)
