"""thresher ingest: the ingest Beam job."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import add_catalog_argument

NAME = "ingest"
HELP = "ingest instruction or image-text files into the catalog (a Beam job; Beam pipeline options such as --runner pass through)"
PASSES_EXTRA_ARGS = True
OBJECT_STORAGE = True  # --catalog may be an s3:// (any fsspec) URL: docs/object_storage.md


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
                        "question_answer | sharegpt | openai_messages | turns | xsample | hh_rlhf")
    p.add_argument("--caption-from", default=None, choices=["auto", "dirname", "none"],
                   help="image folders: where captions come from (default auto: sidecar file, then .txt)")
    p.add_argument("--image-column", default=None, metavar="NAME",
                   help="image-text: the column naming the image in caption sidecars (captions.csv, "
                        "metadata.jsonl, ...) and the image column of Parquet files (default: file_name, "
                        "image, file, filename, path, image_path, img, ...)")
    p.add_argument("--caption-column", default=None, metavar="NAME",
                   help="image-text: the caption column of sidecars and Parquet files "
                        "(default: caption, text, sentence, title, description, prompt)")
    p.add_argument("--shards", type=int, default=None, help="output shards (default: from input size)")
    p.add_argument("--workers", type=int, default=1, help="in-process Beam workers (processes)")
    p.add_argument("--max-record-bytes", type=int, default=None, help="reject records larger than this")
    p.add_argument("--force", action="store_true", help="rebuild even if inputs and parameters are unchanged")


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.io.units import ReadLimits
    from pipeline.stages.ingest import run_ingest

    options = {}
    if args.caption_from:
        options["caption_from"] = args.caption_from
    for flag, name in (("--image-column", "image_column"), ("--caption-column", "caption_column")):
        value = getattr(args, name)
        if value is None:
            continue
        if args.kind != "image_text":
            raise ValueError(f"{flag} applies to --kind image_text only")
        if not value.strip():
            raise ValueError(f"{flag} needs a column name")
        options[name] = value.strip()
    limits = ReadLimits(max_record_bytes=args.max_record_bytes) if args.max_record_bytes else ReadLimits()
    result = run_ingest(args.inputs, args.catalog, args.dataset, kind=args.kind, container=args.container,
                        layout=args.layout, options=options, num_shards=args.shards, workers=args.workers,
                        beam_args=beam_args, limits=limits, force=args.force)
    print(result.summary())
    print(f"  run ledger: {result.catalog.rstrip('/')}/runs/{result.run_id}.json")
    counts = result.counts
    if counts.get("samples", 0) == 0 and counts.get("rejects", 0) > 0:
        print(all_rejected_message(counts), file=sys.stderr)
        for line in _reject_examples(result.catalog, result.dataset, counts):
            print(line, file=sys.stderr)
        return 1
    return 0


def all_rejected_message(counts: dict) -> str:
    """The one line that says an ingest produced nothing: every row rejected, and mostly why."""
    reasons = sorted(counts.get("reject_reasons", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    top = ", ".join(f"{reason} x{n:,}" for reason, n in reasons[:3])
    more = f" and {len(reasons) - 3} more reason(s)" if len(reasons) > 3 else ""
    return (f"thresher ingest: error: ALL {counts.get('rejects', 0):,} ROWS WERE REJECTED, 0 samples "
            f"(top reasons: {top}{more}); see the rejects table for every row")


def _reject_examples(catalog: str, dataset: str, counts: dict, per_reason: int = 1) -> list[str]:
    """One example detail per top reason (what to fix), read back from the committed rejects."""
    try:
        import pyarrow.dataset as pads

        from pipeline.io.catalog import Catalog

        cat = Catalog.at(catalog)
        part = cat.local_input(cat.partition("rejects", dataset))  # downloaded if on object storage
        table = pads.dataset(str(part), format="parquet").to_table(columns=["reason", "detail"])
    except Exception:  # noqa: BLE001 - the examples are a courtesy; the line above already said it all
        return []
    reasons = sorted(counts.get("reject_reasons", {}).items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    lines = []
    rows = table.to_pylist()
    for reason, _ in reasons:
        details = [r["detail"] for r in rows if r["reason"] == reason][:per_reason]
        lines.extend(f"  {reason}: {d[:400]}" for d in details)
    return lines
