"""Curated shards from a selection, and exports in trainer layouts with a manifest."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.cli import main
from pipeline.curate.export_card import MANIFEST
from pipeline.curate.materialise import to_layout
from pipeline.stages.ingest import run_ingest


@pytest.fixture(scope="module")
def curated(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("cat")
    run_ingest([str(demo_data / "instructions")], root, "demo")
    ids = query.run_query(root, "SELECT sample_id FROM samples ORDER BY n_chars DESC LIMIT 30").column("sample_id")
    picks = pa.table({"rank": list(range(30)), "sample_id": ids, "gain": [30.0 - i for i in range(30)],
                      "labels": [["long"]] * 30})
    pq.write_table(picks, root / "picks.parquet")
    assert main(["curate", "--catalog", str(root), "--dataset", "demo", "--picks", str(root / "picks.parquet"),
                 "--name", "longest"]) == 0
    return root


def test_curated_shards_keep_rank_order_and_lineage(curated):
    rows = pq.read_table(curated / "curated" / "longest").to_pylist()
    assert [r["rank"] for r in rows] == list(range(30))
    assert all(r["messages"] and r["source_uri"] for r in rows)
    # curate writes curated/<name>/ only: selections/<name>/ has one writer, `thresher select`
    assert not (curated / "selections" / "longest").exists()
    runs = query.run_query(curated, "SELECT status, counts.rows_out AS n FROM runs WHERE stage = 'curate'")
    assert runs.to_pylist() == [{"status": "succeeded", "n": 30}]


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca", "openai", "parquet"])
def test_export_layouts(curated, tmp_path, fmt):
    out = tmp_path / fmt
    assert main(["export", "--catalog", str(curated), "--curated", "longest", "--format", fmt,
                 "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] + manifest["skipped_without_answer"] == 30
    assert manifest["filtered"] == ({"no_assistant_answer": manifest["skipped_without_answer"]}
                                    if manifest["skipped_without_answer"] else {})
    assert sum(manifest["sources"].values()) == manifest["rows"]
    assert manifest["selection"]["dataset"] == "demo"
    # lineage: every input file with its licence, read from demo_data/instructions/ATTRIBUTION.md
    srcs = manifest["inputs"]["sources"]
    assert sum(s["rows"] for s in srcs) == manifest["rows"] and all(s["licence"] in ("MIT", "Apache-2.0") for s in srcs)
    [rec] = manifest["data_files"]
    assert rec["sha256"] == hashlib.sha256((out / rec["path"]).read_bytes()).hexdigest() and rec["rows"] == 30 - \
        manifest["skipped_without_answer"]
    if fmt == "parquet":
        assert pq.read_table(out / "data").num_rows == manifest["rows"]
        return
    recs = [json.loads(line) for f in manifest["files"] for line in (out / f).read_text().splitlines()]
    assert len(recs) == manifest["rows"]
    first = recs[0]
    if fmt == "sharegpt":
        assert first["conversations"][-1]["from"] == "gpt"
    elif fmt == "openai":
        assert first["messages"][-1]["role"] == "assistant"
    else:
        assert first["instruction"] and first["output"]


def test_layouts_of_multi_turn_and_unanswered_conversations():
    row = {"sample_id": "x", "rank": 0, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]}
    alpaca = to_layout(row, "alpaca")
    assert alpaca["instruction"] == "q2" and alpaca["output"] == "a2" and alpaca["history"] == [["q1", "a1"]]
    assert alpaca["system"] == "be brief"
    assert to_layout(row, "sharegpt")["conversations"][0] == {"from": "system", "value": "be brief"}
    unanswered = {"sample_id": "y", "rank": 1, "messages": [{"role": "user", "content": "only a question"}]}
    assert to_layout(unanswered, "openai") is None


def test_curate_and_export_errors(curated, tmp_path, capsys):
    assert main(["export", "--catalog", str(curated), "--curated", "nope", "--format", "alpaca",
                 "--out", str(tmp_path)]) == 2
    # the demo inputs carry no rejected side: a dpo export is refused before anything is written
    assert main(["export", "--catalog", str(curated), "--curated", "longest", "--format", "dpo",
                 "--out", str(tmp_path / "dpo")]) == 2
    assert "has a rejected side" in capsys.readouterr().err and not (tmp_path / "dpo").exists()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": ["a"]}), bad)
    assert main(["curate", "--catalog", str(curated), "--dataset", "demo", "--picks", str(bad), "--name", "b"]) == 2


def test_mig_pool_leaves_conversations_without_an_answer_out(tmp_path):
    """No SFT export keeps them, so the MIG pool drops them before any budget is spent (issue 11)."""
    from pipeline.curate import mig_pool

    def record(k: int, answered: bool) -> dict:
        dialog = [{"role": "user", "content": f"Question number {k}?"}]
        if answered:
            dialog.append({"role": "assistant", "content": f"Answer {k}."})
        return {"dialogs": dialog, "annotation": {
            "instag": {"content": [{"tag": "maths", "explanation": "."}]},
            "deita": {"quality_scores": [2.0 + k / 10], "complexity_scores": [1.0]}}}

    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps(record(k, answered=k % 4 != 0)) + "\n" for k in range(12)))
    root = tmp_path / "cat"
    run_ingest([str(src)], root, "x")
    all_ids = set(query.run_query(root, "SELECT sample_id FROM samples").column("sample_id").to_pylist())
    assert len(all_ids) == 12
    pool = mig_pool.pool_from_catalog(root, "x")
    assert len(pool.sample_ids) == 9 and pool.notes["without_assistant_answer_excluded"] == 3
    unanswered = set(query.run_query(root, "SELECT sample_id FROM samples WHERE len(messages) = 1")
                     .column("sample_id").to_pylist())
    assert unanswered == all_ids - set(pool.sample_ids)
    assert mig_pool.pool_notes(pool)[0] == "without an assistant answer: excluded 3 samples (no SFT export keeps them)"
