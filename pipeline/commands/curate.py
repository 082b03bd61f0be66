"""thresher curate: materialise a selection as curated Parquet shards."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "curate"
HELP = "join a selection (selections/<name>/ of `thresher select`, or a picks file) with its samples into curated/<name>/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--selection", help="a selection in the catalog (selections/<name>/, from `thresher select`)")
    src.add_argument("--picks", help="or: a Parquet file with rank, sample_id, gain (e.g. `thresher select ... --out`)")
    p.add_argument("--name", help="name of the curated set (default: the selection's name)")
    p.add_argument("--algorithm", default=None, help="recorded with a picks file (default: the selection's selector, "
                                                     "else mig)")
    p.add_argument("--rows-per-shard", type=int, default=50_000)
    p.add_argument("--force", action="store_true", help="rebuild even if the picks, samples and annotations are unchanged")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.curate.materialise import materialise_instructions

    name = args.name or args.selection
    if not name:
        raise ValueError("--picks FILE needs --name NAME (the curated set's name)")
    r = materialise_instructions(args.catalog, args.dataset, args.picks, name, args.algorithm, args.rows_per_shard,
                                 selection=args.selection, force=args.force)
    print(f"curated {r.rows} samples into {r.path} ({r.shards} shards)"
          + (f"; {r.missing} picks not found in dataset {args.dataset!r}" if r.missing else "")
          + (f"; {r.without_assistant_answer} without an assistant answer (kept here, left out of SFT exports)"
             if r.without_assistant_answer else ""))
    return 0
