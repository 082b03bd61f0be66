"""``curate_image_text``: ingest -> concepts -> open_clip embeddings -> index + near-dups -> CABS plan -> export.

Each stage is a retried Prefect task around one library call that skips itself when its inputs
and parameters are unchanged. No CLIP weights ship anywhere: without ``pretrained`` the model is
built with random weights, which exercises the whole path (and still groups byte-identical
images) but gives no semantic similarity — pass a pretrained tag or a local checkpoint for that.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.ingest import IngestSpec, ingest_task

RETRIES = {"retries": 2, "retry_delay_seconds": 5}


@task(name="annotate-caption-concepts", **RETRIES)
def concepts_task(catalog: str, dataset: str, workers: int, force: bool) -> dict[str, Any]:
    from pipeline.stages.concepts import run_caption_concepts

    return asdict(run_caption_concepts(catalog, dataset, workers=workers, force=force))


@task(name="embed-clip", **RETRIES)
def clip_task(catalog: str, dataset: str, model_name: str, pretrained: str | None, workers: int,
              force: bool) -> dict[str, Any]:
    from pipeline.stages.embeddings import run_clip_embedding

    res = run_clip_embedding(catalog, dataset, model_name, pretrained, workers=workers, force=force)
    return {"image_model": res.image.model, "text_model": res.text.model, "clip_score": res.clip_score_stats}


@task(name="index-and-near-duplicates", **RETRIES)
def index_task(catalog: str, dataset: str, model: str, threshold: float, force: bool) -> dict[str, Any]:
    from pipeline.stages.index import run_index_build, run_near_duplicates

    index = run_index_build(catalog, dataset, model, force=force)
    near = run_near_duplicates(catalog, dataset, model, threshold, force=force)
    return {"index": asdict(index), "near_duplicates": asdict(near)}


@task(name="plan-cabs", **RETRIES)
def plan_task(catalog: str, dataset: str, near_dup_annotator: str | None, mode: str, filter_ratio: float,
              superbatch: int, steps: int, seed: int, out: str) -> dict[str, Any]:
    from pipeline.curate import cabs_plan

    pool = cabs_plan.concepts_from_catalog(catalog, dataset, near_duplicates=near_dup_annotator)
    table, report = cabs_plan.plan(pool, mode, filter_ratio, min(superbatch, len(pool.sample_ids)), steps, seed)
    cabs_plan.write_plan(table, report, out, {"dataset": dataset, "mode": mode, "filter_ratio": filter_ratio,
                                              "superbatch": superbatch, "steps": steps, "seed": seed})
    return asdict(report)


@task(name="export-webdataset", **RETRIES)
def export_task(catalog: str, dataset: str, plan: str, out_dir: str) -> dict[str, Any]:
    from pipeline.curate.webdataset_export import export_plan

    return export_plan(catalog, dataset, plan, out_dir, overwrite=True)  # the flow owns this folder


@flow(name="curate_image_text", log_prints=True)
def curate_image_text(spec: IngestSpec, catalog: str, model_name: str = "ViT-B-32", pretrained: str | None = None,
                      mode: str = "dm", filter_ratio: float = 0.8, superbatch: int = 20_480, steps: int = 10,
                      seed: int = 0, near_dup_threshold: float = 0.95, workers: int = 1,
                      force: bool = False) -> dict[str, Any]:
    """Curate one image-text dataset end to end; returns every stage's summary."""
    out: dict[str, Any] = {"ingest": ingest_task(spec, catalog, workers, None, force)}
    out["concepts"] = concepts_task(catalog, spec.dataset, workers, force)
    out["clip"] = clip_task(catalog, spec.dataset, model_name, pretrained, workers, force)
    out["index"] = index_task(catalog, spec.dataset, out["clip"]["image_model"], near_dup_threshold, force)
    name = f"{spec.dataset}_cabs_{mode}"
    plan = str(Path(catalog) / "selections" / f"{name}.plan.parquet")
    # Random-init CLIP embeddings are nearly collinear: their "near-duplicates" would swallow the
    # pool. Only a pretrained model's groups are allowed to remove samples from the plan.
    near_dup = f"near_dup_{out['clip']['image_model']}" if pretrained else None
    if not pretrained:
        print(f"no pretrained CLIP weights given: {model_name} has random weights, so its near-duplicate "
              "groups are recorded but not used to drop samples")
    out["plan"] = plan_task(catalog, spec.dataset, near_dup, mode, filter_ratio, superbatch, steps, seed, plan)
    out["export"] = export_task(catalog, spec.dataset, plan, str(Path(catalog) / "exports" / name))
    return out
