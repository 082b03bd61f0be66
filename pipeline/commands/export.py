"""thresher export: a curated set or a batch plan through a registered exporter (pipeline.registry.EXPORTERS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands import add_catalog_argument
from pipeline.registry import EXPORTERS

NAME = "export"
OBJECT_STORAGE_OUT = True  # --out may be an s3:// (any fsspec) URL: exported locally, then published
HELP = ("export for trainers with a manifest: " + ", ".join(f"{e.name} ({e.help})" for e in EXPORTERS.values()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--format", required=True, choices=list(EXPORTERS))
    p.add_argument("--curated", help=f"{', '.join(EXPORTERS.names(group='curated'))}: name of the curated set")
    p.add_argument("--selection", help="webdataset: a batch plan in the catalog (selections/<name>/ of "
                                       "`thresher select cabs`)")
    p.add_argument("--plan", help="webdataset: or a PLAN.parquet file (`thresher select cabs --out`)")
    p.add_argument("--dataset", help="webdataset: the image-text dataset the plan draws from")
    wds = EXPORTERS["webdataset"]
    for name in ("samples_per_shard", "min_shards", "shards_per_step"):
        param = wds.param(name)
        p.add_argument(param.flag, type=param.type, default=param.default, help=f"webdataset: {param.help}")
    p.add_argument("--out", required=True, help="output folder: data files, a dataset card README.md (load it with "
                                              "datasets.load_dataset(OUT)) and .manifest.json; docs/exports.md")
    p.add_argument("--rows-per-file", type=int, default=EXPORTERS["sharegpt"].param("rows_per_file").default)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in --out (the whole folder; never merged). Without it a "
                        "non-empty --out is refused; a folder that holds no Thresher export is never replaced")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.io.storage import is_url

    if not is_url(args.out):
        return _export(args, args.out, args.overwrite, args.out)
    import tempfile

    from pipeline.io.storage import publish_export

    # Object storage has no folder swap: build the whole export locally, then publish it with its
    # manifest uploaded last (a reader sees one whole export or none; docs/object_storage.md).
    with tempfile.TemporaryDirectory(prefix="thresher-export-") as tmp:
        code = _export(args, str(Path(tmp) / "export"), False, args.out)
        urls = publish_export(Path(tmp) / "export", args.out, args.overwrite)
    print(f"published {len(urls)} files to {args.out}")
    return code


def _export(args: argparse.Namespace, out: str, overwrite: bool, shown: str) -> int:
    entry = EXPORTERS[args.format]
    if entry.group == "plan":
        if not args.dataset or bool(args.plan) == bool(args.selection):
            raise ValueError(f"--format {args.format} needs --dataset NAME and one of --selection NAME or "
                             "--plan PLAN.parquet")
        params = entry.validate({"dataset": args.dataset, "samples_per_shard": args.samples_per_shard,
                                 "min_shards": args.min_shards, "shards_per_step": args.shards_per_step})
        if args.selection:
            m = entry.load()(args.catalog, args.selection, out, overwrite, **params)
        else:
            from pipeline.curate.webdataset_export import export_plan

            m = export_plan(args.catalog, args.dataset, args.plan, out, args.samples_per_shard,
                            overwrite=overwrite, min_shards=args.min_shards, shards_per_step=args.shards_per_step)
        print(f"exported {m['samples']} samples of {m['steps']} steps as {len(m['shards'])} WebDataset shards "
              f"to {shown}" + (f"; {m['missing_from_dataset']} plan rows not in the dataset"
                                  if m["missing_from_dataset"] else ""))
        return 0
    if not args.curated:
        raise ValueError(f"--format {args.format} needs --curated NAME")
    params = entry.validate({"rows_per_file": args.rows_per_file})
    m = entry.load()(args.catalog, args.curated, out, overwrite, **params)
    left_out = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(m["filtered"].items()))
    print(f"exported {m['rows']} {'preference pairs' if args.format == 'dpo' else 'conversations'} as {args.format} "
          f"to {shown} ({len(m['files'])} files)" + (f"; left out: {left_out}" if left_out else ""))
    return 0
