"""Catalog stages that write concept annotations of image-text samples.

* ``annotations/caption_concepts/dataset=<d>/``: the caption annotator over every sample
  (one row per sample; an empty list when its caption names no vocabulary concept).
* ``annotations/clip_concepts/dataset=<d>/``: open_clip zero-shot tags of every image.

Both tables have the ``schemas.CONCEPT_ANNOTATIONS`` shape that ingest gives
``annotations/input_concepts/`` (DataConcept boxes, used as they are), so a reader such as the
CABS planner takes concepts from any of the three. Each stage is a per-shard Beam map
(``run_shard_stage``): skipped when neither the samples nor the parameters (vocabulary digest,
model, thresholds) changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

import schemas
from pipeline.annotate.concepts import (
    CAPTION_ANNOTATOR,
    DEFAULT_TEMPLATE,
    CaptionConceptMatcher,
    ClipConceptTagger,
)
from pipeline.annotate.vocabulary import Vocabulary, load_vocabulary
from pipeline.io.catalog import Catalog
from pipeline.stages.shards import ShardFn, StageResult, run_shard_stage

CAPTION_TABLE = "caption_concepts"
CLIP_TABLE = "clip_concepts"
ANNOTATOR_VERSION = "1"  # bump when matching rules change, so existing annotations are redone


def resolve_vocabulary(vocabulary: Vocabulary | str | os.PathLike | None) -> Vocabulary:
    if vocabulary is None or isinstance(vocabulary, (str, os.PathLike)):
        return load_vocabulary(vocabulary)
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    raise TypeError(f"vocabulary must be a Vocabulary, a file path or None, got {type(vocabulary).__name__}")


class CaptionConceptFn(ShardFn):
    """Samples shard (sample_id, caption) -> concept annotations."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        self._matcher: CaptionConceptMatcher | None = None

    def setup(self) -> None:
        if self._matcher is None:
            self._matcher = CaptionConceptMatcher(self.vocabulary)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the vocabulary, not the indexes: workers rebuild them in setup (0.1 s).
        return {"vocabulary": self.vocabulary, "_matcher": None}

    def __call__(self, table: pa.Table) -> pa.Table:
        self.setup()
        return self._matcher.annotate_table(table, CAPTION_ANNOTATOR)


class ClipConceptFn(ShardFn):
    """Samples shard (sample_id, image) -> zero-shot concept tags."""

    def __init__(self, model_name: str, pretrained: str | None, vocabulary: Vocabulary, options: dict[str, Any]):
        self.model_name, self.pretrained, self.vocabulary, self.options = model_name, pretrained, vocabulary, options
        self._tagger: ClipConceptTagger | None = None

    def setup(self) -> None:
        if self._tagger is None:
            self._tagger = ClipConceptTagger(self.model_name, self.pretrained, self.vocabulary, **self.options).load()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tagger"] = None
        return state

    def __call__(self, table: pa.Table) -> pa.Table:
        self.setup()
        return self._tagger.annotate_table(table)


def _samples(cat: Catalog, dataset: str) -> Path:
    part = cat.samples_partition("image_text", dataset)
    if not part.is_dir():
        raise FileNotFoundError(f"no image-text samples for dataset {dataset!r} in {cat.root}; "
                                "ingest it first (thresher ingest --kind image_text)")
    return part


def run_caption_concepts(
    catalog: str | Path,
    dataset: str,
    vocabulary: Vocabulary | str | os.PathLike | None = None,
    workers: int = 1,
    force: bool = False,
    beam_args: list[str] | None = None,
) -> StageResult:
    """Annotate every caption of ``dataset`` with vocabulary concepts and counts."""
    cat = Catalog.at(catalog)
    vocab = resolve_vocabulary(vocabulary)
    params = {"annotator": CAPTION_ANNOTATOR, "version": ANNOTATOR_VERSION, "vocabulary": vocab.digest(),
              "vocabulary_size": len(vocab)}
    return run_shard_stage(cat.root, CAPTION_TABLE, dataset, _samples(cat, dataset),
                           cat.annotation_partition(CAPTION_TABLE, dataset), CaptionConceptFn(vocab),
                           schemas.CONCEPT_ANNOTATIONS, params, columns=["sample_id", "caption"],
                           workers=workers, beam_args=beam_args, force=force)


def _weights_fingerprint(pretrained: str | None) -> Any:
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return pretrained


def run_clip_concepts(
    catalog: str | Path,
    dataset: str,
    model_name: str,
    pretrained: str | None = None,
    top_k: int = 10,
    threshold: float = 0.01,
    vocabulary: Vocabulary | str | os.PathLike | None = None,
    *,
    score: str = "softmax",
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 64,
    device: str | None = None,
    seed: int = 0,
    workers: int = 1,
    force: bool = False,
    beam_args: list[str] | None = None,
) -> StageResult:
    """Tag every image of ``dataset`` with its top-k vocabulary concepts (open_clip zero-shot).

    ``pretrained=None`` means random weights: the tags are then meaningless, which is only
    useful to test the plumbing; pass a tag or a local checkpoint for real annotations.
    """
    cat = Catalog.at(catalog)
    vocab = resolve_vocabulary(vocabulary)
    options = {"top_k": top_k, "threshold": threshold, "score": score, "template": template,
               "batch_size": batch_size, "device": device, "seed": seed}
    # Fail in the driver, with a clear message, rather than once per worker.
    ClipConceptTagger(model_name, pretrained, vocab, **options)
    params = {"annotator": "clip", "version": ANNOTATOR_VERSION, "model": model_name,
              "weights": _weights_fingerprint(pretrained), "seed": seed, "top_k": top_k, "threshold": threshold,
              "score": score, "template": template, "vocabulary": vocab.digest()}
    return run_shard_stage(cat.root, CLIP_TABLE, dataset, _samples(cat, dataset),
                           cat.annotation_partition(CLIP_TABLE, dataset),
                           ClipConceptFn(model_name, pretrained, vocab, options),
                           schemas.CONCEPT_ANNOTATIONS, params, columns=["sample_id", "image"],
                           workers=workers, beam_args=beam_args, force=force)
