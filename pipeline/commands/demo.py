"""thresher demo: curate the shipped demo data end to end (in-process, offline)."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "curate the demo data shipped with the repo (in-process Prefect + Beam, offline)"


def add_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--catalog", default="catalog/demo", help="where to write the demo catalog")
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--force", action="store_true", help="redo every stage even if unchanged")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from flows.settings import LocalPrefectServer, configure_local_prefect

    configure_local_prefect()  # before Prefect is imported: it reads its settings once
    server = LocalPrefectServer()  # boots while the flows import
    from flows.demo import run_demo

    with server:
        return run_demo(args.catalog, workers=args.workers, force=args.force)
