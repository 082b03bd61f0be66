"""One protocol for every selector, and the one writer of ``selections/<name>/``.

A selector (registered in :data:`pipeline.registry.SELECTORS`) is a class with::

    name: str                                  # its registry name
    schema: pa.Schema                          # of its picks table
    sources(cat, dataset, path, params)        # the files and folders a pool would be read from,
        -> list[Path]                          #   resolved without reading rows (the fingerprint)
    from_catalog(cat, dataset, params) -> pool # what it reads from a catalog dataset
    from_file(path, params) -> pool            # ... or from a file
    notes(pool, params) -> list[str]           # what the pool left out, to print before the report
    run(pool, params) -> (pa.Table, report)    # report: .lines() and .to_dict()

:func:`select_into_catalog` runs one under :class:`pipeline.io.runs.StageRun` (stage
``select``): lock on the selection, verified skip when the inputs and parameters are unchanged,
staging, atomic commit of ``selections/<name>/`` (:data:`PICKS` + :data:`REPORT`), and a ledger
entry with the parameters and the report — or, when it fails, with the error. A copy may also go
to a file outside the catalog (``out``); a file input may go to that file alone
(:func:`select_to_file`), which has no catalog and so no ledger.

The algorithms themselves (``pipeline.select.mig``, ``cabs``, ``gais``) are not touched here;
the selector classes beside their pool readers (``pipeline.curate.mig_pool`` etc.) wrap them.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.catalog import (
    Catalog,
    check_name,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.io.runs import StageRun, check_remote_stage

STAGE = "select"
PICKS = "picks.parquet"
REPORT = "report.json"
FILE_DATASET = "file"  # the ledger's dataset for a selection drawn from a file, not a catalog dataset


class Report(Protocol):
    def lines(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


class Selector(Protocol):
    name: str
    schema: pa.Schema

    def sources(self, cat: Catalog, dataset: str | None, path: Path | None, params: dict[str, Any]) -> list[Path]: ...

    def from_catalog(self, cat: Catalog, dataset: str, params: dict[str, Any]) -> Any: ...

    def from_file(self, path: Path, params: dict[str, Any]) -> Any: ...

    def notes(self, pool: Any, params: dict[str, Any]) -> list[str]: ...

    def run(self, pool: Any, params: dict[str, Any]) -> tuple[pa.Table, Report]: ...


@dataclass
class StoredReport:
    """A report read back from ``report.json`` (a skipped run prints what the committed one did)."""

    data: dict[str, Any]
    stored_lines: list[str]

    def lines(self) -> list[str]:
        return list(self.stored_lines)

    def to_dict(self) -> dict[str, Any]:
        return self.data


@dataclass
class SelectionResult:
    selector: str
    name: str | None  # the selection's name in the catalog (None: written to a file only)
    path: str  # selections/<name>/ in the catalog, or the picks file
    rows: int
    report: Report
    parameters: dict[str, Any]
    source: str
    run_id: str | None = None
    skipped: bool = False
    out: str | None = None  # the extra copy outside the catalog
    notes: list[str] = field(default_factory=list)

    @property
    def picks_path(self) -> Path:
        p = Path(self.path)
        return p / PICKS if self.name else p

    def lines(self) -> list[str]:
        state = ", unchanged, skipped" if self.skipped else ""
        where = f"selections/{self.name}/ ({self.path})" if self.name else self.path
        out = [*self.notes, *self.report.lines(), f"wrote {self.rows:,} rows to {where}{state}"]
        if self.out:
            out.append(f"copy: {self.out} (report: {Path(self.out).with_suffix('.report.json')})")
        return out


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (the ledger must stay valid JSON for DuckDB)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    return obj


def fingerprint(paths: list[Path]) -> list[dict[str, Any]]:
    """``[{uri, size, mtime_ns}]`` of every file (folders: their files, sorted), the input fingerprint."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return [{"uri": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def _selector(name: str) -> tuple[Any, Selector]:
    from pipeline.registry import SELECTORS

    entry = SELECTORS[name]
    return entry, entry.load()()


def write_files(table: pa.Table, schema: pa.Schema, document: dict[str, Any], picks: Path, report: Path) -> None:
    """The one writer of a selection's two files (each atomic: temporary name, then rename)."""
    write_parquet_atomic(table, picks, schema)
    write_json_atomic(jsonable(document), report)


def _document(selector: str, name: str | None, source: str, params: dict[str, Any], report: Report,
              rows: int, run_id: str | None, notes: list[str]) -> dict[str, Any]:
    return {"selector": selector, "name": name, "source": source, "parameters": params, "notes": notes,
            "report": report.to_dict(), "lines": report.lines(), "rows": rows, "run_id": run_id}


def _copy_out(out: str | Path, table: pa.Table, schema: pa.Schema, document: dict[str, Any]) -> str:
    out = Path(out)
    write_files(table, schema, document, out, out.with_suffix(".report.json"))
    return str(out)


def _copy_stored(folder: Path, out: Path) -> str:
    """A committed selection's files to ``out`` (+ ``.report.json``), left alone when already equal,
    so a skipped run does not touch a copy that later stages fingerprint."""
    for src, dst in ((folder / PICKS, out), (folder / REPORT, out.with_suffix(".report.json"))):
        data = src.read_bytes()
        if dst.is_file() and dst.read_bytes() == data:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return str(out)


