"""Misuse of the ``thresher`` CLI ends in one clear error line and exit status 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import check_extra_args, main
from pipeline.stages.runner import beam_option_names, validate_beam_args


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip() and "apitools" not in line]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    return path


# ------------------------------------------------------------------ unknown flags


def test_mistyped_flags_after_ingest_are_rejected_with_suggestions(tmp_path, jsonl, capsys):
    catalog = tmp_path / "cat"
    rc = main(["ingest", str(jsonl), "--catalog", str(catalog), "--dataset", "d", "--wrokers", "2", "--froce"])
    assert rc == 2
    assert _errors(capsys) == ["thresher ingest: error: unrecognised option --wrokers (did you mean --workers?)",
                               "thresher ingest: error: unrecognised option --froce (did you mean --force?)"]
    assert not catalog.exists()  # rejected before any work


def test_unknown_flag_suggests_a_beam_option_too(tmp_path, jsonl, capsys):
    rc = main(["ingest", str(jsonl), "--catalog", str(tmp_path / "c"), "--dataset", "d", "--direct_num_worker=2"])
    assert rc == 2
    assert _errors(capsys) == [
        "thresher ingest: error: unrecognised option --direct_num_worker (did you mean --direct_num_workers?)"]


def test_real_beam_options_pass_validation():
    assert {"--runner", "--direct_num_workers", "--flink_master", "--dask_client_address"} <= set(beam_option_names())
    for args in (["--runner=DirectRunner"], ["--runner", "DirectRunner"], ["--direct_num_workers", "2"],
                 ["--dask_client_address", "tcp://127.0.0.1:8786"], ["--experiments=a", "--experiments", "b"],
                 ["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"], ["--streaming"],
                 ["--runner", "flink", "--flink_master", "localhost:8081", "--parallelism", "4"]):
        assert validate_beam_args(args) == [], args
        assert check_extra_args(args, ["--workers", "--force"], to_beam=True) == [], args


def test_beam_values_and_runner_names_are_checked():
    assert check_extra_args(["--direct_num_workers", "abc"], [], True) == [
        "argument --direct_num_workers: invalid int value: 'abc'"]
    assert check_extra_args(["--runner", "FlinkRuner"], [], True) == [
        "unknown runner 'FlinkRuner' for --runner (did you mean FlinkRunner?)"]
    # Beam knows the Dask runner only by its full class name; Thresher takes the short ones too
    for name in ("dask", "DaskRunner", "--runner=dask"):
        args = [name] if name.startswith("--") else ["--runner", name]
        assert check_extra_args(args + ["--dask_client_address", "tcp://127.0.0.1:8786"], [], True) == [], name
    assert check_extra_args(["--runner", "DaskRuner"], [], True) == [
        "unknown runner 'DaskRuner' for --runner (did you mean DaskRunner?)"]


def test_the_dask_runner_without_dask_installed_is_a_clear_error(monkeypatch):
    from pipeline.stages import runner

    monkeypatch.setattr(runner, "DASK_MODULES", ("dask", "no_such_module_for_the_test"))
    assert check_extra_args(["--runner", "dask"], [], True) == [
        ("--runner dask needs dask[distributed] (no_such_module_for_the_test not installed): "
         "pip install 'dask[distributed]'")]
    with pytest.raises(RuntimeError, match="needs dask"):
        runner.make_pipeline_options(1, ["--runner", "dask"])
    assert check_extra_args(["stray"], [], True) == ["unexpected argument 'stray'"]


def test_job_service_runners_may_define_more_options_but_typos_of_ours_still_fail():
    # Flink's job service adds options Beam's Python classes do not list; those must pass ...
    args = ["--runner", "FlinkRunner", "--checkpointing_interval", "1000"]
    problems = validate_beam_args(args)
    assert [(p.option, p.runner_may_define) for p in problems] == [("--checkpointing_interval", True)]
    assert check_extra_args(args, ["--workers", "--force"], True) == []
    # ... but a near miss of a Thresher option is a typo whatever the runner
    assert check_extra_args(args + ["--froce"], ["--workers", "--force"], True) == [
        "unrecognised option --froce (did you mean --force?)"]


def test_beam_pass_through_still_runs(tmp_path, jsonl, capsys):
    rc = main(["ingest", str(jsonl), "--catalog", str(tmp_path / "c"), "--dataset", "d",
               "--runner=DirectRunner", "--direct_num_workers", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "samples" in capsys.readouterr().out


def test_commands_that_are_not_beam_jobs_take_no_extra_flags(tmp_path, capsys):
    assert main(["concepts", "match", "two", "dogs", "--mentoins"]) == 2
    assert _errors(capsys) == ["thresher concepts match: error: unrecognised option --mentoins (did you mean --mentions?)"]
    assert main(["annotate", "tag-vocab", "--input", str(tmp_path / "t.txt"), "--runner=DirectRunner"]) == 2
    assert _errors(capsys) == ["thresher annotate tag-vocab: error: unrecognised option --runner"]
    assert main(["select", "mig", "--input", "x.jsonl", "--budget", "3", "--out", "o.parquet", "--budjet", "4"]) == 2
    assert _errors(capsys) == ["thresher select mig: error: unrecognised option --budjet (did you mean --budget?)"]


def test_nested_beam_commands_check_against_their_own_options(tmp_path, capsys):
    assert main(["annotate", "tags", "--catalog", str(tmp_path / "c"), "--dataset", "d", "--wrokers", "2"]) == 2
    assert _errors(capsys) == ["thresher annotate tags: error: unrecognised option --wrokers (did you mean --workers?)"]
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ choices and paths


def test_mistyped_layout_and_format_list_the_choices(tmp_path, jsonl, capsys):
    catalog = tmp_path / "cat"
    assert main(["ingest", str(jsonl), "--catalog", str(catalog), "--dataset", "d", "--layout", "sharegtp"]) == 2
    [line] = _errors(capsys)
    assert line.startswith("thresher ingest: error: invalid --layout 'sharegtp' (did you mean sharegpt?); "
                           "choose from: auto, ")
    assert "alpaca" in line and "openai_messages" in line
    assert main(["ingest", str(jsonl), "--catalog", str(catalog), "--dataset", "d", "--format", "jsnol"]) == 2
    [line] = _errors(capsys)
    assert "invalid --format 'jsnol' for --kind instruction (did you mean jsonl?)" in line
    assert not catalog.exists()


def test_catalog_path_that_is_a_file(tmp_path, jsonl, capsys):
    some = tmp_path / "some.txt"
    some.write_text("not a catalog")
    assert main(["ingest", str(jsonl), "--catalog", str(some), "--dataset", "d"]) == 2
    assert _errors(capsys) == [f"thresher ingest: error: catalog path {some} is a file, not a folder"]
    # below a file: the OSError from mkdir becomes one line naming the path
    assert main(["ingest", str(jsonl), "--catalog", str(some / "cat"), "--dataset", "d"]) == 2
    [line] = _errors(capsys)
    assert line.startswith("thresher ingest: error: ") and str(some / "cat") in line
    assert some.read_text() == "not a catalog"


def test_missing_input_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["ingest", str(missing), "--catalog", str(tmp_path / "c"), "--dataset", "d"]) == 2
    [line] = _errors(capsys)
    assert line.startswith("thresher ingest: error: ") and str(missing) in line


def test_bad_sql_and_unquoted_sql(tmp_path, capsys):
    catalog = tmp_path / "c"
    catalog.mkdir()
    assert main(["query", "--catalog", str(catalog), "SELEC 1"]) == 2
    lines = _errors(capsys)
    assert lines[0].startswith("thresher query: error: ") and "SELEC" in lines[0]
    assert all(line.startswith("  ") for line in lines[1:])  # DuckDB's caret, indented under the error
    assert main(["query", "--catalog", str(catalog), "SELECT", "1"]) == 2
    assert _errors(capsys) == ["thresher query: error: unexpected arguments: 1 (quote a value that contains spaces)"]


def test_select_mig_unknown_dataset_and_file(tmp_path, capsys):
    out = str(tmp_path / "o.parquet")
    assert main(["select", "mig", "--input", f"{tmp_path}#nope", "--budget", "3", "--out", out]) == 2
    [line] = _errors(capsys)
    assert line.startswith("thresher select mig: error: ") and "'nope'" in line
    assert main(["select", "mig", "--input", str(tmp_path / "nope.jsonl"), "--budget", "3", "--out", out]) == 2
    [line] = _errors(capsys)
    assert line.startswith("thresher select mig: error: ") and "nope.jsonl" in line


def test_argparse_errors_and_help_return_codes(capsys):
    assert main(["--help"]) == 0
    assert main(["ingest"]) == 2  # required arguments missing: argparse's usage and message
    assert "required" in capsys.readouterr().err


def test_genuine_bugs_still_show_a_traceback(monkeypatch, tmp_path):
    import pipeline.commands.query as query_command

    def broken(args, extra):
        raise AttributeError("a bug")

    monkeypatch.setattr(query_command, "run", broken)
    with pytest.raises(AttributeError, match="a bug"):
        main(["query", "--catalog", str(tmp_path), "SELECT 1"])
