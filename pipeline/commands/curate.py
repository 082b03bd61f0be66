"""thresher curate: materialise a selection as curated Parquet shards."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "curate"
HELP = "join a selection (OUT.parquet of `thresher select`) with its samples into curated/<name>/ shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--picks", required=True, help="Parquet with rank, sample_id, gain (e.g. from `thresher select mig`)")
    p.add_argument("--name", required=True, help="name of the curated set")
    p.add_argument("--algorithm", default="mig")
    p.add_argument("--rows-per-shard", type=int, default=50_000)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.curate.materialise import materialise_instructions

    r = materialise_instructions(args.catalog, args.dataset, args.picks, args.name, args.algorithm,
                                 args.rows_per_shard)
    print(f"curated {r.rows} samples into {r.path} ({r.shards} shards)"
          + (f"; {r.missing} picks not found in dataset {args.dataset!r}" if r.missing else ""))
    return 0
