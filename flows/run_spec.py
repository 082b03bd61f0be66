"""``thresher-pipeline``: one Prefect flow that runs any validated pipeline spec (``pipeline/spec.py``).

The flow composes the tasks the curation flows already define (``flows/ingest.py``,
``flows/curate_instructions.py``, ``flows/curate_image_text.py``): ingest every dataset, then for
each one the spec's steps in the spec's order, its selection, the curated set and its exports.
Every task keeps its retries and its skip-if-unchanged behaviour, so a scheduled re-run of an
unchanged spec redoes nothing but the exports (rewritten whole each run).

The flow takes the spec as plain data (``PipelineSpec.to_dict()``: absolute paths) and validates
it again when it starts: a deployment's parameters can be edited in the Prefect UI, and a
scheduled run should fail on a bad edit with the same clear message as ``thresher run --check``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows import curate_image_text as image_text
from flows import curate_instructions as instructions
from flows.ingest import IngestSpec, ingest_task
from pipeline.spec import NOT_CURATABLE, PipelineSpec, validate_spec


def _instruction_dataset(spec: PipelineSpec, dataset: str, workers: int, force: bool) -> dict[str, Any]:
    catalog, out = spec.catalog, {}
    model = None  # the embeddings folder the embed step wrote (what the index and GAIS read)
    for step in spec.steps:
        if step.step == "embed":
            out["embed"] = instructions.embed_task(catalog, dataset, workers, force, step.params["tier"],
                                                   step.params["precision"])
            model = out["embed"]["model"]
        elif step.step == "index":
            out["index"] = instructions.index_task(catalog, dataset, model, step.params["near_dup_threshold"], force)
        else:  # tags, quality: one registered annotator each
            out[step.step] = instructions.annotate_task.with_options(name=f"annotate-{step.step}")(
                catalog, dataset, step.impl, workers, force, step.params)
    sel = spec.selection
    if sel is None:
        return out
    name = spec.curated_name(dataset)  # selections/<name>/, curated/<name>/
    params = dict(sel.params)
    if sel.algorithm == "mig":
        # near-copies the index step marked leave MIG's pool (the curate_instructions rule)
        params["near_dups"] = f"near_dup_{model}" if "index" in out and not params["keep_near_duplicates"] else None
    elif sel.algorithm == "gais":
        params.update(embeddings=model, sample_kind="instruction")
    out["selection"] = instructions.select_task.with_options(name=f"select-{sel.algorithm}")(
        catalog, dataset, sel.algorithm, name, params)
    out["selection_dir"] = str(Path(catalog) / "selections" / name)
    if sel.algorithm not in NOT_CURATABLE:
        out["curate"] = instructions.curate_task(catalog, dataset, name, name, spec.export_dir(dataset),
                                                 list(spec.exports.formats))
        out["export_dir"] = spec.export_dir(dataset)
    return out


def _image_text_dataset(spec: PipelineSpec, dataset: str, workers: int, force: bool) -> dict[str, Any]:
    catalog, out = spec.catalog, {}
    pretrained = None
    for step in spec.steps:
        p = step.params
        if step.step == "concepts":
            out["concepts"] = image_text.concepts_task(catalog, dataset, workers, force, step.impl, p)
        elif step.step == "embed":
            pretrained = p["pretrained"]
            out["embed"] = image_text.clip_task(catalog, dataset, p["model_name"], pretrained, workers, force)
        elif step.step == "index":
            out["index"] = image_text.index_task(catalog, dataset, out["embed"]["image_model"],
                                                 p["near_dup_threshold"], force)
    sel = spec.selection
    if sel is None:
        return out
    name = spec.curated_name(dataset)
    # As in curate_image_text: random-init CLIP vectors are nearly collinear, so only a pretrained
    # model's near-duplicate groups may remove samples from the plan.
    near = f"near_dup_{out['embed']['image_model']}" if pretrained and "index" in out else None
    if "index" in out and not pretrained:
        print(f"{dataset}: no pretrained CLIP weights, so the near-duplicate groups are recorded but not used")
    out["selection"] = image_text.cabs_task(catalog, dataset, name, {**sel.params, "near_dups": near})
    out["selection_dir"] = str(Path(catalog) / "selections" / name)
    if "webdataset" in spec.exports.formats:
        out["export"] = image_text.export_task(catalog, dataset, name, spec.export_dir(dataset))
        out["export_dir"] = spec.export_dir(dataset)
    return out


@flow(name="thresher-pipeline", log_prints=True)
def pipeline_flow(spec: dict[str, Any], workers: int = 1, force: bool = False,
                  beam_args: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline ``spec`` (a ``PipelineSpec.to_dict()``); returns every task's summary.

    ``beam_args`` (e.g. ``--runner dask --dask_client_address tcp://HOST:8786``) reach the ingest
    jobs; the later stages' tasks take no Beam options yet and run on the local runner.
    """
    s = validate_spec(spec, source=f"pipeline {spec.get('name', '?')!r}")
    # One dataset after another: each Beam job already uses every worker it was given.
    ingest = [ingest_task(IngestSpec(**d.ingest_fields()), s.catalog, workers, beam_args or None, force)
              for d in s.datasets]
    per_dataset = _instruction_dataset if s.kind == "instruction" else _image_text_dataset
    return {"name": s.name, "kind": s.kind, "catalog": s.catalog, "ingest": ingest,
            "datasets": {d.dataset: per_dataset(s, d.dataset, workers, force) for d in s.datasets}}


