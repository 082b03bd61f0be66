"""The ``thresher`` command line.

Each sub-command lives in its own module under ``pipeline/commands`` and is a thin layer over a
library function. Unknown ``--flags`` after ``ingest`` go to Beam unchanged, so the same job runs
on Flink, Spark or Dataflow (``--runner FlinkRunner --flink_master ...``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType

import pipeline.commands


def _quiet_logs() -> None:
    # Beam logs every worker start at INFO; users want the summary, not the harness chatter.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Beam warns at import that optional Google Cloud clients are missing; irrelevant offline.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


def command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in sorted(pkgutil.iter_modules(pipeline.commands.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"pipeline.commands.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            modules[mod.NAME] = mod
    return modules


def build_parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thresher", description="Thresher: curate training data with Beam jobs, Prefect flows, FAISS and DuckDB.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in modules.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    import duckdb

    _quiet_logs()
    modules = command_modules()
    parser = build_parser(modules)
    args, extra = parser.parse_known_args(argv)
    mod = modules[args.command]
    if extra and not getattr(mod, "PASSES_EXTRA_ARGS", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return mod.run(args, extra)
    except (FileNotFoundError, ValueError, KeyError, duckdb.Error) as exc:
        print(f"thresher {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
