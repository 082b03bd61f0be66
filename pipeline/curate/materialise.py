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
from pipeline.io.runs import StageRun

EXPORT_FORMATS = ("sharegpt", "alpaca", "openai", "parquet")


@dataclass
class CuratedResult:
    name: str
    path: str
    rows: int
    shards: int
    missing: int  # picks whose sample is not in the dataset (reported, never silently dropped)


def materialise_instructions(catalog: str | Path, dataset: str, picks: str | Path, name: str,
                             algorithm: str = "mig", rows_per_shard: int = 50_000,
                             parameters: dict[str, Any] | None = None) -> CuratedResult:
    """Join ``picks`` (rank, sample_id, gain[, labels]) with the samples of ``dataset``."""
    cat = Catalog.at(catalog)
    samples = cat.samples_partition("instruction", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no instruction samples for dataset {dataset!r} in {cat.root}")
    picks_table = pq.read_table(picks)
    for col in ("rank", "sample_id", "gain"):
        if col not in picks_table.column_names:
            raise ValueError(f"{picks} has no column {col!r}; expected the output of `thresher select`")
    tags = annotations.find(cat, dataset, annotations.TAG_SOURCES)
    quality = annotations.find(cat, dataset, annotations.QUALITY_SOURCES)
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
    table = joined.to_arrow_table() if hasattr(joined, "to_arrow_table") else joined.arrow()
    missing = picks_table.num_rows - table.num_rows
    n_shards = max(1, -(-table.num_rows // rows_per_shard))
    params = {"dataset": dataset, "picks": str(picks), "algorithm": algorithm, "parameters": parameters or {},
              "rows_per_shard": rows_per_shard}
    outputs = {"curated": cat.curated_dir(name), "selection": cat.selection_dir(name)}
    # Always rebuilt (force): the picks file is the input and is cheap to join again.
    with StageRun(cat, "curate", dataset, outputs, params, {"picks": str(picks)}, force=True) as run:
        staging = run.staging["curated"]
        for k in range(n_shards):
            part = table.slice(k * rows_per_shard, rows_per_shard)
            write_parquet_atomic(part, staging / shard_name(k, n_shards), schemas.CURATED_INSTRUCTIONS)
        why = _why(picks_table, table) if "labels" in picks_table.column_names else [None] * table.num_rows
        sel = pa.table({"rank": table.column("rank"), "sample_id": table.column("sample_id"),
                        "gain": table.column("gain"), "algorithm": [algorithm] * table.num_rows, "why": why})
        write_parquet_atomic(sel, run.staging["selection"] / "part-00000-of-00001.parquet", schemas.SELECTIONS)
        write_json_atomic({"dataset": dataset, "picks": str(picks), "algorithm": algorithm,
                           "parameters": parameters or {}, "rows": table.num_rows, "missing": missing},
                          staging / "_curated.json")
        run.commit({"rows_in": picks_table.num_rows, "rows_out": table.num_rows, "missing": missing})
    return CuratedResult(name, str(cat.curated_dir(name)), table.num_rows, n_shards, missing)


def _why(picks: pa.Table, joined: pa.Table) -> list[str | None]:
    labels = dict(zip(picks.column("sample_id").to_pylist(), picks.column("labels").to_pylist()))
    return [json.dumps({"labels": labels.get(s)}) for s in joined.column("sample_id").to_pylist()]


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


def export(catalog: str | Path, name: str, fmt: str, out_dir: str | Path, rows_per_file: int = 100_000,
           overwrite: bool = False) -> dict:
    """Write curated ``name`` to ``out_dir`` in ``fmt`` plus ``manifest.json``; returns the manifest.

    ``out_dir`` must be new or empty unless ``overwrite``; then a previous export there is replaced
    whole (see :func:`staged_export_dir`).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    cat = Catalog.at(catalog)
    src = cat.curated_dir(name)
    if not src.is_dir():
        raise FileNotFoundError(f"no curated set {name!r} in {cat.root}; run the curate flow or `thresher curate` first")
    info = json.loads((src / "_curated.json").read_text()) if (src / "_curated.json").exists() else {}
    with staged_export_dir(out_dir, overwrite) as stage:
        written, skipped, files, sources = _write_export(src, fmt, stage, rows_per_file)
        manifest = {
            "curated": name, "format": fmt, "files": files, "rows": written,
            "skipped_without_answer": skipped, "selection": info, "sources": sources,
            "catalog": str(cat.root),
        }
        write_json_atomic(manifest, stage / "manifest.json")
    return manifest


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
