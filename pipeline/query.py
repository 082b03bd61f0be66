"""DuckDB over a catalog: a view per table (defined in ``sql/views``) and named queries (``sql/queries``).

The catalog root reaches SQL only as a DuckDB variable set with a bound parameter
(``SET VARIABLE thresher_root = ?``), never by string interpolation. A table that has no files yet
is still a view — an empty one with the right columns — so queries never fail for lack of data.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from pathlib import Path
from typing import IO

import duckdb
import pyarrow as pa

import schemas


def sql_dir() -> Path:
    """``sql/`` at the project root (installed editable) or beside the package (wheel data)."""
    for candidate in (Path(__file__).resolve().parents[1] / "sql", Path(sys.prefix) / "share" / "thresher" / "sql"):
        if (candidate / "views").is_dir():
            return candidate
    raise FileNotFoundError("cannot find Thresher's sql/ folder; install the project with `pip install -e .`")


# view name -> (glob under the root that must match at least one file, schema of the empty view)
_VIEW_FILES = {
    "samples": ("samples/instruction/*/*.parquet", schemas.INSTRUCTION_SAMPLES),
    "image_samples": ("samples/image_text/*/*.parquet", schemas.IMAGE_TEXT_SAMPLES),
    "rejects": ("rejects/*/*.parquet", schemas.REJECTS),
    "duplicates": ("duplicates/*/*.parquet", schemas.DUPLICATES),
    "tags": ("annotations/*_tags/*/*.parquet", schemas.TAG_ANNOTATIONS),
    "quality": ("annotations/*_quality/*/*.parquet", schemas.QUALITY_ANNOTATIONS),
    "concepts": ("annotations/*_concepts/*/*.parquet", schemas.CONCEPT_ANNOTATIONS),
    "selections": ("selections/*/*.parquet", schemas.SELECTIONS),
    "curated": ("curated/*/*.parquet", schemas.CURATED_INSTRUCTIONS),
    "near_duplicates": ("annotations/near_dup_*/*/*.parquet", schemas.NEAR_DUP_ANNOTATIONS),
    "runs": ("runs/*.json", None),
}


VIEW_NAMES = tuple(_VIEW_FILES)


def connect(catalog: str | Path, extra_views: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per catalog table."""
    root = Path(catalog).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"catalog {root} does not exist; run `thresher ingest` or `thresher demo` first")
    con = duckdb.connect()
    con.execute("SET VARIABLE thresher_root = ?", [str(root)])
    views = sql_dir() / "views"
    for name, (pattern, schema) in _VIEW_FILES.items():
        if glob.glob(str(root / pattern)):
            con.execute(f"CREATE VIEW {name} AS {(views / f'{name}.sql').read_text()}")
        else:
            con.register(f"_empty_{name}", _empty(name, schema))
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")
    for name, relation_sql in (extra_views or {}).items():
        con.execute(f"CREATE VIEW {name} AS {relation_sql}")
    return con


def _empty(name: str, schema: pa.Schema | None) -> pa.Table:
    if name == "runs":
        return pa.table({k: pa.array([], pa.string()) for k in schemas.RUN_LEDGER_KEYS})
    if schema is None:  # a table with no schemas/ entry yet: an empty view with just the key
        return pa.table({"sample_id": pa.array([], pa.string()), "dataset": pa.array([], pa.string())})
    extra = {"selections": "selection", "curated": "curated"}.get(name, "dataset")
    return schema.append(pa.field(extra, pa.string())).empty_table()


def named_queries() -> dict[str, Path]:
    return {p.stem: p for p in sorted((sql_dir() / "queries").glob("*.sql"))}


def resolve(sql_or_name: str) -> str:
    """A named query's SQL (``reject_reasons`` or ``@reject_reasons``), else the text itself."""
    name = sql_or_name.strip().lstrip("@")
    queries = named_queries()
    if name in queries:
        return queries[name].read_text()
    if sql_or_name.strip().startswith("@"):
        raise KeyError(f"no named query {name!r}; known: {', '.join(queries)}")
    return sql_or_name


def run_query(catalog: str | Path, sql_or_name: str, params: list | None = None) -> pa.Table:
    con = connect(catalog)
    try:
        relation = con.sql(resolve(sql_or_name), params=params or None)
        if relation is None:  # a statement without a result (SET, CREATE ...)
            return pa.table({})
        # DuckDB 2 renamed fetch_arrow_table to to_arrow_table; support both.
        fetch = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table
        return fetch()
    finally:
        con.close()


def write_result(table: pa.Table, fmt: str, out: IO[str] | None = None, path: str | None = None,
                 max_rows: int = 50) -> None:
    """Print or save a result as table | csv | json | parquet."""
    out = out or sys.stdout
    if fmt == "parquet":
        if not path:
            raise ValueError("--format parquet needs --output PATH")
        from pipeline.io.catalog import write_parquet_atomic

        write_parquet_atomic(table, Path(path))
        print(f"wrote {table.num_rows} rows to {path}", file=out)
        return
    rows = table.to_pylist()
    if path:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            _write_text(rows, table.column_names, fmt, fh, max_rows=None)
        print(f"wrote {table.num_rows} rows to {path}", file=out)
    else:
        _write_text(rows, table.column_names, fmt, out, max_rows=max_rows)


def _cell(v: object) -> str:
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return "" if v is None else str(v)


def _write_text(rows: list[dict], columns: list[str], fmt: str, out: IO[str], max_rows: int | None) -> None:
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([[_cell(r[c]) for c in columns] for r in rows])
    elif fmt == "json":
        for r in rows:
            out.write(json.dumps({k: (_cell(v) if isinstance(v, (bytes, bytearray)) else v) for k, v in r.items()},
                                 ensure_ascii=False, default=str) + "\n")
    elif fmt == "table":
        shown = rows if max_rows is None else rows[:max_rows]
        cells = [[_truncate(_cell(r[c])) for c in columns] for r in shown]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for row in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "\n")
        if max_rows is not None and len(rows) > max_rows:
            out.write(f"... {len(rows) - max_rows} more rows (use --format csv/json/parquet --output for all)\n")
        out.write(f"({len(rows)} rows)\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; choose table, csv, json or parquet")


def _truncate(s: str, width: int = 60) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= width else s[: width - 1] + "…"
