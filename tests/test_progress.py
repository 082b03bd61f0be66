"""Live progress of Beam jobs (rows done / total, rate, ETA) and quiet local Beam workers."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.catalog import Catalog
from pipeline.io.sources import plan_units
from pipeline.stages import progress
from pipeline.stages.ingest import run_ingest
from pipeline.stages.runner import make_pipeline_options, run_pipeline
from pipeline.stages.shards import ShardFn, run_shard_stage

REPO = Path(__file__).resolve().parents[1]
SCHEMA = pa.schema([("sample_id", pa.string()), ("n_chars", pa.int64())])

# What Beam's SDK harness prints when a local worker process starts (and stops).
HARNESS_LINES = ("sdk harness starting", "Logging handler created", "semi_persistent_directory",
                 "Control channel established", "apitools not found")


class CharCount(ShardFn):
    def __call__(self, table: pa.Table) -> pa.Table:
        return table.select(["sample_id", "n_chars"])


class Ticks(beam.DoFn):
    def process(self, x):
        progress.tick(self)
        yield x


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (progress.VERBOSE_ENV, progress.ENV_FORCE)}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


@pytest.fixture
def catalog(tmp_path, demo_data):
    run_ingest([str(demo_data / "instructions")], tmp_path / "cat", "demo", num_shards=3)
    return Catalog.at(tmp_path / "cat")


def _char_count(cat: Catalog, **kw):
    src = cat.samples_partition("instruction", "demo")
    out = cat.annotation_partition("char_count", "demo")
    return run_shard_stage(cat.root, "char_count", "demo", src, out, CharCount(), SCHEMA, {}, **kw)


# ----------------------------------------------------------------------- reporter and watcher


def test_ticks_from_two_processes_add_up_in_the_watcher(tmp_path):
    script = ("import sys, time\n"
              "from pipeline.stages import progress\n"
              "for i in range(300):\n"
              "    progress.tick(sys.argv[1], 1)\n"
              "    if i % 100 == 99: time.sleep(0.4)\n"
              "progress.tick(sys.argv[1], 2, 'shards')\n")
    with progress.watch(tmp_path, 600, "two", extras={"shards": 4}) as w:
        procs = [subprocess.Popen([sys.executable, "-c", script, str(w.folder)], cwd=REPO, env=_env())
                 for _ in range(2)]
        assert [p.wait(timeout=30) for p in procs] == [0, 0]
        deadline = time.monotonic() + 10
        while w.n < 600 and time.monotonic() < deadline:  # the watcher thread polls the files
            time.sleep(0.1)
        assert w.n == 600
        assert len(list(w.folder.glob("*.json"))) == 2  # one file per worker process
        progress.tick(w.folder, 50)  # a retried bundle counting twice: clamped at the total
    assert w.n == 600 and w.counts["shards"] == 4
    assert "two: 600/600 rows (100%)" in w.line(final=True) and "shards 4/4" in w.line()


def test_tick_outside_a_watched_run_does_nothing(tmp_path):
    progress.tick(object(), 5)  # a DoFn that run_pipeline did not stamp
    progress.tick(tmp_path / "gone" / "_progress", 5)  # a finished run's folder
    progress.flush_all()
    assert not (tmp_path / "gone").exists()


def test_a_failed_job_closes_the_bar_with_what_was_done(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_FORCE, "1")
    with pytest.raises(RuntimeError, match="boom"), progress.watch(tmp_path, 100, "failing") as w:
        progress.tick(w.folder, 40)
        raise RuntimeError("boom")
    assert w.n == 40 and "40/100" in capsys.readouterr().err


def test_pipeline_dofns_in_worker_processes_report_every_row(tmp_path, monkeypatch):
    # the worker processes unpickle Ticks, so they must be able to import this module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))
    folder = tmp_path / "_progress"
    folder.mkdir()
    run_pipeline(lambda p: p | beam.Create(range(500)) | beam.Reshuffle() | beam.ParDo(Ticks()),
                 make_pipeline_options(workers=2), progress_dir=folder)
    assert progress.read_counts(folder)["rows"] == 500  # written by the workers before they exit
    assert all(not f.name.startswith(str(os.getpid())) for f in folder.glob("*.json"))


# ----------------------------------------------------------------------------- stages


def test_shard_stage_shows_rows_done_of_total(catalog, monkeypatch, capsys):
    capsys.readouterr()
    n = catalog.row_count("samples_instruction", "demo")
    monkeypatch.setenv(progress.ENV_FORCE, "1")
    r = _char_count(catalog)
    err = capsys.readouterr().err
    assert r.rows_in == n
    assert re.search(rf"char_count demo: 100%.*\b{n}/{n} \[", err), err[-500:]
    monkeypatch.delenv(progress.ENV_FORCE)  # stderr is no terminal here: no bar
    _char_count(catalog, force=True)
    assert "char_count" not in capsys.readouterr().err


def test_ingest_bar_counts_rows_in_and_shards(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(700)))
    monkeypatch.setenv(progress.ENV_FORCE, "1")
    res = run_ingest([str(src)], tmp_path / "cat", "small", num_shards=3)
    err = capsys.readouterr().err
    assert res.counts["rows_in"] == 700
    assert re.search(r"ingest small: 100%.*\b700/700 \[.*shards 3/3", err), err[-500:]


def test_ingest_row_estimates(tmp_path):
    rows = [json.dumps({"instruction": "x" * (i % 50), "output": "y"}) for i in range(60_000)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("\n".join(rows))  # no newline after the last line: still a row
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    small = tmp_path / "c.jsonl"
    small.write_text("\n".join(rows[:10]) + "\n")
    table = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["q"] * 7, "output": ["a"] * 7}), table)
    for path, lo, hi in ((plain, 54_000, 66_000), (packed, 54_000, 66_000), (small, 10, 10), (table, 7, 7)):
        assert lo <= progress.estimate_rows(plan_units([str(path)], "instruction")) <= hi, path
    array = tmp_path / "e.json"
    array.write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    assert progress.estimate_rows(plan_units([str(array), str(small)], "instruction")) is None


# ----------------------------------------------------------------------------- Prefect


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    # The first start migrates a SQLite database; give it time on a small machine.
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_stage_in_a_prefect_flow_logs_its_progress(catalog, prefect_api):
    from prefect import flow

    n = catalog.row_count("samples_instruction", "demo")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    @flow
    def count_chars(root: str) -> int:
        return _char_count(Catalog.at(root)).rows_out

    keep = Keep()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(keep)
    try:
        assert count_chars(str(catalog.root)) == n
    finally:
        logger.removeHandler(keep)
    assert f"char_count demo: started, {n:,} rows to process" in lines
    assert any(line.startswith(f"char_count demo: {n:,}/{n:,} rows (100%)") and line.endswith("done")
               for line in lines), lines


# ------------------------------------------------------------------- Beam worker chatter


def test_multi_worker_ingest_is_quiet_unless_verbose(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(300)))
    base = [sys.executable, "-m", "pipeline.cli", "ingest", str(src), "--catalog", str(tmp_path / "cat"),
            "--dataset", "d", "--workers", "2", "--force"]
    run = {"cwd": REPO, "env": _env(), "capture_output": True, "text": True, "timeout": 120}
    quiet = subprocess.run(base, check=False, **run)
    assert quiet.returncode == 0, quiet.stderr
    assert "samples             300" in quiet.stdout
    assert not [h for h in HARNESS_LINES if h in quiet.stderr], quiet.stderr
    loud = subprocess.run([*base, "--verbose"], check=False, **run)  # the flag after the command works too
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.count("INFO:__main__:Python sdk harness starting") == 2  # printed by each worker process
    assert "Logging handler created" in loud.stderr


def test_verbose_is_accepted_before_or_after_the_command():
    from pipeline.cli import build_parser, command_modules

    parser = build_parser(command_modules())
    for argv in (["--verbose", "ingest", "x", "--dataset", "d"],
                 ["ingest", "x", "--dataset", "d", "--verbose"],
                 ["--verbose", "annotate", "tags", "--dataset", "d"],
                 ["annotate", "tags", "--dataset", "d", "--verbose"]):
        args, extra = parser.parse_known_args(argv)
        assert args.verbose is True and extra == [], argv
    args, _ = parser.parse_known_args(["ingest", "x", "--dataset", "d"])
    assert not getattr(args, "verbose", False)
