"""`thresher select mig|cabs` end to end: real files in, picks and reports out."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.io.instruction_formats import normalise
from pipeline.io.sample_id import conversation_id
from pipeline.stages.ingest import run_ingest

TAGS = ["math", "code generation", "python programming", "poetry", "creative writing", "translation",
        "arithmetic", "sql query", "summarization", "email writing"]


@pytest.fixture
def xsample(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "pool.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            tags = rng.sample(TAGS, rng.randint(0, 3))
            f.write(json.dumps({
                "dialogs": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
                "annotation": {"instag": {"content": [{"tag": t, "explanation": "."} for t in tags]},
                               "deita": {"quality_scores": [rng.uniform(1, 6)], "complexity_scores": [rng.uniform(1, 6)]}},
            }) + "\n")
    return path


def _edges(tmp_path):
    path = tmp_path / "edges.parquet"
    pq.write_table(pa.table({"label_a": ["math", "poetry"], "label_b": ["arithmetic", "creative writing"],
                             "similarity": [0.9, 0.8]}), path)
    return path


def test_select_mig_on_an_xsample_file(xsample, tmp_path, capsys):
    out = tmp_path / "picks.parquet"
    rc = main(["select", "mig", "--input", str(xsample), "--budget", "25", "--out", str(out),
               "--label-graph", str(_edges(tmp_path))])
    assert rc == 0
    picks = pq.read_table(out).to_pylist()
    assert [p["rank"] for p in picks] == list(range(25))
    gains = [p["gain"] for p in picks]
    assert gains == sorted(gains, reverse=True)  # linearised gains never rise (concave phi)
    lines = xsample.read_text().splitlines()
    for p in picks:  # index is the 0-based line and sample_id is the ingest content id
        rec = json.loads(lines[p["index"]])
        assert p["sample_id"] == conversation_id(normalise(rec).messages)
        assert p["labels"] == [t["tag"] for t in rec["annotation"]["instag"]["content"]]
    report = json.loads(out.with_suffix(".report.json").read_text())["report"]
    assert report["information"] > report["random_information_mean"]
    assert report["coverage_selected"] >= report["coverage_random_mean"]
    assert "E(D) MIG selection" in capsys.readouterr().out


def test_select_mig_on_a_catalog_dataset_uses_ingested_annotations(xsample, tmp_path):
    run_ingest([str(xsample)], tmp_path / "cat", "pool")
    out_cat, out_file = tmp_path / "a.parquet", tmp_path / "b.parquet"
    edges = _edges(tmp_path)
    assert main(["select", "mig", "--input", f"{tmp_path / 'cat'}#pool", "--budget", "20",
                 "--out", str(out_cat), "--label-graph", str(edges)]) == 0
    assert main(["select", "mig", "--input", str(xsample), "--budget", "20", "--out", str(out_file),
                 "--label-graph", str(edges)]) == 0
    # the same pool from the catalog and from the file selects the same samples, in the same order
    a, b = pq.read_table(out_cat).to_pylist(), pq.read_table(out_file).to_pylist()
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]
    assert np.allclose([r["gain"] for r in a], [r["gain"] for r in b])


def test_select_mig_errors(tmp_path, xsample, capsys):
    assert main(["select", "mig", "--input", str(tmp_path / "nope.jsonl"), "--budget", "3",
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert main(["select", "mig", "--input", str(xsample), "--budget", "100000",
                 "--out", str(tmp_path / "o.parquet"), "--label-graph", str(_edges(tmp_path))]) == 2
    assert "budget" in capsys.readouterr().err


def test_select_cabs_writes_a_plan(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vocab = [f"c{i}" for i in range(50)]
    weights = 1.0 / np.arange(1, 51)
    concepts = [list(rng.choice(vocab, size=rng.poisson(3), p=weights / weights.sum())) for _ in range(400)]
    src = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(400)], "concepts": concepts}), src)
    out = tmp_path / "plan.parquet"
    assert main(["select", "cabs", "--input", str(src), "--mode", "dm", "--superbatch", "100",
                 "--filter-ratio", "0.8", "--steps", "3", "--out", str(out)]) == 0
    plan = pq.read_table(out).to_pylist()
    assert len(plan) == 3 * 20
    for step in range(3):
        rows = [r for r in plan if r["step"] == step]
        assert [r["position"] for r in rows] == list(range(20))
        assert len({r["sample_id"] for r in rows}) == 20
    report = json.loads(out.with_suffix(".report.json").read_text())["report"]
    assert report["cabs"]["distinct_concepts"] > report["iid"]["distinct_concepts"]
    assert "CABS" in capsys.readouterr().out
    assert main(["select", "cabs", "--input", str(src), "--superbatch", "1000", "--out", str(out)]) == 2


def test_select_gais_on_a_feature_table(tmp_path, capsys):
    from sklearn.datasets import load_wine

    d = load_wine()
    cols = {n: d.data[:, i] for i, n in enumerate(d.feature_names)}
    src = tmp_path / "wine.parquet"
    pq.write_table(pa.table({**cols, "target": d.target, "sample_id": [f"w{i}" for i in range(len(d.target))]}), src)
    out = tmp_path / "gais.parquet"
    assert main(["select", "gais", "--input", str(src), "--label-column", "target", "--variant", "minibatch",
                 "--reduction", "0.9", "--out", str(out)]) == 0
    rows = pq.read_table(out).to_pylist()
    assert [r["index"] for r in rows] == list(range(178)) and rows[5]["sample_id"] == "w5"
    kept = {c: sum(r["selected"] for r in rows if r["label"] == c) for c in ("0", "1", "2")}
    assert all(k >= 1 for k in kept.values()) and abs(sum(kept.values()) - 178 * 0.1) <= 3
    report = json.loads(out.with_suffix(".report.json").read_text())["report"]
    assert report["per_class_counts"] == kept
    assert main(["select", "gais", "--input", str(src), "--label-column", "nope", "--out", str(out)]) == 2
