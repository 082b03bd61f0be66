"""Selections under the stage contract: selections/<name>/ with a ledger entry (parameters and
report), a verified skip on an unchanged re-run, failures recorded; curate and export from it,
with their own ledger entries and the lineage in the export manifest."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.cli import main
from pipeline.curate import materialise
from pipeline.select import protocol
from pipeline.stages.ingest import run_ingest

TAGS = ["math", "code generation", "python programming", "poetry", "creative writing", "translation",
        "arithmetic", "sql query", "summarization", "email writing"]


def _runs(root, stage: str) -> list[dict]:
    out = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*.json"))]
    return sorted((r for r in out if r["stage"] == stage), key=lambda r: r["started_at"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """An xsample pool ingested into a catalog (its tags and scores become input annotations)."""
    tmp = tmp_path_factory.mktemp("sel")
    rng = random.Random(0)
    src = tmp / "pool.jsonl"
    with open(src, "w") as f:
        for i in range(120):
            tags = rng.sample(TAGS, rng.randint(1, 3))
            f.write(json.dumps({
                "dialogs": [{"role": "user", "content": f"question {i}"},
                            {"role": "assistant", "content": f"answer {i}"}],
                "annotation": {"instag": {"content": [{"tag": t, "explanation": "."} for t in tags]},
                               "deita": {"quality_scores": [rng.uniform(1, 6)],
                                         "complexity_scores": [rng.uniform(1, 6)]}},
            }) + "\n")
    edges = tmp / "edges.parquet"
    pq.write_table(pa.table({"label_a": ["math"], "label_b": ["arithmetic"], "similarity": [0.9]}), edges)
    root = tmp / "cat"
    run_ingest([str(src)], root, "pool")
    return root, src, edges


def _select(root, edges, *more: str) -> int:
    return main(["select", "mig", "--catalog", str(root), "--dataset", "pool", "--name", "top20", "--budget", "20",
                 "--label-graph", str(edges), *more])


def test_select_writes_the_selection_with_a_ledger_entry_and_skips_when_unchanged(pool, capsys, monkeypatch):
    root, _, edges = pool
    assert _select(root, edges) == 0
    out = capsys.readouterr().out
    assert "E(D) MIG selection" in out and "selections/top20/" in out
    folder = root / "selections" / "top20"
    assert sorted(p.name for p in folder.iterdir()) == ["picks.parquet", "report.json"]
    picks = pq.read_table(folder / "picks.parquet")
    assert picks.column("rank").to_pylist() == list(range(20))
    doc = json.loads((folder / "report.json").read_text())
    assert doc["selector"] == "mig" and doc["parameters"]["budget"] == 20 and doc["lines"]
    [run] = _runs(root, "select")
    assert run["status"] == "succeeded" and run["dataset"] == "pool" and run["run_id"] == doc["run_id"]
    assert run["parameters"]["selector"] == "mig" and run["parameters"]["budget"] == 20
    assert run["parameters"]["name"] == "top20" and run["parameters"]["outputs"] == {"selection": "selections/top20"}
    assert run["counts"]["rows_out"] == 20 and run["counts"]["rows_in"] == 120
    assert run["counts"]["report"]["information"] == pytest.approx(doc["report"]["information"], rel=1e-9)
    assert any(i["uri"].endswith(".parquet") for i in run["inputs"])  # the pool's files are the fingerprint
    # the same selection again: verified skip, decided before any pool is read, the stored report
    # printed, no new ledger entry
    from pipeline.curate import mig_pool

    def unread(*a, **k):
        raise AssertionError("an unchanged selection read its pool")

    monkeypatch.setattr(mig_pool.MIGSelector, "from_catalog", unread)
    assert _select(root, edges) == 0
    again = capsys.readouterr().out
    assert "unchanged, skipped" in again and "E(D) MIG selection" in again
    assert len(_runs(root, "select")) == 1
    # the selections view reads it
    rows = query.run_query(root, "SELECT selection, count(*) AS n FROM selections GROUP BY ALL").to_pylist()
    assert rows == [{"selection": "top20", "n": 20}]


def test_a_damaged_selection_is_rebuilt_and_new_parameters_run_again(pool, capsys):
    root, _, edges = pool
    assert _select(root, edges) == 0
    picks = root / "selections" / "top20" / "picks.parquet"
    picks.write_bytes(picks.read_bytes()[:-10])  # truncated: the footer checksum no longer matches
    before = len(_runs(root, "select"))
    capsys.readouterr()
    assert _select(root, edges) == 0
    assert "unchanged" not in capsys.readouterr().out
    assert pq.read_table(picks).num_rows == 20 and len(_runs(root, "select")) == before + 1
    assert _select(root, edges, "--prop-weight", "0.5") == 0  # other parameters: selected again
    assert _runs(root, "select")[-1]["parameters"]["prop_weight"] == 0.5


def test_a_failed_selection_is_recorded_and_leaves_the_old_one(pool, capsys):
    root, _, edges = pool
    assert _select(root, edges) == 0
    before = (root / "selections" / "top20" / "picks.parquet").read_bytes()
    capsys.readouterr()
    assert main(["select", "mig", "--catalog", str(root), "--dataset", "pool", "--name", "top20",
                 "--budget", "100000", "--label-graph", str(edges)]) == 2
    assert "budget" in capsys.readouterr().err
    failed = [r for r in _runs(root, "select") if r["status"] == "failed"]
    assert failed and "budget" in failed[-1]["error"] and failed[-1]["parameters"]["budget"] == 100000
    assert (root / "selections" / "top20" / "picks.parquet").read_bytes() == before
    assert not (root / "_staging").exists()


def test_file_input_into_the_catalog_and_to_a_file_only(pool, tmp_path):
    root, src, edges = pool
    out = tmp_path / "copy.parquet"
    assert main(["select", "mig", "--catalog", str(root), "--input", str(src), "--name", "fromfile",
                 "--budget", "20", "--label-graph", str(edges), "--out", str(out)]) == 0
    in_catalog = pq.read_table(root / "selections" / "fromfile" / "picks.parquet")
    assert pq.read_table(out).equals(in_catalog)
    assert json.loads(out.with_suffix(".report.json").read_text())["selector"] == "mig"
    stamp = out.stat().st_mtime_ns
    assert main(["select", "mig", "--catalog", str(root), "--input", str(src), "--name", "fromfile",
                 "--budget", "20", "--label-graph", str(edges), "--out", str(out)]) == 0
    assert out.stat().st_mtime_ns == stamp  # skipped: the copy is left alone (later stages fingerprint it)
    run = [r for r in _runs(root, "select") if r["parameters"]["name"] == "fromfile"][-1]
    assert run["dataset"] == protocol.FILE_DATASET and run["inputs"][0]["uri"] == str(src)
    # the same pool read from the catalog picks the same samples
    top = pq.read_table(root / "selections" / "top20" / "picks.parquet") if \
        (root / "selections" / "top20").exists() else None
    if top is not None:
        assert top.column("sample_id").to_pylist() == in_catalog.column("sample_id").to_pylist()
    # a file input with --out alone touches no catalog
    lone = tmp_path / "lone"
    assert main(["select", "mig", "--catalog", str(lone), "--input", str(src), "--budget", "5",
                 "--label-graph", str(edges), "--out", str(tmp_path / "lone.parquet")]) == 0
    assert not lone.exists() and pq.read_table(tmp_path / "lone.parquet").num_rows == 5


def test_cabs_and_gais_write_through_the_same_protocol(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = [f"c{i}" for i in range(30)]
    src = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(200)],
                             "concepts": [list(rng.choice(vocab, size=3)) for _ in range(200)]}), src)
    r = protocol.select_into_catalog("cabs", tmp_path / "cat", "plan", {"superbatch": 50, "steps": 2},
                                     input_file=src)
    assert r.rows == 2 * 10 and any("CABS" in line for line in r.lines())
    feats = tmp_path / "feats.parquet"
    pq.write_table(pa.table({"x": rng.normal(size=60), "y": rng.normal(size=60),
                             "label": ["a", "b", "c"] * 20, "sample_id": [f"f{i}" for i in range(60)]}), feats)
    g = protocol.select_into_catalog("gais", tmp_path / "cat", "inst",
                                     {"label_column": "label", "variant": "minibatch", "reduction": 0.5},
                                     input_file=feats)
    assert g.rows == 60 and g.report.lines()[0].startswith("GAIS-minibatch")
    assert {r["parameters"]["selector"] for r in _runs(tmp_path / "cat", "select")} == {"cabs", "gais"}
    with pytest.raises(ValueError, match="parameter 'variant'"):
        protocol.select_into_catalog("gais", tmp_path / "cat", "inst", {"label_column": "label", "variant": "x"},
                                     input_file=feats)


def test_curate_and_export_from_a_selection_enter_the_ledger(pool, tmp_path, monkeypatch, capsys):
    root, _, edges = pool
    assert _select(root, edges) == 0
    select_run = json.loads((root / "selections" / "top20" / "report.json").read_text())["run_id"]
    assert main(["curate", "--catalog", str(root), "--dataset", "pool", "--selection", "top20"]) == 0
    info = json.loads((root / "curated" / "top20" / "_curated.json").read_text())
    assert info["selection"] == "top20" and info["selection_run_id"] == select_run
    assert info["algorithm"] == "mig" and info["parameters"]["budget"] == 20
    out = tmp_path / "sft"
    assert main(["export", "--catalog", str(root), "--curated", "top20", "--format", "openai", "--out", str(out),
                 "--rows-per-file", "7"]) == 0
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["parameters"] == {"curated": "top20", "format": "openai", "rows_per_file": 7, "overwrite": False}
    assert manifest["selection"]["selection_run_id"] == select_run and manifest["counts"]["rows"] == 20
    [run] = [r for r in _runs(root, "export") if r["run_id"] == manifest["run_id"]]
    assert run["status"] == "succeeded" and run["dataset"] == "pool" and run["parameters"]["out"] == str(out)
    assert run["parameters"]["format"] == "openai" and run["counts"] == {"rows": 20, "skipped_without_answer": 0,
                                                                          "files": 3}
    assert not (root / "_exports").exists()  # nothing but the ledger and the marker lands in the catalog

    def failing(row, fmt):
        raise RuntimeError("disk full")

    monkeypatch.setattr(materialise, "to_layout", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        materialise.export(root, "top20", "alpaca", tmp_path / "broken")
    failed = _runs(root, "export")[-1]
    assert failed["status"] == "failed" and "disk full" in failed["error"]
    assert not (tmp_path / "broken").exists()
