"""Embedding stages: Beam jobs that embed a dataset's samples into ``embeddings/<model>/``.

Graph (both stages)::

    shard paths -> Reshuffle -+-> ReadBatches (batches of ((shard, row, sample_id), input))
                              |     -> RunInference(keyed handler, batches as they come)
                              |     -> (shard, (tag, row, sample_id, vector)) -+
                              +-> Markers (shard, None), CLIP: caption flags -----+-> Flatten
                -> GroupByKey(shard) -> WriteShard

so each input shard ``part-i-of-n`` yields an output shard of the same name with its rows in
the same order. Every output table uses ``schemas.embedding_schema(dim)`` and carries in its
metadata ``model``, ``weights_digest`` (sha256 of the state dict), ``normalized`` and ``dim``.

Two rules keep the graph runnable on every Beam runner, Beam's Dask runner included:
every step has a single output (branches read the shard paths side by side, rather than one
DoFn emitting tagged outputs, which the Dask runner merges into one collection), and no step
relies on what a DoFn emits from ``finish_bundle`` (the Dask runner drops it, and with it the
last partial batch of Beam's ``BatchElements``). So the readers cut each shard into batches
themselves and RunInference takes them as they are; a batch never spans two shards, which also
makes the batches, and so the vectors, the same whatever the runner.

* :func:`run_text_embedding`: instruction conversations -> one text each
  (:func:`conversation_text`) -> one encoder pass (default: the bundled all-MiniLM-L6-v2),
  pooled into the whole-text, user-side and answer-side vectors (:mod:`pipeline.embed.spans`).
* :func:`run_clip_embedding`: image-text samples -> CLIP image embeddings
  (``<model>-image``), caption embeddings (``<model>-text``) and the image-caption cosine
  (CLIP score) in ``annotations/clip_score/``, all three from one Beam job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.embed.sentence import text_model_key
from pipeline.embed.spans import conversation_spans
from pipeline.io.catalog import Catalog, write_parquet_atomic
from pipeline.io.runs import stored_parameters
from pipeline.stages import progress
from pipeline.stages.shards import StageResult, input_shards, run_stage

CLIP_SCORE_ANNOTATOR = "clip_score"
TEXT_RECIPE_VERSION = 2  # bump when conversation_spans changes what it produces (2: span vectors)
CHARS_PER_TOKEN = 4  # rough English average; sizes the character budget from the token limit

# Table metadata keys that readers (index stage, DuckDB views) rely on.
META_MODEL = "model"
META_DIGEST = "weights_digest"
META_NORMALIZED = "normalized"
META_DIM = "dim"

CLIP_SCORE_SCHEMA = schemas.CLIP_SCORE_ANNOTATIONS  # defined in schemas/, the one source of truth


# --------------------------------------------------------------------------------------------
# Conversation -> text
# --------------------------------------------------------------------------------------------


def conversation_text(messages: Sequence[dict[str, str]], max_chars: int = 1024) -> str:
    """The text one conversation is embedded as (see :func:`pipeline.embed.spans.conversation_spans`)."""
    return conversation_spans(messages, max_chars).text


# --------------------------------------------------------------------------------------------
# Beam pieces
# --------------------------------------------------------------------------------------------

def shard_marker(shard_path: str) -> tuple[str, None]:
    """``(shard, None)``: gives every shard a group downstream, so an empty one still writes its output."""
    return Path(shard_path).name, None


def _batches(items: list[Any], order: Iterable[int], batch_size: int) -> Iterator[list[Any]]:
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


class ReadConversationBatches(beam.DoFn):
    """Instruction shard -> batches of ``((shard, row, sample_id), SpanText)``, shortest texts first."""

    def __init__(self, max_chars: int, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_chars, self.batch_size = max_chars, batch_size

    def process(self, shard_path: str) -> Iterator[list[Any]]:
        name = Path(shard_path).name
        table = pq.read_table(shard_path, columns=["sample_id", "messages"])
        ids = table.column("sample_id").to_pylist()
        items = [((name, row, sid), conversation_spans(m or [], self.max_chars))
                 for row, (sid, m) in enumerate(zip(ids, table.column("messages").to_pylist()))]
        # Sorted by length, so similar lengths share a batch and little compute goes to padding
        # (a stable sort: the same batches on every run). The row number in the key puts every
        # vector back in shard order when the shard is written.
        order = sorted(range(len(items)), key=lambda i: len(items[i][1].text))
        for batch in _batches(items, order, self.batch_size):
            yield batch
            progress.tick(self, len(batch))


class ReadColumnBatches(beam.DoFn):
    """Image-text shard -> batches of ``((shard, row, sample_id), value)`` of one column, in row order.

    ``image``: the encoded image bytes; ``caption``: the caption text ("" when missing: every
    sample gets a text vector). ``counts`` makes it the branch that reports progress.
    """

    def __init__(self, column: str, batch_size: int, counts: bool = False) -> None:
        if column not in ("image", "caption"):
            raise ValueError(f"column must be image or caption, got {column!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.column, self.batch_size, self.counts = column, batch_size, counts

    def process(self, shard_path: str) -> Iterator[list[Any]]:
        name = Path(shard_path).name
        table = pq.read_table(shard_path, columns=["sample_id", self.column])
        ids = table.column("sample_id").to_pylist()
        values = table.column(self.column)
        for start in range(0, len(ids), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(ids)))
            if self.column == "caption":
                batch = [((name, row, ids[row]), values[row].as_py() or "") for row in rows]
            else:
                batch = [((name, row, ids[row]), values[row].as_py()) for row in rows]
            yield batch
            if self.counts:
                progress.tick(self, len(batch))


class ReadCaptionFlags(beam.DoFn):
    """Image-text shard -> ``(shard, ("flag", row, sample_id, has_caption))`` per row, then ``(shard, None)``.

    An empty caption still gets a text vector (every sample has one) but no CLIP score.
    """

    def process(self, shard_path: str) -> Iterator[tuple[str, Any]]:
        name = Path(shard_path).name
        table = pq.read_table(shard_path, columns=["sample_id", "caption"])
        for row, (sid, caption) in enumerate(zip(table.column("sample_id").to_pylist(),
                                                  table.column("caption").to_pylist())):
            yield name, ("flag", row, sid, bool((caption or "").strip()))
        yield shard_marker(shard_path)


def to_shard_value(keyed_vector: tuple[tuple[str, int, str], np.ndarray], tag: str = "") -> tuple[str, Any]:
    (name, row, sid), vector = keyed_vector
    # Raw float32 bytes: a compact, coder-friendly payload for the shuffle.
    return name, (tag, row, sid, np.asarray(vector, dtype=np.float32).tobytes())


def vectors_table(values: list[tuple[str, int, str, bytes]], dim: int, per_row: int = 1) -> tuple[list[str], np.ndarray]:
    """Rows sorted back into shard order: (sample ids, float32 (n, dim) or (n, per_row, dim))."""
    values = sorted(values, key=lambda v: v[1])
    ids = [v[2] for v in values]
    flat = np.frombuffer(b"".join(v[3] for v in values), dtype=np.float32)
    if flat.size != len(ids) * dim * per_row:
        raise ValueError(f"expected {len(ids)} x {per_row} vectors of dimension {dim}, got {flat.size} values")
    return ids, flat.reshape(len(ids), per_row, dim) if per_row > 1 else flat.reshape(len(ids), dim)


def _vector_column(vectors: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])


def embedding_table(ids: list[str], vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    """``vectors`` (n, dim), or (n, 3, dim) for a span schema: whole, user, answer."""
    columns = [pa.array(ids, type=pa.string())]
    if vectors.ndim == 3:
        columns += [_vector_column(vectors[:, k]) for k in range(vectors.shape[1])]
    else:
        columns.append(_vector_column(vectors))
    return pa.Table.from_arrays(columns, schema=schema)


class WriteEmbeddingShard(beam.DoFn):
    """``(shard, values)`` -> ``<staging>/<shard>`` holding that shard's embeddings in row order."""

    def __init__(self, staging: str, schema: pa.Schema) -> None:
        self.staging, self.schema = staging, schema

    def process(self, element: tuple[str, Iterable[Any]]) -> Iterator[int]:
        name, values = element
        rows = [v for v in values if v is not None]
        dim = self.schema.field("embedding").type.list_size
        per_row = 3 if "user_embedding" in self.schema.names else 1
        ids, vectors = vectors_table(rows, dim, per_row)
        write_parquet_atomic(embedding_table(ids, vectors, self.schema), Path(self.staging) / name, self.schema)
        yield len(ids)


