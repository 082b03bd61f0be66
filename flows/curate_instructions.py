"""``curate_instructions``: ingest -> embed -> tags + quality -> index + near-dups -> MIG -> curate -> export.

The text embedding stage is the one encoder pass over the conversations: the tagger, the
quality scorer, the index and MIG's pool all read what it stored.

Each stage is a Prefect task (retried) around one library call; each library call is a Beam job
or a global step that skips itself when its inputs and parameters are unchanged, so re-running
the flow after a crash redoes only what did not finish.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.ingest import IngestSpec, ingest_task
from flows.report import report_task
from pipeline.registry import ANNOTATORS, EMBEDDERS, EXPORTERS

RETRIES = {"retries": 2, "retry_delay_seconds": 5}
CHAIN_TIERS = ("fp32", "int8")  # encoder tiers whose outputs agree with fp32 closely enough (docs/embedding_tiers.md)


@task(name="annotate", **RETRIES)
def annotate_task(catalog: str, dataset: str, annotator: str, workers: int, force: bool,
                  params: dict[str, Any]) -> dict[str, Any]:
    """One registered annotator (``pipeline.registry.ANNOTATORS``) over the dataset."""
    entry = ANNOTATORS[annotator]
    return asdict(entry.load()(catalog, dataset, workers=workers, force=force, **entry.validate(params)))


@task(name="annotate-tags", **RETRIES)
def tags_task(catalog: str, dataset: str, workers: int, force: bool, tier: str = "fp32") -> dict[str, Any]:
    entry = ANNOTATORS["offline_tags"]
    return asdict(entry.load()(catalog, dataset, workers=workers, force=force, **entry.validate({"tier": tier})))


@task(name="annotate-quality", **RETRIES)
def quality_task(catalog: str, dataset: str, workers: int, force: bool, tier: str = "fp32") -> dict[str, Any]:
    entry = ANNOTATORS["offline_quality"]
    return asdict(entry.load()(catalog, dataset, workers=workers, force=force, **entry.validate({"tier": tier})))


@task(name="embed-text", **RETRIES)
def embed_task(catalog: str, dataset: str, workers: int, force: bool, tier: str = "fp32",
               precision: str = "auto") -> dict[str, Any]:
    entry = EMBEDDERS["text"]
    return asdict(entry.load()(catalog, dataset, workers=workers, force=force,
                               **entry.validate({"tier": tier, "precision": precision})))


@task(name="index-and-near-duplicates", **RETRIES)
def index_task(catalog: str, dataset: str, model: str, threshold: float, force: bool) -> dict[str, Any]:
    from pipeline.stages.index import run_index_build, run_near_duplicates

    index = run_index_build(catalog, dataset, model, force=force)
    near = run_near_duplicates(catalog, dataset, model, threshold, force=force)
    return {"index": asdict(index), "near_duplicates": asdict(near)}


@task(name="select", **RETRIES)
def select_task(catalog: str, dataset: str, selector: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A registered selector into ``selections/<name>/`` (skipped when nothing changed); its report."""
    from pipeline.select.protocol import select_into_catalog

    result = select_into_catalog(selector, catalog, name, params, dataset=dataset)
    return result.report.to_dict()


@task(name="select-mig", **RETRIES)
def mig_task(catalog: str, dataset: str, budget: int, near_dup_annotator: str | None, out: str) -> dict[str, Any]:
    """MIG into ``selections/<name>/`` (``name``: ``out``'s file name less ``.picks.parquet``) with a
    copy of the picks at ``out``: the older calling form, kept for flows that curate from a file."""
    from pipeline.select.protocol import select_into_catalog

    name = Path(out).name.removesuffix(".parquet").removesuffix(".picks")
    params = {"budget": budget, "fit_budget": True, "keep_near_duplicates": near_dup_annotator is None,
              **({"near_dups": near_dup_annotator} if near_dup_annotator else {})}
    return select_into_catalog("mig", catalog, name, params, dataset=dataset, out=out).report.to_dict()


@task(name="curate-and-export", **RETRIES)
def curate_task(catalog: str, dataset: str, selection: str, name: str, export_dir: str,
                formats: list[str]) -> dict[str, Any]:
    from pipeline.curate.materialise import materialise_instructions

    curated = materialise_instructions(catalog, dataset, None, name, selection=selection)
    # the flow owns these folders: a re-run replaces its previous exports
    manifests = {fmt: EXPORTERS[fmt].load()(catalog, name, str(Path(export_dir) / fmt), True) for fmt in formats}
    return {"curated": asdict(curated), "exports": {k: v["rows"] for k, v in manifests.items()}}


@flow(name="curate_instructions", log_prints=True)
def curate_instructions(spec: IngestSpec, catalog: str, budget: int, name: str | None = None,
                        export_formats: tuple[str, ...] = ("sharegpt", "alpaca", "openai", "parquet"),
                        near_dup_threshold: float = 0.95, workers: int = 1, force: bool = False,
                        tier: str = "fp32", precision: str = "auto") -> dict[str, Any]:
    """Curate one instruction dataset end to end; returns every stage's summary.

    ``tier``: the text encoder of the one embedding pass (``fp32`` MiniLM, or ``int8``, 2.4x
    faster at 0.994 cosine to fp32; see docs/embedding_tiers.md); tags, quality, the index and
    near-duplicates all read that pass. ``static`` is refused: its neighbours and tags agree too
    little with fp32 (recall@10 0.55, tag Jaccard 0.35) for the thresholds this flow uses.
    ``precision``: the fp32 tier's compute precision (``auto``: bf16 on CPUs with native bf16,
    cosine >= 0.9999 to fp32 at ~1.5x the speed; fp16 on a GPU; else fp32).
    """
    if tier not in CHAIN_TIERS:
        raise ValueError(f"tier {tier!r} is not one curate_instructions runs on; choose one of {CHAIN_TIERS}")
    valid = EXPORTERS.names(kind="instruction")
    for fmt in export_formats:
        if fmt not in valid:
            raise ValueError(f"export format {fmt!r} is not an instruction exporter; choose from: {', '.join(valid)}")
    name = name or f"{spec.dataset}_mig{budget}"
    out: dict[str, Any] = {"ingest": ingest_task(spec, catalog, workers, None, force)}
    out["embed"] = embed_task(catalog, spec.dataset, workers, force, tier, precision)
    out["tags"] = tags_task(catalog, spec.dataset, workers, force, tier)
    out["quality"] = quality_task(catalog, spec.dataset, workers, force, tier)
    model = out["embed"]["model"]
    out["index"] = index_task(catalog, spec.dataset, model, near_dup_threshold, force)
    # the selection is selections/<name>/; the pool leaves out the near-copies the index stage marked
    out["mig"] = select_task.with_options(name="select-mig")(
        catalog, spec.dataset, "mig", name, {"budget": budget, "fit_budget": True, "near_dups": f"near_dup_{model}"})
    out["curate"] = curate_task(catalog, spec.dataset, name, name, str(Path(catalog) / "exports" / name),
                                list(export_formats))
    out["report"] = report_task(catalog, spec.dataset, name, force)
    return out