def select_into_catalog(selector: str, catalog: str | Path | Catalog, name: str, params: dict[str, Any],
                        *, dataset: str | None = None, input_file: str | Path | None = None,
                        out: str | Path | None = None, force: bool = False) -> SelectionResult:
    """Run ``selector`` over ``dataset`` (or ``input_file``) into ``selections/<name>/``.

    ``params`` are checked against the registry entry (defaults filled in). Unchanged inputs and
    parameters with the committed files intact: skipped, the stored report returned. ``out``
    also writes the picks (and ``<out>.report.json``) to a file outside the catalog.
    """
    if (dataset is None) == (input_file is None):
        raise ValueError("give exactly one of a catalog dataset or an input file")
    entry, impl = _selector(selector)
    params = entry.validate(params)
    cat = catalog if isinstance(catalog, Catalog) else Catalog.at(catalog)
    check_remote_stage(cat, STAGE)  # before reading the pool: an object-storage catalog stops here, clearly
    target = cat.selection_dir(name)  # checks the name
    if dataset is not None:
        check_name(dataset)
        source = f"{cat.root}#{dataset}"
    else:
        input_file = Path(input_file)  # type: ignore[arg-type]
        source = str(input_file)
    # The fingerprint comes from resolving the pool's files, not reading them, so an unchanged
    # selection is skipped before any pool is built.
    inputs = fingerprint(impl.sources(cat, dataset, input_file, params))
    parameters = {"selector": selector, **params}
    with StageRun(cat, STAGE, dataset or FILE_DATASET, {"selection": target}, parameters, inputs,
                  force=force, ledger_parameters={"name": name, "source": source}) as run:
        if run.skipped:
            doc = json.loads((target / REPORT).read_text(encoding="utf-8"))
            report: Report = StoredReport(doc.get("report", {}), doc.get("lines", []))
            rows = pq.ParquetFile(target / PICKS).metadata.num_rows
            result = SelectionResult(selector, name, str(target), rows, report, params, source,
                                     run.state["run_id"] if run.state else None, True, notes=doc.get("notes", []))
            if out is not None:
                result.out = _copy_stored(target, Path(out))
            return result
        pool = impl.from_catalog(cat, dataset, params) if dataset is not None else impl.from_file(input_file, params)
        notes = impl.notes(pool, params)
        table, report = impl.run(pool, params)
        doc = _document(selector, name, source, params, report, table.num_rows, run.run_id, notes)
        staging = run.staging["selection"]
        write_files(table, impl.schema, doc, staging / PICKS, staging / REPORT)
        run.commit({"rows_in": _pool_size(pool), "rows_out": table.num_rows, "report": jsonable(report.to_dict())},
                   extra={"source": source})
    result = SelectionResult(selector, name, str(target), table.num_rows, report, params, source, run.run_id,
                             notes=notes)
    if out is not None:
        result.out = _copy_out(out, table, impl.schema, doc)
    return result


def select_to_file(selector: str, input_file: str | Path, out: str | Path, params: dict[str, Any]) -> SelectionResult:
    """Run ``selector`` over a file into ``out`` (+ ``<out>.report.json``): no catalog, no ledger."""
    entry, impl = _selector(selector)
    params = entry.validate(params)
    pool = impl.from_file(Path(input_file), params)
    notes = impl.notes(pool, params)
    table, report = impl.run(pool, params)
    doc = _document(selector, None, pool.source, params, report, table.num_rows, None, notes)
    path = _copy_out(out, table, impl.schema, doc)
    return SelectionResult(selector, None, path, table.num_rows, report, params, pool.source, notes=notes)


def _pool_size(pool: Any) -> int:
    for attr in ("sample_ids", "labels"):
        if hasattr(pool, attr):
            return len(getattr(pool, attr))
    return 0


# ------------------------------------------------------------------------------ readers


def selection_picks(catalog: str | Path | Catalog, name: str) -> Path:
    """The picks file of ``selections/<name>/``; FileNotFoundError naming the selections there."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog.at(catalog)
    picks = cat.selection_dir(name) / PICKS
    if not picks.is_file():
        base = cat.root / "selections"
        have = sorted(p.name for p in base.iterdir() if (p / PICKS).is_file()) if base.is_dir() else []
        raise FileNotFoundError(f"no selection {name!r} in {cat.root} (selections here: {', '.join(have) or 'none'}); "
                                "make one with `thresher select ... --name NAME`")
    return picks


def read_selection_document(catalog: str | Path | Catalog, name: str) -> dict[str, Any]:
    """The report document of ``selections/<name>/``: selector, source, parameters, report, run id."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog.at(catalog)
    selection_picks(cat, name)
    doc = cat.selection_dir(name) / REPORT
    return json.loads(doc.read_text(encoding="utf-8")) if doc.is_file() else {}


def read_selection(catalog: str | Path | Catalog, name: str) -> tuple[pa.Table, dict[str, Any]]:
    """(picks table, report document) of ``selections/<name>/``."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog.at(catalog)
    return pq.read_table(selection_picks(cat, name)), read_selection_document(cat, name)