class WriteClipShard(beam.DoFn):
    """One shard's image vectors, caption vectors and caption flags -> image, text and score shards."""

    def __init__(self, staging: dict[str, str], schemas_by_part: dict[str, pa.Schema], model_key: str) -> None:
        self.staging, self.schemas, self.model_key = staging, schemas_by_part, model_key

    def process(self, element: tuple[str, Iterable[Any]]) -> Iterator[int]:
        name, values = element
        rows = [v for v in values if v is not None]
        dim = self.schemas["image"].field("embedding").type.list_size
        img_ids, img = vectors_table([r for r in rows if r[0] == "image"], dim)
        txt_ids, txt = vectors_table([r for r in rows if r[0] == "text"], dim)
        flags = {r[1]: r[3] for r in rows if r[0] == "flag"}
        if img_ids != txt_ids or len(flags) != len(img_ids):
            raise RuntimeError(f"{name}: image, caption and flag rows disagree; the job lost elements")
        has_caption = [flags[row] for row in sorted(flags)]
        score = cosine_rows(img, txt)
        scores = pa.Table.from_arrays(
            [pa.array(img_ids, type=pa.string()),
             pa.array([float(s) if ok else None for s, ok in zip(score, has_caption)], type=pa.float32()),
             pa.array([self.model_key] * len(img_ids), type=pa.string())],
            schema=self.schemas["score"],
        )
        write_parquet_atomic(embedding_table(img_ids, img, self.schemas["image"]),
                             Path(self.staging["image"]) / name, self.schemas["image"])
        write_parquet_atomic(embedding_table(txt_ids, txt, self.schemas["text"]),
                             Path(self.staging["text"]) / name, self.schemas["text"])
        write_parquet_atomic(scores, Path(self.staging["score"]) / name, self.schemas["score"])
        yield len(img_ids)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays, clipped to [-1, 1]; 0 where a row is all zeros."""
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1).astype(np.float64) * np.linalg.norm(b, axis=1).astype(np.float64)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Results and metadata
# --------------------------------------------------------------------------------------------


@dataclass
class EmbeddingResult:
    """What an embedding stage produced (or found up to date)."""

    dataset: str
    model: str  # folder name under embeddings/
    output: str
    rows: int
    dim: int
    weights_digest: str
    normalized: bool
    seconds: float
    skipped: bool
    run_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        state = "up to date (skipped)" if self.skipped else f"{self.rows:,} rows in {self.seconds:.1f}s"
        precision = f", {self.extra['precision']} compute" if self.extra.get("precision") else ""
        return (f"embeddings/{self.model}/dataset={self.dataset}: {state}, dim {self.dim}, "
                f"weights {self.weights_digest[:12]}{precision}")


@dataclass
class ClipEmbeddingResult:
    dataset: str
    image: EmbeddingResult
    text: EmbeddingResult
    clip_score_output: str
    clip_score_stats: dict[str, float | int]

    def summary(self) -> str:
        s = self.clip_score_stats
        return "\n".join([
            self.image.summary(),
            self.text.summary(),
            f"annotations/{Path(self.clip_score_output).parent.name}/dataset={self.dataset}: CLIP score "
            f"mean {s.get('mean', float('nan')):.4f}, min {s.get('min', float('nan')):.4f}, "
            f"max {s.get('max', float('nan')):.4f} over {s.get('n', 0):,} captioned samples",
        ])


def embedding_schema_with_meta(dim: int, meta: dict[str, str], spans: bool = False) -> pa.Schema:
    base = schemas.embedding_schema(dim, spans)
    return base.with_metadata({**{k.decode(): v.decode() for k, v in (base.metadata or {}).items()}, **meta})


def read_embedding_metadata(partition: Path) -> dict[str, str]:
    """The metadata of an embeddings partition (from its first shard)."""
    shards = input_shards(partition)
    meta = pq.read_schema(shards[0]).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def _result_from_stage(res: StageResult, model_key: str, dim: int, digest: str, output: Path) -> EmbeddingResult:
    return EmbeddingResult(
        dataset=res.dataset, model=model_key, output=str(output), rows=res.rows_out, dim=dim,
        weights_digest=digest, normalized=True, seconds=res.seconds, skipped=res.skipped, run_id=res.run_id,
    )


# --------------------------------------------------------------------------------------------
# Text embedding stage
# --------------------------------------------------------------------------------------------


def run_text_embedding(
    catalog: str | Path,
    dataset: str,
    model: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    workers: int = 1,
    force: bool = False,
    *,
    name: str | None = None,
    max_chars: int | None = None,
    device: str | None = None,
    beam_args: list[str] | None = None,
    tier: str = "fp32",
    precision: str | None = "auto",
) -> EmbeddingResult:
    """Embed every instruction sample of ``dataset`` with a sentence-transformers model.

    ``model``: a local sentence-transformers folder, a name already in the local cache, or
    ``None`` for the bundled all-MiniLM-L6-v2. ``name`` overrides the embeddings folder name.
    ``batch_size``: None picks 64 on a CPU and what half the free memory holds on a GPU (fp16
    there); with ``workers`` > 1 each local worker process uses its share of the cores.
    ``max_chars`` caps the text per conversation (default: 4 characters per model token, e.g.
    1024 for MiniLM's 256 tokens; see :func:`conversation_text`). ``tier``: ``fp32`` (the model
    as it is), or a cheaper tier of it (:mod:`pipeline.embed.tiers`). ``precision``: the fp32
    tier's compute precision (``auto``: fp16 on a GPU, bf16 on a CPU with native bf16 (~1.5x, cosine
    >= 0.9999 to fp32), else fp32; the resolved one is recorded in the table; None: the one the
    stored table was asked for, so that a stage reading the vectors never redoes them at another
    precision, and ``auto`` when there is none). One encoder pass per
    conversation writes three L2-normalised vectors: ``embedding`` (the whole text),
    ``user_embedding`` and ``answer_embedding`` (pooled over each side's tokens;
    :mod:`pipeline.embed.spans`). Skips, without loading the model, when the samples, the model
    files and the settings are unchanged and the output is intact (unless ``force``).
    """
    from pipeline.embed.sentence import (
        PRECISIONS,
        model_files_fingerprint,
        pick_batch_size,
        pick_device,
        resolve_model_path,
    )

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    cat = Catalog.at(catalog)
    source = cat.samples_partition("instruction", dataset)
    input_shards(source)  # fail before loading a model when there is nothing to embed
    model_ref = None if model is None else os.fspath(model)
    model_key = name or text_model_key(model, tier)
    output = cat.embedding_partition(model_key, dataset)
    if precision is None:
        precision = (stored_parameters(cat, "embed_text", dataset, output) or {}).get("precision") or "auto"
    # Decided from the model's files, not its loaded weights: an unchanged stage skips without
    # loading anything. The weights digest is recorded in the table when the stage runs.
    parameters = {"model": model_key, "tier": tier, "precision": precision if tier == "fp32" else None,
                  "model_files": model_files_fingerprint(model_ref),
                  "max_chars": max_chars, "normalized": True, "recipe": TEXT_RECIPE_VERSION}

    def expand(shard_paths: beam.PCollection, staging: Path) -> Any:
        from apache_beam.ml.inference.base import (
            RunInference,  # imports torch: only when the stage runs
        )

        from pipeline.embed.tiers import load_token_encoder
        from pipeline.stages.model_handlers import SpanEmbeddingHandler, prebatched

        encoder = load_token_encoder(tier, model_ref, device, precision=precision)
        chars = max_chars or CHARS_PER_TOKEN * encoder.max_tokens
        schema = embedding_schema_with_meta(encoder.dim, {
            META_MODEL: model_key, META_DIGEST: encoder.digest, META_NORMALIZED: "true", META_DIM: str(encoder.dim),
            "model_source": resolve_model_path(model_ref), "tier": tier, "precision": encoder.precision,
            "text_recipe": f"conversation_spans v{TEXT_RECIPE_VERSION}, max_chars={chars}",
        }, spans=True)
        # int8 and static run on the CPU whatever the device: only fp32 sizes batches for a GPU.
        runs_on = pick_device(device) if tier == "fp32" else "cpu"
        # Workers get the precision the driver resolved, so one table is computed at one precision.
        handler = SpanEmbeddingHandler(model_ref, tier=tier, device=device,
                                       precision=encoder.precision if tier == "fp32" else None,
                                       batch_size=pick_batch_size(batch_size, runs_on),
                                       expected_digest=encoder.digest, fp32_digest=encoder.fp32_digest,
                                       local_workers=workers)
        shards = shard_paths | "Spread" >> beam.Reshuffle()
        markers = shards | "Markers" >> beam.Map(shard_marker)
        vectors = (shards
                   | "ReadTexts" >> beam.ParDo(ReadConversationBatches(chars, handler.batch_size))
                   | "Embed" >> RunInference(prebatched(handler))
                   | "ByShard" >> beam.Map(to_shard_value))
        return ((vectors, markers)
                | "Join" >> beam.Flatten()
                | "GroupShard" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(WriteEmbeddingShard(str(staging), schema)))

    res = run_stage(cat.root, "embed_text", dataset, source, output, expand, parameters,
                    workers=workers, beam_args=beam_args, force=force)
    meta = read_embedding_metadata(output)
    out = _result_from_stage(res, model_key, int(meta[META_DIM]), meta[META_DIGEST], output)
    out.extra = {"max_chars": int(meta["text_recipe"].rsplit("=", 1)[1]), "batch_size": batch_size,
                 "model_source": meta["model_source"], "tier": tier, "precision": meta.get("precision", "fp32")}
    return out


# --------------------------------------------------------------------------------------------
# CLIP embedding stage
# --------------------------------------------------------------------------------------------


def run_clip_embedding(
    catalog: str | Path,
    dataset: str,
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    workers: int = 1,
    force: bool = False,
    *,
    name: str | None = None,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | None = None,
    score_annotator: str = CLIP_SCORE_ANNOTATOR,
    beam_args: list[str] | None = None,
) -> ClipEmbeddingResult:
    """Embed every image-text sample's image and caption with open_clip, and score the pair.

    Writes ``embeddings/<key>-image/``, ``embeddings/<key>-text/`` (``key`` = ``name`` or
    :func:`pipeline.embed.clip.clip_key`, e.g. ``ViT-B-32-laion2b_s34b_b79k``) and
    ``annotations/<score_annotator>/`` with ``clip_score`` = cosine(image, caption) in [-1, 1]
    (null when the caption is empty). ``pretrained``: None (seeded random weights), a tag in
    the local cache, or a checkpoint path; see :func:`pipeline.embed.clip.load_clip`.
    """
    from pipeline.embed.clip import clip_key, shared_clip

    cat = Catalog.at(catalog)
    source = cat.samples_partition("image_text", dataset)
    input_shards(source)
    pretrained_ref = None if pretrained is None else os.fspath(pretrained)
    checkpoint = pretrained_ref is not None and Path(pretrained_ref).expanduser().is_file()

    def load() -> Any:
        return shared_clip(model_name, pretrained_ref, device, seed=seed, cache_dir=cache_dir)

    # A checkpoint file names its folder by its weights digest, so it must be loaded to name it;
    # random weights and pretrained tags are named, and skipped, without loading anything.
    key = name or clip_key(model_name, pretrained_ref, seed=seed,
                           digest=load().weights_digest if checkpoint else None)
    outputs = {
        "image": cat.embedding_partition(f"{key}-image", dataset),
        "text": cat.embedding_partition(f"{key}-text", dataset),
        "score": cat.annotation_partition(score_annotator, dataset),
    }
    weights_file = None
    if checkpoint:
        st = Path(pretrained_ref).expanduser().stat()
        weights_file = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    parameters = {"model": key, "open_clip_model": model_name, "pretrained": pretrained_ref, "seed": seed,
                  "weights_file": weights_file, "normalized": True,
                  "outputs": {k: v.relative_to(cat.root).as_posix() for k, v in outputs.items()}}

    def expand(shard_paths: beam.PCollection, staging: dict[str, Path]) -> Any:
        from apache_beam.ml.inference.base import (
            RunInference,  # imports torch: only when the stage runs
        )

        from pipeline.stages.model_handlers import (
            ClipImageEmbeddingHandler,
            ClipTextEmbeddingHandler,
            prebatched,
        )

        clip = load()
        digest, dim = clip.weights_digest, clip.embed_dim
        common = {META_DIGEST: digest, META_NORMALIZED: "true", META_DIM: str(dim), "model_source": clip.source,
                  "open_clip_model": model_name, "seed": str(seed)}
        score_meta = {k.decode(): v.decode() for k, v in CLIP_SCORE_SCHEMA.metadata.items()}
        part_schemas = {
            "image": embedding_schema_with_meta(dim, {**common, META_MODEL: f"{key}-image", "tower": "image"}),
            "text": embedding_schema_with_meta(dim, {**common, META_MODEL: f"{key}-text", "tower": "text"}),
            "score": CLIP_SCORE_SCHEMA.with_metadata({**score_meta, **common, META_MODEL: key}),
        }
        handler_args = dict(device=device, seed=seed, batch_size=batch_size, expected_digest=digest,
                            cache_dir=cache_dir)
        image_handler = ClipImageEmbeddingHandler(model_name, pretrained_ref, **handler_args)
        text_handler = ClipTextEmbeddingHandler(model_name, pretrained_ref, **handler_args)
        shards = shard_paths | "Spread" >> beam.Reshuffle()
        flags = shards | "ReadFlags" >> beam.ParDo(ReadCaptionFlags())
        images = (shards
                  | "ReadImages" >> beam.ParDo(ReadColumnBatches("image", batch_size, counts=True))
                  | "EmbedImages" >> RunInference(prebatched(image_handler))
                  | "ImagesByShard" >> beam.Map(to_shard_value, "image"))
        captions = (shards
                    | "ReadCaptions" >> beam.ParDo(ReadColumnBatches("caption", batch_size))
                    | "EmbedCaptions" >> RunInference(prebatched(text_handler))
                    | "CaptionsByShard" >> beam.Map(to_shard_value, "text"))
        return ((images, captions, flags)
                | "Join" >> beam.Flatten()
                | "GroupShard" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(WriteClipShard({k: str(v) for k, v in staging.items()}, part_schemas, key)))

    # The three partitions are one output set: committed together, skipped together.
    res = run_stage(cat.root, "embed_clip", dataset, source, outputs, expand, parameters,
                    workers=workers, beam_args=beam_args, force=force)
    meta = read_embedding_metadata(outputs["image"])
    dim, digest = int(meta[META_DIM]), meta[META_DIGEST]
    image_result = _result_from_stage(res, f"{key}-image", dim, digest, outputs["image"])
    text_result = _result_from_stage(res, f"{key}-text", dim, digest, outputs["text"])
    return ClipEmbeddingResult(dataset, image_result, text_result, str(outputs["score"]),
                               clip_score_stats(outputs["score"]))


def clip_score_stats(partition: Path) -> dict[str, float | int]:
    table = pq.read_table(partition, columns=["clip_score"])
    scores = table.column("clip_score").drop_null().to_numpy()
    if len(scores) == 0:
        return {"n": 0}
    return {"n": int(len(scores)), "mean": float(scores.mean()), "min": float(scores.min()),
            "max": float(scores.max()), "median": float(np.median(scores))}


def read_embeddings(partition: Path) -> tuple[list[str], np.ndarray]:
    """All (sample_ids, float32 (n, dim)) of an embeddings partition, in shard order."""
    from pipeline.index.faiss_index import arrow_to_vectors

    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard in input_shards(partition):
        table = pq.read_table(shard, columns=["sample_id", "embedding"])
        ids.extend(table.column("sample_id").to_pylist())
        parts.append(arrow_to_vectors(table.column("embedding"), what=f"{shard}:embedding"))
    dims = {p.shape[1] for p in parts if len(p)}
    dim = dims.pop() if dims else 0
    vectors = np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)
    return ids, vectors


__all__ = [
    "CLIP_SCORE_SCHEMA",
    "ClipEmbeddingResult",
    "EmbeddingResult",
    "conversation_text",
    "read_embedding_metadata",
    "read_embeddings",
    "run_clip_embedding",
    "run_text_embedding",
    "text_model_key",
]
