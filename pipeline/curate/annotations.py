"""Finding a dataset's annotations: which annotator's table to use, in order of preference."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.io.catalog import Catalog

# Annotations the input carried win over computed ones; offline annotators over LLM ones only
# because they are the default — pass a name to choose.
TAG_SOURCES = ("input_tags", "offline_tags", "llm_tags")
QUALITY_SOURCES = ("input_quality", "offline_quality", "llm_quality")
CONCEPT_SOURCES = ("input_concepts", "caption_concepts", "clip_concepts")


def find(cat: Catalog, dataset: str, names: tuple[str, ...]) -> Path | None:
    """The partition of the first annotator in ``names`` that has rows for ``dataset``."""
    for name in names:
        part = cat.annotation_partition(name, dataset)
        if part.is_dir() and any(part.glob("*.parquet")):
            return part
    return None


def require(cat: Catalog, dataset: str, name: str, defaults: tuple[str, ...], hint: str) -> Path:
    """Like :func:`find` for ``name`` (or ``defaults`` when ``name`` is "auto"), but it must exist."""
    names = defaults if name == "auto" else (name,)
    part = find(cat, dataset, names)
    if part is None:
        raise FileNotFoundError(f"dataset {dataset!r} has no {' / '.join(names)} annotations; {hint}")
    return part


def near_copies(cat: Catalog, dataset: str, annotator: str) -> set[str]:
    """Sample ids a near-duplicate annotation marks as not kept (one representative per group stays)."""
    part = require(cat, dataset, annotator, (annotator,), "run `thresher index --near-dup` first")
    table = pq.read_table(part, columns=["sample_id", "keep"])
    return {s for s, k in zip(table.column("sample_id").to_pylist(), table.column("keep").to_pylist()) if not k}
