"""`thresher select mig` on a catalog leaves near-copies out of the pool, as the curate_instructions flow does."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.curate import mig_pool
from pipeline.stages.index import (
    near_dup_annotator,
    read_near_duplicates,
    run_near_duplicates,
)
from pipeline.stages.ingest import run_ingest

TAGS = ["math", "code generation", "poetry", "translation", "summarization", "email writing", "history", "cooking"]

PROMPTS = [
    "Write a short poem about the sea at night.",
    "Translate 'good morning, how are you?' into French.",
    "Summarize the causes of the French Revolution in three sentences.",
    "Write a Python function that returns the nth Fibonacci number.",
    "Draft a polite email asking my landlord to fix the heating.",
    "What is 17 multiplied by 23?",
    "Give me a recipe for a vegetarian lasagna.",
    "Explain how photosynthesis works to a ten-year-old.",
    "List three differences between TCP and UDP.",
    "Who was the first emperor of Rome?",
    "Write a haiku about autumn leaves falling.",
    "How do I reverse a linked list in Java?",
    "Suggest a name for a coffee shop near the beach.",
    "Describe the water cycle in simple terms.",
    "What are the health benefits of green tea?",
    "Plan a three-day trip to Kyoto for a first-time visitor.",
    "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
    "Write a limerick about a cat who loves to sleep.",
    "Explain the difference between a list and a tuple in Python.",
    "Compose a thank-you note to a colleague who helped me move.",
    "What causes the seasons on Earth?",
    "Give five tips for improving sleep quality.",
    "Write an SQL query that counts orders per customer.",
    "Summarize the plot of Romeo and Juliet.",
]
# near-copies of some prompts: different content ids (so ingest keeps them), cosine close to 1
NEAR = {0: "Write a short poem about the sea at night!", 3: "Write a Python function that returns the n-th Fibonacci number.",
        6: "Give me a recipe for a vegetarian lasagna, please.", 10: "Write a haiku about autumn leaves falling down.",
        16: "Convert 100 degrees Fahrenheit to Celsius, and show the steps."}


def _record(prompt: str, k: int, rng: random.Random) -> dict:
    tags = rng.sample(TAGS, 2)
    return {"dialogs": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Answer {k}."}],
            "annotation": {"instag": {"content": [{"tag": t, "explanation": "."} for t in tags]},
                           "deita": {"quality_scores": [rng.uniform(1, 6)], "complexity_scores": [rng.uniform(1, 6)]}}}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A small catalog: ingested xsample pool (tags and quality ride along), embedded, near-dups marked."""
    tmp = tmp_path_factory.mktemp("neardup")
    rng = random.Random(0)
    src = tmp / "pool.jsonl"
    with open(src, "w") as f:
        for k, p in enumerate(PROMPTS):
            f.write(json.dumps(_record(p, k, rng)) + "\n")
        for k, p in NEAR.items():
            f.write(json.dumps(_record(p, k, rng)) + "\n")  # same answer as the prompt it copies
    cat = tmp / "cat"
    run_ingest([str(src)], cat, "pool")
    run_ingest([str(src)], cat, "bare")  # the same pool, never near-dup marked
    assert main(["embed", "--catalog", str(cat), "--dataset", "pool"]) == 0
    model = next(p.name for p in (cat / "embeddings").iterdir())
    nd = run_near_duplicates(cat, "pool", model, 0.95)
    table = read_near_duplicates(cat, "pool", model)
    removed = {s for s, k in zip(table.column("sample_id").to_pylist(), table.column("keep").to_pylist()) if not k}
    edges = tmp / "edges.parquet"
    pq.write_table(pa.table({"label_a": ["math", "poetry"], "label_b": ["code generation", "translation"],
                             "similarity": [0.6, 0.7]}), edges)
    return {"cat": cat, "model": model, "removed": removed, "n": nd.n, "edges": edges, "tmp": tmp}


