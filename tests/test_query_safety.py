"""`thresher query --safe` confines SQL to the catalog; a damaged shard breaks only its own view."""

from __future__ import annotations

import shutil
import warnings

import duckdb
import pytest

from pipeline import query
from pipeline.cli import main
from pipeline.io.catalog import Catalog
from pipeline.stages.ingest import run_ingest


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("cat") / "catalog"
    run_ingest([str(demo_data / "instructions" / "gsm8k_train.jsonl.gz")], root, "g")
    bad = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n{"x": 1}\n')
    run_ingest([str(bad)], root, "bad")
    return root


@pytest.fixture()
def outside(tmp_path):
    """A readable file outside the catalog (a stand-in for ~/.ssh/... or /etc/passwd)."""
    secret = tmp_path / "secret.csv"
    secret.write_text("key,value\napi,hunter2\n")
    return secret


def test_safe_mode_still_answers_queries_over_the_views(catalog):
    assert query.run_query(catalog, "SELECT count(*) AS n FROM samples", safe=True).to_pylist() == [{"n": 151}]
    t = query.run_query(catalog, "SELECT count(*) AS n FROM samples WHERE dataset = ?", ["bad"], safe=True)
    assert t.to_pylist() == [{"n": 1}]
    for name in query.named_queries():  # every shipped query is a read-only query
        query.run_query(catalog, name, safe=True)
    acc = query.run_query(catalog, "ingest_accounting", safe=True).to_pylist()
    assert acc and all(r["balanced"] for r in acc)
    # Files inside the catalog stay readable directly, as do DESCRIBE / SUMMARIZE / WITH.
    shard = sorted(Catalog.at(catalog).samples_partition("instruction", "g").glob("*.parquet"))[0]
    assert query.run_query(catalog, "SELECT count(*) AS n FROM read_parquet(?)", [str(shard)],
                           safe=True).to_pylist()[0]["n"] > 0
    assert "sample_id" in query.run_query(catalog, "DESCRIBE samples", safe=True).column("column_name").to_pylist()
    assert query.run_query(catalog, "WITH r AS (FROM rejects) SELECT count(*) AS n FROM r",
                           safe=True).to_pylist() == [{"n": 2}]


def test_unsafe_mode_reads_outside_files_so_the_safe_checks_mean_something(catalog, outside):
    t = query.run_query(catalog, "SELECT value FROM read_csv(?)", [str(outside)])
    assert t.to_pylist() == [{"value": "hunter2"}]


def test_safe_connection_refuses_files_attach_and_settings(catalog, outside, tmp_path):
    con = query.connect(catalog, safe=True)
    try:
        assert con.sql("SELECT count(*) FROM samples").fetchall() == [(151,)]
        refused = {
            "read outside": f"SELECT * FROM read_csv('{outside}')",
            "read /etc/passwd": "SELECT * FROM read_csv('/etc/passwd')",
            "escape with ..": f"SELECT * FROM read_csv('{catalog}/../{outside.name}')",
            "sibling with the same prefix": f"SELECT * FROM read_csv('{catalog}2/x.csv')",
            "glob outside": "SELECT * FROM glob('/etc/*')",
            "copy to a file": f"COPY (SELECT 1 AS x) TO '{tmp_path / 'out.csv'}'",
            "attach": f"ATTACH '{tmp_path / 'other.db'}' AS other",
            "load an extension": "LOAD httpfs",
        }
        for what, sql in refused.items():
            with pytest.raises(duckdb.Error, match="disabled|Permission") as err:
                con.sql(sql).fetchall()
            assert err.value is not None, what
        for sql in ("SET enable_external_access = true", "SET allowed_directories = ['/']",
                    "RESET enable_external_access", "SET lock_configuration = false",
                    "PRAGMA enable_external_access = true"):
            with pytest.raises(duckdb.Error, match="locked"):
                con.execute(sql)
    finally:
        con.close()
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.db").exists()


