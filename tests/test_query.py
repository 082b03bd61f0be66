"""DuckDB views and named queries over a real catalog, and the query CLI."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.cli import main
from pipeline.stages.ingest import run_ingest


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("cat")
    run_ingest([str(demo_data / "instructions")], root, "demo")
    bad = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n{"x": 1}\n')
    run_ingest([str(bad)], root, "bad")
    return root


def test_views_read_every_partition(catalog):
    t = query.run_query(catalog, "SELECT dataset, count(*) AS n FROM samples GROUP BY ALL ORDER BY dataset")
    rows = {r["dataset"]: r["n"] for r in t.to_pylist()}
    assert rows["bad"] == 1 and rows["demo"] > 1000
    rej = query.run_query(catalog, "SELECT reason, count(*) AS n FROM rejects WHERE dataset = 'bad' GROUP BY ALL")
    assert {r["reason"]: r["n"] for r in rej.to_pylist()} == {"malformed_json": 1, "unknown_layout": 1}


def test_empty_tables_are_empty_views_not_errors(catalog):
    assert query.run_query(catalog, "SELECT count(*) AS n FROM image_samples").to_pylist() == [{"n": 0}]
    assert query.run_query(catalog, "SELECT count(*) AS n FROM concepts").to_pylist() == [{"n": 0}]


def test_named_queries_all_run(catalog):
    names = query.named_queries()
    assert {"counts_by_source", "counts_by_format", "reject_reasons", "length_distribution",
            "ingest_accounting"} <= set(names)
    for name in names:
        query.run_query(catalog, name)  # every shipped query is valid SQL over the views
    acc = query.run_query(catalog, "ingest_accounting").to_pylist()
    assert acc and all(r["balanced"] for r in acc)
    lengths = {r["dataset"]: r for r in query.run_query(catalog, "@length_distribution").to_pylist()}
    assert lengths["demo"]["p05_chars"] <= lengths["demo"]["p50_chars"] <= lengths["demo"]["p95_chars"]


def test_parameters_are_bound_not_interpolated(catalog):
    evil = "demo' OR '1'='1"
    t = query.run_query(catalog, "SELECT count(*) AS n FROM samples WHERE dataset = ?", [evil])
    assert t.to_pylist() == [{"n": 0}]
    t = query.run_query(catalog, "SELECT count(*) AS n FROM samples WHERE dataset = ?", ["demo"])
    assert t.to_pylist()[0]["n"] > 1000


def test_catalog_path_with_quotes_is_safe(tmp_path, demo_data):
    root = tmp_path / "it's a \"catalog\""
    run_ingest([str(demo_data / "instructions" / "gsm8k_train.jsonl.gz")], root, "g")
    assert query.run_query(root, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 150}]


def test_unknown_named_query_and_missing_catalog(tmp_path, catalog):
    with pytest.raises(KeyError, match="no named query"):
        query.run_query(catalog, "@nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        query.connect(tmp_path / "missing")


def test_cli_formats(catalog, tmp_path, capsys):
    assert main(["query", "--catalog", str(catalog), "counts_by_format", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and {"source_format", "samples", "datasets"} == set(rows[0])
    assert main(["query", "--catalog", str(catalog), "SELECT sample_id, messages FROM samples LIMIT 2",
                 "--format", "json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["messages"][0]["role"] in {"user", "system"}
    out = tmp_path / "r.parquet"
    assert main(["query", "--catalog", str(catalog), "reject_reasons", "--format", "parquet",
                 "--output", str(out)]) == 0
    assert pq.read_table(out).num_rows >= 2
    assert main(["query", "--catalog", str(catalog), "SELECT 1 AS one"]) == 0
    assert "one" in capsys.readouterr().out
    assert main(["query", "--catalog", str(catalog), "SELECT * FROM nope"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["query", "--catalog", str(catalog), "--list"]) == 0
    assert "reject_reasons" in capsys.readouterr().out


def test_cli_ingest_passes_unknown_flags_to_beam(tmp_path, demo_data, capsys):
    src = demo_data / "instructions" / "mt_bench_questions.jsonl.gz"
    rc = main(["ingest", str(src), "--catalog", str(tmp_path / "c"), "--dataset", "mt",
               "--direct_num_workers=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "samples" in out and "30" in out
    assert main(["ingest", str(tmp_path / "missing.jsonl"), "--catalog", str(tmp_path / "c"),
                 "--dataset", "x"]) == 2
