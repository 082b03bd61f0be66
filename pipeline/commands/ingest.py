"""thresher ingest: the ingest Beam job."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands import add_catalog_argument

NAME = "ingest"
HELP = "ingest instruction or image-text files into the catalog (a Beam job; unknown --flags go to Beam)"
PASSES_EXTRA_ARGS = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="files or folders")
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True, help="name of the dataset partition to (re)build")
    p.add_argument("--kind", choices=["instruction", "image_text"], default="instruction")
    p.add_argument("--format", dest="container", default="auto",
                   help="container: auto | jsonl | json | parquet (instructions); "
                        "auto | image_folder | webdataset | parquet | nlvr (image-text)")
    p.add_argument("--layout", default="auto",
                   help="instruction layout: auto | alpaca | task_instances | prompt_completion | "
                        "question_answer | sharegpt | openai_messages | turns | xsample")
    p.add_argument("--caption-from", default=None, choices=["auto", "dirname", "none"],
                   help="image folders: where captions come from (default auto: sidecar file, then .txt)")
    p.add_argument("--shards", type=int, default=None, help="output shards (default: from input size)")
    p.add_argument("--workers", type=int, default=1, help="in-process Beam workers (processes)")
    p.add_argument("--max-record-bytes", type=int, default=None, help="reject records larger than this")
    p.add_argument("--force", action="store_true", help="rebuild even if inputs and parameters are unchanged")


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.beam.ingest import run_ingest
    from pipeline.io.sources import ReadLimits

    options = {"caption_from": args.caption_from} if args.caption_from else {}
    limits = ReadLimits(max_record_bytes=args.max_record_bytes) if args.max_record_bytes else ReadLimits()
    result = run_ingest(args.inputs, args.catalog, args.dataset, kind=args.kind, container=args.container,
                        layout=args.layout, options=options, num_shards=args.shards, workers=args.workers,
                        beam_args=beam_args, limits=limits, force=args.force)
    print(result.summary())
    print(f"  run ledger: {Path(result.catalog) / 'runs' / (result.run_id + '.json')}")
    return 0
