"""thresher export: curated shards -> trainer-ready JSONL (ShareGPT, Alpaca, OpenAI) or Parquet."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "export"
HELP = "export a curated set for SFT trainers (sharegpt | alpaca | openai JSONL, or parquet) with a manifest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--curated", required=True, help="name of the curated set")
    p.add_argument("--format", required=True, choices=["sharegpt", "alpaca", "openai", "parquet"])
    p.add_argument("--out", required=True, help="output folder (data files + manifest.json)")
    p.add_argument("--rows-per-file", type=int, default=100_000)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.curate.materialise import export

    m = export(args.catalog, args.curated, args.format, args.out, args.rows_per_file)
    print(f"exported {m['rows']} conversations as {args.format} to {args.out} ({len(m['files'])} files)"
          + (f"; {m['skipped_without_answer']} without an assistant answer left out" if m["skipped_without_answer"] else ""))
    return 0
