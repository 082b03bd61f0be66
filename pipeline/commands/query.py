"""thresher query: SQL or a named query over the catalog with DuckDB."""

from __future__ import annotations

import argparse
import sys
import warnings

from pipeline.commands import add_catalog_argument

NAME = "query"
HELP = "run SQL or a named query over the catalog with DuckDB"
OBJECT_STORAGE = True  # --catalog may be an s3:// (any fsspec) URL: docs/object_storage.md


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("sql", nargs="?", help="SQL text, or the name of a query in sql/queries (e.g. reject_reasons)")
    add_catalog_argument(q)
    q.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"])
    q.add_argument("--output", help="write the result to this file instead of stdout")
    q.add_argument("--param", action="append", default=[], help="bind a value to the next ? in the SQL")
    q.add_argument("--max-rows", type=int, default=50, help="rows to print in table format")
    q.add_argument("--list", action="store_true", help="list the views and named queries")
    q.add_argument("--safe", action="store_true",
                   help="confine the SQL to the catalog: read-only queries, no files outside the catalog, "
                        "no ATTACH/COPY/SET/extensions (use for SQL from other people, e.g. a served or "
                        "scheduled query); without it the SQL can read and write any file you can")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline import query

    if args.list:
        print("views:", ", ".join(query.VIEW_NAMES))
        for name, path in query.named_queries().items():
            first = path.read_text().splitlines()[0].lstrip("- ")
            print(f"  {name:<24}{first}")
        return 0
    if not args.sql:
        print("thresher query: give SQL or a named query (see --list)", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", query.DamagedTableWarning)
        try:
            table = query.run_query(args.catalog, args.sql, args.param, safe=args.safe)
        finally:
            for w in caught:
                if issubclass(w.category, query.DamagedTableWarning):
                    print(f"thresher query: warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    query.write_result(table, args.format, path=args.output, max_rows=args.max_rows)
    return 0