def _select(c, capsys, dataset: str, budget: int, *extra: str) -> tuple[int, list[str], str]:
    out = c["tmp"] / f"{dataset}_{budget}_{len(extra)}.parquet"
    rc = main(["select", "mig", "--input", f"{c['cat']}#{dataset}", "--budget", str(budget), "--out", str(out),
               "--label-graph", str(c["edges"]), *extra])
    printed = capsys.readouterr()
    picks = pq.read_table(out).column("sample_id").to_pylist() if rc == 0 else []
    return rc, picks, printed.out + printed.err


def test_near_copies_are_marked(catalog):
    assert catalog["n"] == len(PROMPTS) + len(NEAR)
    assert len(catalog["removed"]) == len(NEAR)  # each near-copy (or its original) goes, one per pair


def test_select_excludes_near_copies_and_says_how_many(catalog, capsys):
    removed, n = catalog["removed"], catalog["n"]
    rc, picks, out = _select(catalog, capsys, "pool", n - len(removed))
    assert rc == 0
    assert not removed & set(picks)
    assert len(picks) == n - len(removed)
    assert f"excluded {len(removed)} samples that {near_dup_annotator(catalog['model'])} marks" in out
    # a budget as large as the whole catalog no longer fits: the near-copies are not in the pool
    rc, _, out = _select(catalog, capsys, "pool", n)
    assert rc == 2 and "budget" in out


def test_keep_near_duplicates_opts_out(catalog, capsys):
    removed, n = catalog["removed"], catalog["n"]
    rc, picks, out = _select(catalog, capsys, "pool", n, "--keep-near-duplicates")
    assert rc == 0
    assert removed <= set(picks)
    assert "excluded" not in out and "kept (--keep-near-duplicates)" in out


def test_cli_and_flow_build_the_same_pool(catalog, capsys):
    # the flow's mig_task calls pool_from_catalog with near_dup_<model>; the CLI resolves the same one
    flow_pool = mig_pool.pool_from_catalog(catalog["cat"], "pool", near_duplicates=near_dup_annotator(catalog["model"]))
    rc, picks, _ = _select(catalog, capsys, "pool", len(flow_pool.sample_ids), "--near-dups", catalog["model"])
    assert rc == 0 and set(picks) == set(flow_pool.sample_ids)
    assert flow_pool.notes["near_duplicates_excluded"] == len(catalog["removed"])
    auto = mig_pool.pool_from_catalog(catalog["cat"], "pool", near_duplicates="auto")
    assert auto.sample_ids == flow_pool.sample_ids


def test_without_an_annotation_a_note_says_how_to_make_one(catalog, capsys):
    n = catalog["n"]
    rc, picks, out = _select(catalog, capsys, "bare", n)
    assert rc == 0 and len(picks) == n
    note = [line for line in out.splitlines() if "near-duplicate annotation" in line]
    assert len(note) == 1
    assert "thresher index --catalog" in note[0] and "--dataset bare" in note[0] and "--near-dup 0.95" in note[0]
    # an annotation asked for by name must exist
    rc, _, out = _select(catalog, capsys, "bare", 5, "--near-dups", catalog["model"])
    assert rc == 2 and "no near_dup_" in out and "thresher index" in out


def test_auto_with_several_annotations(catalog, tmp_path):
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(catalog["cat"], cat)
    ann = cat / "annotations"
    shutil.copytree(ann / near_dup_annotator(catalog["model"]), ann / "near_dup_other-model")
    if catalog["model"] == mig_pool.DEFAULT_TEXT_MODEL_NAME:
        assert mig_pool.resolve_near_duplicates(cat, "pool") == (near_dup_annotator(catalog["model"]), None)
    shutil.copytree(ann / near_dup_annotator(catalog["model"]), ann / "near_dup_third")
    shutil.rmtree(ann / near_dup_annotator(catalog["model"]))
    with pytest.raises(ValueError, match="several near-duplicate annotations"):
        mig_pool.resolve_near_duplicates(cat, "pool")
    assert mig_pool.resolve_near_duplicates(cat, "pool", "third") == ("near_dup_third", None)
    assert mig_pool.resolve_near_duplicates(cat, "pool", None) == (None, None)
