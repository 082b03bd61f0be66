"""Inputs users really bring: one bad row never stops a job, and common layouts are read.

Deeply nested JSON, broken JSON-array elements, byte-order marks, lone surrogates, HH-RLHF
transcripts, OpenAI ``developer`` messages, caption sidecars with other column names, and a run
in which every row is rejected (``thresher ingest`` exits 1).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import instruction_formats
from pipeline.io.catalog import Catalog
from pipeline.io.json_stream import (
    MAX_JSON_DEPTH,
    check_json_depth,
    decode_json_line,
    iter_json_elements,
    json_depth,
)
from pipeline.io.records import parse_chunk
from pipeline.io.rejects import JobError, RecordRejected
from pipeline.io.sources import plan_units, read_chunks, sniff_instruction_container
from pipeline.io.units import IMAGE_TEXT, INSTRUCTION, Chunk, RawItem, Unit
from pipeline.stages.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEMO = REPO / "demo_data"
BOM = b"\xef\xbb\xbf"

DEEP_ARRAY = "[" * 1000 + "]" * 1000
DEEP_OBJECT = '{"a":' * 1000 + "1" + "}" * 1000


def _real_rows(n: int = 4) -> list[dict]:
    """A few real GSM8K rows when the shared data is there, else rows of the same shape."""
    path = SHARED / "instructions" / "gsm8k_train.jsonl.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(next(f)) for _ in range(n)]
    return [{"question": f"Natalia sold {48 + k} clips in April and half as many in May. How many in all?",
             "answer": f"#### {(48 + k) * 3 // 2}"} for k in range(n)]


def _lines(records) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


def _table(cat: Catalog, table: str, dataset: str) -> list[dict]:
    files = sorted(cat.partition(table, dataset).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def _balanced(c: dict) -> bool:
    return c["rows_in"] == c["samples"] + c["rejects"] + c["duplicates"]


def _parse_file(path: Path, **unit_kw) -> tuple[list[dict], list]:
    samples, rejects = [], []
    for unit in plan_units([path], INSTRUCTION, **unit_kw):
        for chunk in read_chunks(unit):
            parsed = parse_chunk(chunk)
            assert len(parsed.samples) + len(parsed.rejects) == chunk.rows_in
            samples += parsed.samples
            rejects += parsed.rejects
    return samples, rejects


@dataclass
class ImageRun:
    samples: list[dict] = field(default_factory=list)
    rejects: list = field(default_factory=list)

    def reject_for(self, member: str) -> str:
        found = [r.reason for r in self.rejects if r.source_member == member]
        assert len(found) == 1, (member, self.rejects)
        return found[0]


def ingest_images(path: Path, **options) -> ImageRun:
    """Read and parse an image-text input the way the Beam job does (chunks pickled in between)."""
    out = ImageRun()
    for unit in plan_units([path], IMAGE_TEXT, options=options):
        for chunk in read_chunks(unit):
            parsed = parse_chunk(pickle.loads(pickle.dumps(chunk)))
            assert len(parsed.samples) + len(parsed.rejects) == chunk.rows_in
            out.samples += parsed.samples
            out.rejects += parsed.rejects
    return out


# ---------------------------------------------------------------- 1. deep nesting never crashes


def test_depth_is_measured_without_parsing_and_ignores_brackets_in_strings():
    assert json_depth('{"a": [1, {"b": "[[[[[[[[{{{{"}], "c": "\\"]]]"}') == 3
    assert json_depth(DEEP_ARRAY) == 1000
    check_json_depth('["' + "[" * 5000 + '"]')  # 5000 brackets, all inside a string: depth 1
    with pytest.raises(RecordRejected) as exc:
        check_json_depth(DEEP_OBJECT)
    assert exc.value.reason == "too_deep" and "1000 levels" in exc.value.detail


@pytest.mark.parametrize("line", [DEEP_ARRAY, DEEP_OBJECT, "[" * 150 + "]" * 150, "[" * 5000 + "1"])
def test_deep_jsonl_lines_are_too_deep_rejects(line):
    with pytest.raises(RecordRejected) as exc:
        decode_json_line(line.encode())
    assert exc.value.reason == "too_deep"


def test_deep_lines_are_rejected_and_the_job_finishes(tmp_path):
    rows = _real_rows(3)
    nested = {"a": 1}
    for _ in range(MAX_JSON_DEPTH - 5):
        nested = {"a": nested}  # deep, but within the limit: kept, metadata and all
    src = tmp_path / "deep.jsonl"
    src.write_bytes(_lines([rows[0], DEEP_ARRAY, rows[1], DEEP_OBJECT, {**rows[2], "meta": nested},
                            '{"question": "q", "answer": "a", "x": ' + "[" * 200 + "]" * 200 + "}"]))
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(src)], cat.root, "deep")
    assert _balanced(r.counts) and r.counts["rows_in"] == 6
    assert r.counts["samples"] == 3 and r.counts["reject_reasons"] == {"too_deep": 3}
    rejects = _table(cat, "rejects", "deep")
    assert sorted(x["source_offset"] for x in rejects) == [1, 3, 5]
    kept = {s["source_offset"]: s for s in _table(cat, "samples_instruction", "deep")}
    assert json_depth(kept[4]["metadata_json"]) == MAX_JSON_DEPTH - 3  # {"meta": nested}


def test_deep_caption_sidecar_rows_and_json_sidecars_are_rejects(tmp_path):
    from PIL import Image

    root = tmp_path / "pics"
    root.mkdir()
    for k, color in enumerate(("red", "green", "blue")):
        buf = io.BytesIO()
        Image.new("RGB", (8 + k, 8), color).save(buf, "PNG")
        (root / f"{k}.png").write_bytes(buf.getvalue())
    (root / "captions.jsonl").write_bytes(
        BOM + json.dumps({"file_name": "0.png", "text": "a red square"}).encode() + b"\n"
        + b'{"file_name": "1.png", "text": ' + DEEP_ARRAY.encode() + b"}\n"
        + b'{"file_name": "2.png", "text": "broken\n')
    (root / "1.json").write_text(DEEP_OBJECT)  # the per-image JSON sidecar of 1.png
    (root / "1.txt").write_text("a green square")
    (root / "2.txt").write_text("a blue square")
    out = ingest_images(root)
    assert {s["source_member"]: s["caption"] for s in out.samples} == {"0.png": "a red square", "2.png": "a blue square"}
    assert Counter(r.reason for r in out.rejects) == {"too_deep": 2, "malformed_json": 1}
    assert out.reject_for("1.png") == "too_deep"


# ---------------------------------------------------------------- 1b. parse_chunk never raises for one item


def _unit(layout: str = "auto") -> Unit:
    return Unit("mem://x.jsonl", INSTRUCTION, "jsonl", layout)


def test_unexpected_errors_in_one_record_become_rejects(monkeypatch):
    real = instruction_formats.normalise

    def flaky(record, layout="auto"):
        if record.get("question") == "boom":
            raise KeyError("surprise")
        if record.get("question") == "recurse":
            raise RecursionError("maximum recursion depth exceeded")
        return real(record, layout)

    monkeypatch.setattr(instruction_formats, "normalise", flaky)
    items = [RawItem(k, json.dumps({"question": q, "answer": "a"}).encode()) for k, q in enumerate(["ok", "boom", "recurse", "fine"])]
    parsed = parse_chunk(Chunk(_unit(), items))
    assert [s["source_offset"] for s in parsed.samples] == [0, 3]
    assert [(r.source_offset, r.reason) for r in parsed.rejects] == [(1, "parse_error"), (2, "too_deep")]
    assert parsed.rejects[0].detail == "KeyError: 'surprise'" and parsed.rejects[0].raw_excerpt.startswith('{"question"')


def test_whole_job_problems_still_stop_the_job(monkeypatch):
    item = RawItem(0, b'{"question": "q", "answer": "a"}')
    with pytest.raises(ValueError, match="unknown instruction layout"):
        parse_chunk(Chunk(_unit("no_such_layout"), [item]))

    def broken_setup(record, layout="auto"):
        raise JobError("the environment is wrong for every record")

    monkeypatch.setattr(instruction_formats, "normalise", broken_setup)
    with pytest.raises(JobError):
        parse_chunk(Chunk(_unit(), [item]))


def test_a_failing_annotation_does_not_leave_half_a_sample(monkeypatch):
    from pipeline.io import records

    def bad_quality(sid, conv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(records, "_quality_row", bad_quality)
    rec = {"dialogs": ["q", "a"], "annotation": {"deita": {"quality_scores": [1.0]}}}
    parsed = parse_chunk(Chunk(_unit(), [RawItem(0, json.dumps(rec).encode())]))
    assert not parsed.samples and not parsed.annotations
    assert [(r.reason, r.detail) for r in parsed.rejects] == [("parse_error", "ZeroDivisionError: division by zero")]


def test_lone_surrogates_are_rejected_not_written(tmp_path):
    # "\udc80" is valid JSON and a valid Python str, but not UTF-8: Parquet would refuse the shard.
    src = tmp_path / "s.jsonl"
    src.write_bytes(_lines([
        {"question": "fine", "answer": "yes"},
        '{"question": "bad \\udc80 text", "answer": "x"}',
        '{"question": "q2", "answer": "a2", "note": "\\ud800"}',
        '{"dialogs": ["q3", "a3"], "annotation": {"instag": {"content": ["tag \\udfff"]}}}',
    ]))
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(src)], cat.root, "s")
    assert _balanced(r.counts) and r.counts["samples"] == 1
    assert r.counts["reject_reasons"] == {"invalid_text": 3}


# ---------------------------------------------------------------- 2. JSON arrays keep their good elements


def _elements(data: bytes, max_chars: int = 1 << 20) -> list[tuple[int, object]]:
    return [(e.index, e.value if e.reject is None else e.reject.reason)
            for e in iter_json_elements(io.BytesIO(data), max_chars)]


@pytest.mark.parametrize("data, expected", [
    (b"[]", []),
    (b'[1, {"a": "],[{"}, "x"]', [(0, 1), (1, {"a": "],[{"}), (2, "x")]),
    (b'[{"a": 1}, {"a": 2,}, {"b": [1, {"c": "}"}]}]', [(0, {"a": 1}), (1, "malformed_json"), (2, {"b": [1, {"c": "}"}]})]),
    (b"[1,,2]", [(0, 1), (1, "malformed_json"), (2, 2)]),
    (b"[1, 2,]", [(0, 1), (1, 2)]),  # a trailing comma loses nothing: tolerated
    (b'[{"a": 1} {"b": 2}, 3]', [(0, "malformed_json"), (1, 3)]),
    (b"[1, 2] trailing", [(0, 1), (1, 2), (-1, "malformed_json")]),
    (b'[{"a": 1}, {"b": "cut', [(0, {"a": 1}), (1, "malformed_json")]),
    # an unterminated string flips every later quote: the next element is found from the layout
    (b'[{"a": "x}, {"b": 1}, {"c": 2}]', [(0, "malformed_json"), (1, {"b": 1}), (2, {"c": 2})]),
    (b'[\n  {"a": "x},\n  {"b": "y},\n  {\n    "c": [\n  {"d": 3}]\n  }\n]\n',
     [(0, "malformed_json"), (1, "malformed_json"), (2, {"c": [{"d": 3}]})]),
    (b'[{"conversations": [{"from": "human", "value": "cut}, {"from": "gpt", "value": "ok"}], "id": 3}, {"q": 1}]',
     [(0, "malformed_json"), (1, {"q": 1})]),
    (b'[{"a": 1},', [(0, {"a": 1}), (-1, "malformed_json")]),
    (b'[{"a": "caf\xe9"}, {"a": "ok"}]', [(0, "invalid_utf8"), (1, {"a": "ok"})]),
    (b'{"single": "object"}', [(0, {"single": "object"})]),
    (b"42", [(-1, "unknown_layout")]),
    (b"  \n", [(-1, "empty_file")]),
    (BOM + b'[{"a": 1}]', [(0, {"a": 1})]),
    (b"[" + DEEP_ARRAY.encode() + b", " + DEEP_OBJECT.encode() + b", 7]", [(0, "too_deep"), (1, "too_deep"), (2, 7)]),
])
def test_json_array_elements_are_split_one_by_one(data, expected):
    assert _elements(data) == expected


def test_json_array_elements_spanning_many_read_blocks():
    recs = [{"question": f"q{i}", "answer": "a" * (i % 997)} for i in range(5000)]
    big = "x" * (3 << 20)  # one element and one broken element far larger than a read block
    data = (b"[" + b", ".join(json.dumps(r).encode() for r in recs[:2500])
            + b', {"big": "' + big.encode() + b'"}, {"broken": ' + big.encode() + b"}, "
            + b", ".join(json.dumps(r).encode() for r in recs[2500:]) + b"]")
    got = _elements(data, max_chars=8 << 20)
    assert len(got) == 5002
    assert [v for i, v in got[:2500]] == recs[:2500] and [v for i, v in got[2502:]] == recs[2500:]
    assert got[2500] == (2500, {"big": big}) and got[2501] == (2501, "malformed_json")
    assert [i for i, _ in got] == list(range(5002))


def test_a_broken_element_keeps_the_rest_of_a_real_json_array(tmp_path):
    path = SHARED / "instructions" / "gpteacher_roleplay.json.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            real = json.load(f)[:4]
    else:
        real = [{"instruction": f"Imagine you are detective {k}.", "input": "", "response": f"Clue {k}."} for k in range(4)]
    parts = [json.dumps(r, indent=2) for r in real]
    parts.insert(2, '{"instruction": "broken", "input": "", "response": "no closing quote}')
    parts.insert(4, DEEP_ARRAY)
    src = tmp_path / "roleplay.json.gz"
    src.write_bytes(gzip.compress(BOM + ("[\n" + ",\n".join(parts) + "\n]\n").encode()))
    assert sniff_instruction_container(src) == "json"
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(src)], cat.root, "rp")
    assert _balanced(r.counts) and r.counts["rows_in"] == 6
    assert r.counts["samples"] == 4
    assert r.counts["reject_reasons"] == {"malformed_json": 1, "too_deep": 1}
    rejects = sorted((x["source_offset"], x["reason"]) for x in _table(cat, "rejects", "rp"))
    assert rejects == [(2, "malformed_json"), (4, "too_deep")]
    samples = _table(cat, "samples_instruction", "rp")
    assert sorted(s["source_offset"] for s in samples) == [0, 1, 3, 5]
    assert {s["source_format"] for s in samples} == {"json/alpaca"}
    by_offset = {s["source_offset"]: s for s in samples}
    assert by_offset[5]["messages"][-1]["content"] == real[3]["response"]


def test_a_truncated_json_array_keeps_what_was_complete(tmp_path):
    recs = _real_rows(3)
    text = json.dumps(recs)
    (tmp_path / "cut.json").write_text(text[: text.index(recs[2]["answer"][:10]) + 5])
    samples, rejects = _parse_file(tmp_path / "cut.json")
    assert [s["source_offset"] for s in samples] == [0, 1]
    assert [(r.source_offset, r.reason) for r in rejects] == [(2, "malformed_json")]
    assert "truncated" in rejects[0].detail


def test_the_json_array_size_limit_still_holds(tmp_path):
    from pipeline.io.units import ReadLimits

    (tmp_path / "a.json").write_text(json.dumps(_real_rows(3)))
    unit, = plan_units([tmp_path / "a.json"], INSTRUCTION)
    chunks = list(read_chunks(unit, ReadLimits(max_file_bytes_for_json_array=100)))
    assert [(r.reason, r.source_offset) for c in chunks for r in c.rejects] == [("oversized_record", -1)]
    assert not any(c.items for c in chunks)


# ---------------------------------------------------------------- 3. byte-order marks


def test_byte_order_marks_are_ignored_in_jsonl_json_and_gzip(tmp_path):
    rows = _real_rows(2)
    (tmp_path / "a.jsonl").write_bytes(BOM + _lines(rows))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(BOM + _lines(rows[::-1])))
    (tmp_path / "c.json").write_bytes(BOM + b"\n" + json.dumps(rows).encode())
    (tmp_path / "d.jsonl").write_bytes(BOM + _lines(rows[:1]) + BOM + _lines(rows[1:]))  # two files concatenated
    assert sniff_instruction_container(tmp_path / "c.json") == "json"
    samples, rejects = _parse_file(tmp_path)
    assert not rejects
    assert len(samples) == 8
    assert Counter(s["source_format"] for s in samples) == {"jsonl/question_answer": 6, "json/question_answer": 2}


# ---------------------------------------------------------------- 4a. HH-RLHF and developer messages

HH_CHOSEN = ("\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.\n\n"
             "Ass, dick, bugger.\n\nHuman: What's your favorite one?\n\nAssistant: I haven't even thought about it.")
HH_REJECTED = ("\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.\n\n"
               "Ass, dick, bugger.\n\nHuman: What's your favorite one?\n\nAssistant: Ass.")


def test_hh_rlhf_pairs_become_conversations_with_the_rejected_side_kept(tmp_path):
    src = tmp_path / "hh.jsonl"
    src.write_bytes(_lines([
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"text": "\n\nHuman: Can you help me fix my bike?\n\nAssistant: Sure, what is wrong with it?"},
        {"prompt": "\n\nHuman: Hi!\n\nAssistant:", "response": " Hello.", "chosen": " Hello, how can I help?",
         "rejected": " Go away."},
        {"chosen": "\n\nAssistant: I talk alone.", "rejected": "\n\nAssistant: Me too."},  # no Human turn
        {"chosen": "\n\nHuman: Anyone there?\n\nAssistant:", "rejected": "\n\nHuman: Anyone there?\n\nAssistant: No."},
        {"messages": [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Bonjour"}]},
    ]))
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(src)], cat.root, "hh")
    assert _balanced(r.counts) and r.counts["samples"] == 4
    assert r.counts["reject_reasons"] == {"malformed_transcript": 1, "empty_content": 1}
    by = {s["source_offset"]: s for s in _table(cat, "samples_instruction", "hh")}
    pair = by[0]
    assert pair["source_format"] == "jsonl/hh_rlhf"
    assert [(m["role"], m["content"]) for m in pair["messages"]] == [
        ("user", "What are some cuss words in english?"),
        ("assistant", "Here's an incomplete list.\n\nAss, dick, bugger."),
        ("user", "What's your favorite one?"),
        ("assistant", "I haven't even thought about it."),
    ]
    rejected = json.loads(pair["metadata_json"])[instruction_formats.REJECTED_MESSAGES_KEY]
    assert rejected[:3] == pair["messages"][:3] and rejected[3] == {"role": "assistant", "content": "Ass."}
    assert [m["role"] for m in by[1]["messages"]] == ["user", "assistant"] and by[1]["source_format"] == "jsonl/hh_rlhf"
    assert by[2]["messages"][-1]["content"] == "Hello, how can I help?"
    assert json.loads(by[2]["metadata_json"]) == {
        "response": " Hello.", "rejected_messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Go away."}]}
    assert [m["role"] for m in by[5]["messages"]] == ["system", "user", "assistant"]
    rejects = {x["source_offset"]: x for x in _table(cat, "rejects", "hh")}
    assert rejects[3]["reason"] == "malformed_transcript" and "Human" in rejects[3]["detail"]


def test_hh_transcript_parsing_details():
    msgs = instruction_formats.parse_hh_transcript("Be nice.\n\nHuman: hi\n\nHuman: still there?\n\nAssistant: yes", "text")
    assert msgs == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
                    {"role": "user", "content": "still there?"}, {"role": "assistant", "content": "yes"}]
    # "Human:" inside a turn (not after a blank line) is text, not a new turn
    assert len(instruction_formats.parse_hh_transcript("\n\nHuman: say Human: twice\n\nAssistant: ok", "text")) == 2
    with pytest.raises(RecordRejected) as exc:
        instruction_formats.normalise({"chosen": 5, "rejected": "\n\nHuman: x"})
    assert exc.value.reason == "unknown_layout"  # not a transcript: no layout claims it
    # a rejected side that is no transcript is kept as it came
    conv = instruction_formats.normalise({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "nonsense"})
    assert conv.metadata == {"rejected": "nonsense"}


# ---------------------------------------------------------------- 4b. caption sidecars named otherwise


def _images(dest: Path, n: int = 5) -> list[str]:
    """Copy n real images (the shared small_dupes set, else the committed demo copy) into dest."""
    src = SHARED / "image_text" / "small_dupes"
    if not src.is_dir():
        src = DEMO / "image_text" / "small_dupes"
    names = sorted(p.name for p in src.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:n]
    assert len(names) == n
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dest / name)
    return names


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_file_caption_csv_sidecar_is_read(tmp_path, capsys):
    folder = tmp_path / "pics"
    names = _images(folder)
    (folder / "captions.csv").write_bytes(BOM + ("file,caption\n" + "".join(
        f"{n},photo number {k} of the set\n" for k, n in enumerate(names))).encode())
    code, out, err = _cli(capsys, "ingest", str(folder), "--kind", "image_text",
                          "--catalog", str(tmp_path / "cat"), "--dataset", "pics")
    assert code == 0, err
    rows = _table(Catalog.at(tmp_path / "cat"), "samples_image_text", "pics")
    assert {r["source_member"]: r["caption"] for r in rows} == {n: f"photo number {k} of the set" for k, n in enumerate(names)}


@pytest.mark.parametrize("header, sidecar", [
    ("Image_Path,Description", "captions.csv"),
    ("img,title", "metadata.csv"),
])
def test_other_common_column_names_are_accepted(tmp_path, header, sidecar):
    names = _images(tmp_path / "p", 3)
    (tmp_path / "p" / sidecar).write_text(header + "\n" + "".join(f"{n},caption {n}\n" for n in names))
    out = ingest_images(tmp_path / "p")
    assert not out.rejects and sorted(s["caption"] for s in out.samples) == sorted(f"caption {n}" for n in names)


def test_json_caption_sidecar_as_a_mapping_or_an_array(tmp_path):
    names = _images(tmp_path / "m", 3)
    (tmp_path / "m" / "captions.json").write_text(json.dumps({names[0]: "first", names[1]: {"caption": "second", "by": "me"}}))
    (tmp_path / "m" / f"{Path(names[2]).stem}.txt").write_text("third")
    out = ingest_images(tmp_path / "m")
    assert not out.rejects
    assert {s["source_member"]: s["caption"] for s in out.samples} == {names[0]: "first", names[1]: "second", names[2]: "third"}
    # an object that is not a file -> caption mapping (e.g. COCO annotations) is one clear reject
    (tmp_path / "m" / "captions.json").write_text(json.dumps({"info": {"year": 2017}, "images": [], "annotations": []}))
    out = ingest_images(tmp_path / "m")
    bad = [r for r in out.rejects if r.source_member == "captions.json"]
    assert [r.reason for r in bad] == ["unknown_layout"] and "'info'" in bad[0].detail
    names = _images(tmp_path / "a", 3)
    elements = [json.dumps({"image": names[0], "text": "one"}), '{"image": "' + names[1] + '", "text": oops}',
                json.dumps({"image": names[2], "text": "three"})]
    (tmp_path / "a" / "captions.json").write_text("[" + ",".join(elements) + "]")
    out = ingest_images(tmp_path / "a")
    assert sorted(s["caption"] for s in out.samples) == ["one", "three"]
    assert Counter(r.reason for r in out.rejects) == {"malformed_json": 1, "missing_caption": 1}


def test_unrecognised_sidecar_columns_fail_loudly_then_the_flags_fix_it(tmp_path, capsys):
    folder = tmp_path / "pics"
    names = _images(folder)
    (folder / "captions.csv").write_text("photo,words\n" + "".join(f"{n},a picture called {n}\n" for n in names))
    cat = str(tmp_path / "cat")
    code, out, err = _cli(capsys, "ingest", str(folder), "--kind", "image_text", "--catalog", cat, "--dataset", "d")
    assert code == 1
    first, *rest = err.strip().splitlines()
    assert "ALL 6 ROWS WERE REJECTED" in first and "missing_caption x5" in first and "unknown_layout x1" in first
    hint = next(line for line in rest if "unknown_layout" in line)
    assert "['photo', 'words']" in hint and "--image-column" in hint and "--caption-column" in hint
    rejects = _table(Catalog.at(cat), "rejects", "d")
    assert [r["source_member"] for r in rejects if r["reason"] == "unknown_layout"] == ["captions.csv"]

    code, out, err = _cli(capsys, "ingest", str(folder), "--kind", "image_text", "--catalog", cat, "--dataset", "d",
                          "--image-column", "photo", "--caption-column", "words")
    assert code == 0, err
    rows = _table(Catalog.at(cat), "samples_image_text", "d")
    assert sorted(r["caption"] for r in rows) == sorted(f"a picture called {n}" for n in names)
    assert not _table(Catalog.at(cat), "rejects", "d")

    # a column that is not there is named in the reject
    code, out, err = _cli(capsys, "ingest", str(folder), "--kind", "image_text", "--catalog", cat, "--dataset", "e",
                          "--caption-column", "label")
    assert code == 1 and "no column 'label' (--caption-column)" in err


def test_column_flags_are_for_image_text_only(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(_lines(_real_rows(1)))
    code, _out, err = _cli(capsys, "ingest", str(tmp_path / "a.jsonl"), "--catalog", str(tmp_path / "cat"),
                          "--dataset", "d", "--caption-column", "text")
    assert code == 2 and "--caption-column applies to --kind image_text only" in err


# ---------------------------------------------------------------- 4c. every row rejected: exit 1


def test_ingest_exits_1_when_every_row_is_rejected(tmp_path, capsys):
    src = tmp_path / "junk.jsonl"
    src.write_bytes(_lines([{"foo": 1}, {"bar": 2}, "{not json", DEEP_ARRAY]))
    code, out, err = _cli(capsys, "ingest", str(src), "--catalog", str(tmp_path / "cat"), "--dataset", "junk")
    assert code == 1
    first = err.strip().splitlines()[0]
    assert first.startswith("thresher ingest: error: ALL 4 ROWS WERE REJECTED, 0 samples")
    assert "unknown_layout x2" in first and "malformed_json x1" in first and "too_deep x1" in first
    assert "rejects" in out  # the summary still goes to stdout
    # one good row is enough for success
    src.write_bytes(_lines([{"foo": 1}] + _real_rows(1)))
    code, out, err = _cli(capsys, "ingest", str(src), "--catalog", str(tmp_path / "cat"), "--dataset", "junk")
    assert code == 0 and not err.strip()
