"""Image-text exports: WebDataset tar shards in batch-plan order, ``sizes.json``, curated Parquet, a manifest.

Each tar member group is ``<key>.<ext>`` (the image bytes exactly as ingested), ``<key>.txt``
(the caption) and ``<key>.json`` (sample id, step, position, gain, concepts), which is what
open_clip's WebDataset loader reads (``--train-data 'shard-{000000..N}.tar'`` with the default
``jpg;png;jpeg;webp`` / ``txt`` keys). Keys are ``<step>_<position>`` so that the tar order is
the training order of the plan; members carry a fixed mtime so the same plan gives the same bytes.

Shards never straddle a step: each step is cut into the same number of parts, so shard
``i * k + p`` is part ``p`` of the i-th planned step (``docs/webdataset.md``). ``sizes.json``
(shard name -> samples) and ``__len__`` sit beside the shards, which is where open_clip_train's
``get_dataset_size`` looks, so ``--train-num-samples`` is not needed. By default there are at
least 8 shards, because open_clip asserts ``shards >= workers * world_size`` (``--workers``
defaults to 4). open_clip shuffles shards and samples in training whatever the flags, so it
trains on the planned *set*; :func:`plan_order_dataset` reads the export back batch by batch in
plan order (per DDP rank, with DataLoader workers) for a loop that keeps the CABS batches.
The folder's metadata is the shared export card (``export_card``): a ``README.md`` dataset card
whose ``configs`` name the shards (``datasets.load_dataset(folder)`` reads them with its
webdataset builder) and a hidden ``.manifest.json`` (parameters, counts, per-shard sha256, the
layout, input licences), written last.
The folder is written in a staging folder and swapped in whole (``materialise.staged_export_dir``):
a non-empty ``out_dir`` is refused unless ``overwrite=True``, and then replaced, never merged.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curate import annotations, export_card
from pipeline.curate.materialise import (
    check_export_target,
    export_run,
    staged_export_dir,
)
from pipeline.io.catalog import Catalog, write_json_atomic, write_parquet_atomic
from pipeline.io.runs import check_remote_stage
from pipeline.select.protocol import fingerprint

# open_clip's --workers defaults to 4 and it needs shards >= workers * world_size: 8 shards fit the
# default on two GPUs, or 8 workers on one; raise --min-shards for more.
MIN_SHARDS = 8
LAYOUT = "step-parts-v1"  # shard i * k + p = part p of the i-th step; read by plan_order_shards

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_plan(catalog: str | Path, dataset: str, plan: str | Path, out_dir: str | Path,
                samples_per_shard: int = 1000, concepts: str | None = None,
                overwrite: bool = False, lineage: dict[str, Any] | None = None, *,
                min_shards: int = MIN_SHARDS, shards_per_step: int | None = None) -> dict[str, Any]:
    """Write the samples of ``plan`` (step, position, sample_id, gain) as WebDataset shards.

    Each step is cut into ``shards_per_step`` parts (default: the least giving shards of at most
    ``samples_per_shard`` samples and at least ``min_shards`` shards); for plan-order reading
    under DDP pass the world size (:func:`plan_order_shards`). ``out_dir`` must be new or empty
    unless ``overwrite``; then a previous export there is replaced whole.
    """
    cat = Catalog.at(catalog)
    check_remote_stage(cat, "export")
    samples = cat.samples_partition("image_text", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no image-text samples for dataset {dataset!r} in {cat.root}")
    out = check_export_target(out_dir, overwrite)  # refuse before the join, not after it
    if samples_per_shard < 1 or min_shards < 1 or (shards_per_step is not None and shards_per_step < 1):
        raise ValueError(f"samples_per_shard, min_shards and shards_per_step must be >= 1, got "
                         f"{samples_per_shard}, {min_shards}, {shards_per_step}")
    plan_table = pq.read_table(plan)
    con = duckdb.connect()
    con.register("plan", plan_table)
    con.read_parquet(str(samples / "*.parquet")).create_view("s")
    concept_part = annotations.find(cat, dataset, (concepts,) if concepts else annotations.CONCEPT_SOURCES)
    if concept_part is not None:
        con.read_parquet(str(concept_part / "*.parquet")).project("sample_id, concepts").create_view("c")
    else:
        con.register("c", pa.table({"sample_id": pa.array([], pa.string()),
                                    "concepts": pa.array([], pa.list_(pa.struct([("concept", pa.string()),
                                                                                ("count", pa.int32())])))}))
    rel = con.sql("""
        SELECT p.step, p.position, p.sample_id, p.gain, s.caption, s.image, s.image_format,
               s.width, s.height, s.source_uri, c.concepts
        FROM plan p JOIN s USING (sample_id) LEFT JOIN c USING (sample_id)
        ORDER BY p.step, p.position""")
    rows = (rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()).to_pylist()
    missing = plan_table.num_rows - len(rows)
    parameters = {"format": "webdataset", "dataset": dataset, "plan": str(plan), "samples_per_shard": samples_per_shard,
                  "min_shards": min_shards, "shards_per_step": shards_per_step,
                  "concepts": concepts, "overwrite": overwrite, **(lineage or {})}
    parts, where, per_step = _step_parts(rows, samples_per_shard, min_shards, shards_per_step)
    read = [Path(plan), samples, *([concept_part] if concept_part is not None else [])]
    with export_run(cat, dataset, out, parameters, fingerprint(read)) as run:
        with staged_export_dir(out, overwrite) as stage:
            shards = _write_shards(parts, stage)
            sizes = {name: len(part) for name, part in zip(shards, parts)}
            # open_clip_train's get_dataset_size: sizes.json first, else the literal in __len__.
            write_json_atomic(sizes, stage / "sizes.json")
            (stage / "__len__").write_text(f"{len(rows)}\n")
            if rows:
                curated = pa.Table.from_pylist([{k: r[k] for k in ("step", "position", "sample_id", "gain", "caption",
                                                                   "image_format", "width", "height", "source_uri")}
                                                for r in rows])
                write_parquet_atomic(curated, stage / "curated.parquet")
            counts = {"samples": len(rows), "missing_from_dataset": missing, "shards": len(shards)}
            sources: dict[str, int] = {}
            for r in rows:
                sources[r["source_uri"]] = sources.get(r["source_uri"], 0) + 1
            manifest = {"dataset": dataset, "plan": str(plan), "shards": shards, "samples": len(rows),
                        "missing_from_dataset": missing, "steps": len({r["step"] for r in rows}),
                        "layout": LAYOUT, "shards_per_step": per_step,
                        "train_data": _brace_pattern(shards),
                        "shard_steps": [{"shard": name, "step": step, "part": p, "samples": sizes[name]}
                                        for name, (step, p) in zip(shards, where)],
                        "data_files": [{**rec, "samples": sizes[rec["path"]]}
                                       for rec in export_card.file_records(stage, shards)],
                        "warnings": ([(f"{len(shards)} shards < min_shards {min_shards} ({per_step} per step): "
                                      "open_clip needs shards >= --workers x world size")]
                                     if shards and len(shards) < min_shards else []),
                        "concepts_from": concept_part.parent.name if concept_part else None,
                        "inputs": {"dataset": dataset, "plan": str(plan), "selection": (lineage or {}).get("selection"),
                                   "sources": export_card.input_sources(sources)},
                        "catalog": str(cat.root), "parameters": parameters, "run_id": run.run_id, "counts": counts}
            # A glob, not thousands of names: datasets expands it sorted, which is the plan order.
            export_card.write_export_metadata(
                stage, manifest, title=f"{(lineage or {}).get('selection') or Path(plan).stem} (WebDataset)",
                configs=[export_card.config("default", ["shard-*.tar"])], body=_card_body(manifest),
                tags=("thresher", "webdataset", "cabs"))
        # Committed after the swap, so a failed swap is recorded as a failure, never a success.
        run.commit(counts, absent=tuple(run.outputs))
    return manifest


def export_webdataset(catalog: str | Path, source: str, out_dir: str | Path, overwrite: bool = False, *,
                      dataset: str, samples_per_shard: int = 1000, concepts: str | None = None,
                      min_shards: int = MIN_SHARDS, shards_per_step: int | None = None) -> dict[str, Any]:
    """The batch plan of selection ``source`` (``selections/<source>/``, e.g. from CABS) as
    WebDataset shards (registry entry ``webdataset``); the selection's run id goes to the manifest."""
    from pipeline.select import protocol

    plan = protocol.selection_picks(catalog, source)
    doc = protocol.read_selection_document(catalog, source)
    return export_plan(catalog, dataset, plan, out_dir, samples_per_shard, concepts, overwrite,
                       lineage={"selection": source, "selection_run_id": doc.get("run_id")},
                       min_shards=min_shards, shards_per_step=shards_per_step)


