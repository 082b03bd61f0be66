"""Curated shards and trainer exports: a selection joined back to its samples and annotations.

A selection (ordered sample ids with gains, see DataComp) stays separate from the step that
materialises it: ``materialise_instructions`` joins the picks with the samples and their
annotations into ``curated/<name>/`` Parquet shards (in rank order), and ``export`` writes those
as JSONL in the layouts SFT trainers read (ShareGPT, Alpaca, OpenAI messages) or as Parquet, with
a manifest of parameters, counts and source lineage.

Exports (here and in ``webdataset_export``) are written into a fresh staging folder beside the
target and renamed into place whole (:func:`staged_export_dir`), so a folder never mixes files of
two exports: a non-empty target is refused unless ``overwrite=True``, and then it is replaced, not
merged — and only if it holds a previous Thresher export (a ``manifest.json`` of one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.curate import annotations
from pipeline.io.catalog import (
    Catalog,
    shard_name,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.io.runs import StageRun, check_remote_stage
from pipeline.registry import EXPORTERS
from pipeline.select import protocol

EXPORT_FORMATS = EXPORTERS.names(group="curated")  # sharegpt, alpaca, openai, parquet


@dataclass
class CuratedResult:
    name: str
    path: str
    rows: int
    shards: int
    missing: int  # picks whose sample is not in the dataset (reported, never silently dropped)


def materialise_instructions(catalog: str | Path, dataset: str, picks: str | Path | None, name: str,
                             algorithm: str | None = None, rows_per_shard: int = 50_000,
                             parameters: dict[str, Any] | None = None, *, selection: str | None = None,
                             force: bool = False) -> CuratedResult:
    """Join picks (rank, sample_id, gain[, labels]) with the samples of ``dataset`` into ``curated/<name>/``.

    The picks come from ``selections/<selection>/`` (its selector, parameters and run id go into
    ``_curated.json``, the ledger and so every export's manifest) or from a ``picks`` file. Under
    the stage contract: unchanged picks, samples and annotations with the curated files intact
    are skipped.
    """
    if (picks is None) == (selection is None):
        raise ValueError("give exactly one of a selection name or a picks file")
    cat = Catalog.at(catalog)
    check_remote_stage(cat, "curate")
    samples = cat.samples_partition("instruction", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no instruction samples for dataset {dataset!r} in {cat.root}")
    lineage: dict[str, Any] = {}
    if selection is not None:
        picks = protocol.selection_picks(cat, selection)
        doc = protocol.read_selection_document(cat, selection)
        lineage = {"selection": selection, "selection_run_id": doc.get("run_id"), "source": doc.get("source")}
        algorithm = algorithm or doc.get("selector")
        parameters = {**doc.get("parameters", {}), **(parameters or {})}
    algorithm = algorithm or "mig"
    picks_table = pq.read_table(picks)
    for col in ("rank", "sample_id", "gain"):
        if col not in picks_table.column_names:
            raise ValueError(f"{picks} has no column {col!r}; expected the output of `thresher select`")
    tags = annotations.find(cat, dataset, annotations.TAG_SOURCES)
    quality = annotations.find(cat, dataset, annotations.QUALITY_SOURCES)
    params = {"dataset": dataset, "picks": str(picks), "algorithm": algorithm, "parameters": parameters or {},
              "rows_per_shard": rows_per_shard, **lineage}
    inputs = protocol.fingerprint([Path(picks), samples, *(p for p in (tags, quality) if p is not None)])
    with StageRun(cat, "curate", dataset, {"curated": cat.curated_dir(name)}, params, inputs, force=force) as run:
        if run.skipped:
            c = run.state["counts"]
            return CuratedResult(name, str(cat.curated_dir(name)), c["rows_out"], c.get("shards", 1), c["missing"])
        table = _join(picks_table, samples, tags, quality)
        missing = picks_table.num_rows - table.num_rows
        n_shards = max(1, -(-table.num_rows // rows_per_shard))
        staging = run.staging["curated"]
        for k in range(n_shards):
            part = table.slice(k * rows_per_shard, rows_per_shard)
            write_parquet_atomic(part, staging / shard_name(k, n_shards), schemas.CURATED_INSTRUCTIONS)
        write_json_atomic({"dataset": dataset, "picks": str(picks), "algorithm": algorithm,
                           "parameters": parameters or {}, "rows": table.num_rows, "missing": missing,
                           "run_id": run.run_id, **lineage}, staging / "_curated.json")
        run.commit({"rows_in": picks_table.num_rows, "rows_out": table.num_rows, "missing": missing,
                    "shards": n_shards})
    return CuratedResult(name, str(cat.curated_dir(name)), table.num_rows, n_shards, missing)


def _join(picks_table: pa.Table, samples: Path, tags: Path | None, quality: Path | None) -> pa.Table:
    """The picks in rank order with their conversation, tags, score and lineage (DuckDB join)."""
    con = duckdb.connect()
    con.register("picks", picks_table)
    # Relations from the Python API: paths are arguments, never spliced into SQL text.
    con.read_parquet(str(samples / "*.parquet")).create_view("s")
    empty_tags = pa.table({"sample_id": pa.array([], pa.string()), "tags": pa.array([], pa.list_(pa.string()))})
    empty_q = pa.table({"sample_id": pa.array([], pa.string()), "score": pa.array([], pa.float32())})
    if tags is not None:
        con.read_parquet(str(tags / "*.parquet")).project("sample_id, list_transform(tags, lambda x: x.tag) AS tags") \
            .create_view("t")
    else:
        con.register("t", empty_tags)
    if quality is not None:
        con.read_parquet(str(quality / "*.parquet")).project("sample_id, score").create_view("q")
    else:
        con.register("q", empty_q)
    joined = con.sql("""
        SELECT p.sample_id, s.messages, t.tags, q.score::FLOAT AS score,
               p.rank::BIGINT AS rank, p.gain::DOUBLE AS gain, s.source_uri, s.source_offset
        FROM picks p
        JOIN s USING (sample_id)
        LEFT JOIN t USING (sample_id)
        LEFT JOIN q USING (sample_id)
        ORDER BY p.rank""")
    return joined.to_arrow_table() if hasattr(joined, "to_arrow_table") else joined.arrow()


# ------------------------------------------------------------------ export


def _pairs(messages: list[dict]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(system, [(user, assistant), ...], trailing unanswered user turns)."""
    system = None
    pairs: list[tuple[str, str]] = []
    pending: list[str] = []
    for m in messages:
        if m["role"] == "system":
            system = m["content"] if system is None else f"{system}\n{m['content']}"
        elif m["role"] == "user":
            pending.append(m["content"])
        elif pending:
            pairs.append(("\n\n".join(pending), m["content"]))
            pending = []
    return system, pairs, pending


def to_layout(row: dict, fmt: str) -> dict | None:
    """One curated row in a trainer layout; None when it has no assistant answer to learn from."""
    messages = row["messages"]
    system, pairs, _ = _pairs(messages)
    if not pairs:
        return None
    meta = {"id": row["sample_id"], "rank": row["rank"]}
    if fmt == "sharegpt":
        conv = ([{"from": "system", "value": system}] if system else [])
        for u, a in pairs:
            conv += [{"from": "human", "value": u}, {"from": "gpt", "value": a}]
        return {**meta, "conversations": conv}
    if fmt == "openai":
        msgs = ([{"role": "system", "content": system}] if system else [])
        for u, a in pairs:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return {**meta, "messages": msgs}
    if fmt == "alpaca":
        # Alpaca is single-turn; earlier exchanges go to "history" (the LLaMA-Factory convention).
        *history, (instruction, output) = pairs
        out = {**meta, "instruction": instruction, "input": "", "output": output}
        if history:
            out["history"] = [list(h) for h in history]
        if system:
            out["system"] = system
        return out
    raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")


def _curated_rows(path: Path) -> Iterator[dict]:
    for shard in sorted(path.glob("part-*.parquet")):
        yield from pq.read_table(shard).to_pylist()


def _looks_like_export(folder: Path) -> bool:
    """A previous Thresher export: a manifest.json of one (``export`` or ``export_plan``) and no
    sub-folders (exports never write any; a home or project folder almost always has some)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or "catalog" not in manifest:
        return False
    if not ({"curated", "format", "files"} <= manifest.keys() or {"plan", "shards"} <= manifest.keys()):
        return False
    return not any(entry.is_dir() for entry in folder.iterdir())


def check_export_target(out_dir: str | Path, overwrite: bool = False) -> Path:
    """The absolute target folder, or ValueError when an export must not replace it."""
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out.parent == out:
        raise ValueError(f"refusing to export into {out}; give a folder of its own")
    if out.is_symlink():
        raise ValueError(f"{out} is a symbolic link; give the folder it points to, or a new folder")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if not any(out.iterdir()):
        return out
    if not overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to replace it")
    if not _looks_like_export(out):
        raise ValueError(f"{out} is not empty and does not hold a previous Thresher export (no export "
                         "manifest.json, or it has sub-folders); refusing to replace it even with --overwrite. "
                         "Choose a new or empty --out folder")
    return out


@contextmanager
def staged_export_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder ``<out>.tmp-<id>`` beside ``out_dir``; swap it in on success.

    The target is checked first (:func:`check_export_target`) and again before the swap. An old
    folder is renamed away, the new one renamed in, then the old one removed, so the target is
    always one whole export. On error the staging folder is removed and the target is untouched.
    """
    out = check_export_target(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staging = out.with_name(f"{out.name}.tmp-{token}")
    staging.mkdir()
    try:
        yield staging
        check_export_target(out, overwrite)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{token}")
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def export_run(cat: Catalog, dataset: str, out: Path, parameters: dict[str, Any], inputs: list[dict[str, Any]]) -> StageRun:
    """The stage contract around one export (stage ``export``): a lock per target folder, and a
    ledger entry with the parameters and counts, or with the error when the export fails.

    The export itself lives outside the catalog (staged beside ``out`` and swapped in whole by
    :func:`staged_export_dir`), so the run's catalog output is a placeholder that each commit
    records as absent: nothing is written into the catalog but the ledger and the marker. Always
    rebuilt: the target may have been edited by hand, and a trainer's folder is cheap to remake.
    """
    key = "exports/" + hashlib.sha1(str(out).encode("utf-8")).hexdigest()[:16]
    return StageRun(cat, "export", dataset, {"export": cat.root / "_exports" / key.rsplit("/", 1)[1]}, parameters,
                    inputs, force=True, key=key, ledger_parameters={"out": str(out)})


def export(catalog: str | Path, name: str, fmt: str, out_dir: str | Path, rows_per_file: int = 100_000,
           overwrite: bool = False) -> dict:
    """Write curated ``name`` to ``out_dir`` in ``fmt`` plus ``manifest.json``; returns the manifest.

    ``out_dir`` must be new or empty unless ``overwrite``; then a previous export there is replaced
    whole (see :func:`staged_export_dir`). The run enters the ledger (:func:`export_run`); the
    manifest carries the export's parameters, its run id and the selection it came from.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    cat = Catalog.at(catalog)
    check_remote_stage(cat, "export")
    src = cat.curated_dir(name)
    if not src.is_dir():
        raise FileNotFoundError(f"no curated set {name!r} in {cat.root}; run the curate flow or `thresher curate` first")
    out = check_export_target(out_dir, overwrite)  # refuse before any work (and before the ledger)
    info = json.loads((src / "_curated.json").read_text()) if (src / "_curated.json").exists() else {}
    parameters = {"curated": name, "format": fmt, "rows_per_file": rows_per_file, "overwrite": overwrite}
    with export_run(cat, info.get("dataset") or name, out, parameters, protocol.fingerprint([src])) as run:
        with staged_export_dir(out, overwrite) as stage:
            written, skipped, files, sources = _write_export(src, fmt, stage, rows_per_file)
            counts = {"rows": written, "skipped_without_answer": skipped, "files": len(files)}
            manifest = {
                "curated": name, "format": fmt, "files": files, "rows": written,
                "skipped_without_answer": skipped, "selection": info, "sources": sources,
                "catalog": str(cat.root), "parameters": parameters, "run_id": run.run_id, "counts": counts,
            }
            write_json_atomic(manifest, stage / "manifest.json")
        # Committed after the swap, so a failed swap is recorded as a failure, never a success.
        run.commit(counts, absent=tuple(run.outputs))
    return manifest


def _exporter(fmt: str):
    def export_format(catalog: str | Path, source: str, out_dir: str | Path, overwrite: bool = False,
                      rows_per_file: int = 100_000) -> dict:
        return export(catalog, source, fmt, out_dir, rows_per_file, overwrite)

    export_format.__name__ = f"export_{fmt}"
    export_format.__doc__ = f"Curated set ``source`` as {fmt} into ``out_dir`` (registry entry ``{fmt}``)."
    return export_format


# The EXPORTERS registry's callables: fn(catalog, source, out_dir, overwrite=False, **params).
export_sharegpt = _exporter("sharegpt")
export_alpaca = _exporter("alpaca")
export_openai = _exporter("openai")
export_parquet = _exporter("parquet")


def _write_export(src: Path, fmt: str, out_dir: Path, rows_per_file: int) -> tuple[int, int, list[str], dict]:
    """Data files of one export into ``out_dir``: (rows written, rows skipped, file names, rows per source)."""
    written, skipped, files, sources = 0, 0, [], {}
    if fmt == "parquet":
        table = pq.read_table(src)
        target = out_dir / "data.parquet"
        write_parquet_atomic(table, target, schemas.CURATED_INSTRUCTIONS)
        files.append(target.name)
        written = table.num_rows
        for uri in table.column("source_uri").to_pylist():
            sources[uri] = sources.get(uri, 0) + 1
        return written, skipped, files, sources
    fh, tmp, k = None, None, 0
    try:
        for row in _curated_rows(src):
            rec = to_layout(row, fmt)
            if rec is None:
                skipped += 1
                continue
            if fh is None or written % rows_per_file == 0 and written:
                if fh is not None:
                    fh.close()
                    os.replace(tmp, out_dir / files[-1])
                files.append(f"data-{k:05d}.jsonl")
                tmp = out_dir / f".{files[-1]}.tmp"
                fh = open(tmp, "w", encoding="utf-8")
                k += 1
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
            sources[row["source_uri"]] = sources.get(row["source_uri"], 0) + 1
    finally:
        if fh is not None:
            fh.close()
            os.replace(tmp, out_dir / files[-1])
    return written, skipped, files, sources
