"""The generic catalog stage: per-shard Beam map, atomic commit, skip-if-unchanged, ledger."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io.catalog import Catalog, check_name, safe_name
from pipeline.stages.ingest import run_ingest
from pipeline.stages.shards import ShardFn, run_shard_stage

SCHEMA = pa.schema([("sample_id", pa.string()), ("n_chars", pa.int64())])


class CharCount(ShardFn):
    def __call__(self, table: pa.Table) -> pa.Table:
        return table.select(["sample_id", "n_chars"]).filter(pc.greater(table["n_chars"], 0))


@pytest.fixture
def catalog(tmp_path, demo_data):
    run_ingest([str(demo_data / "instructions")], tmp_path / "cat", "demo", num_shards=3)
    return Catalog.at(tmp_path / "cat")


def test_shard_stage_writes_one_output_shard_per_input_and_skips_when_unchanged(catalog):
    src = catalog.samples_partition("instruction", "demo")
    out = catalog.annotation_partition("char_count", "demo")
    r = run_shard_stage(catalog.root, "char_count", "demo", src, out, CharCount(), SCHEMA, {"v": 1})
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in src.glob("*.parquet"))
    assert r.rows_out == r.rows_in == catalog.row_count("samples_instruction", "demo")
    assert pq.read_table(out).schema.names[:2] == ["sample_id", "n_chars"]
    again = run_shard_stage(catalog.root, "char_count", "demo", src, out, CharCount(), SCHEMA, {"v": 1})
    assert again.skipped
    changed = run_shard_stage(catalog.root, "char_count", "demo", src, out, CharCount(), SCHEMA, {"v": 2})
    assert not changed.skipped
    ledger = json.loads(catalog.ledger_path(changed.run_id).read_text())
    assert ledger["stage"] == "char_count" and ledger["counts"]["rows_out"] == r.rows_out


def test_a_failing_stage_commits_nothing(catalog):
    class Boom(ShardFn):
        def __call__(self, table):
            raise RuntimeError("model exploded")

    src = catalog.samples_partition("instruction", "demo")
    out = catalog.annotation_partition("boom", "demo")
    with pytest.raises(Exception, match="model exploded"):
        run_shard_stage(catalog.root, "boom", "demo", src, out, Boom(), None, {})
    assert not out.exists() and not (catalog.root / "_staging").exists()
    failed = [json.loads(p.read_text()) for p in (catalog.root / "runs").glob("boom-*.json")]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "model exploded" in failed[0]["error"]


def test_safe_name():
    assert safe_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers__all-MiniLM-L6-v2"
    with pytest.raises(ValueError):
        safe_name("../..")


@pytest.mark.parametrize("bad", ["my set!", "../x", "a/b", "_staging", ".hidden", "", "x" * 200])
def test_user_names_are_refused_not_rewritten(bad):
    with pytest.raises(ValueError, match="must be 1-128"):
        check_name(bad, "selection")
    assert check_name("v1.old", "selection") == "v1.old"
