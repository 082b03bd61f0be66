"""Scheduled Prefect deployments of Thresher's flows.

``thresher serve --specs datasets.json --cron "0 3 * * *"`` registers the ingest flow with a
Prefect server (``PREFECT_API_URL``) and runs its scheduled runs in this process until stopped.
A spec file is a JSON list of objects with the fields of :class:`flows.ingest.IngestSpec`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from flows.ingest import IngestSpec, ingest_flow


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
    return ingest_flow.to_deployment(name=name, cron=cron, parameters=params,
                                     description="Ingest the configured datasets into the catalog; "
                                                 "unchanged datasets are skipped.")


def serve_ingest(specs_path: str, catalog: str, cron: str | None, workers: int = 1) -> None:  # pragma: no cover
    from prefect import serve

    serve(ingest_deployment(load_specs(specs_path), catalog, cron, workers=workers))