def _step_parts(rows: list[dict[str, Any]], samples_per_shard: int, min_shards: int,
                shards_per_step: int | None) -> tuple[list[list[dict[str, Any]]], list[tuple[Any, int]], int]:
    """Cut the plan-ordered rows into shards that never straddle a step.

    Every step is split into the same number ``k`` of contiguous parts (``np.array_split``
    sizes: they differ by at most one), so shard ``i * k + p`` is part ``p`` of the i-th step and
    a brace pattern over all shards lists them in plan order. ``k`` is ``shards_per_step`` when
    given, else the least that keeps every shard at most ``samples_per_shard`` and gives at least
    ``min_shards`` shards — but never more than the smallest step has samples, so no shard is empty.
    """
    steps: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r)
    if not steps:
        return [], [], shards_per_step or 1
    smallest, largest = min(map(len, steps.values())), max(map(len, steps.values()))
    if shards_per_step is not None:
        if not 1 <= shards_per_step <= smallest:
            raise ValueError(f"shards_per_step={shards_per_step} must be between 1 and the smallest step's "
                             f"{smallest} samples (a larger value would write empty shards)")
        k = shards_per_step
    else:
        k = min(smallest, max(1, -(-min_shards // len(steps)), -(-largest // samples_per_shard)))
    parts, where = [], []
    for step, step_rows in steps.items():
        bounds = np.array_split(np.arange(len(step_rows)), k)
        for p, idx in enumerate(bounds):
            parts.append([step_rows[i] for i in idx.tolist()])
            where.append((step, p))
    return parts, where, k


def _card_body(m: dict[str, Any]) -> str:
    lines = [(f"Batch plan `{m['inputs']['selection'] or m['plan']}` of dataset `{m['dataset']}` exported by Thresher "
             f"as WebDataset: {m['samples']} samples of {m['steps']} planned steps in {len(m['shards'])} shards "
             f"({m['shards_per_step']} per step), keys `<step>_<position>` in plan order; `sizes.json` gives "
             "the samples per shard."), "",
             "open_clip (shuffles shards and samples, so it trains on the planned set, not the batches):", "",
             "```bash", "python -m open_clip_train.main --dataset-type webdataset \\",
             f"    --train-data 'path/to/this/folder/{m['train_data']}' --workers 4 ...", "```", "",
             ("The CABS batches in plan order: `pipeline.curate.webdataset_export.plan_order_dataset(folder, rank, "
             "world_size)`; Hugging Face: `datasets.load_dataset(\"path/to/this/folder\", split=\"train\")`. "
             "Parameters, counts, the sha256 of every shard and the run id are in `.manifest.json`; "
             "details in Thresher's docs/webdataset.md."), ""]
    if m["warnings"]:
        lines += ["Warnings: " + "; ".join(m["warnings"]) + ".", ""]
    lines += ["## Sources", "", "| input file | samples | licence |", "|---|---|---|"]
    sources = m["inputs"]["sources"]
    lines += [f"| {s['source_uri']} | {s['rows']} | {s['licence']} |" for s in sources[:_CARD_SOURCES]]
    if len(sources) > _CARD_SOURCES:  # an image folder has one source per image: all are in the manifest
        lines += ["", f"{len(sources) - _CARD_SOURCES} more input files in `.manifest.json`."]
    return "\n".join(lines)


_CARD_SOURCES = 50


def _brace_pattern(shards: list[str]) -> str | None:
    """``shard-{000000..000009}.tar`` for ``--train-data`` (relative to the export folder)."""
    if not shards:
        return None
    return shards[0] if len(shards) == 1 else f"shard-{{{0:06d}..{len(shards) - 1:06d}}}.tar"


def _write_shards(parts: list[list[dict[str, Any]]], out_dir: Path) -> list[str]:
    shards: list[str] = []
    for part in parts:
        name = f"shard-{len(shards):06d}.tar"
        tmp = out_dir / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for r in part:
                key = f"{r['step']:06d}_{r['position']:06d}"
                ext = _EXT.get(r["image_format"] or "", "img")
                _member(tar, f"{key}.{ext}", r["image"])
                _member(tar, f"{key}.txt", (r["caption"] or "").encode("utf-8"))
                meta = {"sample_id": r["sample_id"], "step": r["step"], "position": r["position"],
                        "gain": r["gain"], "width": r["width"], "height": r["height"],
                        "concepts": [{"concept": c["concept"], "count": c["count"]} for c in r["concepts"] or []]}
                _member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        os.replace(tmp, out_dir / name)
        shards.append(name)
    return shards


def plan_order_shards(export_dir: str | Path, rank: int = 0, world_size: int = 1) -> list[list[str]]:
    """Rank ``rank``'s shards of every planned step, in plan order: ``[[path, ...] per step]``.

    A step's ``k`` parts are shared out like :func:`pipeline.select.cabs_sampler.rank_share`:
    rank r reads parts ``r * k / W`` to ``(r + 1) * k / W - 1``, so ``k`` must be a multiple of the
    world size; with ``k == W`` each rank's shard is exactly its ``rank_share`` of the step. The
    ranks' shares are disjoint, cover the step, and every rank gets every step (as DDP needs).
    """
    root = Path(export_dir)
    manifest = export_card.read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root} holds no export manifest ({export_card.MANIFEST}); is it a Thresher export?")
    if manifest.get("layout") != LAYOUT:
        raise ValueError(f"{root} was exported before shards followed steps (no layout {LAYOUT!r} in its "
                         "manifest); export it again to read it in plan order")
    k = int(manifest["shards_per_step"])
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if k % world_size:
        raise ValueError(f"{root} has {k} shards per step, which {world_size} ranks cannot share; export it "
                         f"again with shards_per_step={world_size} (--shards-per-step {world_size})")
    per_rank = k // world_size
    names = manifest["shards"]
    return [[str(root / names[i * k + p]) for p in range(rank * per_rank, (rank + 1) * per_rank)]
            for i in range(len(names) // k)]


def plan_order_dataset(export_dir: str | Path, rank: int = 0, world_size: int = 1, *,
                       decode: str | None = "pil", map_sample: Any = None) -> Any:
    """An IterableDataset of this rank's batches, one per planned step, in plan order.

    Each batch is the list of samples (webdataset dicts: ``__key__``, the image under its
    extension, ``txt``, ``json``; decoded with ``webdataset.decode(decode)`` unless None, then
    ``map_sample`` applied when given). Use ``DataLoader(ds, batch_size=None, num_workers=W,
    collate_fn=...)``: worker w reads the steps w, w + W, ..., and the DataLoader takes one
    batch from each worker in turn, so its output is the plan order for any W. Nothing is
    shuffled; the order is the plan's, epoch after epoch. Needs the ``webdataset`` package.
    """
    import webdataset as wds

    steps = plan_order_shards(export_dir, rank, world_size)
    stages: list[Any] = [_WorkerSteps(steps), wds.tarfile_to_samples()]
    if decode is not None:
        stages.append(wds.decode(decode))
    stages.append(_StepBatches(steps, map_sample))
    return wds.DataPipeline(*stages)


class _WorkerSteps:
    """This DataLoader worker's steps' shard URLs (steps w, w + W, ...); a step stays in one worker.

    Module-level (not a closure) so that DataLoader workers started by spawn can unpickle it.
    """

    def __init__(self, steps: list[list[str]]) -> None:
        self.steps = steps

    def __call__(self) -> Any:  # a DataPipeline source: called with no arguments each epoch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(worker, len(self.steps), workers):
            for url in self.steps[i]:
                yield {"url": url}


class _StepBatches:
    """Group a worker's sample stream into one list per step (a step's shards are consecutive)."""

    def __init__(self, steps: list[list[str]], map_sample: Any = None) -> None:
        self.step_of = {url: i for i, urls in enumerate(steps) for url in urls}
        self.map_sample = map_sample

    def __call__(self, samples: Any) -> Any:
        batch: list[Any] = []
        current = None
        for sample in samples:
            i = self.step_of[sample["__url__"]]
            if batch and i != current:
                yield batch
                batch = []
            current = i
            batch.append(self.map_sample(sample) if self.map_sample is not None else sample)
        if batch:
            yield batch
