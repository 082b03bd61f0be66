"""Image-text batch plans exported as WebDataset tars in plan order."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import query
from pipeline.cli import main
from pipeline.stages.ingest import run_ingest


def test_plan_to_webdataset_shards(tmp_path, demo_data):
    root = tmp_path / "cat"
    run_ingest([str(demo_data / "image_text" / "dreambooth" / "images")], root, "db", kind="image_text",
               container="image_folder", options={"caption_from": "dirname"})
    samples = query.run_query(root, "SELECT sample_id, caption FROM image_samples ORDER BY sample_id").to_pylist()
    src = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"sample_id": [s["sample_id"] for s in samples],
                             "concepts": [s["caption"].split() for s in samples]}), src)
    plan = tmp_path / "plan.parquet"
    assert main(["select", "cabs", "--input", str(src), "--superbatch", "20", "--filter-ratio", "0.5",
                 "--steps", "2", "--out", str(plan)]) == 0
    out = tmp_path / "wds"
    assert main(["export", "--catalog", str(root), "--format", "webdataset", "--plan", str(plan),
                 "--dataset", "db", "--out", str(out), "--samples-per-shard", "7"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 20 and manifest["missing_from_dataset"] == 0 and len(manifest["shards"]) == 3
    plan_rows = pq.read_table(plan).to_pylist()
    caption_of = {s["sample_id"]: s["caption"] for s in samples}
    seen = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard) as tar:
            names = tar.getnames()
            keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
            for key in keys:
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                caption = tar.extractfile(f"{key}.txt").read().decode()
                Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).load()
                assert caption == caption_of[meta["sample_id"]]
                seen.append((meta["step"], meta["position"], meta["sample_id"]))
    assert seen == [(r["step"], r["position"], r["sample_id"]) for r in plan_rows]


def test_selection_in_the_catalog_to_webdataset_with_lineage(tmp_path, demo_data):
    root = tmp_path / "cat"
    run_ingest([str(demo_data / "image_text" / "dreambooth" / "images")], root, "db", kind="image_text",
               container="image_folder", options={"caption_from": "dirname"})
    samples = query.run_query(root, "SELECT sample_id, caption FROM image_samples ORDER BY sample_id").to_pylist()
    src = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"sample_id": [s["sample_id"] for s in samples],
                             "concepts": [s["caption"].split() for s in samples]}), src)
    assert main(["select", "cabs", "--catalog", str(root), "--input", str(src), "--name", "plan2",
                 "--superbatch", "20", "--filter-ratio", "0.5", "--steps", "2"]) == 0
    report = json.loads((root / "selections" / "plan2" / "report.json").read_text())
    out = tmp_path / "wds"
    assert main(["export", "--catalog", str(root), "--format", "webdataset", "--selection", "plan2",
                 "--dataset", "db", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 20 and manifest["parameters"]["selection_run_id"] == report["run_id"]
    runs = query.run_query(root, "SELECT stage, status, dataset FROM runs WHERE stage IN ('select', 'export') "
                                 "ORDER BY stage").to_pylist()
    assert runs == [{"stage": "export", "status": "succeeded", "dataset": "db"},
                    {"stage": "select", "status": "succeeded", "dataset": "file"}]
    assert main(["export", "--catalog", str(root), "--format", "webdataset", "--dataset", "db",
                 "--out", str(tmp_path / "x")]) == 2  # neither --selection nor --plan
