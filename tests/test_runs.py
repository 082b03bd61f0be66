"""The stage contract under faults: names that cannot collide, journaled commits that survive
SIGKILL, verified skips, locks between real processes, failures in the ledger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.curate.materialise import materialise_instructions
from pipeline.io.catalog import Catalog
from pipeline.io.runs import CatalogBusy, Lock, folder_manifest, verify_folder
from pipeline.stages.ingest import run_ingest
from pipeline.stages.shards import ShardFn, run_shard_stage

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, rows: list, bad_lines: int = 0) -> Path:
    lines = [json.dumps(r) for r in rows] + ["{not json"] * bad_lines
    path.write_text("\n".join(lines) + "\n")
    return path


def _qa(prefix: str, n: int) -> list[dict]:
    return [{"question": f"{prefix} question {i}?", "answer": f"answer {i}"} for i in range(n)]


def signature(root: Path) -> dict:
    """What a user sees through `thresher query`: every table's rows, per dataset."""
    con = query.connect(root)
    return {
        "samples": con.sql("SELECT dataset, sample_id FROM samples ORDER BY ALL").fetchall(),
        "rejects": con.sql("SELECT dataset, source_uri, source_offset, reason FROM rejects ORDER BY ALL").fetchall(),
        "duplicates": con.sql("SELECT dataset, sample_id, source_offset FROM duplicates ORDER BY ALL").fetchall(),
    }


def _partition_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("dataset=*") if p.is_dir() and "_staging" not in p.parts)


# ------------------------------------------------------------------ 1. names cannot collide


def test_ingesting_x_never_touches_dataset_x_old(tmp_path):
    cat = tmp_path / "cat"
    src_old = _write_jsonl(tmp_path / "old.jsonl", _qa("old", 7))
    src = _write_jsonl(tmp_path / "x.jsonl", _qa("x", 5), bad_lines=1)
    run_ingest([str(src_old)], cat, "x.old")
    before = signature(cat)
    run_ingest([str(src)], cat, "x")
    _write_jsonl(src, _qa("x2", 4))  # no rejects now: the rejects partition of x goes
    run_ingest([str(src)], cat, "x")
    after = signature(cat)
    assert [r for r in after["samples"] if r[0] == "x.old"] == before["samples"]
    assert sum(1 for r in after["samples"] if r[0] == "x") == 4
    assert not any(r[0] == "x" for r in after["rejects"])
    assert not (cat / "_staging").exists()


def test_curating_v1_never_touches_curated_set_v1_old(tmp_path):
    cat = tmp_path / "cat"
    run_ingest([str(_write_jsonl(tmp_path / "a.jsonl", _qa("a", 6)))], cat, "d")
    ids = pq.read_table(Catalog.at(cat).samples_partition("instruction", "d")).column("sample_id").to_pylist()
    picks = tmp_path / "picks.parquet"
    pq.write_table(pa.table({"rank": list(range(len(ids))), "sample_id": ids, "gain": [1.0] * len(ids)}), picks)
    old = materialise_instructions(cat, "d", picks, "v1.old")
    pq.write_table(pa.table({"rank": [0, 1], "sample_id": ids[:2], "gain": [1.0, 0.5]}), picks)
    materialise_instructions(cat, "d", picks, "v1")
    materialise_instructions(cat, "d", picks, "v1")  # a replace of v1
    c = Catalog.at(cat)
    assert pq.read_table(c.curated_dir("v1.old")).num_rows == old.rows == 6
    assert pq.read_table(c.curated_dir("v1")).num_rows == 2
    assert sorted(p.name for p in (cat / "curated").iterdir()) == ["v1", "v1.old"]


