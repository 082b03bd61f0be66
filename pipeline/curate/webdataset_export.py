"""Image-text exports: WebDataset tar shards in batch-plan order, curated Parquet, a manifest.

Each tar member group is ``<key>.<ext>`` (the image bytes exactly as ingested), ``<key>.txt``
(the caption) and ``<key>.json`` (sample id, step, position, gain, concepts), which is what
open_clip's WebDataset loader reads (``--train-data 'shard-{00000..N}.tar'`` with the default
``jpg;png;jpeg;webp`` / ``txt`` keys). Keys are ``<step>_<position>`` so that the tar order is
the training order of the plan; members carry a fixed mtime so the same plan gives the same bytes.
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
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curate import annotations
from pipeline.curate.materialise import (
    check_export_target,
    export_run,
    staged_export_dir,
)
from pipeline.io.catalog import Catalog, write_json_atomic, write_parquet_atomic
from pipeline.io.runs import check_remote_stage
from pipeline.select.protocol import fingerprint

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_plan(catalog: str | Path, dataset: str, plan: str | Path, out_dir: str | Path,
                samples_per_shard: int = 1000, concepts: str | None = None,
                overwrite: bool = False, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the samples of ``plan`` (step, position, sample_id, gain) as WebDataset shards.

    ``out_dir`` must be new or empty unless ``overwrite``; then a previous export there is replaced whole.
    """
    cat = Catalog.at(catalog)
    check_remote_stage(cat, "export")
    samples = cat.samples_partition("image_text", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no image-text samples for dataset {dataset!r} in {cat.root}")
    out = check_export_target(out_dir, overwrite)  # refuse before the join, not after it
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
                  "concepts": concepts, "overwrite": overwrite, **(lineage or {})}
    read = [Path(plan), samples, *([concept_part] if concept_part is not None else [])]
    with export_run(cat, dataset, out, parameters, fingerprint(read)) as run:
        with staged_export_dir(out, overwrite) as stage:
            shards = _write_shards(rows, stage, samples_per_shard)
            if rows:
                curated = pa.Table.from_pylist([{k: r[k] for k in ("step", "position", "sample_id", "gain", "caption",
                                                                   "image_format", "width", "height", "source_uri")}
                                                for r in rows])
                write_parquet_atomic(curated, stage / "curated.parquet")
            counts = {"samples": len(rows), "missing_from_dataset": missing, "shards": len(shards)}
            manifest = {"dataset": dataset, "plan": str(plan), "shards": shards, "samples": len(rows),
                        "missing_from_dataset": missing, "steps": len({r["step"] for r in rows}),
                        "concepts_from": concept_part.parent.name if concept_part else None,
                        "catalog": str(cat.root), "parameters": parameters, "run_id": run.run_id, "counts": counts}
            write_json_atomic(manifest, stage / "manifest.json")
        # Committed after the swap, so a failed swap is recorded as a failure, never a success.
        run.commit(counts, absent=tuple(run.outputs))
    return manifest


def export_webdataset(catalog: str | Path, source: str, out_dir: str | Path, overwrite: bool = False, *,
                      dataset: str, samples_per_shard: int = 1000, concepts: str | None = None) -> dict[str, Any]:
    """The batch plan of selection ``source`` (``selections/<source>/``, e.g. from CABS) as
    WebDataset shards (registry entry ``webdataset``); the selection's run id goes to the manifest."""
    from pipeline.select import protocol

    plan = protocol.selection_picks(catalog, source)
    doc = protocol.read_selection_document(catalog, source)
    return export_plan(catalog, dataset, plan, out_dir, samples_per_shard, concepts, overwrite,
                       lineage={"selection": source, "selection_run_id": doc.get("run_id")})


def _write_shards(rows: list[dict[str, Any]], out_dir: Path, samples_per_shard: int) -> list[str]:
    shards: list[str] = []
    for start in range(0, len(rows), samples_per_shard):
        name = f"shard-{len(shards):05d}.tar"
        tmp = out_dir / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for r in rows[start:start + samples_per_shard]:
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
