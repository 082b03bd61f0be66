"""thresher export: curated shards -> trainer-ready JSONL (ShareGPT, Alpaca, OpenAI) or Parquet."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "export"
HELP = ("export a curated instruction set for SFT trainers (sharegpt | alpaca | openai JSONL, or parquet), "
        "or an image-text batch plan as WebDataset tars (webdataset), with a manifest")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--curated", help="name of the curated instruction set")
    p.add_argument("--format", required=True, choices=["sharegpt", "alpaca", "openai", "parquet", "webdataset"])
    p.add_argument("--plan", help="webdataset: PLAN.parquet from `thresher select cabs`")
    p.add_argument("--dataset", help="webdataset: the image-text dataset the plan draws from")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--out", required=True, help="output folder (data files + manifest.json)")
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in --out (the whole folder; never merged). Without it a "
                        "non-empty --out is refused; a folder that holds no Thresher export is never replaced")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.format == "webdataset":
        from pipeline.curate.webdataset_export import export_plan

        if not (args.plan and args.dataset):
            raise ValueError("--format webdataset needs --plan PLAN.parquet and --dataset NAME")
        m = export_plan(args.catalog, args.dataset, args.plan, args.out, args.samples_per_shard,
                        overwrite=args.overwrite)
        print(f"exported {m['samples']} samples of {m['steps']} steps as {len(m['shards'])} WebDataset shards "
              f"to {args.out}" + (f"; {m['missing_from_dataset']} plan rows not in the dataset" if m["missing_from_dataset"] else ""))
        return 0
    from pipeline.curate.materialise import export

    if not args.curated:
        raise ValueError(f"--format {args.format} needs --curated NAME")

    m = export(args.catalog, args.curated, args.format, args.out, args.rows_per_file, overwrite=args.overwrite)
    print(f"exported {m['rows']} conversations as {args.format} to {args.out} ({len(m['files'])} files)"
          + (f"; {m['skipped_without_answer']} without an assistant answer left out" if m["skipped_without_answer"] else ""))
    return 0
