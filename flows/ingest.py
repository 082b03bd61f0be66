"""Prefect flows for ingest: each input dataset is one task (retried), the flow only composes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, task

from pipeline.stages.ingest import IngestResult, run_ingest


@dataclass
class IngestSpec:
    """One dataset to ingest: what the CLI flags say, as data a flow or deployment can carry."""

    dataset: str
    inputs: list[str]
    kind: str = "instruction"
    container: str = "auto"
    layout: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@task(name="ingest-dataset", retries=2, retry_delay_seconds=5, task_run_name="ingest-{spec.dataset}")
def ingest_task(spec: IngestSpec, catalog: str, workers: int = 1, beam_args: list[str] | None = None,
                force: bool = False) -> dict[str, Any]:
    result: IngestResult = run_ingest(spec.inputs, catalog, spec.dataset, kind=spec.kind,
                                      container=spec.container, layout=spec.layout, options=spec.options,
                                      workers=workers, beam_args=beam_args, force=force)
    return asdict(result)


@flow(name="ingest", log_prints=True)
def ingest_flow(specs: list[IngestSpec], catalog: str, workers: int = 1, beam_args: list[str] | None = None,
                force: bool = False) -> list[dict[str, Any]]:
    """Ingest every dataset of ``specs`` into ``catalog``; unchanged datasets are skipped."""
    # One dataset after another: each Beam job already uses every worker it was given, and two
    # in-process Beam runners in threads of one process would only compete for the same cores.
    return [ingest_task(spec, catalog, workers, beam_args, force) for spec in specs]
