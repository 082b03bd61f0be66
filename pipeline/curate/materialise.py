"""Curated shards and trainer exports: a selection joined back to its samples and annotations.

A selection (ordered sample ids with gains, see DataComp) stays separate from the step that
materialises it: ``materialise_instructions`` joins the picks with the samples and their
annotations into ``curated/<name>/`` Parquet shards (in rank order), and ``export`` writes those
as JSONL in the layouts SFT trainers read (ShareGPT, Alpaca, OpenAI messages), as Parquet, or as
TRL preference pairs (dpo), with a dataset card and a manifest (``export_card``); docs/exports.md.

Exports (here and in ``webdataset_export``) are written into a fresh staging folder beside the
target and renamed into place whole (:func:`staged_export_dir`), so a folder never mixes files of
two exports: a non-empty target is refused unless ``overwrite=True``, and then it is replaced, not
merged — and only if it holds a previous Thresher export (a manifest of one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.curate import annotations, export_card
from pipeline.io.catalog import (
    Catalog,
    shard_name,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.io.instruction_formats import REJECTED_MESSAGES_KEY
from pipeline.io.runs import StageRun, check_remote_stage
from pipeline.registry import EXPORTERS
from pipeline.select import protocol

EXPORT_FORMATS = EXPORTERS.names(group="curated")  # sharegpt, alpaca, openai, parquet, dpo


@dataclass
class CuratedResult:
    name: str
    path: str
    rows: int
    shards: int
    missing: int  # picks whose sample is not in the dataset (reported, never silently dropped)
    # kept in the curated set (it is the selection, whole), left out of every SFT export
    without_assistant_answer: int = 0


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
            return CuratedResult(name, str(cat.curated_dir(name)), c["rows_out"], c.get("shards", 1), c["missing"],
                                 c.get("without_assistant_answer", 0))
        table = _join(picks_table, samples, tags, quality)
        missing = picks_table.num_rows - table.num_rows
        # Kept in the curated set (it is the selection, whole) but counted: SFT exports leave them out.
        answerless = sum(not has_answer(m) for m in table.column("messages").to_pylist())
        n_shards = max(1, -(-table.num_rows // rows_per_shard))
        staging = run.staging["curated"]
        for k in range(n_shards):
            part = table.slice(k * rows_per_shard, rows_per_shard)
            write_parquet_atomic(part, staging / shard_name(k, n_shards), schemas.CURATED_INSTRUCTIONS)
        write_json_atomic({"dataset": dataset, "picks": str(picks), "algorithm": algorithm,
                           "parameters": parameters or {}, "rows": table.num_rows, "missing": missing,
                           "without_assistant_answer": answerless,
                           "run_id": run.run_id, **lineage}, staging / "_curated.json")
        run.commit({"rows_in": picks_table.num_rows, "rows_out": table.num_rows, "missing": missing,
                    "shards": n_shards, "without_assistant_answer": answerless})
    return CuratedResult(name, str(cat.curated_dir(name)), table.num_rows, n_shards, missing, answerless)


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

# Why a row is left out of an export (the manifest's "filtered" and the ledger's counts).
NO_ANSWER = "no_assistant_answer"  # SFT formats: no user turn answered by the assistant
NO_REJECTED = "no_rejected_side"  # dpo: the input record had no rejected conversation
NOT_A_PAIR = "rejected_not_comparable"  # dpo: no shared prompt, or nothing differs after it

DATA_DIR = "data"  # the data files' sub-folder: nothing else in it, so folder loaders read it whole
DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's dataset registry, written beside the data


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


def has_answer(messages: list[dict]) -> bool:
    """True when some user turn is answered by the assistant: the one rule every SFT export, the
    curate counts and the MIG pool share (a conversation without one teaches nothing, and TRL's
    ``assistant_only_loss`` fails on it)."""
    return bool(_pairs(messages)[1])


def to_layout(row: dict, fmt: str) -> dict | None:
    """One curated row in a trainer layout; None when it has no assistant answer to learn from.

    Every row of a format has the same keys (Alpaca: ``system`` "" and ``history`` [] when the
    conversation has none), so the files of one export share one schema.
    """
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
        return {**meta, "instruction": instruction, "input": "", "output": output, "system": system or "",
                "history": [list(h) for h in history]}
    raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")


def to_preference(row: dict, rejected: list[dict] | None) -> tuple[dict | None, str | None]:
    """(TRL conversational preference row, None) or (None, the reason it is filtered).

    ``prompt`` is the turns both sides share (ending with a user turn); ``chosen`` / ``rejected``
    are what follows on each side (in HH-RLHF: the last assistant answer).
    """
    chosen = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if not has_answer(chosen):
        return None, NO_ANSWER
    if not rejected:
        return None, NO_REJECTED
    rejected = [{"role": m["role"], "content": m["content"]} for m in rejected]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] != "user":  # the prompt ends where the answers begin
        n -= 1
    tail_c, tail_r = chosen[n:], rejected[n:]
    if not n or not any(m["role"] == "assistant" for m in tail_c) or not any(m["role"] == "assistant" for m in tail_r) \
            or tail_c == tail_r:
        return None, NOT_A_PAIR
    return {"id": row["sample_id"], "rank": row["rank"], "prompt": chosen[:n], "chosen": tail_c,
            "rejected": tail_r}, None


def _curated_rows(path: Path) -> Iterator[dict]:
    for shard in sorted(path.glob("part-*.parquet")):
        yield from pq.read_table(shard).to_pylist()


def _looks_like_export(folder: Path) -> bool:
    """A previous Thresher export: a manifest of one (``export`` or ``export_plan``; the hidden
    ``.manifest.json`` or the older ``manifest.json``) and no sub-folder but ``data/`` (exports
    write no other; a home or project folder almost always has some)."""
    manifest = export_card.read_manifest(folder)
    if manifest is None or "catalog" not in manifest:
        return False
    if not ({"curated", "format", "files"} <= manifest.keys() or {"plan", "shards"} <= manifest.keys()):
        return False
    return not any(entry.is_dir() and entry.name != DATA_DIR for entry in folder.iterdir())


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
                         "manifest, or sub-folders other than data/); refusing to replace it even with "
                         "--overwrite. Choose a new or empty --out folder")
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
    """Write curated ``name`` to ``out_dir`` in ``fmt``; returns the manifest.

    The folder: ``data/train-NNNNN-of-NNNNN.{jsonl,parquet}``, a dataset card ``README.md`` whose
    ``configs`` name them (``datasets.load_dataset(out_dir)``), LLaMA-Factory's
    ``dataset_info.json`` (chat formats) and the hidden ``.manifest.json`` (parameters, counts,
    rows filtered by reason, sha256 of every data file, input files with their licences; written
    last). ``out_dir`` must be new or empty unless ``overwrite``; then a previous export there is
    replaced whole (see :func:`staged_export_dir`). The run enters the ledger (:func:`export_run`).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    cat = Catalog.at(catalog)
    check_remote_stage(cat, "export")
    src = cat.curated_dir(name)
    if not src.is_dir():
        raise FileNotFoundError(f"no curated set {name!r} in {cat.root}; run the curate flow or `thresher curate` first")
    out = check_export_target(out_dir, overwrite)  # refuse before any work (and before the ledger)
    info = json.loads((src / "_curated.json").read_text()) if (src / "_curated.json").exists() else {}
    dataset = info.get("dataset") or name
    parameters = {"curated": name, "format": fmt, "rows_per_file": rows_per_file, "overwrite": overwrite}
    read = [src]
    rejected: dict[str, list[dict]] | None = None
    if fmt == "dpo":
        samples = cat.samples_partition("instruction", dataset)
        if not samples.is_dir():
            raise FileNotFoundError(f"the dpo export reads the rejected sides from dataset {dataset!r}, which is "
                                    f"not in {cat.root}")
        rejected = _rejected_sides(samples, src)
        if not rejected:
            raise ValueError(f"no row of curated set {name!r} has a rejected side, so there is nothing to write "
                             "as dpo: preference pairs come from inputs with chosen/rejected transcripts (the "
                             "hh_rlhf layout, docs/ingest_formats.md)")
        read.append(samples)
    with export_run(cat, dataset, out, parameters, protocol.fingerprint(read)) as run:
        with staged_export_dir(out, overwrite) as stage:
            files, filtered, sources = _write_export(src, fmt, stage, rows_per_file, rejected)
            rows = sum(f["rows"] for f in files)
            names = [f["path"] for f in files]
            counts = {"rows": rows, "skipped_without_answer": filtered.get(NO_ANSWER, 0), "files": len(files),
                      **{f"filtered_{k}": v for k, v in sorted(filtered.items()) if k != NO_ANSWER}}
            manifest = {
                "curated": name, "format": fmt, "files": names, "rows": rows,
                "skipped_without_answer": filtered.get(NO_ANSWER, 0), "filtered": filtered,
                "data_files": [{**rec, "rows": f["rows"]} for rec, f in
                               zip(export_card.file_records(stage, names), files)],
                "selection": info, "sources": sources,
                "inputs": {"dataset": dataset, "curated": name, "sources": export_card.input_sources(sources)},
                "catalog": str(cat.root), "parameters": parameters, "run_id": run.run_id, "counts": counts,
            }
            if fmt in LLAMA_FACTORY:
                write_json_atomic({f"thresher_{name}": LLAMA_FACTORY[fmt]}, stage / DATASET_INFO)
            export_card.write_export_metadata(
                stage, manifest, title=f"{name} ({fmt})", configs=[export_card.config("default", names)],
                body=_card_body(manifest), tags=("thresher", fmt), features=FEATURES.get(fmt))
        # Committed after the swap, so a failed swap is recorded as a failure, never a success.
        run.commit(counts, absent=tuple(run.outputs))
    return manifest


