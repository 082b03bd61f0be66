"""Scheduled Prefect deployments of Thresher's flows.

``thresher deploy SPEC.yaml --cron "0 3 * * *"`` registers a whole curation pipeline (a spec,
see ``pipeline/spec.py``) with a Prefect server (``PREFECT_API_URL``) as a deployment of the
``thresher-pipeline`` flow, and runs its scheduled runs in this process until stopped.
``thresher serve --specs datasets.json --cron ...`` does the same for the ingest flow alone; its
file is a JSON list of objects with the fields of :class:`flows.ingest.IngestSpec`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.ingest import IngestSpec, ingest_flow
from pipeline.spec import PipelineSpec


def load_specs(path: str | Path) -> list[IngestSpec]:
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of dataset specs")
    allowed = {f.name for f in fields(IngestSpec)}
    specs = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict) or not {"dataset", "inputs"} <= set(item):
            raise ValueError(f"{path}: spec #{k} needs at least 'dataset' and 'inputs'")
        unknown = set(item) - allowed
        if unknown:
            raise ValueError(f"{path}: spec #{k} has unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        specs.append(IngestSpec(**item))
    return specs


def ingest_deployment(specs: list[IngestSpec], catalog: str, cron: str | None = None,
                      name: str = "thresher-ingest", workers: int = 1) -> Any:
    """A RunnerDeployment of the ingest flow with its parameters and (optional) cron schedule."""
    params = {"specs": [s.__dict__ for s in specs], "catalog": str(Path(catalog).resolve()), "workers": workers}
    return _to_deployment(ingest_flow, cron, name=name, parameters=params,
                          description="Ingest the configured datasets into the catalog; "
                                      "unchanged datasets are skipped.")


def serve_ingest(specs_path: str, catalog: str, cron: str | None, workers: int = 1) -> None:  # pragma: no cover
    from prefect import serve

    require_api_url("thresher serve")
    serve(ingest_deployment(load_specs(specs_path), catalog, cron, workers=workers))


def require_api_url(command: str) -> str:
    """The Prefect server a deployment registers with; a clear error when none is configured.

    Without one, Prefect would serve against a temporary in-process server that dies with the
    command, so the schedule would exist nowhere else: refuse instead.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError(f"{command} registers a deployment with a Prefect server, and PREFECT_API_URL is not set: "
                         "start one (`prefect server start`, or `docker compose -f infra/docker-compose.yml up`) "
                         "and export PREFECT_API_URL=http://HOST:4200/api")
    return url


def _to_deployment(flow: Any, cron: str | None, **kwargs: Any) -> Any:
    from prefect.types.entrypoint import EntrypointType

    try:
        # By module path (flows.ingest.ingest_flow), not file path: a scheduled run imports the
        # installed package from any working directory, and a file loaded as a script would be
        # imported under its bare file name.
        return flow.to_deployment(cron=cron, entrypoint_type=EntrypointType.MODULE_PATH, **kwargs)
    except ValidationError as exc:  # Prefect's CronSchedule refuses the expression
        if cron is not None and any("cron" in map(str, e.get("loc", ())) for e in exc.errors()):
            raise ValueError(f"--cron {cron!r} is not a cron expression: five fields, minute hour day-of-month "
                             "month day-of-week, e.g. \"0 3 * * *\" (03:00 every day)") from None
        raise


def pipeline_deployment(spec: PipelineSpec, cron: str | None = None, name: str | None = None,
                        workers: int = 1, beam_args: list[str] | None = None) -> Any:
    """A RunnerDeployment of ``thresher-pipeline`` carrying the validated spec (absolute paths).

    The spec travels as the deployment's parameters, so each scheduled run curates what the spec
    said when it was deployed (re-deploy after editing the file); the flow validates it again.
    """
    from flows.run_spec import pipeline_flow

    params = {"spec": spec.to_dict(), "workers": workers}
    if beam_args:
        params["beam_args"] = list(beam_args)
    selection = f", selection {spec.selection.algorithm}" if spec.selection else ""
    return _to_deployment(pipeline_flow, cron, name=name or spec.name, parameters=params,
                          tags=["thresher", spec.kind],
                          description=f"Thresher pipeline {spec.name!r}: {len(spec.datasets)} {spec.kind} dataset(s)"
                                      f"{selection}; unchanged stages are skipped.")


def serve_pipeline(spec: PipelineSpec, cron: str | None, name: str | None = None, workers: int = 1,
                   beam_args: list[str] | None = None) -> None:  # pragma: no cover - blocks until stopped
    from prefect import serve

    require_api_url("thresher deploy")
    serve(pipeline_deployment(spec, cron, name, workers, beam_args))
