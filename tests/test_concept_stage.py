"""Concept annotation stages over a catalog: caption and open_clip annotators, DataConcept passthrough."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from pipeline.annotate.vocabulary import ConceptEntry, Vocabulary
from pipeline.cli import main as cli_main
from pipeline.io.catalog import Catalog
from pipeline.stages.concepts import (
    CAPTION_TABLE,
    CLIP_TABLE,
    run_caption_concepts,
    run_clip_concepts,
)
from pipeline.stages.ingest import run_ingest


def jpeg(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nlvr_catalog(tmp_path_factory, demo_data) -> Catalog:
    root = tmp_path_factory.mktemp("cat")
    run_ingest([str(demo_data / "image_text" / "nlvr_dev")], root, "nlvr", kind="image_text", container="nlvr")
    return Catalog.at(root)


def read_rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_caption_concepts_stage_writes_one_row_per_sample_and_skips_when_unchanged(nlvr_catalog, tmp_path):
    cat = nlvr_catalog
    r = run_caption_concepts(cat.root, "nlvr")
    out = cat.annotation_partition(CAPTION_TABLE, "nlvr")
    assert r.output == str(out) and not r.skipped
    assert r.rows_in == r.rows_out == cat.row_count("samples_image_text", "nlvr") > 100  # 120 images, a few dedup
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == schemas.CONCEPT_ANNOTATIONS.remove_metadata()
    samples = {s["sample_id"]: s["caption"] for s in pq.read_table(cat.samples_partition("image_text", "nlvr"),
                                                                   columns=["sample_id", "caption"]).to_pylist()}
    rows = {row["sample_id"]: row for row in table.to_pylist()}
    assert set(rows) == set(samples)
    tower = [row for sid, row in rows.items() if samples[sid] == "There is a tower with four blocks."]
    assert 1 <= len(tower) <= 6  # one per distinct rendered image of that sentence
    assert {(c["concept"], c["count"]) for c in tower[0]["concepts"]} == {("tower", 1), ("block", 4)}
    assert all(row["annotator"] == "caption" and row["boxes"] is None for row in rows.values())

    again = run_caption_concepts(cat.root, "nlvr")
    assert again.skipped and again.run_id == r.run_id
    forced = run_caption_concepts(cat.root, "nlvr", force=True)
    assert not forced.skipped
    ledger = json.loads(cat.ledger_path(forced.run_id).read_text())
    assert ledger["stage"] == CAPTION_TABLE and ledger["parameters"]["vocabulary_size"] > 3000

    # A different vocabulary is a different stage run, with different rows.
    small = Vocabulary((ConceptEntry("tower", (), "building"), ConceptEntry("triangle", (), "shape")))
    path = small.write(tmp_path / "v.tsv")
    changed = run_caption_concepts(cat.root, "nlvr", vocabulary=str(path))
    assert not changed.skipped
    tower_id = next(sid for sid, c in samples.items() if c == "There is a tower with four blocks.")
    new_rows = {row["sample_id"]: row for row in read_rows(out)}
    assert new_rows[tower_id]["concepts"] == [{"concept": "tower", "count": 1, "confidence": 1.0}]


def test_input_dataconcept_boxes_and_caption_concepts_share_one_table_shape(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "d.jpg").write_bytes(jpeg("white"))
    (root / "d.txt").write_text("three dogs and a ball")
    (root / "d.json").write_text(json.dumps({
        "classes": ["dog", "ball", "dog", "dog"], "scores": [0.9, 0.5, 0.8, 0.95],
        "bounding_boxes": [[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.6, 0.6], [0.2, 0.2, 0.3, 0.3], [0.6, 0.1, 0.9, 0.4]],
        "tags": [{"tag": "grass", "prob": 0.7}]}))
    (root / "e.jpg").write_bytes(jpeg("black"))
    (root / "e.txt").write_text("a cat on a sofa")
    run_ingest([str(root)], tmp_path / "cat", "dc", kind="image_text", container="image_folder")
    cat = Catalog.at(tmp_path / "cat")
    run_caption_concepts(cat.root, "dc")
    given = pq.read_table(cat.annotation_partition("input_concepts", "dc"))
    derived = pq.read_table(cat.annotation_partition(CAPTION_TABLE, "dc"))
    assert given.schema == derived.schema  # the same table, metadata included
    # The input annotations are kept as they are (boxes, scores, tags), one instance per box ...
    (box_row,) = given.to_pylist()
    assert box_row["annotator"] == "input" and len(box_row["boxes"]) == 4
    assert [(c["concept"], c["count"]) for c in box_row["concepts"]] == [("dog", 3), ("ball", 1)]
    # ... and the caption annotator, reading only "three dogs and a ball", agrees on the instances.
    by_id = {row["sample_id"]: row for row in derived.to_pylist()}
    assert [(c["concept"], c["count"]) for c in by_id[box_row["sample_id"]]["concepts"]] == [("dog", 3), ("ball", 1)]
    assert {c["concept"] for row in by_id.values() for c in row["concepts"]} == {"dog", "ball", "cat", "sofa"}


def test_cabs_planner_reads_caption_concepts(nlvr_catalog):
    from pipeline.curate.cabs_plan import concepts_from_catalog

    run_caption_concepts(nlvr_catalog.root, "nlvr")
    pool = concepts_from_catalog(nlvr_catalog.root, "nlvr", source=CAPTION_TABLE)
    assert len(pool.sample_ids) == nlvr_catalog.row_count("samples_image_text", "nlvr") and pool.source == CAPTION_TABLE
    # instances are repeated by count: "a tower with four blocks" gives block x4
    assert any(sorted(c) == ["block"] * 4 + ["tower"] for c in pool.concepts)


def test_clip_concepts_stage_with_a_tiny_random_model(demo_data, tmp_path):
    from pipeline.embed.clip import TINY_MODEL

    run_ingest([str(demo_data / "image_text" / "small_dupes")], tmp_path / "cat", "dupes", kind="image_text",
               container="image_folder")
    cat = Catalog.at(tmp_path / "cat")
    vocab = Vocabulary(tuple(ConceptEntry(n, (), "object") for n in ("bed", "bus", "umbrella", "woman", "street")))
    r = run_clip_concepts(cat.root, "dupes", TINY_MODEL, None, top_k=2, threshold=0.0, vocabulary=vocab)
    assert r.rows_in == r.rows_out == cat.row_count("samples_image_text", "dupes") > 0
    rows = read_rows(cat.annotation_partition(CLIP_TABLE, "dupes"))
    for row in rows:
        assert len(row["concepts"]) == 2 and row["annotator"] == f"clip:{TINY_MODEL}-random"
        conf = [c["confidence"] for c in row["concepts"]]
        assert conf == sorted(conf, reverse=True) and all(0 <= x <= 1 for x in conf)
        assert [t["tag"] for t in row["tags"]] == [c["concept"] for c in row["concepts"]]
    # identical images get identical tags: the model is seeded the same in every worker
    by_sha = {}
    images = pq.read_table(cat.samples_partition("image_text", "dupes"), columns=["sample_id", "image_sha256"])
    sha = dict(zip(images.column("sample_id").to_pylist(), images.column("image_sha256").to_pylist()))
    for row in rows:
        by_sha.setdefault(sha[row["sample_id"]], []).append([c["concept"] for c in row["concepts"]])
    assert all(len({tuple(x) for x in v}) == 1 for v in by_sha.values())
    assert run_clip_concepts(cat.root, "dupes", TINY_MODEL, None, top_k=2, threshold=0.0, vocabulary=vocab).skipped
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        run_clip_concepts(cat.root, "dupes", "no-such-model", None, vocabulary=vocab)


def test_stage_needs_ingested_samples(tmp_path):
    with pytest.raises(FileNotFoundError, match="ingest it first"):
        run_caption_concepts(tmp_path / "empty", "nothing")


def test_cli_annotate_and_match(nlvr_catalog, capsys):
    assert cli_main(["concepts", "annotate", "--catalog", str(nlvr_catalog.root), "--dataset", "nlvr"]) == 0
    out = capsys.readouterr().out
    n = nlvr_catalog.row_count("samples_image_text", "nlvr")
    assert f"caption_concepts nlvr: {n} samples -> {n} rows" in out
    assert cli_main(["concepts", "match", "two", "dogs", "and", "no", "cats"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["dog\t2"]
