"""pipeline/registry.py: every entry resolves, the CLI's choices are the registry's names, unknown
names and parameters fail with the choices listed, and the module stays cheap to import."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import pytest

from pipeline import registry
from pipeline.cli import build_parser, command_modules, main


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _choices(parser: argparse.ArgumentParser, flag: str) -> list:
    return list(next(a for a in parser._actions if flag in a.option_strings).choices)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser(command_modules())


@pytest.mark.parametrize("entry", list(registry.all_entries()), ids=lambda e: f"{e.family}:{e.name}")
def test_every_entry_resolves_and_its_parameters_fit_the_callable(entry):
    impl = entry.load()
    assert callable(impl)
    assert entry.kind in registry.KINDS and entry.help and "\n" not in entry.help
    for p in entry.params:
        assert p.type in (str, int, float, bool)
        if not p.required and p.default is not None:
            assert p.check(p.default, "default") == p.default  # defaults pass their own checks
    if entry.family == "selector":
        selector = impl()
        assert selector.name == entry.name and selector.schema is not None
        for method in ("sources", "from_catalog", "from_file", "notes", "run"):
            assert callable(getattr(selector, method))
        return
    accepted = inspect.signature(impl).parameters
    fixed = (["catalog", "dataset", "workers", "force", "beam_args"] if entry.family in ("annotator", "embedder")
             else ["catalog", "source", "out_dir", "overwrite"])
    for name in fixed + [p.name for p in entry.params]:
        assert name in accepted, f"{entry.target} takes no {name!r}"


def test_cli_choices_are_the_registry_names(parser):
    select = _subparser(parser, "select")
    sub = next(a for a in select._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(registry.SELECTORS)
    assert _choices(_subparser(parser, "export"), "--format") == list(registry.EXPORTERS)
    for group in ("tags", "quality"):
        assert _choices(_subparser(parser, "annotate", group), "--annotator") == list(registry.ANNOTATORS.options(group))
    assert _choices(_subparser(parser, "concepts", "annotate"), "--annotator") == \
        list(registry.ANNOTATORS.options("concepts"))
    embed = _subparser(parser, "embed")
    assert _choices(embed, "--kind") == list(registry.KINDS)
    assert {e.kind for e in registry.EMBEDDERS.values()} == set(registry.KINDS)  # every kind can be embedded
    assert _choices(embed, "--tier") == list(registry.EMBEDDERS["text"].param("tier").choice_values())
    # a selector's options are its parameters, choices included
    mig = _subparser(parser, "select", "mig")
    assert _choices(mig, "--phi") == list(registry.SELECTORS["mig"].param("phi").choices)
    gais = _subparser(parser, "select", "gais")
    assert _choices(gais, "--variant") == list(registry.SELECTORS["gais"].param("variant").choices)
    assert "--no-scale" in gais._option_string_actions  # a bool parameter that defaults to True


def test_unknown_names_list_the_choices():
    with pytest.raises(KeyError) as err:
        registry.SELECTORS["mgi"]
    assert "unknown selector 'mgi' (did you mean mig?); choose from: mig, cabs, gais" in str(err.value)
    with pytest.raises(KeyError, match="choose from: sharegpt, alpaca, openai, parquet, dpo, webdataset"):
        registry.lookup("exporter", "jsonl")
    with pytest.raises(KeyError, match="unknown step family 'selectors'"):
        registry.lookup("selectors", "mig")
    with pytest.raises(KeyError, match="choose from: offline, llm"):
        registry.ANNOTATORS.find("tags", "gpt")


def test_parameters_are_validated_with_defaults():
    mig = registry.SELECTORS["mig"]
    got = mig.validate({"budget": 10, "prop_weight": 2})
    assert got["budget"] == 10 and got["prop_weight"] == 2.0 and isinstance(got["prop_weight"], float)
    assert got["phi"] == "pow" and got["label_graph"] is None
    with pytest.raises(ValueError, match=r"'budgte' \(did you mean budget\?\)"):
        mig.validate({"budgte": 10})
    with pytest.raises(ValueError, match="'budget' is required"):
        mig.validate({})
    with pytest.raises(ValueError, match="'budget' must be int, got True"):
        mig.validate({"budget": True})
    with pytest.raises(ValueError, match="'phi' is 'lin'; choose from: pow, exp"):
        mig.validate({"budget": 1, "phi": "lin"})
    text = registry.EMBEDDERS["text"]
    with pytest.raises(ValueError, match="choose from: fp32, int8, static"):
        text.validate({"tier": "fp16"})


def test_cli_refuses_an_unknown_format_with_the_choices(capsys, tmp_path):
    assert main(["export", "--catalog", str(tmp_path), "--format", "sharegtp", "--curated", "x",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sharegtp'" in err and "sharegpt" in err


def test_registry_import_is_cheap():
    code = ("import sys, pipeline.registry; "
            "print(sorted(m for m in ('numpy', 'apache_beam', 'prefect', 'torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
