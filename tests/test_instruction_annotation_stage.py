"""Offline tag and quality stages over a small catalog: rows, schemas, skip-if-unchanged, input annotations."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pipeline.io.catalog import Catalog
from pipeline.stages.ingest import run_ingest
from pipeline.stages.instruction_annotations import (
    run_quality_annotation,
    run_tag_annotation,
)

RECORDS = [
    {"instruction": "Write a Python function that returns the factorial of n.",
     "output": "```python\ndef factorial(n):\n    return 1 if n < 2 else n * factorial(n - 1)\n```"},
    {"question": "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many apples are left?",
     "answer": "3 * 12 = <<3*12=36>>36 apples, 36 - 5 = <<36-5=31>>31.\n#### 31"},
    {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am an assistant."},
                       {"from": "human", "value": "Goodbye!"}, {"from": "gpt", "value": "Bye!"}]},
    {"instruction": "Translate the sentence into German.", "input": "The cat sleeps.", "output": "Die Katze schläft."},
    {"instruction": "Write a haiku about the sea.", "output": "Grey waves fold and break\nsalt wind combs the dune grasses\ngulls hang in the light"},
    {"dialogs": ["Summarize: the meeting moved to Friday because the room was booked.", "The meeting is now on Friday."],
     "annotation": {"instag": {"content": [{"tag": "summarization"}]},
                    "deita": {"quality_scores": [5.0], "complexity_scores": [2.0]}}},
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("annot")
    src = root / "in"
    src.mkdir()
    (src / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    run_ingest([str(src)], root / "cat", "mix", num_shards=2)
    return Catalog.at(root / "cat")


def _rows(partition) -> dict[str, dict]:
    return {r["sample_id"]: r for r in pq.read_table(partition).to_pylist()}


def _samples(cat: Catalog) -> dict[str, dict]:
    return _rows(cat.samples_partition("instruction", "mix"))


def test_offline_tag_stage_writes_tag_rows_per_shard_and_skips_when_unchanged(catalog):
    result = run_tag_annotation(catalog.root, "mix")
    out = catalog.annotation_partition("offline_tags", "mix")
    src = catalog.samples_partition("instruction", "mix")
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in src.glob("*.parquet"))
    assert result.rows_out == len(RECORDS) and pq.read_schema(next(out.glob("*.parquet"))).names == schemas.TAG_ANNOTATIONS.names
    rows, samples = _rows(out), _samples(catalog)
    tags = {}
    for sid, row in rows.items():
        assert row["annotator"] == "offline_tags" and len(row["tags"]) >= 1
        assert all(0.0 <= t["confidence"] <= 1.0 for t in row["tags"])
        tags[samples[sid]["messages"][0]["content"][:12]] = {t["tag"] for t in row["tags"]}
    assert "python programming" in tags["Write a Pyth"]
    assert {"arithmetic", "math word problem"} <= tags["Tom has 3 bo"]
    assert {"identity question", "multi-turn dialogue"} <= tags["Who are you?"]
    assert "machine translation" in tags["Translate th"] and "haiku" in tags["Write a haik"]
    assert np.mean([len(t) for t in tags.values()]) >= 2.0
    assert run_tag_annotation(catalog.root, "mix").skipped


def test_offline_quality_stage_scores_rounds_and_keeps_input_annotations(catalog):
    input_quality = catalog.annotation_partition("input_quality", "mix")
    input_tags = catalog.annotation_partition("input_tags", "mix")
    before = (pq.read_table(input_quality).to_pylist(), pq.read_table(input_tags).to_pylist())
    result = run_quality_annotation(catalog.root, "mix", use_embeddings=False)
    rows, samples = _rows(result.output), _samples(catalog)
    assert len(rows) == len(RECORDS)
    for sid, r in rows.items():
        assert len(r["quality_per_round"]) == len(r["complexity_per_round"]) == samples[sid]["n_turns"]
        assert r["score"] == pytest.approx(np.mean(np.multiply(r["quality_per_round"], r["complexity_per_round"])), rel=1e-5)
        assert 1.0 <= r["quality"] <= 6.0 and 1.0 <= r["complexity"] <= 6.0 and r["annotator"] == "offline_quality"
    assert (pq.read_table(input_quality).to_pylist(), pq.read_table(input_tags).to_pylist()) == before
    assert before[0][0]["score"] == pytest.approx(10.0)  # the input's own DEITA scores, untouched


def test_stage_refuses_input_folders_unknown_annotators_and_missing_llm(catalog):
    with pytest.raises(ValueError, match="came with the input"):
        run_quality_annotation(catalog.root, "mix", name="input_quality")
    with pytest.raises(ValueError, match="must end with '_tags'"):
        run_tag_annotation(catalog.root, "mix", name="my_labels")
    with pytest.raises(ValueError, match="unknown tag annotator"):
        run_tag_annotation(catalog.root, "mix", "gpt_tags")
    with pytest.raises(ValueError, match="needs an endpoint"):
        run_quality_annotation(catalog.root, "mix", "llm_quality")
    with pytest.raises(FileNotFoundError):
        run_tag_annotation(catalog.root, "no_such_dataset", vocabulary=None)


def test_annotate_command_runs_the_quality_stage_and_the_views_see_it(catalog, capsys):
    from pipeline.cli import main
    from pipeline.query import run_query

    assert main(["annotate", "quality", "--catalog", str(catalog.root), "--dataset", "mix", "--no-embed",
                 "--name", "heuristic_quality"]) == 0
    assert "annotate_quality mix: 6 rows" in capsys.readouterr().out
    table = run_query(catalog.root, "SELECT annotator, count(*) AS n FROM quality GROUP BY 1 ORDER BY 1", [])
    counts = dict(zip(table["annotator"].to_pylist(), table["n"].to_pylist()))
    assert counts["heuristic_quality"] == 6 and counts["input"] == 1
    assert main(["annotate", "quality", "--catalog", str(catalog.root), "--dataset", "mix", "--annotator", "llm"]) == 2


def test_annotators_reuse_stored_vectors_at_the_precision_the_embed_step_chose(tmp_path):
    """Tags and quality read the embed step's vectors as they are: an fp32 table (asked for
    explicitly) is not redone at ``auto``'s precision, and a later embed at ``auto`` still redoes it."""
    from pipeline.io.runs import stored_parameters
    from pipeline.stages.embeddings import read_embedding_metadata, run_text_embedding

    src = tmp_path / "in"
    src.mkdir()
    (src / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]), encoding="utf-8")
    run_ingest([str(src)], tmp_path / "cat", "few", num_shards=1)
    cat = Catalog.at(tmp_path / "cat")
    made = run_text_embedding(cat.root, "few", precision="fp32")
    part = cat.embedding_partition("all-MiniLM-L6-v2", "few")
    assert stored_parameters(cat, "embed_text", "few", part)["precision"] == "fp32"

    run_tag_annotation(cat.root, "few")
    run_quality_annotation(cat.root, "few")
    assert read_embedding_metadata(part)["precision"] == "fp32"
    assert stored_parameters(cat, "embed_text", "few", part)["precision"] == "fp32"
    assert run_text_embedding(cat.root, "few", precision=None).run_id == made.run_id  # reused, not redone
    assert not run_text_embedding(cat.root, "few", precision="auto").skipped
