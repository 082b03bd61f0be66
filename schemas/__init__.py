"""The catalog's table schemas: the one source of truth for every Parquet file Thresher writes.

Every schema carries ``thresher.schema`` (table name) and ``thresher.schema_version`` in its
metadata, so a reader can tell which layout a shard was written with. Bump ``SCHEMA_VERSION`` on
any incompatible change and keep readers able to say clearly what they found.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
TAG = pa.struct([("tag", pa.string()), ("confidence", pa.float32())])
CONCEPT = pa.struct(
    [("concept", pa.string()), ("count", pa.int32()), ("confidence", pa.float32())]
)
BOX = pa.struct(
    [
        ("label", pa.string()),
        ("score", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)


def _schema(name: str, fields: list[tuple[str, pa.DataType]], nullable: set[str] = frozenset()) -> pa.Schema:
    return pa.schema(
        [pa.field(n, t, nullable=n in nullable) for n, t in fields],
        metadata={"thresher.schema": name, "thresher.schema_version": SCHEMA_VERSION},
    )


# Lineage columns shared by every sample table: where a row came from, exactly.
_LINEAGE = [
    ("source_uri", pa.string()),  # the input file (absolute path or URL)
    ("source_offset", pa.int64()),  # line / array index / row / tar member ordinal in that file
    ("source_member", pa.string()),  # tar member or image file name inside a folder; null otherwise
    ("source_format", pa.string()),  # the detected or requested layout, e.g. "alpaca", "webdataset"
]

INSTRUCTION_SAMPLES = _schema(
    "samples_instruction",
    [
        ("sample_id", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("n_turns", pa.int32()),  # user messages
        ("n_chars", pa.int64()),  # total characters over all messages
        *_LINEAGE,
        ("metadata_json", pa.string()),  # fields of the input record not used for the messages
    ],
    nullable={"source_member", "metadata_json"},
)

IMAGE_TEXT_SAMPLES = _schema(
    "samples_image_text",
    [
        ("sample_id", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),  # the encoded bytes as ingested (decoded once to check them)
        ("image_sha256", pa.string()),
        ("image_format", pa.string()),  # PIL format name: JPEG, PNG, WEBP, ...
        ("width", pa.int32()),
        ("height", pa.int32()),
        *_LINEAGE,
        ("metadata_json", pa.string()),
    ],
    nullable={"source_member", "metadata_json"},
)

REJECTS = _schema(
    "rejects",
    [
        ("kind", pa.string()),  # instruction | image_text
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),  # -1 when the whole file is rejected
        ("source_member", pa.string()),
        ("reason", pa.string()),  # a short stable code: malformed_json, corrupt_image, ...
        ("detail", pa.string()),  # human-readable explanation
        ("raw_excerpt", pa.string()),  # the first bytes of the offending input, for debugging
    ],
    nullable={"source_member", "raw_excerpt"},
)

DUPLICATES = _schema(
    "duplicates",
    [
        ("kind", pa.string()),
        ("sample_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),
        ("source_member", pa.string()),
        ("kept_source_uri", pa.string()),
        ("kept_source_offset", pa.int64()),
    ],
    nullable={"source_member"},
)

# Annotation sidecars, keyed by sample_id. Computing a score is kept apart from deciding on it.
TAG_ANNOTATIONS = _schema(
    "annotations_tags",
    [("sample_id", pa.string()), ("tags", pa.list_(TAG)), ("annotator", pa.string())],
)

QUALITY_ANNOTATIONS = _schema(
    "annotations_quality",
    [
        ("sample_id", pa.string()),
        ("quality", pa.float32()),  # DEITA-style quality (mean over rounds)
        ("complexity", pa.float32()),  # DEITA-style complexity (mean over rounds)
        ("score", pa.float32()),  # the value selection uses: mean over rounds of quality x complexity
        ("quality_per_round", pa.list_(pa.float32())),
        ("complexity_per_round", pa.list_(pa.float32())),
        ("annotator", pa.string()),
    ],
    nullable={"quality", "complexity", "quality_per_round", "complexity_per_round"},
)

CONCEPT_ANNOTATIONS = _schema(
    "annotations_concepts",
    [
        ("sample_id", pa.string()),
        ("concepts", pa.list_(CONCEPT)),
        ("boxes", pa.list_(BOX)),
        ("tags", pa.list_(TAG)),
        ("annotator", pa.string()),
    ],
    nullable={"boxes", "tags"},
)


NEAR_DUP_ANNOTATIONS = _schema(
    "annotations_near_dup",
    [
        ("sample_id", pa.string()),
        ("group_id", pa.string()),  # sample_id of the group's kept row
        ("keep", pa.bool_()),
        ("max_similarity", pa.float32()),  # cosine to the nearest other sample
    ],
    nullable={"max_similarity"},
)

CLIP_SCORE_ANNOTATIONS = _schema(
    "annotations_clip_score",
    [("sample_id", pa.string()), ("clip_score", pa.float32()), ("model", pa.string())],
    nullable={"clip_score"},  # null: the sample has no caption
)

# LLM annotators add why a reply could not be used (the row is kept, never dropped).
_LLM_ERROR = [("error", pa.string()), ("error_detail", pa.string())]

LLM_TAG_ANNOTATIONS = _schema(
    "annotations_tags_llm",
    [*((f.name, f.type) for f in TAG_ANNOTATIONS), ("explanations", pa.list_(pa.string())), *_LLM_ERROR],
    nullable={"explanations", "error", "error_detail"},
)

LLM_QUALITY_ANNOTATIONS = _schema(
    "annotations_quality_llm",
    [*((f.name, f.type) for f in QUALITY_ANNOTATIONS), *_LLM_ERROR],
    nullable={"quality", "complexity", "quality_per_round", "complexity_per_round", "error", "error_detail"},
)


def embedding_schema(dim: int, spans: bool = False) -> pa.Schema:
    """Vectors keyed by sample_id; the model name and weights digest live in the table metadata.

    With ``spans`` (instruction text embeddings) two more vectors pooled from the same encoder
    pass: the user side and the answer side of the conversation (all NaN when that side is empty
    or was cut off by the model's token limit: pyarrow cannot yet read back null fixed-size lists
    from Parquet); see ``pipeline.embed.spans``.
    """
    fields = [("sample_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))]
    if spans:
        fields += [("user_embedding", pa.list_(pa.float32(), dim)), ("answer_embedding", pa.list_(pa.float32(), dim))]
    return _schema("embeddings", fields)


SELECTIONS = _schema(
    "selections",
    [
        ("rank", pa.int64()),
        ("sample_id", pa.string()),
        ("gain", pa.float64()),
        ("algorithm", pa.string()),
        ("why", pa.string()),  # e.g. the labels or concepts the pick covered
    ],
    nullable={"why"},
)

CURATED_INSTRUCTIONS = _schema(
    "curated_instruction",
    [
        ("sample_id", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("tags", pa.list_(pa.string())),
        ("score", pa.float32()),
        ("rank", pa.int64()),
        ("gain", pa.float64()),
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),
    ],
    nullable={"tags", "score"},
)

# What `thresher select` writes (OUT.parquet), one schema per algorithm.
MIG_PICKS = _schema(
    "mig_picks",
    [("rank", pa.int64()), ("index", pa.int64()), ("sample_id", pa.string()), ("gain", pa.float64()),
     ("labels", pa.list_(pa.string()))],
)

CABS_PLAN = _schema(
    "cabs_plan",
    [("step", pa.int64()), ("position", pa.int64()), ("sample_id", pa.string()), ("gain", pa.float64())],
    nullable={"gain"},  # NaN/None for picks the reference mode filled at random
)

GAIS_SELECTION = _schema(
    "gais_selection",
    [("index", pa.int64()), ("sample_id", pa.string()), ("label", pa.string()), ("score", pa.float64()),
     ("selected", pa.bool_())],
)

# The run ledger is JSON (runs/<run_id>.json); this schema documents its top-level keys and lets
# DuckDB read the ledger as a table.
RUN_LEDGER_KEYS = (
    "run_id",
    "stage",
    "dataset",
    "started_at",
    "finished_at",
    "code_version",
    "parameters",
    "inputs",  # [{uri, size, mtime_ns}] — the input fingerprint
    "counts",
    "timings_s",
    "status",
)

TABLES: dict[str, pa.Schema] = {
    "samples_instruction": INSTRUCTION_SAMPLES,
    "samples_image_text": IMAGE_TEXT_SAMPLES,
    "rejects": REJECTS,
    "duplicates": DUPLICATES,
    "annotations_tags": TAG_ANNOTATIONS,
    "annotations_quality": QUALITY_ANNOTATIONS,
    "annotations_concepts": CONCEPT_ANNOTATIONS,
    "selections": SELECTIONS,
    "mig_picks": MIG_PICKS,
    "cabs_plan": CABS_PLAN,
    "gais_selection": GAIS_SELECTION,
    "annotations_near_dup": NEAR_DUP_ANNOTATIONS,
    "annotations_clip_score": CLIP_SCORE_ANNOTATIONS,
    "annotations_tags_llm": LLM_TAG_ANNOTATIONS,
    "annotations_quality_llm": LLM_QUALITY_ANNOTATIONS,
    "curated_instruction": CURATED_INSTRUCTIONS,
}
