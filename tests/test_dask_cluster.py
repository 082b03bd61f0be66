"""Every Beam stage on Beam's Dask runner, against a real dask.distributed cluster.

A scheduler and two worker processes are started as subprocesses on 127.0.0.1; the stages run
through their public entry points with ``--runner dask --dask_client_address tcp://...`` and
their outputs are compared with the in-process runner's: same tables, same rows, same row
accounting (counted from what the job wrote: Dask reports no metrics), vectors equal within
float tolerance (the Dask workers run torch on one thread, the in-process runner on all cores).
The quick test runs ``thresher ingest`` and ``thresher embed`` on the cluster; the full
comparison of every stage is marked ``slow`` (3 minutes on 2 busy cores; tags and CLIP concepts,
whose set-up embeds a whole vocabulary in every worker, take a third of it): ``pytest -m slow
tests/test_dask_cluster.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")

from pipeline.embed.clip import TINY_MODEL
from pipeline.io.catalog import Catalog
from pipeline.stages.concepts import run_caption_concepts, run_clip_concepts
from pipeline.stages.embeddings import (
    read_embeddings,
    run_clip_embedding,
    run_text_embedding,
)
from pipeline.stages.ingest import run_ingest
from pipeline.stages.instruction_annotations import (
    run_quality_annotation,
    run_tag_annotation,
)
from pipeline.stages.runner import DASK_RUNNER, make_pipeline_options

START_TIMEOUT_S = 90
# Two small files (70 rows): two units of work for ingest; three shards for the later stages.
INSTRUCTION_FILES = ["mt_bench_questions.jsonl.gz", "self_instruct_seed_tasks.jsonl.gz"]


def _wait_for(path: Path, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"the dask {what} did not start (exit status {[p.returncode for p in dead]})")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``tcp://127.0.0.1:PORT`` of a scheduler with two single-threaded worker processes."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs: list[subprocess.Popen] = []
    with open(folder / "cluster.log", "wb") as log:
        try:
            # --port 0: the scheduler picks a free port and writes its address to the scheduler file.
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                 "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
            _wait_for(scheduler_file, procs, "scheduler")
            for i in range(2):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                     "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                     "--local-directory", str(folder / f"worker{i}"), "--name", f"w{i}"],
                    cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
            with Client(scheduler_file=str(scheduler_file), timeout=START_TIMEOUT_S) as client:
                client.wait_for_workers(2, timeout=START_TIMEOUT_S)
                address = client.scheduler.address
                pids = client.run(os.getpid)
            assert len(set(pids.values()) | {os.getpid()}) == 3  # two worker processes, neither of them us
            yield address
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in reversed(procs):
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _tables(partition: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(partition.glob("part-*.parquet"))}


def _close(x, y) -> bool:
    """Equal values, floats (also inside lists and structs) within 1e-5."""
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, abs_tol=1e-5) or (math.isnan(x) and math.isnan(y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    return x == y


def _assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    assert ta and list(ta) == list(tb), (a, b)
    for name in ta:
        x, y = ta[name], tb[name]
        assert x.schema == y.schema and x.num_rows == y.num_rows, name
        for col in x.column_names:
            if not x.column(col).equals(y.column(col)):  # floats computed on another thread count
                for i, (u, v) in enumerate(zip(x.column(col).to_pylist(), y.column(col).to_pylist())):
                    assert _close(u, v), f"{a.name}/{name}:{col} row {i}: {u!r} != {v!r}"


def _assert_same_embeddings(a: Path, b: Path) -> None:
    ids_a, va = read_embeddings(a)
    ids_b, vb = read_embeddings(b)
    assert ids_a == ids_b and len(ids_a) > 0
    np.testing.assert_allclose(va, vb, atol=1e-5)
    for column in ("user_embedding", "answer_embedding"):
        if column in pq.read_schema(next(a.glob("part-*.parquet"))).names:
            xa = np.stack(pq.read_table(a, columns=[column]).column(column).to_numpy(zero_copy_only=False))
            xb = np.stack(pq.read_table(b, columns=[column]).column(column).to_numpy(zero_copy_only=False))
            np.testing.assert_allclose(xa, xb, atol=1e-5)  # NaN where a side is empty: equal_nan


def _run_all(root: Path, demo: Path, beam_args: list[str]) -> dict:
    inputs = [str(demo / "instructions" / f) for f in INSTRUCTION_FILES]
    out = {"ingest": run_ingest(inputs, root, "mix", num_shards=3, beam_args=beam_args),
           "images": run_ingest([str(demo / "image_text" / "small_dupes")], root, "dupes", kind="image_text",
                                container="image_folder", num_shards=2, beam_args=beam_args)}
    out["text"] = run_text_embedding(root, "mix", beam_args=beam_args, batch_size=16)
    out["quality"] = run_quality_annotation(root, "mix", beam_args=beam_args)
    out["clip"] = run_clip_embedding(root, "dupes", TINY_MODEL, batch_size=4, beam_args=beam_args)
    out["caption_concepts"] = run_caption_concepts(root, "dupes", beam_args=beam_args)
    return out


@pytest.fixture(scope="module")
def both_runners(dask_cluster, demo_data, tmp_path_factory) -> tuple[dict, dict]:
    """The same stages in-process and on the cluster, each into its own catalog."""
    local = _run_all(tmp_path_factory.mktemp("local"), demo_data, [])
    dask = _run_all(tmp_path_factory.mktemp("dask"), demo_data,
                    ["--runner", "dask", "--dask_client_address", dask_cluster])
    return local, dask


def test_short_runner_name_becomes_beams_dask_runner():
    opts = make_pipeline_options(2, ["--runner", "dask", "--dask_client_address", "tcp://127.0.0.1:1"])
    all_opts = opts.get_all_options()
    assert all_opts["runner"] == DASK_RUNNER and all_opts["address"] == "tcp://127.0.0.1:1"
    assert all_opts["partition_size"] == 1  # one unit of work a Dask partition, unless told otherwise
    assert make_pipeline_options(1, ["--runner=DaskRunner", "--dask_npartitions=4"]).get_all_options()[
        "partition_size"] is None


@pytest.mark.slow
def test_ingest_on_dask_writes_the_same_tables_and_accounts_for_every_row(both_runners):
    local, dask = both_runners
    a, b = Path(local["ingest"].catalog), Path(dask["ingest"].catalog)
    for key in ("ingest", "images"):
        # rows in = samples + rejects + duplicates, counted from the job's own records
        assert dask[key].counts == local[key].counts and not dask[key].skipped
        assert dask[key].counts["rows_in"] > 0
    for table in ("samples/instruction/dataset=mix", "samples/image_text/dataset=dupes",
                  "rejects/dataset=mix", "duplicates/dataset=mix", "duplicates/dataset=dupes"):
        if (a / table).is_dir() or (b / table).is_dir():
            _assert_same_tables(a / table, b / table)


@pytest.mark.slow
def test_embedding_stages_on_dask_match_the_in_process_runner(both_runners):
    local, dask = both_runners
    assert dask["text"].rows == local["text"].rows == local["ingest"].counts["samples"]
    assert dask["text"].weights_digest == local["text"].weights_digest
    _assert_same_embeddings(Path(local["text"].output), Path(dask["text"].output))
    for part in ("image", "text"):
        res_a, res_b = getattr(local["clip"], part), getattr(dask["clip"], part)
        assert res_a.rows == res_b.rows == local["images"].counts["samples"]
        _assert_same_embeddings(Path(res_a.output), Path(res_b.output))
    _assert_same_tables(Path(local["clip"].clip_score_output), Path(dask["clip"].clip_score_output))


@pytest.mark.slow
def test_shard_stages_on_dask_match_the_in_process_runner(both_runners):
    local, dask = both_runners
    for key in ("quality", "caption_concepts"):
        assert (dask[key].rows_in, dask[key].rows_out) == (local[key].rows_in, local[key].rows_out), key
        assert dask[key].rows_out == dask[key].rows_in > 0 and not dask[key].skipped
        _assert_same_tables(Path(local[key].output), Path(dask[key].output))


@pytest.mark.slow
def test_model_loading_shard_stages_on_dask_match_the_in_process_runner(both_runners, dask_cluster):
    """Tags and CLIP concepts: each worker embeds the whole vocabulary in its set-up (slow on 2 cores)."""
    local, dask = both_runners
    on_dask = ["--runner", "dask", "--dask_client_address", dask_cluster]
    for run in (lambda root, args: run_tag_annotation(root, "mix", beam_args=args),
                lambda root, args: run_clip_concepts(root, "dupes", TINY_MODEL, None, top_k=2, threshold=0.0,
                                                     beam_args=args)):
        a = run(Path(local["ingest"].catalog), [])
        b = run(Path(dask["ingest"].catalog), on_dask)
        assert a.rows_in == b.rows_in == a.rows_out == b.rows_out > 0 and not b.skipped
        _assert_same_tables(Path(a.output), Path(b.output))


def test_thresher_cli_ingests_and_embeds_on_the_cluster(dask_cluster, tmp_path, capsys):
    """The quick check (the full comparison is slow): ingest and the text embedding via ``thresher``."""
    from pipeline.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n{"instruction": "Add 2 and 2.", "output": "4"}\n'
                   '{"instruction": "Say hi.", "output": "Hi!"}\nnot json\n'
                   '{"instruction": "Name a colour.", "output": "Blue."}\n')
    on_dask = ["--runner", "dask", "--dask_client_address", dask_cluster]
    cat = tmp_path / "dask"
    assert main(["ingest", str(src), "--catalog", str(cat), "--dataset", "d", "--shards", "2", *on_dask]) == 0
    out = capsys.readouterr().out
    assert [line.split()[-1] for line in out.splitlines()[1:5]] == ["5", "3", "1", "1"]  # in, samples, rejects, dupes
    assert main(["embed", "--catalog", str(cat), "--dataset", "d", *on_dask]) == 0
    run_ingest([str(src)], tmp_path / "local", "d", num_shards=2)
    local = run_text_embedding(tmp_path / "local", "d")
    _assert_same_tables(Catalog.at(tmp_path / "local").samples_partition("instruction", "d"),
                        Catalog.at(cat).samples_partition("instruction", "d"))
    _assert_same_embeddings(Path(local.output), Catalog.at(cat).embedding_partition(Path(local.output).parent.name, "d"))
