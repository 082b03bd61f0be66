"""The one DEITA score function (pipeline/annotate/deita.py) and the callers that use it: the
MIG/xsample reader, the ingest of input annotations and the quality annotators agree on every
case, mismatched rounds included."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.annotate import quality as Q
from pipeline.annotate.deita import deita_score
from pipeline.io.records import parse_chunk
from pipeline.io.units import INSTRUCTION, Chunk, RawItem, Unit
from pipeline.select.mig import read_xsample_jsonl

NAN = float("nan")

# quality, complexity -> score, rounds used, rounds left out
CASES = [
    ([3.0], [2.0], 6.0, 1, 0),
    ([4.0, 2.0], [1.5, 3.0], (6.0 + 6.0) / 2, 2, 0),
    ([5, 1], [2, 3], (10 + 3) / 2, 2, 0),  # ints are ratings too
    ([3.0], [2.0, 4.0], 6.0, 1, 1),  # mismatched: the rounds both rate (round 0)
    ([3.0, 5.0, 1.0], [2.0], 6.0, 1, 2),
    ([3.0, None], [2.0, 4.0], 6.0, 1, 1),  # a null entry is a round not rated
    ([3.0, NAN, 2.0], [2.0, 4.0, 1.0], (6.0 + 2.0) / 2, 2, 1),
    ([None], [None], None, 0, 1),
    ([], [], None, 0, 0),
    (None, None, None, 0, 0),
    ([3.0, 4.0], None, None, 0, 2),  # complexity missing altogether: nothing to multiply
    ([], [2.0], None, 0, 1),
    ([0.0, 6.0], [6.0, 6.0], 18.0, 2, 0),  # zero is a rating, not a missing one
]


@pytest.mark.parametrize("quality,complexity,score,rounds,left_out", CASES)
def test_score_table(quality, complexity, score, rounds, left_out):
    d = deita_score(quality, complexity)
    assert (d.rounds, d.left_out) == (rounds, left_out)
    if score is None:
        assert d.score is None and not d.complete
    else:
        assert d.score == pytest.approx(score, rel=1e-12)
        assert d.complete == (left_out == 0)


@pytest.mark.parametrize("quality,complexity,match", [
    ([-1.0], [2.0], "finite rating >= 0"),
    ([3.0], [math.inf], "finite rating >= 0"),
    ([True], [2.0], "not a number"),
    (["4"], [2.0], "not a number"),
])
def test_bad_ratings_are_errors_not_missing_rounds(quality, complexity, match):
    with pytest.raises(ValueError, match=match):
        deita_score(quality, complexity)


def _xsample(q, c) -> dict:
    return {"dialogs": ["question", "answer"], "annotation": {"instag": {"content": ["math"]},
                                                             "deita": {"quality_scores": q, "complexity_scores": c}}}


def _ingest_scores(records: list[dict]) -> list[float | None]:
    unit = Unit("mem://x.jsonl", INSTRUCTION, "jsonl", "xsample")
    parsed = parse_chunk(Chunk(unit, [RawItem(k, json.dumps(r).encode()) for k, r in enumerate(records)]))
    assert not parsed.rejects and len(parsed.samples) == len(records)
    rows = {r["_source_offset"]: r for r in parsed.annotations["annotations_quality"]}
    return [rows[k]["score"] for k in range(len(records))]


# JSON can carry these (NaN needs Python's json extension, which the readers accept)
JSON_CASES = [c for c in CASES if c[0] is not None and c[1] is not None and None not in c[0] + c[1]]


def test_every_caller_gives_the_same_score(tmp_path):
    records = [_xsample(q, c) for q, c, *_ in JSON_CASES]
    expected = [s for _, _, s, _, _ in JSON_CASES]
    # ingest: the score column is non-null, so "no score" is 0.0
    got = _ingest_scores(records)
    assert got == pytest.approx([0.0 if s is None else s for s in expected])
    # the MIG/xsample reader: a record with no round rated twice is skipped like an unannotated one
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="fewer rounds than they have"):
        pool = read_xsample_jsonl(path)
    assert pool.scores.tolist() == pytest.approx([s for s in expected if s is not None])
    assert pool.skipped == sum(s is None for s in expected)
    with pytest.raises(ValueError, match="rates no round"):
        read_xsample_jsonl(path, strict=True)
    # the annotators' combine_rounds: same score wherever one exists
    for q, c, s, _, _ in JSON_CASES:
        if s is not None:
            assert Q.combine_rounds(q, c)[2] == pytest.approx(s)


def test_the_reader_names_the_record_with_a_bad_rating(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(_xsample([3.0], [2.0])) + "\n" + json.dumps(_xsample([3.0], [-2.0])) + "\n")
    with pytest.raises(ValueError, match=r"pool.jsonl:2: annotation.deita: complexity\[0\] = -2.0"):
        read_xsample_jsonl(path)


def test_ingest_rejects_a_negative_rating_with_its_reason():
    unit = Unit("mem://x.jsonl", INSTRUCTION, "jsonl", "xsample")
    parsed = parse_chunk(Chunk(unit, [RawItem(0, json.dumps(_xsample([3.0], [-2.0])).encode())]))
    assert not parsed.samples
    assert [(r.reason, r.detail) for r in parsed.rejects] == [
        ("wrong_type", "annotation.deita: complexity[0] = -2.0 is not a finite rating >= 0")]
