"""DuckDB over a catalog: a view per table (defined in ``sql/views``) and named queries (``sql/queries``).

The catalog root reaches SQL only as a DuckDB variable set with a bound parameter
(``SET VARIABLE thresher_root = ?``), never by string interpolation. A table that has no files yet
is still a view — an empty one with the right columns — so queries never fail for lack of data.

A table whose files include a damaged one (a truncated or corrupt Parquet footer, unreadable JSON)
does not take the other views down: its view is replaced by one with the same columns that raises
an error naming the damaged file(s) when used, and :func:`connect` emits a
:class:`DamagedTableWarning` saying the same.

``connect(catalog, safe=True)`` confines DuckDB to the catalog: external access is off, only the
catalog folder is an allowed directory, and the configuration is locked once the views exist, so
SQL cannot read other files, ATTACH databases, load extensions or SET the options back.
``run_query(..., safe=True)`` additionally runs only read-only (SELECT-type) statements, because
DuckDB's allowed directory also admits writes (``COPY ... TO`` a file inside the catalog). Use
``safe=True`` for any SQL that comes from someone other than the person who owns the catalog.

A catalog on object storage (``s3://bucket/cat``, any fsspec URL) is read through its fsspec
filesystem registered with DuckDB (``register_filesystem``: no httpfs extension, nothing
downloaded); each view reads exactly the files the catalog manifest lists as current, passed as a
bound list variable, so a query sees every table at one committed state (docs/object_storage.md).
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import json
import re
import sys
import warnings
from pathlib import Path
from typing import IO

import duckdb
import pyarrow as pa

import schemas
from pipeline.io.runs import recover


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


class DamagedTableWarning(UserWarning):
    """A catalog table has damaged files; its view raises an error naming them when used."""


class UnsafeQueryError(ValueError):
    """A statement that safe mode does not run (anything but a read-only query)."""


def connect(catalog: str | Path, extra_views: dict[str, str] | None = None,
            safe: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per catalog table.

    With ``safe=True`` the connection can read files under the catalog only and its settings are
    locked (see the module docstring); writes into the catalog are refused only by
    :func:`run_query` / :func:`check_read_only`, so pass user SQL through one of those.
    """
    from pipeline.io.catalog import REMOTE_MARKER
    from pipeline.io.storage import is_url

    if is_url(catalog) or (Path(catalog).expanduser() / REMOTE_MARKER).is_file():
        return _connect_remote(catalog, extra_views, safe)
    root = Path(catalog).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"catalog {root} does not exist; run `thresher ingest` or `thresher demo` first")
    recover(root)  # a commit cut short by a crash is finished before anything is read
    con = duckdb.connect()
    con.execute("SET VARIABLE thresher_root = ?", [str(root)])
    views = sql_dir() / "views"
    for name, (pattern, schema) in _VIEW_FILES.items():
        files = sorted(glob.glob(str(root / pattern)))
        if not files:
            con.register(f"_empty_{name}", _empty(name, schema))
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")
            continue
        try:
            con.execute(f"CREATE VIEW {name} AS {(views / f'{name}.sql').read_text()}")
        except duckdb.Error as exc:  # the view binds every file's schema: one bad file fails it
            message = _damage_message(name, files, exc)
            _error_view(con, name, schema, message)
            warnings.warn(DamagedTableWarning(message), stacklevel=2)
    for name, relation_sql in (extra_views or {}).items():
        con.execute(f"CREATE VIEW {name} AS {relation_sql}")
    if safe:
        _restrict(con, root)
    return con


# ``getvariable('thresher_root') || '/<glob>'`` in a view's SQL: replaced, for a catalog on
# object storage, by the list of files the manifest names (a bound variable, never text).
_ROOT_GLOB = re.compile(r"getvariable\('thresher_root'\)\s*\|\|\s*'/[^']*'")