def summary_lines(out: dict[str, Any]) -> list[str]:
    """A few lines per dataset, like the demo's: ingest counts, the selection, the outputs."""
    lines = [f"=== pipeline {out['name']} ({out['kind']}) ===", "ingest:"]
    for r in out["ingest"]:
        c = r["counts"]
        status = " (unchanged, skipped)" if r["skipped"] else ""
        lines.append(f"  {r['dataset']:<20} rows in {c['rows_in']:>7}  samples {c['samples']:>7}  "
                     f"rejects {c['rejects']:>5}  duplicates {c['duplicates']:>5}{status}")
    for dataset, res in out["datasets"].items():
        done = [k for k in res if k not in ("selection", "selection_dir", "curate", "export", "export_dir")]
        lines.append(f"{dataset}: steps {', '.join(done) or 'none'}")
        sel = res.get("selection")
        if sel is None:
            continue
        if "information" in sel:  # MIG
            lines.append(f"  MIG picked {sel['budget']} of {sel['n_pool']} samples over {sel['n_labels']} tags "
                         f"(E(D) {sel['information']:.1f} vs random {sel['random_information_mean']:.1f}; tag "
                         f"coverage {sel['coverage_selected']}/{sel['coverage_pool']}); near-copies excluded: "
                         f"{sel['notes'].get('near_duplicates_excluded', 0)}")
        elif "achieved_reduction" in sel:  # GAIS
            lines.append(f"  GAIS-{sel['variant']} kept {sel['selected']} of {sel['n']} "
                         f"(reduction {sel['achieved_reduction']:.3f})")
        else:  # CABS
            lines.append(f"  CABS-{sel['mode'].upper()} plan of {sel['steps']} steps, super-batch {sel['superbatch']} "
                         f"-> batch {sel['batch']}; distinct concepts per batch "
                         f"{sel['cabs']['distinct_concepts']:.1f} (IID {sel['iid']['distinct_concepts']:.1f})")
        lines.append(f"  selection: {res['selection_dir']}")
        if "curate" in res:
            lines.append(f"  curated: {res['curate']['curated']['path']} ({res['curate']['curated']['rows']} rows)")
            if res["curate"]["exports"]:
                lines.append(f"  exports: {res['curate']['exports']} in {res['export_dir']}")
        if "export" in res:
            lines.append(f"  WebDataset: {res['export']['samples']} samples in {len(res['export']['shards'])} "
                         f"shard(s) in {res['export_dir']}")
    return lines
