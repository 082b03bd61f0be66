"""thresher report: a self-contained HTML page of plots about a dataset and its selection."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "report"
HELP = "write an HTML report (plots) of a dataset and, optionally, a selection or curated set"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True, help="the dataset the report describes")
    p.add_argument("--selection", help="a selection (selections/<name>) or curated set to compare with the dataset")
    p.add_argument("--out", help="HTML file to write (default: <catalog>/reports/<dataset>[--<selection>].html)")
    p.set_defaults(passes_extra_args=False)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.report import build_report

    path, _ = build_report(args.catalog, args.dataset, args.selection, args.out)
    print(f"report: {path}")
    return 0