# The card's dataset_info.features for the JSONL formats: datasets infers "[]" as a list of nulls,
# so without them files where no row has a history (Alpaca) would not cast to the others.
_MSG = [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}]
_META = [{"name": "id", "dtype": "string"}, {"name": "rank", "dtype": "int64"}]
FEATURES: dict[str, list[dict]] = {
    "sharegpt": [*_META, {"name": "conversations", "list": [{"name": "from", "dtype": "string"},
                                                             {"name": "value", "dtype": "string"}]}],
    "openai": [*_META, {"name": "messages", "list": _MSG}],
    "alpaca": [*_META, *({"name": k, "dtype": "string"} for k in ("instruction", "input", "output", "system")),
               {"name": "history", "list": {"list": "string"}}],
    "dpo": [*_META, *({"name": k, "list": _MSG} for k in ("prompt", "chosen", "rejected"))],
}

# LLaMA-Factory's dataset_info.json entry per format (documented fields: script_url or file_name,
# formatting, columns, tags). "script_url" names a folder that LLaMA-Factory passes to
# datasets.load_dataset whole, so it reads the card's configs and features; "file_name" would make it
# read the data files with the json builder, which infers each file's types on its own (an Alpaca
# file where no row has a history infers history as a list of nulls and the files do not combine).
_LF_SOURCE = {"script_url": "."}  # relative to dataset_dir: this folder
LLAMA_FACTORY: dict[str, dict] = {
    "sharegpt": {**_LF_SOURCE, "formatting": "sharegpt", "columns": {"messages": "conversations"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                          "assistant_tag": "gpt", "system_tag": "system"}},
    "openai": {**_LF_SOURCE, "formatting": "sharegpt", "columns": {"messages": "messages"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                        "assistant_tag": "assistant", "system_tag": "system"}},
    "alpaca": {**_LF_SOURCE, "formatting": "alpaca",
               "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                           "history": "history"}},
}


def _card_body(m: dict) -> str:
    fmt = m["format"]
    lines = [(f"Curated set `{m['curated']}` of dataset `{m['inputs']['dataset']}` exported by Thresher as **{fmt}**: "
              f"{m['rows']} rows in {len(m['files'])} file(s) under `{DATA_DIR}/`, in selection rank order."),
             "", "```python", "from datasets import load_dataset", "",
             'ds = load_dataset("path/to/this/folder", split="train")', "```", ""]
    if m["filtered"]:
        lines += ["Left out: " + ", ".join(f"{n} ({reason})" for reason, n in sorted(m["filtered"].items())) + ".", ""]
    lines += [("Parameters, counts, the sha256 of every data file and the run id are in `.manifest.json`; "
               "trainer snippets in Thresher's docs/exports.md."), "", "## Sources", "",
              "| input file | rows | licence |", "|---|---|---|"]
    lines += [f"| {s['source_uri']} | {s['rows']} | {s['licence']} |" for s in m["inputs"]["sources"]]
    return "\n".join(lines)


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
export_dpo = _exporter("dpo")


def _rejected_sides(samples: Path, curated: Path) -> dict[str, list[dict]]:
    """``{sample_id: rejected messages}`` for the curated rows whose input record had a rejected
    side (``metadata_json.rejected_messages``, kept by the hh_rlhf layout)."""
    con = duckdb.connect()
    con.read_parquet(str(samples / "*.parquet")).create_view("s")
    con.read_parquet(str(curated / "part-*.parquet")).project("sample_id").create_view("c")
    rel = con.sql("SELECT DISTINCT s.sample_id, s.metadata_json FROM s SEMI JOIN c USING (sample_id) "
                  "WHERE s.metadata_json IS NOT NULL")
    out: dict[str, list[dict]] = {}
    for sample_id, meta in rel.fetchall():
        value = json.loads(meta).get(REJECTED_MESSAGES_KEY)
        if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in value):
            out.setdefault(sample_id, value)
    return out


