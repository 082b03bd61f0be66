"""The ingest Beam job: every format, every bad input, exact accounting, idempotence, atomicity."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.catalog import Catalog
from pipeline.io.units import ReadLimits
from pipeline.stages import ingest as ingest_mod
from pipeline.stages.ingest import run_ingest

GOOD = [
    {"instruction": "Add two numbers", "input": "2, 3", "output": "5"},
    {"prompt": "Translate 'chat'", "completion": "cat"},
    {"question": "What is 6*7?", "answer": "42"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]},
    {"turns": ["Write a haiku", "Now a limerick"]},
    {"dialogs": ["Sum 1+1", "2"], "annotation": {"instag": {"content": [{"tag": "arithmetic"}]},
                                                 "deita": {"quality_scores": [3.0], "complexity_scores": [2.0]}}},
]


def _lines(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def read_table(cat: Catalog, table: str, dataset: str) -> pa.Table:
    files = sorted(cat.partition(table, dataset).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def counts_balance(counts: dict) -> bool:
    return counts["rows_in"] == counts["samples"] + counts["rejects"] + counts["duplicates"]


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.jsonl").write_bytes(_lines(GOOD))
    with gzip.open(d / "good_gz.jsonl.gz", "wb") as f:  # the first record again (an exact duplicate)
        f.write(_lines(GOOD[:1] + [{"question": "Capital of France?", "answer": "Paris"}]))
    (d / "array.json").write_text(json.dumps([{"instruction": "Say yes", "output": "yes"}, {"bad": True}]))
    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "answer": "4"}, {"question": "", "answer": "x"}]),
                   d / "rows.parquet")
    bad = (
        b'{"instruction": "ok", "output": "fine"}\n'
        b"{not json}\n"                                         # malformed_json
        b'{"question": "caf\xe9", "answer": "x"}\n'              # invalid_utf8 (latin-1 byte)
        b'{"instruction": "missing output"}\n'                  # unknown_layout (no answer key)
        b'{"instruction": "x", "output": ""}\n'                 # empty_content
        b'{"question": "big", "answer": "' + b"a" * 5000 + b'"}\n'  # oversized_record (limit below)
        b"\n"                                                    # blank_line
        b'["a", "list"]\n'                                       # unknown_layout
    )
    (d / "bad.jsonl").write_bytes(bad)
    (d / "empty.jsonl").write_bytes(b"")                         # empty_file
    (d / "broken_array.json").write_text('[{"question": "q", "answer": "a"},')  # malformed_json (file)
    (d / "README.md").write_text("not data: ignored inside a folder")
    return d


def test_ingest_all_formats_and_bad_inputs_accounts_for_every_row(messy, tmp_path):
    cat = Catalog.at(tmp_path / "cat")
    result = run_ingest([str(messy)], cat.root, "messy", limits=ReadLimits(max_record_bytes=4096))
    c = result.counts
    assert counts_balance(c), c
    # 7 + 2 + 2 + 2 + 8 rows + 1 empty file + 1 broken array file
    assert c["rows_in"] == 24  # broken_array.json keeps its complete element and rejects the cut-off rest
    assert c["duplicates"] == 1
    assert c["reject_reasons"] == {
        "malformed_json": 2, "invalid_utf8": 1, "unknown_layout": 3, "empty_content": 2,
        "oversized_record": 1, "blank_line": 1, "empty_file": 1,
    }
    samples = read_table(cat, "samples_instruction", "messy")
    assert samples.num_rows == c["samples"] == 12
    assert len(set(samples.column("sample_id").to_pylist())) == samples.num_rows
    formats = set(samples.column("source_format").to_pylist())
    assert {"jsonl/alpaca", "jsonl/prompt_completion", "jsonl/question_answer", "jsonl/sharegpt",
            "jsonl/openai_messages", "jsonl/turns", "jsonl/xsample", "json/alpaca",
            "parquet/question_answer"} <= formats
    rejects = read_table(cat, "rejects", "messy")
    assert rejects.num_rows == c["rejects"]
    bad_rows = [r for r in rejects.to_pylist() if r["source_uri"].endswith("bad.jsonl")]
    assert sorted(r["source_offset"] for r in bad_rows) == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["detail"] for r in rejects.to_pylist())
    whole_file = [r for r in rejects.to_pylist() if r["source_offset"] == -1]
    assert {Path(r["source_uri"]).name for r in whole_file} == {"empty.jsonl", "broken_array.json"}
    dupes = read_table(cat, "duplicates", "messy").to_pylist()
    assert len(dupes) == 1 and dupes[0]["kept_source_uri"].endswith("good.jsonl")
    assert dupes[0]["source_uri"].endswith("good_gz.jsonl.gz")
    # xsample annotations are kept as input annotations, keyed by the sample id
    tags = read_table(cat, "annotations_tags", "messy").to_pylist()
    quality = read_table(cat, "annotations_quality", "messy").to_pylist()
    assert [t["tag"] for t in tags[0]["tags"]] == ["arithmetic"] and quality[0]["score"] == pytest.approx(6.0)
    assert tags[0]["sample_id"] in set(samples.column("sample_id").to_pylist())
    # the ledger records the run
    ledger = json.loads(cat.ledger_path(result.run_id).read_text())
    assert ledger["counts"]["rows_in"] == 24 and ledger["status"] == "succeeded"
    assert not (cat.root / "_staging").exists()


def test_lineage_points_back_to_the_input_line(messy, tmp_path):
    cat = Catalog.at(tmp_path / "cat")
    run_ingest([str(messy / "good.jsonl")], cat.root, "one")
    rows = read_table(cat, "samples_instruction", "one").to_pylist()
    lines = (messy / "good.jsonl").read_text().splitlines()
    for r in rows:
        assert r["source_uri"] == str((messy / "good.jsonl").resolve())
        original = json.loads(lines[r["source_offset"]])
        assert original == GOOD[r["source_offset"]]


def test_rerun_is_skipped_then_forced_rerun_writes_identical_shards(messy, tmp_path):
    cat = Catalog.at(tmp_path / "cat")
    first = run_ingest([str(messy)], cat.root, "d")
    snapshot = {p.relative_to(cat.root): pq.read_table(p) for p in cat.root.rglob("part-*.parquet")}
    again = run_ingest([str(messy)], cat.root, "d")
    assert again.skipped and again.counts == first.counts
    forced = run_ingest([str(messy)], cat.root, "d", force=True)
    assert not forced.skipped and forced.counts == first.counts
    after = {p.relative_to(cat.root): pq.read_table(p) for p in cat.root.rglob("part-*.parquet")}
    assert after.keys() == snapshot.keys()
    for k in after:
        assert after[k].equals(snapshot[k]), k
    assert cat.row_count("samples_instruction") == first.counts["samples"]  # never duplicated


def test_changed_input_rebuilds_and_stale_rejects_disappear(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_bytes(_lines(GOOD[:2]) + b"{broken\n")
    cat = Catalog.at(tmp_path / "cat")
    assert run_ingest([str(src)], cat.root, "d").counts["rejects"] == 1
    src.write_bytes(_lines(GOOD[:3]))
    r = run_ingest([str(src)], cat.root, "d")
    assert not r.skipped and r.counts["samples"] == 3 and r.counts["rejects"] == 0
    assert cat.row_count("rejects", "d") == 0
    assert cat.row_count("samples_instruction", "d") == 3


def test_same_content_from_two_files_gets_the_same_id(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.json"
    a.write_bytes(_lines([{"instruction": "Name a fruit", "input": "", "output": "Apple"}]))
    b.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Name a fruit"},
                                                {"from": "gpt", "value": "Apple"}]}]))
    cat = Catalog.at(tmp_path / "cat")
    ra = run_ingest([str(a)], cat.root, "a")
    rb = run_ingest([str(b)], cat.root, "b")
    ida = read_table(cat, "samples_instruction", "a").column("sample_id").to_pylist()
    idb = read_table(cat, "samples_instruction", "b").column("sample_id").to_pylist()
    assert ida == idb and ra.counts["samples"] == rb.counts["samples"] == 1


def test_crash_before_commit_leaves_the_old_partition_intact(messy, tmp_path, monkeypatch):
    from pipeline.io.runs import StageRun

    cat = Catalog.at(tmp_path / "cat")
    first = run_ingest([str(messy)], cat.root, "d")
    before = cat.row_count("samples_instruction", "d")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash after the Beam job")

    monkeypatch.setattr(StageRun, "commit", boom)
    (messy / "more.jsonl").write_bytes(_lines([{"question": "new?", "answer": "yes"}]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ingest([str(messy)], cat.root, "d")
    assert cat.row_count("samples_instruction", "d") == before
    assert not list(cat.root.rglob("*.tmp")) and not (cat.root / "_staging").exists()
    monkeypatch.undo()
    # the crashed run left no completion marker, so the next run redoes the work
    resumed = run_ingest([str(messy)], cat.root, "d")
    assert not resumed.skipped and resumed.counts["samples"] == first.counts["samples"] + 1


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from pipeline.io import catalog as catalog_mod

    def failing_write(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(catalog_mod.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        catalog_mod.write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "t" / "x.parquet")
    assert list((tmp_path / "t").iterdir()) == []


def test_lost_rows_are_detected_and_nothing_is_committed(messy, tmp_path, monkeypatch):
    original = ingest_mod.ReadAndParse.parse

    def lossy(self, chunk):
        chunk.items = chunk.items[1:]  # silently drop a row: the accounting must notice
        yield from original(self, chunk)

    monkeypatch.setattr(ingest_mod.ReadAndParse, "parse", lossy)
    cat = Catalog.at(tmp_path / "cat")
    with pytest.raises(RuntimeError, match="ingest lost rows"):
        run_ingest([str(messy)], cat.root, "d")
    assert cat.row_count("samples_instruction") == 0


def test_multiprocessing_mode_gives_the_same_catalog(messy, tmp_path):
    one = Catalog.at(tmp_path / "one")
    two = Catalog.at(tmp_path / "two")
    r1 = run_ingest([str(messy)], one.root, "d", workers=1)
    r2 = run_ingest([str(messy)], two.root, "d", workers=2)
    assert r1.counts == r2.counts
    for table in ("samples_instruction", "rejects", "duplicates"):
        assert read_table(one, table, "d").equals(read_table(two, table, "d")), table


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_ingest([str(tmp_path / "nope.jsonl")], tmp_path / "cat", "d")
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="dataset name"):
        run_ingest([str(tmp_path / "a.jsonl")], tmp_path / "cat", "../escape")
    with pytest.raises(ValueError, match="unknown container"):
        run_ingest([str(tmp_path / "a.jsonl")], tmp_path / "cat", "d", container="csv")


def test_large_files_are_split_into_ranges_without_losing_lines(tmp_path):
    from pipeline.io.sources import plan_units, read_chunks, split_unit

    recs = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(1001)]
    data = _lines(recs)[:-1]  # no newline after the last line
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(data))
    unit, = plan_units([str(tmp_path / "big.jsonl.gz")], "instruction")
    ranges = split_unit(unit, 4)
    assert [(r.start, r.stop) for r in ranges] == [(0, 251), (251, 502), (502, 753), (753, None)]
    offsets = [it.offset for r in ranges for c in read_chunks(r) for it in c.items]
    assert offsets == list(range(1001))
    cat = Catalog.at(tmp_path / "cat")
    from pipeline.stages.ingest import build_pipeline  # noqa: F401  (the job uses the same split)
    r = run_ingest([str(tmp_path / "big.jsonl.gz")], cat.root, "d", workers=2)
    assert r.counts["samples"] == 1001 and r.counts["rows_in"] == 1001


def test_truncated_gzip_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    full = gzip.compress(_lines([{"question": f"q{i}?", "answer": f"a{i}"} for i in range(3000)]))
    (tmp_path / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(tmp_path / "cut.jsonl.gz")], cat.root, "d")
    assert counts_balance(r.counts)
    assert r.counts["reject_reasons"].get("unreadable_file") == 1
    assert r.counts["samples"] > 0


def test_every_shared_instruction_file_ingests(shared_data, tmp_path):
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(shared_data / "instructions")], cat.root, "shared", workers=2)
    c = r.counts
    assert counts_balance(c)
    assert c["rows_in"] == 55185 + 175 + 252 + 2016 + 4535 + 1923 + 7673 + 7473 + 80 + 500
    by_file = {}
    samples = pq.read_table(cat.partition("samples_instruction", "shared"), columns=["source_uri"])
    for uri in samples.column("source_uri").to_pylist():
        by_file[Path(uri).name] = by_file.get(Path(uri).name, 0) + 1
    assert len(by_file) == 10, by_file  # every file contributed samples
    # only real problems are rejected: a few empty model answers, nothing unparseable
    assert set(c["reject_reasons"]) <= {"empty_content"}, c["reject_reasons"]


def test_annotations_follow_the_kept_copy_of_a_duplicate(tmp_path):
    rec = {"dialogs": ["Sum 1+1", "2"], "annotation": {"instag": {"content": ["arithmetic"]},
                                                     "deita": {"quality_scores": [3.0], "complexity_scores": [2.0]}}}
    (tmp_path / "x.jsonl").write_bytes(_lines([rec, rec, {"question": "q", "answer": "a"}, rec]))
    cat = Catalog.at(tmp_path / "cat")
    r = run_ingest([str(tmp_path / "x.jsonl")], cat.root, "d")
    assert r.counts["duplicates"] == 2 and r.counts["annotations"] == {"annotations_tags": 1, "annotations_quality": 1}
    assert read_table(cat, "annotations_tags", "d").column_names == ["sample_id", "tags", "annotator"]


def test_image_text_ingest_through_the_beam_job(demo_data, tmp_path):
    from pipeline import query

    cat = Catalog.at(tmp_path / "cat")
    folder = run_ingest([str(demo_data / "image_text" / "small_dupes")], cat.root, "dupes",
                        kind="image_text", workers=2)
    # img1=img4, img2=img5, img3=img6=img7: 7 files, 3 distinct samples
    assert folder.counts == {**folder.counts, "rows_in": 7, "samples": 3, "duplicates": 4, "rejects": 0}
    db = run_ingest([str(demo_data / "image_text" / "dreambooth" / "images")], cat.root, "db",
                    kind="image_text", container="image_folder", options={"caption_from": "dirname"})
    assert db.counts["samples"] == 21 and counts_balance(db.counts)
    rows = query.run_query(cat.root, "SELECT dataset, caption, image_format, width > 0 AS ok, octet_length(image) AS n "
                                     "FROM image_samples ORDER BY dataset, caption").to_pylist()
    assert {r["dataset"] for r in rows} == {"dupes", "db"}
    assert all(r["ok"] and r["n"] > 0 for r in rows)
    assert {r["caption"] for r in rows if r["dataset"] == "db"} == {"backpack", "cat", "dog", "teapot"}