# --------------------------------------------------- 2. SIGKILL anywhere: old or new, then converge


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """An input folder, and reference catalogs of its old and its new content (uninterrupted)."""
    base = tmp_path_factory.mktemp("faults")
    src = base / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", _qa("a", 40) + _qa("a", 3))  # 3 exact duplicates
    run_ingest([str(src)], base / "old", "d", num_shards=2)
    _write_jsonl(src / "b.jsonl", _qa("b", 25), bad_lines=2)
    run_ingest([str(src)], base / "new", "d", num_shards=2)
    return {"src": src, "old": base / "old", "new": base / "new",
            "sig_old": signature(base / "old"), "sig_new": signature(base / "new")}


@pytest.mark.parametrize("point, expect", [
    ("ingest:parse", "old"),
    ("ingest:write_shard", "old"),
    ("commit:before_journal", "old"),
    ("commit:between_renames", "new"),  # the journal exists: the commit is rolled forward
    ("commit:after_op", "new"),
])
def test_sigkill_leaves_old_or_new_state_and_a_rerun_converges(states, tmp_path, point, expect):
    cat = tmp_path / "cat"
    shutil.copytree(states["old"], cat)
    env = {**os.environ, "THRESHER_FAILPOINT": point, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(states["src"]), "--catalog", str(cat),
                           "--dataset", "d", "--shards", "2"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if expect == "new":
        assert (cat / "_staging").is_dir()  # the dead run's journal is still there ...
    assert signature(cat) == states[f"sig_{expect}"]  # ... and reading finishes it, never half of it
    assert not (cat / "_staging").exists(), "the dead run's staging area was not cleaned"
    assert all(name == "dataset=d" for name in _partition_dirs(cat))
    again = run_ingest([str(states["src"])], cat, "d", num_shards=2)
    assert signature(cat) == states["sig_new"]
    assert not again.skipped  # the killed run wrote no completion marker, so the work is redone


# --------------------------------------------------------------------- 3. verified skips


def test_a_truncated_or_deleted_partition_is_rebuilt_not_skipped(tmp_path, caplog):
    src = _write_jsonl(tmp_path / "a.jsonl", _qa("a", 30), bad_lines=1)
    cat = tmp_path / "cat"
    first = run_ingest([str(src)], cat, "d", num_shards=2)
    want = signature(cat)
    assert run_ingest([str(src)], cat, "d", num_shards=2).skipped
    shard = sorted(Catalog.at(cat).partition("samples_instruction", "d").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rebuilt = run_ingest([str(src)], cat, "d", num_shards=2)
    assert not rebuilt.skipped and shard.name in rebuilt.rebuilt and shard.name in rebuilt.summary()
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert signature(cat) == want and rebuilt.counts == first.counts
    shutil.rmtree(Catalog.at(cat).partition("rejects", "d"))
    again = run_ingest([str(src)], cat, "d", num_shards=2)
    assert not again.skipped and "missing" in again.rebuilt and signature(cat) == want


class _Len(ShardFn):
    def __call__(self, table: pa.Table) -> pa.Table:
        return table.select(["sample_id", "n_chars"])


def test_a_stage_output_that_changed_after_commit_is_rebuilt(tmp_path):
    cat = Catalog.at(tmp_path / "cat")
    run_ingest([str(_write_jsonl(tmp_path / "a.jsonl", _qa("a", 12)))], cat.root, "d", num_shards=2)
    src, out = cat.samples_partition("instruction", "d"), cat.annotation_partition("len", "d")
    schema = pa.schema([("sample_id", pa.string()), ("n_chars", pa.int64())])
    run_shard_stage(cat.root, "len", "d", src, out, _Len(), schema, {})
    assert run_shard_stage(cat.root, "len", "d", src, out, _Len(), schema, {}).skipped
    victim = sorted(out.glob("*.parquet"))[1]
    victim.unlink()
    redone = run_shard_stage(cat.root, "len", "d", src, out, _Len(), schema, {})
    assert not redone.skipped and victim.exists() and redone.rows_out == 12


def test_verify_folder_names_what_changed(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"x" * 100)
    manifest = folder_manifest(folder)
    assert verify_folder(folder, manifest) is None
    (folder / "a.parquet").write_bytes(b"y" * 100)  # same size, other bytes
    assert "a.parquet changed" in verify_folder(folder, manifest)
    (folder / "b.parquet").write_bytes(b"")
    (folder / "a.parquet").write_bytes(b"x" * 100)
    assert "b.parquet was added" in verify_folder(folder, manifest)


# ------------------------------------------------------------------ 4. locks, real processes


def _hold_lock(root: Path, key: str) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from pipeline.io.runs import Lock;"
            "Lock(Path(sys.argv[1]), sys.argv[2]).acquire('holder-run'); print('locked', flush=True);"
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), key], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_fails_clearly_while_the_first_holds_the_lock_and_proceeds_once_it_dies(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", _qa("a", 10))
    cat = Catalog.at(tmp_path / "cat")
    holder = _hold_lock(cat.root, "dataset=d")
    try:
        with pytest.raises(CatalogBusy, match=rf"holder-run \(pid {holder.pid} on "):
            run_ingest([str(src)], cat.root, "d")
        assert not (cat.root / "samples").exists()
        # The CLI says it in one line, with a non-zero exit.
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(src), "--catalog", str(cat.root),
                               "--dataset", "d"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "is being written by run holder-run" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock; no stale lock is left behind
        holder.wait()
    assert run_ingest([str(src)], cat.root, "d").counts["samples"] == 10


def test_a_waiting_run_proceeds_when_the_holder_finishes(tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "a.jsonl", _qa("a", 10))
    cat = Catalog.at(tmp_path / "cat")
    holder = _hold_lock(cat.root, "dataset=d")
    monkeypatch.setenv("THRESHER_LOCK_TIMEOUT", "60")
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time, signal; time.sleep(1.5); os.kill({holder.pid}, 9)"])
    t0 = time.monotonic()
    try:
        result = run_ingest([str(src)], cat.root, "d")
    finally:
        killer.wait(), holder.wait()
    assert result.counts["samples"] == 10 and time.monotonic() - t0 >= 1.0


def test_two_real_ingests_of_one_dataset_never_both_write(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", _qa("a", 200), bad_lines=3)
    cat = tmp_path / "cat"
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(src), "--catalog", str(cat), "--dataset", "d"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outs
    for code, (out, err) in zip(codes, outs):
        assert code == 0 or "is being written by run" in err, err[-2000:]
    runs = [json.loads(p.read_text()) for p in (cat / "runs").glob("ingest-*.json")]
    # Exactly one run wrote; a second that succeeded came after it and found the work done.
    assert sum(r["status"] == "succeeded" for r in runs) == 1
    assert len(signature(cat)["samples"]) == 200 and len(signature(cat)["rejects"]) == 3


# ------------------------------------------------------------------ 5. failures are recorded


def test_a_failed_ingest_is_in_the_ledger_with_its_error(tmp_path, monkeypatch):
    from pipeline.stages import ingest as ingest_mod

    def broken(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(ingest_mod, "run_pipeline", broken)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_ingest([str(_write_jsonl(tmp_path / "a.jsonl", _qa("a", 3)))], tmp_path / "cat", "d")
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "cat" / "runs").glob("*.json")]
    assert entry["status"] == "failed" and "RuntimeError: worker lost" in entry["error"]
    assert "trace" in entry and not (tmp_path / "cat" / "_staging").exists()
    con = query.connect(tmp_path / "cat")
    assert con.sql("SELECT status FROM runs").fetchall() == [("failed",)]


def test_lock_file_names_its_holder(tmp_path):
    lock = Lock(tmp_path, "embeddings/m/dataset=d")
    lock.acquire("run-1")
    try:
        holder = json.loads(lock.path.read_text())
        assert holder["run_id"] == "run-1" and holder["pid"] == os.getpid()
        assert lock.path.parent == tmp_path / "_locks"
        assert not Lock(tmp_path, "embeddings/m/dataset=d").try_acquire()
    finally:
        lock.release()
    assert Lock(tmp_path, "embeddings/m/dataset=d").try_acquire()
