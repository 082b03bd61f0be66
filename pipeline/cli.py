"""The ``thresher`` command line.

Every sub-command is a thin layer over a library function; flags map one-to-one to its
parameters. Unknown ``--flags`` after ``ingest`` are passed to Beam unchanged, so the same job
runs on Flink, Spark or Dataflow (``--runner FlinkRunner --flink_master ...``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_CATALOG = os.environ.get("THRESHER_CATALOG", "catalog")


def _quiet_logs() -> None:
    # Beam logs every worker start at INFO; users want the summary, not the harness chatter.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Beam warns at import that optional Google Cloud clients are missing; irrelevant offline.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
    for name in ("apache_beam", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _add_catalog(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", default=DEFAULT_CATALOG,
                   help="catalog folder (default: $THRESHER_CATALOG or ./catalog)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thresher", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="ingest instruction or image-text files into the catalog (a Beam job)",
                       description="Ingest files or folders. Unknown --flags are passed to Beam.")
    p.add_argument("inputs", nargs="+", help="files or folders")
    _add_catalog(p)
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

    q = sub.add_parser("query", help="run SQL or a named query over the catalog with DuckDB")
    q.add_argument("sql", nargs="?", help="SQL text, or the name of a query in sql/queries (e.g. reject_reasons)")
    _add_catalog(q)
    q.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"])
    q.add_argument("--output", help="write the result to this file instead of stdout")
    q.add_argument("--param", action="append", default=[], help="bind a value to the next ? in the SQL")
    q.add_argument("--max-rows", type=int, default=50, help="rows to print in table format")
    q.add_argument("--list", action="store_true", help="list the views and named queries")

    s = sub.add_parser("serve", help="serve the ingest flow as a scheduled Prefect deployment (needs a Prefect server)")
    s.add_argument("--specs", required=True, help="JSON list of {dataset, inputs, kind, container, layout, options}")
    _add_catalog(s)
    s.add_argument("--cron", default=None, help='schedule, e.g. "0 3 * * *" (default: run on demand only)')
    s.add_argument("--workers", type=int, default=1)

    d = sub.add_parser("demo", help="curate the demo data shipped with the repo (in-process, offline)")
    d.add_argument("--catalog", default="catalog/demo", help="where to write the demo catalog")
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--force", action="store_true")
    return parser


def cmd_ingest(args: argparse.Namespace, beam_args: list[str]) -> int:
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


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline import query

    if args.list:
        print("views:", ", ".join(query._VIEW_FILES))
        for name, path in query.named_queries().items():
            first = path.read_text().splitlines()[0].lstrip("- ")
            print(f"  {name:<24}{first}")
        return 0
    if not args.sql:
        print("thresher query: give SQL or a named query (see --list)", file=sys.stderr)
        return 2
    table = query.run_query(args.catalog, args.sql, args.param)
    query.write_result(table, args.format, path=args.output, max_rows=args.max_rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.settings import configure_local_prefect

    configure_local_prefect()  # before Prefect is imported: it reads its settings once
    from flows.demo import run_demo

    return run_demo(args.catalog, workers=args.workers, force=args.force)


def cmd_serve(args: argparse.Namespace) -> int:  # pragma: no cover - blocks until stopped
    from flows.deployments import serve_ingest

    serve_ingest(args.specs, args.catalog, args.cron, workers=args.workers)
    return 0


def main(argv: list[str] | None = None) -> int:
    import duckdb

    _quiet_logs()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "ingest":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        if args.command == "ingest":
            return cmd_ingest(args, extra)
        if args.command == "query":
            return cmd_query(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "serve":
            return cmd_serve(args)
    except (FileNotFoundError, ValueError, KeyError, duckdb.Error) as exc:
        print(f"thresher {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
