"""Prefect flows run in-process against a temporary Prefect API."""

from __future__ import annotations

import pytest

from flows.demo import demo_specs, run_demo
from flows.ingest import IngestSpec, ingest_flow, ingest_task
from pipeline import query


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    # The first start migrates a SQLite database; give it time on a small machine.
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_ingest_flow_runs_each_dataset_as_a_retried_task(tmp_path, demo_data):
    assert ingest_task.retries == 2
    specs = [
        IngestSpec("gsm", [str(demo_data / "instructions" / "gsm8k_train.jsonl.gz")]),
        IngestSpec("chat", [str(demo_data / "instructions" / "sharegpt_dummy_conversations.json.gz")],
                   layout="sharegpt"),
    ]
    results = ingest_flow(specs, str(tmp_path / "cat"))
    assert [r["dataset"] for r in results] == ["gsm", "chat"]
    assert results[0]["counts"]["samples"] == 150
    chat = results[1]["counts"]
    assert chat["rows_in"] == 40 and chat["samples"] + chat["duplicates"] == 40
    again = ingest_flow(specs, str(tmp_path / "cat"))
    assert all(r["skipped"] for r in again)


def test_task_failure_is_retried_then_reported(tmp_path, monkeypatch):
    import flows.ingest as fi

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        raise OSError("transient storage error")

    monkeypatch.setattr(fi, "run_ingest", flaky)
    monkeypatch.setattr(fi.ingest_task, "retry_delay_seconds", 0)
    with pytest.raises(OSError, match="transient"):
        fi.ingest_flow([IngestSpec("x", [str(tmp_path)])], str(tmp_path / "cat"))
    assert len(calls) == 3  # first try + 2 retries


def test_demo_curates_the_shipped_data(tmp_path, capsys):
    assert run_demo(str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    assert "Thresher demo" in out and "demo_instructions" in out
    acc = query.run_query(tmp_path / "demo", "ingest_accounting").to_pylist()
    assert {r["dataset"] for r in acc} == {s.dataset for s in demo_specs()}
    assert all(r["balanced"] for r in acc)


def test_deployment_carries_specs_and_schedule(tmp_path):
    import json

    from flows.deployments import ingest_deployment, load_specs

    spec_file = tmp_path / "datasets.json"
    spec_file.write_text(json.dumps([{"dataset": "gsm", "inputs": ["/data/gsm8k.jsonl"], "layout": "question_answer"}]))
    specs = load_specs(spec_file)
    dep = ingest_deployment(specs, str(tmp_path / "cat"), cron="0 3 * * *")
    assert dep.name == "thresher-ingest"
    assert dep.parameters["specs"][0]["dataset"] == "gsm"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    spec_file.write_text(json.dumps([{"dataset": "x", "inputs": [], "colour": "red"}]))
    with pytest.raises(ValueError, match="unknown fields"):
        load_specs(spec_file)


def test_curate_image_text_flow_end_to_end(tmp_path, demo_data):
    import tarfile

    from flows.curate_image_text import curate_image_text
    from pipeline.embed.clip import TINY_MODEL, register_tiny_config

    register_tiny_config()
    spec = IngestSpec("nlvr", [str(demo_data / "image_text" / "nlvr_dev")], kind="image_text", container="nlvr")
    out = curate_image_text(spec, str(tmp_path / "cat"), model_name=TINY_MODEL, superbatch=50,
                            filter_ratio=0.8, steps=3)
    assert out["ingest"]["counts"]["samples"] == 117
    assert out["concepts"]["rows_out"] == 117
    plan = out["plan"]
    assert plan["batch"] == 10 and plan["steps"] == 3
    assert plan["cabs"]["distinct_concepts"] >= plan["iid"]["distinct_concepts"]
    export = out["export"]
    assert export["samples"] == 30 and export["missing_from_dataset"] == 0
    names = []
    for shard in export["shards"]:  # shards follow the plan's steps (several per step for loader workers)
        with tarfile.open(tmp_path / "cat" / "exports" / "nlvr_cabs_dm" / shard) as tar:
            names += tar.getnames()
    assert len(names) == 90 and {n.rsplit(".", 1)[1] for n in names} == {"png", "txt", "json"}
    views = query.run_query(tmp_path / "cat", "SELECT count(*) AS n FROM concepts").to_pylist()
    assert views == [{"n": 117}]


def test_curate_instructions_flow_end_to_end(tmp_path, demo_data):
    import json

    from flows.curate_instructions import curate_instructions

    spec = IngestSpec("small", [str(demo_data / "instructions" / "gsm8k_train.jsonl.gz"),
                                str(demo_data / "instructions" / "gpteacher_roleplay.json.gz")])
    out = curate_instructions(spec, str(tmp_path / "cat"), budget=20, name="small20")
    assert out["ingest"]["counts"]["samples"] == 210
    assert out["tags"]["rows_out"] == out["quality"]["rows_out"] == 210
    mig = out["mig"]
    assert mig["budget"] == 20 and mig["information"] > mig["random_information_mean"]
    assert mig["notes"]["tags_from"] == "offline_tags" and mig["notes"]["quality_from"] == "offline_quality"
    assert out["curate"]["exports"] == {"sharegpt": 20, "alpaca": 20, "openai": 20, "parquet": 20}
    curated = query.run_query(tmp_path / "cat", "SELECT rank, tags, score FROM curated ORDER BY rank").to_pylist()
    assert [r["rank"] for r in curated] == list(range(20)) and all(r["tags"] for r in curated)
    manifest = json.loads((tmp_path / "cat" / "exports" / "small20" / "alpaca" / ".manifest.json").read_text())
    assert manifest["rows"] == 20 and manifest["selection"]["algorithm"] == "mig"
    again = curate_instructions(spec, str(tmp_path / "cat"), budget=20, name="small20")
    assert again["ingest"]["skipped"] and again["mig"]["information"] == mig["information"]
