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
from flows.report import report_task
from pipeline.registry import ANNOTATORS, EMBEDDERS, EXPORTERS

RETRIES = {"retries": 2, "retry_delay_seconds": 5}


@task(name="annotate-concepts", **RETRIES)
def concepts_task(catalog: str, dataset: str, workers: int, force: bool,
                  annotator: str = "caption_concepts", params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One registered concept annotator (``pipeline.registry.ANNOTATORS``) over the dataset."""
    entry = ANNOTATORS[annotator]
    return asdict(entry.load()(catalog, dataset, workers=workers, force=force, **entry.validate(params)))


@task(name="embed-clip", **RETRIES)
def clip_task(catalog: str, dataset: str, model_name: str, pretrained: str | None, workers: int,
              force: bool) -> dict[str, Any]:
    entry = EMBEDDERS["clip"]
    res = entry.load()(catalog, dataset, workers=workers, force=force,
                       **entry.validate({"model_name": model_name, "pretrained": pretrained}))
    return {"image_model": res.image.model, "text_model": res.text.model, "clip_score": res.clip_score_stats}


@task(name="index-and-near-duplicates", **RETRIES)
def index_task(catalog: str, dataset: str, model: str, threshold: float, force: bool) -> dict[str, Any]:
    from pipeline.stages.index import run_index_build, run_near_duplicates

    index = run_index_build(catalog, dataset, model, force=force)
    near = run_near_duplicates(catalog, dataset, model, threshold, force=force)
    return {"index": asdict(index), "near_duplicates": asdict(near)}


@task(name="plan-cabs", **RETRIES)
def cabs_task(catalog: str, dataset: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """CABS batch plan into ``selections/<name>/`` (skipped when nothing changed); its report."""
    from pipeline.select.protocol import select_into_catalog

    return select_into_catalog("cabs", catalog, name, params, dataset=dataset).report.to_dict()


@task(name="plan-cabs", **RETRIES)
def plan_task(catalog: str, dataset: str, near_dup_annotator: str | None, mode: str, filter_ratio: float,
              superbatch: int, steps: int, seed: int, out: str) -> dict[str, Any]:
    """The older calling form: CABS into ``selections/<name>/`` (``name``: ``out``'s file name less
    ``.plan.parquet``) with a copy of the plan at ``out``."""
    from pipeline.select.protocol import select_into_catalog

    name = Path(out).name.removesuffix(".parquet").removesuffix(".plan")
    params = {"near_dups": near_dup_annotator, "mode": mode, "filter_ratio": filter_ratio, "superbatch": superbatch,
              "fit_superbatch": True, "steps": steps, "seed": seed}
    return select_into_catalog("cabs", catalog, name, params, dataset=dataset, out=out).report.to_dict()


@task(name="export-webdataset", **RETRIES)
def export_task(catalog: str, dataset: str, selection: str, out_dir: str) -> dict[str, Any]:
    """The batch plan ``selection`` (a name in selections/, or a plan file) as WebDataset shards."""
    entry = EXPORTERS["webdataset"]
    if selection.endswith(".parquet"):  # a plan file (the older calling form)
        from pipeline.curate.webdataset_export import export_plan

        return export_plan(catalog, dataset, selection, out_dir, overwrite=True)
    # the flow owns this folder: a re-run replaces its previous export
    return entry.load()(catalog, selection, out_dir, True, **entry.validate({"dataset": dataset}))


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
    # Random-init CLIP embeddings are nearly collinear: their "near-duplicates" would swallow the
    # pool. Only a pretrained model's groups are allowed to remove samples from the plan.
    near_dup = f"near_dup_{out['clip']['image_model']}" if pretrained else None
    if not pretrained:
        print(f"no pretrained CLIP weights given: {model_name} has random weights, so its near-duplicate "
              "groups are recorded but not used to drop samples")
    out["plan"] = cabs_task(catalog, spec.dataset, name, {
        "near_dups": near_dup, "mode": mode, "filter_ratio": filter_ratio, "superbatch": superbatch,
        "fit_superbatch": True, "steps": steps, "seed": seed})
    out["export"] = export_task(catalog, spec.dataset, name, str(Path(catalog) / "exports" / name))
    out["report"] = report_task(catalog, spec.dataset, name, force)
    return out