def _connect_remote(catalog: str | Path, extra_views: dict[str, str] | None,
                    safe: bool) -> duckdb.DuckDBPyConnection:
    from pipeline.io.catalog import Catalog

    cat = Catalog.at(catalog)
    storage = cat.storage
    manifest, _ = storage.read_manifest()
    ledger = sorted(storage.fs.glob(storage.path("runs/*.json")))
    if manifest is None and not ledger:
        raise FileNotFoundError(f"catalog {cat.url} has no committed tables (no {storage.uri(storage.path('_manifest.json'))});"
                                " run `thresher ingest --catalog URL ...` first")
    folders = (manifest or {}).get("folders", {})
    con = duckdb.connect()
    # Object storage is read through the registered fsspec filesystem: DuckDB must never fetch
    # an extension (httpfs) for s3:// paths instead.
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.register_filesystem(storage.fs)
    con.execute("SET VARIABLE thresher_root = ?", [cat.url])
    views = sql_dir() / "views"
    for name, (pattern, schema) in _VIEW_FILES.items():
        if name == "runs":
            files = [storage.uri(p) for p in ledger]
        else:
            files = _manifest_files(storage, folders, pattern)
        if not files:
            con.register(f"_empty_{name}", _empty(name, schema))
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")
            continue
        sql = (views / f"{name}.sql").read_text()
        if not _ROOT_GLOB.search(sql):
            raise ValueError(f"sql/views/{name}.sql does not read getvariable('thresher_root') || '/...';"
                             " it cannot be pointed at an object-storage catalog")
        con.execute(f"SET VARIABLE thresher_files_{name} = ?", [files])
        try:
            files_sql = f"getvariable('thresher_files_{name}')"
            con.execute(f"CREATE VIEW {name} AS {_ROOT_GLOB.sub(lambda _m, f=files_sql: f, sql)}")
        except duckdb.Error as exc:
            message = _damage_message(name, files, exc, storage.fs)
            _error_view(con, name, schema, message)
            warnings.warn(DamagedTableWarning(message), stacklevel=3)
    for name, relation_sql in (extra_views or {}).items():
        con.execute(f"CREATE VIEW {name} AS {relation_sql}")
    if safe:
        _restrict(con, cat.url)
    return con


def _manifest_files(storage, folders: dict[str, dict], pattern: str) -> list[str]:
    """URLs of the current files of every manifest folder that ``pattern`` (``a/*/b/*.parquet``)
    matches, one path segment per glob segment as the local glob would."""
    folder_glob, file_glob = pattern.rsplit("/", 1)
    want = folder_glob.split("/")
    out = []
    for rel, entry in sorted(folders.items()):
        parts = rel.split("/")
        if len(parts) == len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want)):
            out.extend(storage.uri(p) for p in storage.folder_files(rel, entry)
                       if "/" not in p[len(storage.version_prefix(rel, entry["version"])) + 1:]
                       and fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], file_glob))
    return out


def _restrict(con: duckdb.DuckDBPyConnection, root: Path | str) -> None:
    """Files outside ``root`` unreachable, no extensions or Python objects, settings locked."""
    con.execute("SET allowed_directories = ?", [[str(root).rstrip("/") + "/"]])
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`UnsafeQueryError` unless every statement in ``sql`` is a query (SELECT,
    FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE): no COPY, ATTACH, SET, CREATE, PRAGMA, CALL ..."""
    for statement in con.extract_statements(sql):
        if statement.type != duckdb.StatementType.SELECT:
            kind = str(statement.type).rsplit(".", 1)[-1]
            raise UnsafeQueryError(f"safe mode runs read-only queries only; refused a {kind} statement")


def _damage_message(name: str, files: list[str], exc: Exception, filesystem=None) -> str:
    """Which of ``files`` DuckDB cannot read on its own, or DuckDB's error when none alone fails."""
    reader = "read_json" if name == "runs" else "read_parquet"
    probe = duckdb.connect()
    if filesystem is not None:  # an object-storage catalog's fsspec filesystem
        probe.register_filesystem(filesystem)
    damaged = []
    try:
        for f in files:
            try:
                probe.execute(f"DESCRIBE SELECT * FROM {reader}(?)", [f])
            except duckdb.Error as e:
                damaged.append(f"{f} ({str(e).splitlines()[0]})")
    finally:
        probe.close()
    if damaged:
        return (f"view {name} is unavailable: damaged file(s) in the catalog: {'; '.join(damaged)}. "
                "Re-run the stage that wrote them (e.g. with --force) or move them out of the catalog; "
                "the other views are unaffected")
    return f"view {name} is unavailable: {str(exc).splitlines()[0]}"


def _error_view(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema | None, message: str) -> None:
    """A view with ``name``'s columns whose every column raises ``message`` when evaluated.

    Each column of the one extra row is ``error(...)``, so a count, a projection or a filter on any
    column fails with the message rather than returning a silently partial or empty result.
    """
    empty = _empty(name, schema)
    con.register(f"_empty_{name}", empty)
    con.execute(f"SET VARIABLE thresher_damaged_{name} = ?", [message])
    raises = ", ".join(f"error(getvariable('thresher_damaged_{name}')) AS {_ident(c)}" for c in empty.column_names)
    con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name} UNION ALL BY NAME SELECT {raises}")


def _ident(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


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


def run_query(catalog: str | Path, sql_or_name: str, params: list | None = None, safe: bool = False) -> pa.Table:
    """Run SQL or a named query; with ``safe=True`` in a :func:`connect` ``safe`` connection and
    only if every statement is read-only (:func:`check_read_only`)."""
    con = connect(catalog, safe=safe)
    try:
        sql = resolve(sql_or_name)
        if safe:
            check_read_only(con, sql)
        relation = con.sql(sql, params=params or None)
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
