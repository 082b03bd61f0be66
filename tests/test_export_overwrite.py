"""Exports into a used folder: refused unless --overwrite, then replaced whole (never merged)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.cli import main
from pipeline.curate import materialise
from pipeline.curate.export_card import MANIFEST
from pipeline.curate.materialise import export, materialise_instructions
from pipeline.curate.webdataset_export import export_plan
from pipeline.stages.ingest import run_ingest


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("cat")
    run_ingest([str(demo_data / "instructions" / "gsm8k_train.jsonl.gz")], root, "g")
    ids = query.run_query(root, "SELECT sample_id FROM samples ORDER BY sample_id LIMIT 30").column("sample_id")
    for name, n in (("big", 30), ("small", 10)):
        picks = root / f"{name}.picks.parquet"
        pq.write_table(pa.table({"rank": list(range(n)), "sample_id": ids.slice(0, n),
                                 "gain": [float(n - i) for i in range(n)]}), picks)
        materialise_instructions(root, "g", picks, name)
    return root


def _export(catalog, name, out, *flags, fmt="openai", rows_per_file=10) -> int:
    return main(["export", "--catalog", str(catalog), "--curated", name, "--format", fmt, "--out", str(out),
                 "--rows-per-file", str(rows_per_file), *flags])


def _on_disk_rows(out: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in out.rglob("*.jsonl"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_smaller_reexport_with_overwrite_leaves_no_stale_rows(catalog, tmp_path, capsys):
    out = tmp_path / "exports" / "sft"
    assert _export(catalog, "big", out) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000-of-00003.jsonl", "train-00001-of-00003.jsonl", "train-00002-of-00003.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "README.md", "data", "dataset_info.json"]
    assert _on_disk_rows(out) == 30
    assert _export(catalog, "small", out, "--overwrite") == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["curated"] == "small" and manifest["rows"] == 10
    assert _on_disk_rows(out) == manifest["rows"]  # the bug: 30 rows on disk vs 10 in the manifest
    assert sorted(p.relative_to(out).as_posix() for p in (out / "data").iterdir()) == sorted(manifest["files"])
    assert [p.name for p in out.parent.iterdir()] == ["sft"]  # no staging or old folder left beside it
    capsys.readouterr()


def test_non_empty_folder_is_refused_without_overwrite(catalog, tmp_path, capsys):
    out = tmp_path / "sft"
    assert _export(catalog, "big", out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _export(catalog, "small", out) == 2
    assert f"{out} is not empty; pass --overwrite to replace it" in capsys.readouterr().err
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        export(catalog, "small", "alpaca", out)
    assert _snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["sft"]


def test_new_or_empty_folder_needs_no_overwrite(catalog, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    m = export(catalog, "small", "sharegpt", empty)
    assert m["rows"] == 10 and _on_disk_rows(empty) == 10
    m = export(catalog, "small", "parquet", tmp_path / "a" / "b" / "new")
    assert pq.read_table(tmp_path / "a" / "b" / "new" / "data").num_rows == m["rows"] == 10


def test_parquet_reexport_replaces_the_folder(catalog, tmp_path):
    out = tmp_path / "pq"
    export(catalog, "big", "openai", out, rows_per_file=7)
    m = export(catalog, "small", "parquet", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "README.md", "data"]
    assert m["files"] == ["data/train-00000-of-00001.parquet"]
    assert pq.read_table(out / "data").num_rows == m["rows"] == 10


def test_an_export_of_the_older_layout_is_replaced(catalog, tmp_path):
    """Exports made before the card/manifest move kept manifest.json beside flat data files."""
    out = tmp_path / "old"
    export(catalog, "small", "openai", out)
    (out / MANIFEST).rename(out / "manifest.json")
    (out / "data" / "train-00000-of-00001.jsonl").rename(out / "data-00000.jsonl")
    (out / "data").rmdir()
    m = export(catalog, "big", "openai", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "README.md", "data", "dataset_info.json"]
    assert _on_disk_rows(out) == m["rows"] == 30


@pytest.mark.parametrize("content", ["user files", "foreign manifest", "export with sub-folders"])
def test_overwrite_never_replaces_a_folder_that_is_not_an_export(catalog, tmp_path, capsys, content):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("my notes")
    if content == "foreign manifest":
        (home / "manifest.json").write_text(json.dumps({"name": "some web app", "files": ["a.js"]}))
    if content == "export with sub-folders":  # e.g. --out pointed at a folder someone exported into by hand
        export(catalog, "small", "alpaca", tmp_path / "prev")
        for f in (tmp_path / "prev").iterdir():
            if f.is_file():
                (home / f.name).write_bytes(f.read_bytes())
        (home / "projects").mkdir()
        (home / "projects" / "thesis.tex").write_text("important")
    before = _snapshot(home)
    assert _export(catalog, "small", home, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "does not hold a previous Thresher export" in err and "refusing" in err
    assert _snapshot(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["home"] + (["prev"] if "sub" in content else []))


def test_other_unusable_targets_are_refused(catalog, tmp_path):
    a_file = tmp_path / "file.jsonl"
    a_file.write_text("x\n")
    with pytest.raises(ValueError, match="not a folder"):
        export(catalog, "small", "openai", a_file, overwrite=True)
    real = tmp_path / "real"
    export(catalog, "small", "openai", real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="symbolic link"):
        export(catalog, "big", "openai", link, overwrite=True)
    assert json.loads((real / MANIFEST).read_text())["curated"] == "small"


def test_a_failed_export_leaves_the_previous_one_whole(catalog, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    export(catalog, "small", "openai", out)
    before = _snapshot(out)
    calls = {"n": 0}
    real = materialise.to_layout

    def failing(row, fmt):
        calls["n"] += 1
        if calls["n"] > 15:
            raise RuntimeError("disk full")
        return real(row, fmt)

    monkeypatch.setattr(materialise, "to_layout", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export(catalog, "big", "openai", out, rows_per_file=5, overwrite=True)
    assert calls["n"] == 16
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]


# ------------------------------------------------------------------ WebDataset


@pytest.fixture(scope="module")
def images(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("img")
    run_ingest([str(demo_data / "image_text" / "dreambooth" / "images")], root, "db", kind="image_text",
               container="image_folder", options={"caption_from": "dirname"})
    ids = query.run_query(root, "SELECT sample_id FROM image_samples ORDER BY sample_id LIMIT 20") \
        .column("sample_id").to_pylist()
    plans = {}
    for name, n in (("long", 20), ("short", 6)):
        plans[name] = root / f"{name}.plan.parquet"
        pq.write_table(pa.table({"step": [i // 2 for i in range(n)], "position": [i % 2 for i in range(n)],
                                 "sample_id": ids[:n], "gain": [1.0] * n}), plans[name])
    return root, plans


def _tar_samples(out: Path) -> int:
    n = 0
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            n += sum(1 for m in tar.getnames() if m.endswith(".json"))
    return n


def test_webdataset_reexport(images, tmp_path, capsys):
    root, plans = images
    out = tmp_path / "wds"
    m = export_plan(root, "db", plans["long"], out, samples_per_shard=4)
    assert len(m["shards"]) == 10 and _tar_samples(out) == 20  # shards follow the 10 steps of 2
    before = _snapshot(out)
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        export_plan(root, "db", plans["short"], out, samples_per_shard=4)
    assert _snapshot(out) == before
    assert main(["export", "--catalog", str(root), "--format", "webdataset", "--plan", str(plans["short"]),
                 "--dataset", "db", "--out", str(out), "--samples-per-shard", "4", "--overwrite"]) == 0
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["samples"] == 6 and manifest["shards"] == [f"shard-{i:06d}.tar" for i in range(6)]  # 3 steps x 2
    assert _tar_samples(out) == manifest["samples"]
    assert pq.read_table(out / "curated.parquet").num_rows == 6
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["shards"] + ["curated.parquet", ".manifest.json",
                                                                                "README.md", "sizes.json", "__len__"])
    assert [p.name for p in tmp_path.iterdir()] == ["wds"]
    # An instruction export may replace a WebDataset export (both are Thresher exports) and vice versa,
    # but a folder of someone's pictures is never replaced.
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="does not hold a previous Thresher export"):
        export_plan(root, "db", plans["short"], pics, overwrite=True)
    assert (pics / "cat.jpg").read_bytes() == b"\xff\xd8"
