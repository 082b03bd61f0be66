"""Catalog stages that tag and score instruction samples (Beam, one output shard per input shard).

``run_tag_annotation`` writes ``annotations/<annotator>/dataset=<d>/`` rows of
``schemas.TAG_ANNOTATIONS``; ``run_quality_annotation`` writes rows of
``schemas.QUALITY_ANNOTATIONS``. Annotators:

- ``offline_tags``: :class:`pipeline.annotate.tags.OfflineTagger` (MiniLM + rules);
- ``offline_quality``: :class:`pipeline.annotate.quality.OfflineQualityScorer` (heuristics);
- ``llm_tags`` / ``llm_quality``: :class:`pipeline.annotate.llm.LLMAnnotator` against an
  OpenAI-compatible endpoint. Their rows carry two more columns, ``error`` and ``error_detail``
  (null when the call succeeded), so a malformed reply or a timeout is visible per sample; the
  schemas are :data:`schemas.LLM_TAG_ANNOTATIONS` and :data:`schemas.LLM_QUALITY_ANNOTATIONS` (supersets of the
  shared ones; DuckDB's ``tags`` / ``quality`` views read them by column name).

Annotations that came with the input (``input_tags``, ``input_quality``, written at ingest) are
never touched: those names are refused as output folders.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline.annotate.llm import (
    QUALITY_PROMPT_VERSION,
    TAG_PROMPT_VERSION,
    LLMAnnotator,
    LLMConfig,
)
from pipeline.annotate.quality import (
    SCORER_VERSION,
    OfflineQualityScorer,
    combine_rounds,
    on_topic_from_spans,
)
from pipeline.annotate.tags import (
    TAGGER_VERSION,
    OfflineTagger,
    TaggerConfig,
    load_tag_vocabulary,
)
from pipeline.io.catalog import Catalog
from pipeline.stages.shards import ShardFn, StageResult, run_shard_stage

OFFLINE_TAGS, LLM_TAGS = "offline_tags", "llm_tags"
OFFLINE_QUALITY, LLM_QUALITY = "offline_quality", "llm_quality"
INPUT_ANNOTATIONS = {"input_tags", "input_quality"}
INPUT_COLUMNS = ["sample_id", "messages"]
CHUNK_ROWS = 2048  # rows embedded together: bounds memory on big shards




def _vectors(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table.column(column).to_pylist(), dtype=np.float32)


# ---------------------------------------------------------------- shard functions


class OfflineTagFn(ShardFn):
    """Tags from the stored user-side vectors (``companion``: the text embeddings partition);
    only the tag descriptions are encoded here, once per worker, by the same encoder."""

    companion_columns = ["sample_id", "user_embedding"]

    def __init__(self, annotator: str, vocabulary_path: str | None, config: TaggerConfig, catalog: str,
                 embeddings: str, embed_model: str | None = None, device: str | None = None, tier: str = "fp32"):
        self.annotator, self.vocabulary_path, self.config = annotator, vocabulary_path, config
        self.catalog, self.companion = catalog, embeddings
        self.embed_model, self.device, self.tier = embed_model, device, tier
        self._tagger: OfflineTagger | None = None

    def setup(self) -> None:
        if self._tagger is None:
            from pipeline.embed.text_cache import text_vectors

            def embed(texts: list[str]) -> np.ndarray:  # the catalog's cache: a model loads only on a miss
                return text_vectors(self.catalog, texts, self.embed_model, self.tier, self.device)

            self._tagger = OfflineTagger(load_tag_vocabulary(self.vocabulary_path), embed, self.config)

    def __call__(self, table: pa.Table, companion: pa.Table | None = None) -> pa.Table:
        self.setup()
        rows = []
        for start in range(0, table.num_rows, CHUNK_ROWS):
            chunk, vectors = table.slice(start, CHUNK_ROWS), companion.slice(start, CHUNK_ROWS)
            ids, messages = chunk["sample_id"].to_pylist(), chunk["messages"].to_pylist()
            preds_all = self._tagger.tag_many(messages, _vectors(vectors, "user_embedding"))
            for sid, preds in zip(ids, preds_all):
                rows.append({"sample_id": sid, "tags": [p.as_row() for p in preds], "annotator": self.annotator})
        return pa.Table.from_pylist(rows, schema=schemas.TAG_ANNOTATIONS) if rows else schemas.TAG_ANNOTATIONS.empty_table()


class OfflineQualityFn(ShardFn):
    """Heuristic DEITA-scale scores; the on-topic feature is the cosine of the stored user-side
    and answer-side vectors (``companion``), so no model is loaded here."""

    companion_columns = ["sample_id", "user_embedding", "answer_embedding"]

    def __init__(self, annotator: str, embeddings: str | None):
        self.annotator = annotator
        self.companion = embeddings  # None: score without the on-topic feature
        self._scorer = OfflineQualityScorer(embedder=False)

    def __call__(self, table: pa.Table, companion: pa.Table | None = None) -> pa.Table:
        rows = []
        for start in range(0, table.num_rows, CHUNK_ROWS):
            chunk = table.slice(start, CHUNK_ROWS)
            on_topic = None
            if companion is not None:
                vectors = companion.slice(start, CHUNK_ROWS)
                on_topic = on_topic_from_spans(np.einsum(  # NaN where a side is absent
                    "ij,ij->i", _vectors(vectors, "user_embedding"), _vectors(vectors, "answer_embedding")))
            ids, messages = chunk["sample_id"].to_pylist(), chunk["messages"].to_pylist()
            for sid, result in zip(ids, self._scorer.score_many(messages, on_topic)):
                rows.append(result.row(sid, self.annotator))
        return pa.Table.from_pylist(rows, schema=schemas.QUALITY_ANNOTATIONS) if rows else schemas.QUALITY_ANNOTATIONS.empty_table()


class _LLMFn(ShardFn):
    """One LLM client (with its reply cache) per worker, made on first use."""

    def __init__(self, annotator: str, config: LLMConfig, cache_path: str | None):
        self.annotator, self.config, self.cache_path = annotator, config, cache_path
        self._llm: LLMAnnotator | None = None

    def setup(self) -> None:
        if self._llm is None:
            self._llm = LLMAnnotator(self.config, self.cache_path)


class LLMTagFn(_LLMFn):
    def __call__(self, table: pa.Table) -> pa.Table:
        self.setup()
        ids, messages = table["sample_id"].to_pylist(), table["messages"].to_pylist()
        rows = []
        for sid, r in zip(ids, self._llm.tag_many(messages)):
            rows.append({"sample_id": sid, "tags": [{"tag": t.tag, "confidence": 1.0} for t in r.tags],
                         "annotator": self.annotator, "explanations": [t.explanation for t in r.tags] if r.tags else None,
                         "error": r.error, "error_detail": r.detail})
        return pa.Table.from_pylist(rows, schema=schemas.LLM_TAG_ANNOTATIONS) if rows else schemas.LLM_TAG_ANNOTATIONS.empty_table()


class LLMQualityFn(_LLMFn):
    def __call__(self, table: pa.Table) -> pa.Table:
        self.setup()
        ids, messages = table["sample_id"].to_pylist(), table["messages"].to_pylist()
        rows = []
        for sid, r in zip(ids, self._llm.score_many(messages)):
            row = {"sample_id": sid, "quality": None, "complexity": None, "score": 0.0,
                   "quality_per_round": r.quality_per_round, "complexity_per_round": r.complexity_per_round,
                   "annotator": self.annotator, "error": r.error, "error_detail": r.detail}
            if r.error is None:
                row["quality"], row["complexity"], row["score"] = combine_rounds(r.quality_per_round, r.complexity_per_round)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=schemas.LLM_QUALITY_ANNOTATIONS) if rows else schemas.LLM_QUALITY_ANNOTATIONS.empty_table()


# ---------------------------------------------------------------- stages


def _output_name(kind: str, annotator: str, name: str | None) -> str:
    out = name or annotator
    if out in INPUT_ANNOTATIONS:
        raise ValueError(f"{out!r} holds the annotations that came with the input; choose another output name")
    if not out.endswith(f"_{kind}"):
        raise ValueError(f"output name {out!r} must end with '_{kind}' so that the catalog's {kind} view finds it")
    return out


def _default_cache(cat: Catalog) -> str:
    return str(cat.root / "cache" / "llm_annotations.sqlite")


def _error_counts(partition: Path) -> dict[str, int]:
    table = pq.read_table(partition, columns=["error"])
    counts = pc.value_counts(table["error"].drop_null()).to_pylist() if table.num_rows else []
    return {c["values"]: int(c["counts"]) for c in counts}


def _stored_embeddings(cat: Catalog, dataset: str, embed_model: str | None, tier: str, workers: int,
                       beam_args: list[str] | None) -> tuple[Path, list[dict[str, Any]]]:
    """The dataset's text embeddings (made now if missing or stale: the one text pass that tags,
    quality, the index and MIG all reuse), and their fingerprint for the caller's skip test."""
    from pipeline.stages.embeddings import run_text_embedding
    from pipeline.stages.shards import input_shards, shard_fingerprint

    # precision=None: vectors stored at any precision are reused as they are (the embed step chose it)
    result = run_text_embedding(cat.root, dataset, embed_model, workers=workers, beam_args=beam_args, tier=tier,
                                precision=None)
    partition = Path(result.output)
    return partition, shard_fingerprint(input_shards(partition))