def test_safe_run_query_runs_read_only_statements_only(catalog, tmp_path):
    inside = catalog / "stolen.csv"  # DuckDB's allowed directory admits writes; safe mode must not
    for sql in (f"COPY (SELECT * FROM samples) TO '{inside}'",
                f"SELECT 1; COPY (SELECT 1) TO '{inside}'",
                f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{inside}'",
                f"EXPORT DATABASE '{catalog / 'dump'}'",
                "SET VARIABLE thresher_root = '/etc'",
                "CREATE TABLE t AS SELECT 1",
                "PRAGMA version",
                "CALL pragma_version()",
                f"ATTACH '{catalog / 'x.db'}'"):
        with pytest.raises(query.UnsafeQueryError, match="read-only queries only"):
            query.run_query(catalog, sql, safe=True)
    assert not inside.exists() and not (catalog / "dump").exists() and not (catalog / "x.db").exists()
    # The same statement without --safe does run: the check above is what stops it.
    query.run_query(catalog, f"COPY (SELECT 1 AS x) TO '{tmp_path / 'ok.csv'}'")
    assert (tmp_path / "ok.csv").read_text().splitlines() == ["x", "1"]


def test_cli_safe_flag(catalog, outside, tmp_path, capsys):
    assert main(["query", "--catalog", str(catalog), "--safe", "SELECT count(*) AS n FROM samples",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "151"]
    assert main(["query", "--catalog", str(catalog), "--safe", f"SELECT * FROM read_csv('{outside}')"]) == 2
    assert "disabled by configuration" in capsys.readouterr().err
    target = tmp_path / "x.csv"
    assert main(["query", "--catalog", str(catalog), "--safe", f"COPY (SELECT 1) TO '{target}'"]) == 2
    assert "read-only queries only" in capsys.readouterr().err and not target.exists()
    assert main(["query", "--catalog", str(catalog), f"SELECT * FROM read_csv('{outside}')", "--format", "csv"]) == 0
    assert "hunter2" in capsys.readouterr().out


# ------------------------------------------------------------------ damaged shards


@pytest.fixture()
def damaged(catalog, tmp_path):
    """A copy of the catalog with the rejects shard of dataset ``bad`` cut in half."""
    root = tmp_path / "damaged"
    shutil.copytree(catalog, root)
    shards = sorted(Catalog.at(root).partition("rejects", "bad").glob("*.parquet"))
    assert shards
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    return root, shards[0]


def test_truncated_shard_breaks_only_its_view_and_names_the_file(damaged):
    root, shard = damaged
    with pytest.warns(query.DamagedTableWarning, match="rejects") as caught:
        con = query.connect(root)
    assert any(str(shard) in str(w.message) for w in caught)
    try:
        assert con.sql("SELECT count(*) FROM samples").fetchall() == [(151,)]
        assert con.sql("SELECT count(*) FROM duplicates").fetchall()[0][0] >= 0
        for sql in ("SELECT count(*) FROM rejects", "SELECT reason FROM rejects",
                    "SELECT * FROM rejects WHERE dataset = 'g'", "SELECT 1 FROM rejects LIMIT 1"):
            with pytest.raises(duckdb.Error, match="damaged") as err:
                con.sql(sql).fetchall()
            assert str(shard) in str(err.value), sql
        # The view keeps its columns, so a query binds and the error says what is wrong.
        assert "reason" in [r[0] for r in con.sql("DESCRIBE rejects").fetchall()]
    finally:
        con.close()
    # Queries that never touch rejects run without error; ones that do name the file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", query.DamagedTableWarning)
        assert query.run_query(root, "counts_by_source", safe=True).num_rows > 0
        with pytest.raises(duckdb.Error, match=str(shard.name)):
            query.run_query(root, "reject_reasons", safe=True)


def test_cli_warns_on_stderr_about_a_damaged_shard(damaged, capsys):
    root, shard = damaged
    assert main(["query", "--catalog", str(root), "SELECT count(*) AS n FROM samples", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["n", "151"]
    warning = [line for line in captured.err.splitlines() if line.startswith("thresher query: warning:")]
    assert len(warning) == 1 and str(shard) in warning[0] and "rejects" in warning[0]
    assert main(["query", "--catalog", str(root), "reject_reasons"]) == 2
    err = capsys.readouterr().err
    assert "thresher query: warning:" in err and f"thresher query: error: " in err and str(shard) in err


def test_a_healthy_catalog_gives_no_warning(catalog):
    with warnings.catch_warnings():
        warnings.simplefilter("error", query.DamagedTableWarning)
        query.connect(catalog).close()
