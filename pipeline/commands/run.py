"""thresher run: a curation pipeline spec (YAML) as a Prefect flow on your own data."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

NAME = "run"
HELP = "run a curation pipeline spec (YAML: datasets, steps, selection, exports) as a Prefect flow"
# Beam options after the spec (--runner dask --dask_client_address ...) go to the ingest jobs.
PASSES_EXTRA_ARGS = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the pipeline spec, e.g. examples/specs/instructions_mig.yaml")
    p.add_argument("--check", action="store_true", help="validate the spec and stop (nothing runs)")
    p.add_argument("--catalog", default=None, help="catalog folder (default: the spec's `catalog`)")
    p.add_argument("--workers", type=int, default=1, help="Beam worker processes per stage")
    p.add_argument("--force", action="store_true", help="redo every stage even if unchanged")


def load(args: argparse.Namespace):
    """The validated spec, with ``--catalog`` (if given) in place of its own."""
    from pipeline.spec import load_spec

    spec = load_spec(args.spec)
    if args.catalog:
        spec = spec.model_copy(update={"catalog": str(Path(args.catalog).expanduser().resolve())})
    return spec


def describe(spec) -> str:
    steps = ", ".join(s.step + (f"[{s.option}]" if s.option and s.option not in ("text", "clip") else "")
                      for s in spec.steps) or "none"
    sel = spec.selection
    selection = f"{sel.algorithm} {sel.params}" if sel else "none"
    return (f"pipeline {spec.name!r} ({spec.kind}): {len(spec.datasets)} dataset(s) "
            f"[{', '.join(d.dataset for d in spec.datasets)}]; steps: {steps}; selection: {selection}; "
            f"exports: {', '.join(spec.exports.formats) or 'none'}; catalog: {spec.catalog}")


@contextlib.contextmanager
def _api_settings(api_url: str | None):
    """Prefect settings pointing at this run's temporary server, drained before it stops.

    Prefect reads PREFECT_API_URL from the environment once per process; a second run in the
    same process (tests, a notebook) has a new server on a new port, so say so explicitly. On
    the way out, the events still queued for the server are sent while it is up: otherwise
    Prefect's event thread retries them against the stopped server at interpreter exit.
    """
    if not api_url:
        yield
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        try:
            yield
        finally:
            for worker in (APILogWorker, EventsWorker):
                worker.drain_all(timeout=10, at_exit=False)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    spec = load(args)  # a bad spec stops here, before Prefect, Beam or a model is loaded
    if args.check:
        print(f"ok: {describe(spec)}")
        return 0
    from flows.settings import LocalPrefectServer, configure_local_prefect

    configure_local_prefect()  # before Prefect is imported: it reads its settings once
    server = LocalPrefectServer()  # boots while the flows import (nothing when PREFECT_API_URL is set)
    try:
        from flows.run_spec import pipeline_flow, summary_lines

        with server, _api_settings(server.api_url):
            out = pipeline_flow(spec.to_dict(), workers=args.workers, force=args.force, beam_args=extra or None)
    finally:
        if server.api_url:  # the temporary server is gone: a later run in this process starts its own
            os.environ.pop("PREFECT_API_URL", None)
    print()
    print("\n".join(summary_lines(out)))
    print(f"\ncatalog: {spec.catalog}")
    print(f"try: thresher query --catalog {spec.catalog} "
          "\"SELECT stage, dataset, status, started_at FROM runs ORDER BY started_at DESC LIMIT 10\"")
    return 0
