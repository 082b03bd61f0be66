"""Exports load unchanged with one call in each consumer (issue 11), checked with `datasets`.

The catalog mixes the demo instruction files (MT-bench questions have no answer) with a small
HH-RLHF-style file (chosen/rejected pairs, for the dpo export). Exports are written with few rows
per file so every format is split into several files. The docs' snippets (docs/exports.md) are
read from the page and run the way each trainer loads data; TRL, LLaMA-Factory and axolotl are
not installed, so their loading step is reproduced with `datasets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

datasets = pytest.importorskip("datasets")

from pipeline import query
from pipeline.curate.export_card import MANIFEST
from pipeline.curate.materialise import export, materialise_instructions
from pipeline.stages.ingest import run_ingest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "exports.md"
CURATED = "chats_mig"  # the name the docs' snippets use
FORMATS = ("openai", "sharegpt", "alpaca", "parquet", "dpo")
ROWS_PER_FILE = 3


def _hh(human: str, answer: str, *earlier: tuple[str, str]) -> str:
    turns = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in earlier)
    return f"{turns}\n\nHuman: {human}\n\nAssistant: {answer}"


HH_RECORDS = [
    {"chosen": _hh("What is a good name for a cat?", "Miso is a popular choice."),
     "rejected": _hh("What is a good name for a cat?", "Cats do not need names.")},
    {"chosen": _hh("And for a dog?", "Biscuit works well.", ("Name ideas for pets?", "Sure, which pet?")),
     "rejected": _hh("And for a dog?", "Dog.", ("Name ideas for pets?", "Sure, which pet?"))},
    {"chosen": _hh("How do I boil an egg?", "Simmer it for nine minutes, then cool it in cold water."),
     "rejected": _hh("How do I boil an egg?", "Put it in the microwave.")},
    {"prompt": "\n\nHuman: Is the sea salty?\n\nAssistant:", "chosen": " Yes, about 3.5% salt by weight.",
     "rejected": " No."},
    {"text": _hh("Can you help me fix my bike?", "Sure, what is wrong with it?")},  # no rejected side
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, demo_data):
    """{format: export folder} under <tmp>/exports/chats_<format>, plus the catalog root."""
    root = tmp_path_factory.mktemp("exp")
    hh = root / "hh_pairs.jsonl"
    hh.write_text("".join(json.dumps(r) + "\n" for r in HH_RECORDS), encoding="utf-8")
    cat = root / "cat"
    run_ingest([str(demo_data / "instructions"), str(hh)], cat, "mix")
    picked = query.run_query(cat, """
        SELECT sample_id FROM (
          SELECT sample_id, source_uri, row_number() OVER (PARTITION BY source_uri ORDER BY sample_id) AS k
          FROM samples)
        WHERE (source_uri LIKE '%mt_bench%' AND k <= 5) OR (source_uri LIKE '%hh_pairs%')
           OR (source_uri LIKE '%sharegpt_dummy%' AND k <= 8) OR (source_uri LIKE '%gsm8k%' AND k <= 6)
           OR (source_uri LIKE '%gpteacher_codegen%' AND k <= 6)
        ORDER BY sample_id""").column("sample_id")
    picks = root / "picks.parquet"
    pq.write_table(pa.table({"rank": list(range(len(picked))), "sample_id": picked,
                             "gain": [float(len(picked) - i) for i in range(len(picked))]}), picks)
    materialise_instructions(cat, "mix", picks, CURATED)
    out = {fmt: export(cat, CURATED, fmt, root / "exports" / f"chats_{fmt}", rows_per_file=ROWS_PER_FILE)
           for fmt in FORMATS}
    return root, cat, len(picked), out


def _on_disk(folder: Path, manifest: dict) -> list[dict]:
    """The rows exactly as written, file by file in manifest order."""
    rows: list[dict] = []
    for f in manifest["files"]:
        if f.endswith(".parquet"):
            rows += pq.read_table(folder / f).to_pylist()
        else:
            rows += [json.loads(line) for line in (folder / f).read_text(encoding="utf-8").splitlines()]
    return rows


def _same_rows(loaded: list[dict], written: list[dict]) -> None:
    assert len(loaded) == len(written)
    for got, want in zip(loaded, written):
        floats = {k for k, v in want.items() if isinstance(v, float)}
        assert {k: v for k, v in got.items() if k not in floats} == {k: v for k, v in want.items() if k not in floats}
        for k in floats:
            assert got[k] == pytest.approx(want[k], rel=1e-6)


def _has_answer(messages: list[dict]) -> bool:
    roles = [m["role"] for m in messages]
    return "user" in roles and "assistant" in roles[roles.index("user"):]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    # A cache per test: every load reads the export files, never an earlier test's Arrow cache.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_export_loads_with_one_call(exports, fmt):
    root, _, n_picked, manifests = exports
    folder = root / "exports" / f"chats_{fmt}"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == manifests[fmt]
    assert len(manifest["files"]) > 1 and all(f.startswith("data/train-") for f in manifest["files"])
    written = _on_disk(folder, manifest)
    assert len(written) == manifest["rows"] > 0
    assert manifest["rows"] + sum(manifest["filtered"].values()) == n_picked
    # one call, through the card
    _same_rows(datasets.load_dataset(str(folder), split="train").to_list(), written)
    # one call, with the builder named and the folder as data_dir: the card, the manifest and
    # dataset_info.json are not read as data
    builder = "parquet" if fmt == "parquet" else "json"
    if fmt != "alpaca":
        _same_rows(datasets.load_dataset(builder, data_dir=str(folder), split="train").to_list(), written)
    else:
        # docs/exports.md: per-file inference can make a history-free file's `history` a list of
        # nulls; with the card's features the json builder reads the same rows.
        features = datasets.load_dataset(str(folder), split="train").features
        _same_rows(datasets.load_dataset(builder, data_dir=str(folder), features=features,
                                         split="train").to_list(), written)
    # checksums and sizes of every data file
    for rec in manifest["data_files"]:
        data = (folder / rec["path"]).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
    assert sum(r["rows"] for r in manifest["data_files"]) == manifest["rows"]


def test_every_file_of_a_format_has_the_same_keys(exports):
    root, _, _, manifests = exports
    for fmt in ("openai", "sharegpt", "alpaca", "dpo"):
        keys = {tuple(r) for r in _on_disk(root / "exports" / f"chats_{fmt}", manifests[fmt])}
        assert len(keys) == 1, (fmt, keys)
    alpaca = _on_disk(root / "exports" / "chats_alpaca", manifests["alpaca"])
    assert any(r["history"] for r in alpaca) and any(not r["history"] for r in alpaca)


def test_answerless_rows_are_left_out_and_counted(exports):
    root, cat, _, manifests = exports
    info = json.loads((cat / "curated" / CURATED / "_curated.json").read_text())
    assert info["without_assistant_answer"] == 5  # the MT-bench questions: the curated set keeps them
    assert materialise_instructions(cat, "mix", info["picks"], CURATED).without_assistant_answer == 5  # (skipped run)
    runs = query.run_query(cat, "SELECT parameters, counts FROM runs WHERE stage = 'export' ORDER BY started_at")
    by_format = {r["parameters"]["format"]: r["counts"] for r in runs.to_pylist()}
    for fmt in ("openai", "sharegpt", "alpaca", "parquet"):
        m = manifests[fmt]
        assert m["filtered"] == {"no_assistant_answer": 5} and m["counts"]["skipped_without_answer"] == 5
        assert by_format[fmt]["skipped_without_answer"] == 5 and by_format[fmt]["rows"] == m["rows"]
    openai = _on_disk(root / "exports" / "chats_openai", manifests["openai"])
    parquet = _on_disk(root / "exports" / "chats_parquet", manifests["parquet"])
    assert all(_has_answer(r["messages"]) for r in openai + parquet)
    assert all(r["conversations"][-1]["from"] == "gpt"
               for r in _on_disk(root / "exports" / "chats_sharegpt", manifests["sharegpt"]))


def test_dpo_export_pairs_chosen_and_rejected(exports):
    root, _, n_picked, manifests = exports
    m = manifests["dpo"]
    rows = _on_disk(root / "exports" / "chats_dpo", m)
    assert m["rows"] == 4  # the four HH records with a rejected side
    assert m["filtered"]["no_assistant_answer"] == 5
    assert m["filtered"]["no_rejected_side"] == n_picked - 4 - 5
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert r["rejected"][0]["role"] == "assistant" and r["chosen"] != r["rejected"]
    dog = next(r for r in rows if r["chosen"][0]["content"] == "Biscuit works well.")
    assert [x["content"] for x in dog["prompt"]] == ["Name ideas for pets?", "Sure, which pet?", "And for a dog?"]
    assert dog["rejected"] == [{"role": "assistant", "content": "Dog."}]


def test_manifest_lineage_and_card(exports):
    root, _, _, manifests = exports
    m = manifests["openai"]
    assert m["parameters"] == {"curated": CURATED, "format": "openai", "rows_per_file": ROWS_PER_FILE,
                               "overwrite": False}
    licences = {Path(s["source_uri"]).name: s["licence"] for s in m["inputs"]["sources"]}
    assert licences["gsm8k_train.jsonl.gz"] == "MIT" and licences["sharegpt_dummy_conversations.json.gz"] == "Apache-2.0"
    assert licences["hh_pairs.jsonl"] == "unknown"  # named in no attribution table: never guessed
    assert sum(s["rows"] for s in m["inputs"]["sources"]) == m["rows"]
    card = (root / "exports" / "chats_openai" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"][0]["data_files"][0]["path"] == m["files"]
    assert "license" not in header  # mixed licences (and one unknown): listed in the body instead
    assert "| unknown |" in card


# ------------------------------------------------------------------ the docs' snippets


def _snippet(name: str) -> str:
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.DOTALL)
    assert found, f"docs/exports.md has no snippet {name!r}"
    return found.group(1)


def test_trl_sft_snippet(exports, monkeypatch):
    root, *_ = exports
    code = _snippet("trl-sft")
    assert "assistant_only_loss=True" in code
    [path] = re.findall(r'load_dataset\("([^"]+)", split="train"\)', code)
    monkeypatch.chdir(root)
    for folder in (path, path.replace("openai", "parquet")):  # the parquet export has the same column
        train = datasets.load_dataset(folder, split="train")
        assert train.features["messages"] == datasets.List({"role": datasets.Value("string"),
                                                            "content": datasets.Value("string")})
        # assistant_only_loss needs an assistant turn in every row
        assert all(_has_answer(msgs) for msgs in train["messages"])


def test_trl_dpo_snippet(exports, monkeypatch):
    root, *_ = exports
    [path] = re.findall(r'load_dataset\("([^"]+)", split="train"\)', _snippet("trl-dpo"))
    monkeypatch.chdir(root)
    pairs = datasets.load_dataset(path, split="train")
    message = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    assert all(pairs.features[k] == message for k in ("prompt", "chosen", "rejected"))
    assert pairs.num_rows == 4


def test_llama_factory_snippet(exports, monkeypatch):
    """LLaMA-Factory reads dataset_info.json in dataset_dir; an entry with script_url is loaded as
    load_dataset(os.path.join(dataset_dir, script_url)); then its aligner maps the columns/tags."""
    root, *_ = exports
    config = yaml.safe_load(_snippet("llama-factory"))
    monkeypatch.chdir(root)
    for fmt in ("sharegpt", "openai", "alpaca"):
        dataset_dir = config["dataset_dir"].replace("sharegpt", fmt)
        entry = json.loads(Path(dataset_dir, "dataset_info.json").read_text())[config["dataset"]]
        assert set(entry) <= {"script_url", "file_name", "formatting", "columns", "tags"}
        ds = datasets.load_dataset(os.path.join(dataset_dir, entry["script_url"]), split="train")
        cols = entry["columns"]
        assert set(cols.values()) <= set(ds.column_names)
        if entry["formatting"] == "sharegpt":
            tags = entry["tags"]
            for conv in ds[cols["messages"]]:
                if conv[0][tags["role_tag"]] == tags["system_tag"]:
                    conv = conv[1:]
                # LLaMA-Factory's check: user turns at even positions, assistant at odd, even count
                assert len(conv) % 2 == 0 and conv
                assert [m[tags["role_tag"]] for m in conv] == [tags["user_tag"], tags["assistant_tag"]] * (len(conv) // 2)
                assert all(isinstance(m[tags["content_tag"]], str) for m in conv)
        else:
            assert entry["formatting"] == "alpaca"
            for row in ds:
                assert row[cols["prompt"]] and row[cols["response"]] and isinstance(row[cols["system"]], str)
                assert all(len(pair) == 2 for pair in row[cols["history"]])
    # dataset_info.json is not data for the json builder either (it is not a train-* file)
    assert datasets.load_dataset("json", data_dir=config["dataset_dir"], split="train").num_rows > 0


@pytest.mark.parametrize("name", ["axolotl-chat", "axolotl-alpaca"])
def test_axolotl_snippets(exports, monkeypatch, name):
    """axolotl loads a local folder given as `path` with datasets.load_dataset(path)."""
    root, *_ = exports
    monkeypatch.chdir(root)
    for entry in yaml.safe_load(_snippet(name))["datasets"]:
        ds = datasets.load_dataset(entry["path"], split="train")
        if entry["type"] == "chat_template":
            mapping = entry["message_property_mappings"]
            for conv in ds[entry["field_messages"]]:
                assert all(set(mapping.values()) <= m.keys() for m in conv)
                assert {m[mapping["role"]] for m in conv} <= {"system", "user", "assistant"}
        else:
            assert entry["type"] == "alpaca" and {"instruction", "input", "output"} <= set(ds.column_names)
            assert all(ds["output"])
