"""Pipeline specs: validation with clear messages, the shipped examples, `thresher run` end to end,
`thresher deploy`'s deployment object, and the infra/ compose file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import registry
from pipeline.spec import FLOW_PARAMS, SpecError, load_spec, validate_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "specs"
INSTRUCTIONS = EXAMPLES / "instructions_mig.yaml"
IMAGE_TEXT = EXAMPLES / "image_text_cabs.yaml"


def _raw(path: Path = INSTRUCTIONS) -> dict:
    return yaml.safe_load(path.read_text())


def _problems(raw: dict, base: Path = EXAMPLES) -> list[str]:
    with pytest.raises(SpecError) as exc:
        validate_spec(raw, base_dir=base, source="my.yaml")
    assert str(exc.value).startswith("my.yaml: ")
    return exc.value.problems


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("path", [INSTRUCTIONS, IMAGE_TEXT], ids=lambda p: p.name)
def test_example_specs_validate_with_paths_relative_to_the_file(path):
    spec = load_spec(path)
    assert Path(spec.catalog).is_absolute() and Path(spec.catalog).parent == REPO / "catalog"
    for d in spec.datasets:
        assert all(Path(p).is_absolute() and Path(p).exists() and REPO / "demo_data" in Path(p).parents
                   for p in d.inputs)
    # what a deployment carries validates again unchanged (the flow re-validates it)
    assert validate_spec(spec.to_dict()).to_dict() == spec.to_dict()
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()


def test_a_good_spec_fills_in_the_registry_defaults():
    spec = load_spec(INSTRUCTIONS)
    assert spec.kind == "instruction" and [s.step for s in spec.steps] == ["embed", "tags", "quality", "index"]
    tags = spec.step("tags")
    assert tags.impl == "offline_tags" and tags.option == "offline"
    assert tags.params["tier"] == "fp32"  # the embed step's tier, which tags read
    mig = spec.selection
    assert mig.algorithm == "mig" and mig.params["budget"] == 40
    assert mig.params["prop_weight"] == pytest.approx(registry.SELECTORS["mig"].param("prop_weight").default)
    assert spec.curated_name("demo_chat") == "demo_chat_mig40"
    assert spec.export_dir("demo_chat") == str(Path(spec.catalog) / "exports" / "demo_chat_mig40")


def test_spec_rules_match_the_flows_they_drive():
    from flows.curate_instructions import CHAIN_TIERS as FLOW_TIERS
    from pipeline.spec import CHAIN_TIERS

    assert CHAIN_TIERS == FLOW_TIERS


def test_several_datasets_get_one_curated_set_each():
    raw = _raw()
    raw["datasets"].append({"dataset": "more", "inputs": ["../../demo_data/instructions/mt_bench_questions.jsonl.gz"]})
    raw["exports"]["dir"] = "out"
    spec = validate_spec(raw, base_dir=EXAMPLES)
    names = [spec.curated_name(d.dataset) for d in spec.datasets]
    assert names == ["demo_chat_mig40-demo_chat", "demo_chat_mig40-more"]
    assert spec.export_dir("more") == str(EXAMPLES / "out" / "demo_chat_mig40-more")
    raw["datasets"][1]["dataset"] = "demo_chat"
    assert _problems(raw) == ["datasets[1].dataset: 'demo_chat' is already datasets[0]"]


def test_llm_annotators_need_no_embed_step_and_resolve_their_cache_path():
    raw = _raw()
    llm = {"annotator": "llm", "endpoint": "http://localhost:8000/v1", "model": "m", "cache": "cache/llm.sqlite"}
    raw["steps"] = [{"step": "tags", **llm}, {"step": "quality", **llm}]
    raw["selection"]["keep_near_duplicates"] = True
    spec = validate_spec(raw, base_dir=EXAMPLES)
    assert [s.impl for s in spec.steps] == ["llm_tags", "llm_quality"]
    assert spec.step("tags").params["cache"] == str(EXAMPLES / "cache" / "llm.sqlite")
    assert spec.step("tags").params["timeout"] == pytest.approx(60.0)  # the registry's default
    del raw["steps"][0]["endpoint"]
    assert _problems(raw) == [("steps[0].endpoint: required field is missing "
                               "(base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1)")]


def test_internal_fields_cannot_be_written_in_a_spec():
    raw = _raw()
    raw["steps"][1] = {"step": "tags", "impl": "llm_tags", "params": {}}
    assert [p.split(";")[0] for p in _problems(raw)] == ["steps[1].impl: unknown 'impl'",
                                                         "steps[1].params: unknown 'params'"]


def test_unknown_field_is_an_error_naming_its_path():
    raw = _raw()
    raw["colour"] = "red"
    raw["datasets"][0]["layuot"] = "sharegpt"
    assert _problems(raw) == [
        ("datasets[0].layuot: unknown field (did you mean 'layout'?); allowed fields: dataset, inputs, kind, "
         "container, layout, options"),
        "colour: unknown field; allowed fields: name, catalog, datasets, steps, selection, curate, exports",
    ]


def test_bad_selector_name_suggests_and_lists_the_allowed_ones():
    raw = _raw()
    raw["selection"]["algorithm"] = "mgi"
    assert _problems(raw) == ["selection.algorithm: unknown 'mgi' (did you mean 'mig'?); allowed: mig, cabs, gais"]
    raw["selection"]["algorithm"] = "cabs"
    assert _problems(raw) == ["selection.algorithm: 'cabs' does not select instruction data; allowed: mig, gais"]


def test_bad_step_names_and_parameters():
    raw = _raw()
    raw["steps"][1] = {"step": "tgas"}
    raw["steps"][2] = {"step": "quality", "annotator": "ofline"}
    raw["steps"][3] = {"step": "index", "near_dup_treshold": 0.9}
    assert _problems(raw) == [
        ("steps[1].step: unknown 'tgas' (did you mean 'tags'?); allowed for instruction data: "
         "embed, tags, quality, index"),
        ("steps[2].annotator: unknown 'ofline' (did you mean 'offline'?); allowed annotators of step 'quality': "
         "offline, llm"),
        ("steps[3].near_dup_treshold: unknown 'near_dup_treshold' (did you mean 'near_dup_threshold'?); "
         "allowed parameters of step 'index': near_dup_threshold"),
    ]
    raw = _raw()
    raw["steps"].insert(0, {"step": "concepts"})
    assert _problems(raw)[0] == ("steps[0].step: 'concepts' is not a step for instruction data; "
                                 "allowed: embed, tags, quality, index")


def test_bad_types_and_values():
    raw = _raw()
    raw["selection"]["budget"] = "lots"
    raw["steps"][0]["tier"] = "static"
    raw["steps"][3]["near_dup_threshold"] = 1.5
    problems = _problems(raw)
    assert "selection.budget: must be int, got 'lots'" in problems
    assert any(p.startswith("steps[0].tier: 'static' is refused in a pipeline") for p in problems)
    assert "steps[3].near_dup_threshold: must be <= 1.0, got 1.5" in problems
    raw = _raw()
    del raw["selection"]["budget"]
    raw["datasets"][0]["inputs"] = "one/file.jsonl"
    assert _problems(raw) == ["datasets[0].inputs: Input should be a valid list (got 'one/file.jsonl')",
                              "selection.budget: required field is missing (number of samples to pick)"]


def test_missing_input_path_names_the_resolved_path():
    raw = _raw()
    raw["datasets"][0]["inputs"].append("../../demo_data/instructions/nope.jsonl")
    missing = REPO / "demo_data" / "instructions" / "nope.jsonl"
    assert _problems(raw) == [f"datasets[0].inputs[2]: no such file or folder: {missing}"]


def test_registry_parameters_the_flow_cannot_pass_are_refused_not_dropped():
    raw = _raw()
    raw["steps"][1]["name"] = "my_tags"  # an output name: later steps look annotations up by default names
    (problem,) = _problems(raw)
    assert problem.startswith("steps[1].name: annotator 'offline_tags' has this parameter, but pipeline specs cannot "
                              "set it yet")
    # every runnable parameter is a registered one (the registry is the source of truth)
    for family in (registry.ANNOTATORS, registry.EMBEDDERS, registry.SELECTORS, registry.EXPORTERS):
        for name, entry in family.items():
            for p in FLOW_PARAMS.get(name, ()):
                entry.param(p)


def test_whole_spec_checks():
    raw = _raw()
    raw["steps"] = list(reversed(raw["steps"]))
    assert _problems(raw) == [
        "steps[0].step: 'index' reads what 'embed' writes; add {step: embed} before it",
        "steps[1].step: 'quality' reads what 'embed' writes; add {step: embed} before it",
        "steps[2].step: 'tags' reads what 'embed' writes; add {step: embed} before it",
    ]
    raw = _raw()
    raw["datasets"].append(_raw(IMAGE_TEXT)["datasets"][0])
    assert _problems(raw)[0] == ("datasets: one spec curates one kind of data; found image_text, instruction "
                                 "(write one spec per kind)")
    raw = _raw()
    raw["selection"] = {"algorithm": "gais", "label_column": "source_format"}
    (problem,) = _problems(raw)
    assert problem.startswith("selection.algorithm: 'gais' scores and flags instances but does not rank picks")
    del raw["exports"], raw["curate"]
    assert validate_spec(raw, base_dir=EXAMPLES).selection.params["label_column"] == "source_format"
    raw = _raw(IMAGE_TEXT)
    raw["exports"]["formats"] = ["sharegpt"]
    assert _problems(raw) == ["exports.formats[0]: unknown 'sharegpt'; allowed for image_text data: webdataset"]


def test_load_spec_reports_bad_yaml_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such spec file"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"\(file\): not valid YAML"):
        load_spec(bad)


def test_run_check_validates_only(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["run", "--check", str(IMAGE_TEXT)]) == 0
    assert capsys.readouterr().out.startswith("ok: pipeline 'image_text_cabs' (image_text)")
    bad = tmp_path / "bad.yaml"
    raw = _raw()
    raw["selection"]["algorithm"] = "mgi"
    raw["datasets"][0]["inputs"] = [str(REPO / "demo_data" / "instructions")]
    bad.write_text(yaml.safe_dump(raw))
    assert main(["run", "--check", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"thresher run: error: {bad}: 1 problem in the pipeline spec",
                   "  selection.algorithm: unknown 'mgi' (did you mean 'mig'?); allowed: mig, cabs, gais"]
    assert not (tmp_path / "catalog").exists()


# ------------------------------------------------------------------------------------------ deployments


def test_deployment_carries_the_spec_and_the_schedule(monkeypatch):
    from flows.deployments import pipeline_deployment, require_api_url

    spec = load_spec(IMAGE_TEXT)
    dep = pipeline_deployment(spec, cron="0 3 * * *", workers=2)
    assert dep.name == "image_text_cabs" and dep.flow_name == "thresher-pipeline"
    assert dep.entrypoint == "flows.run_spec.pipeline_flow"  # imported from the installed package
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters == {"spec": spec.to_dict(), "workers": 2}
    assert set(dep.tags) == {"thresher", "image_text"}
    assert pipeline_deployment(spec, name="nightly").name == "nightly"
    dask = ["--runner", "dask", "--dask_client_address", "tcp://dask-scheduler:8786"]
    assert pipeline_deployment(spec, beam_args=dask).parameters["beam_args"] == dask  # for the ingest jobs
    with pytest.raises(ValueError, match=r"--cron '0 3 \* \*' is not a cron expression"):
        pipeline_deployment(spec, cron="0 3 * *")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ValueError, match="PREFECT_API_URL is not set"):
        require_api_url("thresher deploy")


def test_deploy_command_refuses_without_a_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["deploy", str(INSTRUCTIONS), "--cron", "0 3 * * *"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ thresher run


def _thresher_run(spec: Path, catalog: Path) -> int:
    """`thresher run SPEC --catalog DIR` in-process, as the CLI runs it (its own temporary Prefect
    server, started by the command)."""
    from pipeline.cli import main

    return main(["run", str(spec), "--catalog", str(catalog)])


def test_run_image_text_example_end_to_end(tmp_path, capsys):
    import tarfile

    from pipeline import query

    catalog = tmp_path / "cat"
    assert _thresher_run(IMAGE_TEXT, catalog) == 0
    out = capsys.readouterr().out
    assert "=== pipeline image_text_cabs (image_text) ===" in out
    assert "demo_nlvr: steps concepts, embed, index" in out and "CABS-DM plan of 5 steps" in out
    export = catalog / "exports" / "image_text_cabs"
    manifest = json.loads((export / ".manifest.json").read_text())
    assert manifest["samples"] == 60 and manifest["missing_from_dataset"] == 0  # 5 steps x batch 12
    with tarfile.open(export / manifest["shards"][0]) as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"png", "txt", "json"}
    assert (catalog / "selections" / "image_text_cabs" / "picks.parquet").is_file()
    stages = {r["stage"] for r in query.run_query(catalog, "SELECT DISTINCT stage FROM runs").to_pylist()}
    assert {"ingest", "select"} <= stages
    # unchanged: every stage skips itself, the export is rewritten whole
    assert _thresher_run(IMAGE_TEXT, catalog) == 0
    assert "(unchanged, skipped)" in capsys.readouterr().out
    assert json.loads((export / ".manifest.json").read_text())["samples"] == 60


def test_run_instruction_example_end_to_end(tmp_path, capsys):
    from pipeline import query

    catalog = tmp_path / "cat"
    assert _thresher_run(INSTRUCTIONS, catalog) == 0
    out = capsys.readouterr().out
    assert "demo_chat: steps embed, tags, quality, index" in out and "MIG picked 40 of 210" in out
    rows = query.run_query(catalog, "SELECT rank, tags FROM curated ORDER BY rank").to_pylist()
    assert [r["rank"] for r in rows] == list(range(40)) and all(r["tags"] for r in rows)
    export = catalog / "exports" / "demo_chat_mig40"
    for fmt in ("sharegpt", "alpaca", "openai", "parquet"):
        manifest = json.loads((export / fmt / ".manifest.json").read_text())
        assert manifest["rows"] == 40 and manifest["selection"]["algorithm"] == "mig"


# ------------------------------------------------------------------------------------------ infra


def test_compose_file_parses_and_wires_the_services():
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prefect-server", "pipeline", "dask-scheduler", "dask-worker-1", "dask-worker-2"} <= set(services)
    assert "thresher" in " ".join(services["pipeline"]["command"]) and "deploy" in services["pipeline"]["command"]
    assert services["pipeline"]["environment"]["PREFECT_API_URL"].startswith("http://prefect-server:4200")
    catalog_mounts = [v for s in services.values() for v in s.get("volumes", []) if str(v).startswith("catalog:")]
    assert len(catalog_mounts) >= 3 and "catalog" in compose["volumes"]  # one shared volume, mounted everywhere
    dockerfile = (REPO / "infra" / "worker.Dockerfile").read_text()
    assert dockerfile.startswith("# ") and "FROM python:3.11-slim" in dockerfile and ".[cpu]" in dockerfile