def _write_export(src: Path, fmt: str, out_dir: Path, rows_per_file: int,
                  rejected: dict[str, list[dict]] | None = None) -> tuple[list[dict], dict[str, int], dict[str, int]]:
    """Data files of one export into ``out_dir/data``: ([{path, rows}], {reason: rows filtered},
    {source_uri: rows written})."""
    data = out_dir / DATA_DIR
    data.mkdir()
    filtered: dict[str, int] = {}
    sources: dict[str, int] = {}
    parts: list[tuple[Path, int]] = []
    batch: list[dict] = []
    ext = "parquet" if fmt == "parquet" else "jsonl"

    def flush() -> None:
        # Named without the total first ("train-00003.jsonl.part"), renamed once it is known.
        path = data / f"train-{len(parts):05d}.{ext}.part"
        if fmt == "parquet":
            write_parquet_atomic(pa.Table.from_pylist(batch, schemas.CURATED_INSTRUCTIONS), path,
                                 schemas.CURATED_INSTRUCTIONS)
        else:
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
        parts.append((path, len(batch)))
        batch.clear()

    for row in _curated_rows(src):
        if fmt == "parquet":
            rec, reason = (row, None) if has_answer(row["messages"]) else (None, NO_ANSWER)
        elif fmt == "dpo":
            rec, reason = to_preference(row, (rejected or {}).get(row["sample_id"]))
        else:
            rec = to_layout(row, fmt)
            reason = NO_ANSWER if rec is None else None
        if rec is None:
            filtered[reason] = filtered.get(reason, 0) + 1
            continue
        batch.append(rec)
        sources[row["source_uri"]] = sources.get(row["source_uri"], 0) + 1
        if len(batch) == rows_per_file:
            flush()
    if batch or not parts:
        flush()  # an export with no rows still has one (empty) file, so every consumer sees the schema
    files = []
    for k, (path, n) in enumerate(parts):
        final = f"train-{k:05d}-of-{len(parts):05d}.{ext}"
        os.replace(path, data / final)
        files.append({"path": f"{DATA_DIR}/{final}", "rows": n})
    return files, filtered, sources
