"""thresher serve: the ingest flow alone as a scheduled Prefect deployment (``thresher deploy``
serves a whole pipeline spec)."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "serve"
HELP = ("serve the ingest flow as a scheduled Prefect deployment (needs a Prefect server; "
        "`thresher deploy SPEC.yaml` serves a whole pipeline)")


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--specs", required=True, help="JSON list of {dataset, inputs, kind, container, layout, options}")
    add_catalog_argument(s)
    s.add_argument("--cron", default=None, help='schedule, e.g. "0 3 * * *" (default: run on demand only)')
    s.add_argument("--workers", type=int, default=1)


def run(args: argparse.Namespace, extra: list[str]) -> int:  # pragma: no cover - blocks until stopped
    from flows.deployments import serve_ingest

    serve_ingest(args.specs, args.catalog, args.cron, workers=args.workers)
    return 0