def run_tag_annotation(
    catalog: str | Path,
    dataset: str,
    annotator: str = OFFLINE_TAGS,
    *,
    vocabulary: str | Path | None = None,
    tagger_config: TaggerConfig | None = None,
    embed_model: str | None = None,
    device: str | None = None,
    tier: str = "fp32",
    llm: LLMConfig | None = None,
    cache_path: str | Path | None = None,
    name: str | None = None,
    workers: int = 1,
    beam_args: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    """Tag every instruction sample of ``dataset``; ``annotator`` is ``offline_tags`` or ``llm_tags``.

    ``offline_tags`` reads the user-side vectors of the dataset's text embeddings
    (``embed_model``/``tier``; made first when missing), so no conversation is encoded again.
    """
    cat = Catalog.at(catalog)
    out_name = _output_name("tags", annotator, name)
    src = cat.samples_partition("instruction", dataset)
    out = cat.annotation_partition(out_name, dataset)
    if annotator == OFFLINE_TAGS:
        config = tagger_config or TaggerConfig()
        vocab = load_tag_vocabulary(vocabulary)  # fail early, in the driver, on a bad file
        emb, emb_fp = _stored_embeddings(cat, dataset, embed_model, tier, workers, beam_args)
        fn: ShardFn = OfflineTagFn(out_name, str(vocabulary) if vocabulary else None, config, str(cat.root),
                                   str(emb), embed_model, device, tier)
        schema = schemas.TAG_ANNOTATIONS
        params: dict[str, Any] = {"annotator": annotator, "tagger_version": TAGGER_VERSION,
                                  "vocabulary_digest": vocab.digest, "config": config.to_dict(),
                                  "embeddings": emb_fp}
    elif annotator == LLM_TAGS:
        if llm is None:
            raise ValueError("the llm_tags annotator needs an endpoint and a model (LLMConfig)")
        cache = str(cache_path) if cache_path else _default_cache(cat)
        fn, schema = LLMTagFn(out_name, llm, cache), schemas.LLM_TAG_ANNOTATIONS
        params = {"annotator": annotator, "prompt_version": TAG_PROMPT_VERSION, "llm": llm.parameters()}
    else:
        raise ValueError(f"unknown tag annotator {annotator!r}; choose {OFFLINE_TAGS} or {LLM_TAGS}")
    result = run_shard_stage(cat.root, "annotate_tags", dataset, src, out, fn, schema, params,
                             columns=INPUT_COLUMNS, workers=workers, beam_args=beam_args, force=force)
    if annotator == LLM_TAGS and not result.skipped:
        result.extra["errors"] = _error_counts(cat.local_input(out))
    return result


def run_quality_annotation(
    catalog: str | Path,
    dataset: str,
    annotator: str = OFFLINE_QUALITY,
    *,
    use_embeddings: bool = True,
    embed_model: str | None = None,
    tier: str = "fp32",
    llm: LLMConfig | None = None,
    cache_path: str | Path | None = None,
    name: str | None = None,
    workers: int = 1,
    beam_args: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    """Score every instruction sample of ``dataset``; ``annotator`` is ``offline_quality`` or ``llm_quality``.

    ``offline_quality``'s on-topic feature is the cosine of the stored user-side and answer-side
    vectors of the dataset's text embeddings (made first when missing; ``use_embeddings=False``
    scores without it).
    """
    cat = Catalog.at(catalog)
    out_name = _output_name("quality", annotator, name)
    src = cat.samples_partition("instruction", dataset)
    out = cat.annotation_partition(out_name, dataset)
    if annotator == OFFLINE_QUALITY:
        emb, emb_fp = (_stored_embeddings(cat, dataset, embed_model, tier, workers, beam_args)
                       if use_embeddings else (None, None))
        fn: ShardFn = OfflineQualityFn(out_name, str(emb) if emb else None)
        schema = schemas.QUALITY_ANNOTATIONS
        params: dict[str, Any] = {"annotator": annotator, "scorer_version": SCORER_VERSION,
                                  "on_topic": "stored user/answer span vectors" if use_embeddings else None,
                                  "embeddings": emb_fp}
    elif annotator == LLM_QUALITY:
        if llm is None:
            raise ValueError("the llm_quality annotator needs an endpoint and a model (LLMConfig)")
        cache = str(cache_path) if cache_path else _default_cache(cat)
        fn, schema = LLMQualityFn(out_name, llm, cache), schemas.LLM_QUALITY_ANNOTATIONS
        params = {"annotator": annotator, "prompt_version": QUALITY_PROMPT_VERSION, "llm": llm.parameters()}
    else:
        raise ValueError(f"unknown quality annotator {annotator!r}; choose {OFFLINE_QUALITY} or {LLM_QUALITY}")
    result = run_shard_stage(cat.root, "annotate_quality", dataset, src, out, fn, schema, params,
                             columns=INPUT_COLUMNS, workers=workers, beam_args=beam_args, force=force)
    if annotator == LLM_QUALITY and not result.skipped:
        result.extra["errors"] = _error_counts(cat.local_input(out))
    return result


def stage_summary(result: StageResult) -> str:
    """One line for the command line."""
    if result.skipped:
        return f"{result.stage} {result.dataset}: unchanged since run {result.run_id}, skipped ({result.output})"
    rate = result.rows_in / result.seconds if result.seconds > 0 else math.inf
    line = (f"{result.stage} {result.dataset}: {result.rows_out:,} rows -> {result.output} "
            f"in {result.seconds:.1f} s ({rate:,.0f} samples/s)")
    if result.extra.get("errors"):
        line += "; errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result.extra["errors"].items()))
    return line


__all__ = [
    "LLMQualityFn", "LLMTagFn", "OfflineQualityFn",
    "OfflineTagFn", "run_quality_annotation", "run_tag_annotation", "stage_summary",
]
