"""thresher deploy: a curation pipeline spec as a scheduled Prefect deployment."""

from __future__ import annotations

import argparse

NAME = "deploy"
HELP = "serve a pipeline spec as a scheduled Prefect deployment (needs a Prefect server: PREFECT_API_URL)"
PASSES_EXTRA_ARGS = True  # Beam options for the ingest jobs of every scheduled run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the pipeline spec (YAML), validated before anything is registered")
    p.add_argument("--cron", default=None, help='schedule, e.g. "0 3 * * *" (default: run on demand only)')
    p.add_argument("--name", default=None, help="deployment name (default: the spec's name)")
    p.add_argument("--catalog", default=None, help="catalog folder (default: the spec's `catalog`)")
    p.add_argument("--workers", type=int, default=1, help="Beam worker processes per stage")


def run(args: argparse.Namespace, extra: list[str]) -> int:  # pragma: no cover - blocks until stopped
    from pipeline.commands.run import describe, load

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    spec = load(args)
    from flows.deployments import pipeline_deployment, require_api_url

    # a bad --cron stops here, before the server is asked for
    deployment = pipeline_deployment(spec, args.cron, args.name, args.workers, beam_args=extra)
    url = require_api_url("thresher deploy")
    print(f"serving {describe(spec)}")
    print(f"deployment {deployment.name!r} on {url}, schedule: {args.cron or 'none (run on demand)'}; Ctrl-C stops")
    from prefect import serve

    serve(deployment)
    return 0
