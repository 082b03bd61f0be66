"""A catalog on object storage, against a local S3 server (moto's server mode on 127.0.0.1,
started and stopped here): ingest, verified skip, DuckDB views, a stage after ingest, a commit
killed before its manifest switch, conflicting commits, and the clear refusals of what is not
supported yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from pipeline import cli, query
from pipeline.io import storage as storage_mod
from pipeline.io.catalog import Catalog
from pipeline.io.runs import StageRun
from pipeline.io.storage import CommitConflict, ObjectStorageUnsupported
from pipeline.stages.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free port of 127.0.0.1; the endpoint reaches s3fs and boto through
    AWS_ENDPOINT_URL, as it would for a user (docs/object_storage.md)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "THRESHER_CACHE_DIR": str(tmp_path_factory.mktemp("object_storage_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage_mod._STORAGES.clear()  # their clients point at the stopped server
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket_url(s3_server):
    """A fresh bucket per test, so tests never see each other's catalogs."""
    import boto3

    name = f"thresher-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}/cat"


def _qa(prefix: str, n: int) -> list[dict]:
    return [{"question": f"{prefix} question {i}?", "answer": f"answer {i}"} for i in range(n)]


def _jsonl(path: Path, rows: list[dict], bad: int = 0) -> Path:
    path.write_text("\n".join([json.dumps(r) for r in rows] + ["{not json"] * bad) + "\n")
    return path


def _objects(url: str) -> list[str]:
    st = Catalog.at(url).storage
    st.fs.invalidate_cache()
    return sorted(st.fs.find(st.base))


# ------------------------------------------------------------------ ingest, skip, query (CLI)


def test_cli_ingest_query_and_verified_skip(bucket_url, demo_data, tmp_path, capsys):
    src = str(demo_data / "instructions")
    assert cli.main(["ingest", src, "--catalog", bucket_url, "--dataset", "demo"]) == 0
    out = capsys.readouterr().out
    assert f"in {bucket_url}" in out and f"run ledger: {bucket_url}/runs/ingest-" in out

    # The same input into a local catalog: the object-storage one must hold the same rows.
    local = run_ingest([src], tmp_path / "local", "demo")
    remote = Catalog.at(bucket_url)
    assert remote.row_count("samples_instruction", "demo") == local.counts["samples"] > 0
    c = local.counts
    assert c["rows_in"] == c["samples"] + c["rejects"] + c["duplicates"]

    # Rows-in accounting is recorded in the ledger object, read back through DuckDB.
    acct = query.run_query(bucket_url, "ingest_accounting").to_pylist()
    assert len(acct) == 1 and acct[0]["balanced"] and acct[0]["rows_in"] == c["rows_in"]
    assert acct[0]["samples"] == c["samples"] and acct[0]["rejects"] == c["rejects"]

    sql = "SELECT sample_id FROM samples ORDER BY 1"
    assert query.run_query(bucket_url, sql) == query.run_query(tmp_path / "local", sql)
    for view, n in (("rejects", c["rejects"]), ("duplicates", c["duplicates"])):
        assert query.run_query(bucket_url, f"SELECT count(*) AS n FROM {view}").column("n")[0].as_py() == n

    # Unchanged input: skipped after verifying the committed objects.
    assert cli.main(["ingest", src, "--catalog", bucket_url, "--dataset", "demo"]) == 0
    assert "unchanged, verified, skipped" in capsys.readouterr().out

    assert cli.main(["query", "--catalog", bucket_url, "--format", "csv",
                     "SELECT dataset, count(*) AS n FROM samples GROUP BY ALL"]) == 0
    assert capsys.readouterr().out.splitlines() == ["dataset,n", f"demo,{c['samples']}"]


def test_skip_is_verified_against_the_objects(bucket_url, tmp_path, caplog):
    src = _jsonl(tmp_path / "a.jsonl", _qa("a", 30), bad=2)
    first = run_ingest([str(src)], bucket_url, "d", num_shards=2)
    st = Catalog.at(bucket_url).storage
    entry = st.current()["samples/instruction/dataset=d"]
    shard = f"{st.version_prefix('samples/instruction/dataset=d', entry['version'])}/part-00001-of-00002.parquet"
    st.fs.pipe_file(shard, st.fs.cat_file(shard)[:-100])  # truncated behind the catalog's back
    with caplog.at_level("WARNING", logger="thresher"):
        again = run_ingest([str(src)], bucket_url, "d", num_shards=2)
    assert not again.skipped and again.run_id != first.run_id
    assert "part-00001-of-00002.parquet changed since it was committed" in (again.rebuilt or "")
    assert query.run_query(bucket_url, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 30
    # The damaged version was replaced; only the current and one kept previous version remain.
    versions = {p.split("/_v/")[1].split("/")[0] for p in _objects(bucket_url) if "samples/instruction" in p}
    assert versions == {first.run_id, again.run_id}


# ------------------------------------------------------------------ atomic commit


@pytest.mark.parametrize("point", ["commit:before_journal", "commit:before_manifest"])
def test_commit_killed_before_the_manifest_switch_keeps_the_old_version(bucket_url, tmp_path, s3_server, point):
    old = _jsonl(tmp_path / "old.jsonl", _qa("old", 12), bad=1)
    run_ingest([str(old)], bucket_url, "d")
    before = query.run_query(bucket_url, "SELECT sample_id FROM samples ORDER BY 1")
    manifest_before = Catalog.at(bucket_url).storage.read_manifest()[0]

    new = _jsonl(tmp_path / "new.jsonl", _qa("new", 20))
    env = {**os.environ, **s3_server, "THRESHER_FAILPOINT": point, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(new), "--catalog", bucket_url,
                           "--dataset", "d"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed at the fault point
    # The new version was uploaded but nothing names it: readers see exactly the old state.
    old_version = manifest_before["folders"]["samples/instruction/dataset=d"]["version"]
    uploaded = {p.split("/_v/")[1].split("/")[0] for p in _objects(bucket_url) if "samples/instruction" in p}
    assert len(uploaded) == 2 and old_version in uploaded
    assert Catalog.at(bucket_url).storage.read_manifest()[0] == manifest_before
    assert query.run_query(bucket_url, "SELECT sample_id FROM samples ORDER BY 1") == before
    assert query.run_query(bucket_url, "SELECT count(*) AS n FROM rejects").column("n")[0].as_py() == 1

    # The next run commits and removes the orphaned upload of the killed one.
    done = run_ingest([str(new)], bucket_url, "d")
    assert query.run_query(bucket_url, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 20
    assert query.run_query(bucket_url, "SELECT count(*) AS n FROM rejects").column("n")[0].as_py() == 0
    runs = {p.split("/_v/")[1].split("/")[0] for p in _objects(bucket_url) if "samples/instruction" in p}
    assert runs == {old_version, done.run_id}
    assert "rejects/dataset=d" not in Catalog.at(bucket_url).storage.current()


def test_conflicting_commit_is_refused(bucket_url, tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", _qa("a", 5))
    run_ingest([str(src)], bucket_url, "d")
    cat = Catalog.at(bucket_url)
    outputs = cat.dataset_partitions("d")
    with pytest.raises(CommitConflict, match="was committed by run"):
        with StageRun(cat, "ingest", "d", outputs, {"p": 1}, {"i": 1}, key="dataset=d") as run:
            # Another machine commits the same dataset meanwhile (the local lock cannot see it).
            other = cat.storage.upload("samples/instruction/dataset=d", "other-run", run.staging["samples_instruction"])
            cat.storage.switch("other-run", {}, {"samples/instruction/dataset=d": other})
            run.commit({"rows": 0})
    assert cat.storage.current()["samples/instruction/dataset=d"]["version"] == "other-run"
    ledger = query.run_query(bucket_url, "SELECT status FROM runs WHERE status = 'failed'")
    assert ledger.num_rows == 1  # the refused run is in the ledger with its error


# ------------------------------------------------------------------ leases (one writer across machines)


def _lock_object(url: str, key: str) -> str:
    st = Catalog.at(url).storage
    return st.path(f"_locks/{key}.lock")


def _hold(url: str, key: str, expires_in: float, host: str = "another-machine") -> None:
    import time

    st = Catalog.at(url).storage
    st.fs.pipe_file(_lock_object(url, key), json.dumps(
        {"run_id": "ingest-elsewhere", "pid": 4242, "host": host, "since": "then",
         "expires_at": time.time() + expires_in}).encode())


def test_a_live_lease_elsewhere_stops_the_run_at_once(bucket_url, tmp_path, capsys):
    src = _jsonl(tmp_path / "a.jsonl", _qa("a", 4))
    _hold(bucket_url, "dataset=d", 300)
    assert cli.main(["ingest", str(src), "--catalog", bucket_url, "--dataset", "d"]) == 75
    err = capsys.readouterr().err
    assert "dataset=d is being written by run ingest-elsewhere (pid 4242 on another-machine" in err
    assert "_manifest.json" not in " ".join(_objects(bucket_url))  # nothing was computed or committed


def test_an_expired_lease_is_taken_over_and_a_finished_run_leaves_none(bucket_url, tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "a.jsonl", _qa("a", 4))
    _hold(bucket_url, "dataset=d", -1)
    assert run_ingest([str(src)], bucket_url, "d").counts["samples"] == 4
    assert not [p for p in _objects(bucket_url) if "/_locks/" in p]
    # THRESHER_LOCK_TIMEOUT waits for a lease that is not renewed any more.
    _hold(bucket_url, "dataset=d", 2)
    monkeypatch.setenv("THRESHER_LOCK_TIMEOUT", "20")
    assert run_ingest([str(src)], bucket_url, "d", force=True).counts["samples"] == 4


def test_lease_is_renewed_and_a_lost_lease_refuses_the_commit(bucket_url, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("THRESHER_LEASE_TTL", "5")  # a heartbeat every 5/3 s
    run_ingest([str(_jsonl(tmp_path / "a.jsonl", _qa("a", 3)))], bucket_url, "d")
    cat = Catalog.at(bucket_url)
    st = cat.storage
    with pytest.raises(CommitConflict, match="was taken over by another run"):
        with StageRun(cat, "ingest", "d", cat.dataset_partitions("d"), {"p": 2}, {"i": 2}, key="dataset=d") as run:
            first = json.loads(st.fs.cat_file(_lock_object(bucket_url, "dataset=d")))
            assert first["run_id"] == run.run_id
            time.sleep(2.5)
            renewed = json.loads(st.fs.cat_file(_lock_object(bucket_url, "dataset=d")))
            assert renewed["expires_at"] > first["expires_at"]
            _hold(bucket_url, "dataset=d", 300)  # another machine took it (this run "stalled")
            time.sleep(2.5)
            run.commit({"rows": 0})
    # The other holder's lease is left alone; the manifest was not switched.
    assert json.loads(st.fs.cat_file(_lock_object(bucket_url, "dataset=d")))["run_id"] == "ingest-elsewhere"
    assert query.run_query(bucket_url, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 3


def test_commits_of_other_folders_are_merged_not_lost(bucket_url, tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _qa("a", 5))
    b = _jsonl(tmp_path / "b.jsonl", _qa("b", 7))
    run_ingest([str(a)], bucket_url, "da")
    run_ingest([str(b)], bucket_url, "db")
    got = query.run_query(bucket_url, "SELECT dataset, count(*) AS n FROM samples GROUP BY ALL ORDER BY 1")
    assert got.to_pylist() == [{"dataset": "da", "n": 5}, {"dataset": "db", "n": 7}]


# ------------------------------------------------------------------ a stage after ingest


def test_quality_annotation_reads_its_input_from_object_storage(bucket_url, tmp_path):
    from pipeline.stages.instruction_annotations import run_quality_annotation

    run_ingest([str(_jsonl(tmp_path / "a.jsonl", _qa("a", 40)))], bucket_url, "d", num_shards=3)
    res = run_quality_annotation(bucket_url, "d", use_embeddings=False)
    assert not res.skipped and res.rows_in == res.rows_out == 40
    q = query.run_query(bucket_url, "SELECT count(*) AS n, count(DISTINCT q.sample_id) AS ids FROM quality q"
                                    " JOIN samples s USING (sample_id)").to_pylist()
    assert q == [{"n": 40, "ids": 40}]
    assert run_quality_annotation(bucket_url, "d", use_embeddings=False).skipped
    import shutil

    shutil.rmtree(Catalog.at(bucket_url).root / "_inputs")  # the working folder may be wiped
    assert run_quality_annotation(bucket_url, "d", use_embeddings=False).skipped


def test_llm_tag_stage_on_object_storage(bucket_url, tmp_path):
    """The LLM tagger (no companion input) against a fake OpenAI-compatible endpoint on 127.0.0.1."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipeline.annotate.llm import LLMConfig
    from pipeline.stages.instruction_annotations import run_tag_annotation

    class Chat(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # http.server's naming
            self.rfile.read(int(self.headers["Content-Length"]))
            content = json.dumps({"tags": [{"tag": "trivia", "explanation": "a question"}]})
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run_ingest([str(_jsonl(tmp_path / "a.jsonl", _qa("a", 6)))], bucket_url, "d")
        config = LLMConfig(endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1", model="fake",
                           concurrency=2, timeout_s=5, max_retries=0)
        res = run_tag_annotation(bucket_url, "d", "llm_tags", llm=config)
        assert res.rows_out == 6 and res.extra["errors"] == {}
    finally:
        server.shutdown()
        server.server_close()
    tags = query.run_query(bucket_url, "SELECT sample_id, tags FROM tags").to_pylist()
    assert len(tags) == 6 and all(r["tags"][0]["tag"] == "trivia" for r in tags)


# ------------------------------------------------------------------ safety and refusals


def test_safe_query_is_confined_to_the_catalog(bucket_url, tmp_path):
    run_ingest([str(_jsonl(tmp_path / "a.jsonl", _qa("a", 3)))], bucket_url, "d")
    st = Catalog.at(bucket_url).storage
    st.fs.pipe_file(st.base.rsplit("/", 1)[0] + "/secret/x.json", b'{"s": 1}')
    bucket = bucket_url.rsplit("/", 1)[0]
    assert query.run_query(bucket_url, "SELECT count(*) AS n FROM samples", safe=True).column("n")[0].as_py() == 3
    for sql in (f"SELECT * FROM read_json('{bucket}/secret/x.json')", "SELECT * FROM read_csv('/etc/passwd')"):
        with pytest.raises(Exception, match="(?i)permission|not allowed|disabled"):
            query.run_query(bucket_url, sql, safe=True)
    with pytest.raises(query.UnsafeQueryError):
        query.run_query(bucket_url, f"COPY (SELECT 1) TO '{bucket_url}/x.csv'", safe=True)


def test_unsupported_commands_and_stages_stop_at_once(bucket_url, tmp_path, capsys):
    assert cli.main(["curate", "--catalog", bucket_url, "--dataset", "d", "--picks", "p.parquet",
                     "--name", "n"]) == 2
    err = capsys.readouterr().err
    assert "does not support object-storage catalogs yet" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["select", "mig", "--catalog", str(tmp_path / "local"), "--input", "pool.jsonl", "--budget", "3",
                     "--out", bucket_url + "/picks.parquet"]) == 2
    assert "--out does not support object storage yet" in capsys.readouterr().err
    assert not (tmp_path / "local").exists() and not Path("s3:").exists()
    cat = Catalog.at(bucket_url)
    with pytest.raises(ObjectStorageUnsupported, match="stage index_build does not support object-storage"):
        StageRun(cat, "index_build", "d", {"index": cat.index_dir("m", "d")}, {}, {})
    run_ingest([str(_jsonl(tmp_path / "a.jsonl", _qa("a", 3)))], bucket_url, "d")
    from pipeline.stages.instruction_annotations import run_tag_annotation

    with pytest.raises(ObjectStorageUnsupported, match="does not support object-storage catalogs yet"):
        run_tag_annotation(bucket_url, "d")  # needs the text-embedding stage, not supported there yet
    assert not [p for p in _objects(bucket_url) if "/embeddings/" in p or "/annotations/" in p]


def test_missing_catalog_is_one_clear_error(bucket_url, capsys):
    assert cli.main(["query", "--catalog", bucket_url, "SELECT 1"]) == 2
    assert "has no committed tables" in capsys.readouterr().err


def test_reopening_the_working_folder_gives_the_url_catalog(bucket_url):
    cat = Catalog.at(bucket_url)
    again = Catalog.at(cat.root)
    assert again.url == bucket_url and again.root == cat.root


# ------------------------------------------------------------------ without conditional writes


def test_memory_filesystem_catalog(tmp_path, monkeypatch):
    """Any fsspec URL: memory:// has no conditional PUT, so the manifest is compared just before it."""
    monkeypatch.setenv("THRESHER_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://thresher-{uuid.uuid4().hex[:8]}/cat"
    src = _jsonl(tmp_path / "a.jsonl", _qa("a", 9), bad=1)
    first = run_ingest([str(src)], url, "d")
    assert first.counts["samples"] == 9 and first.counts["rejects"] == 1
    assert run_ingest([str(src)], url, "d").skipped
    assert query.run_query(url, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 9
    assert not Catalog.at(url).storage.conditional


# ------------------------------------------------------------------ exports to object storage


def _curated(tmp_path: Path, rows: int, picked: int) -> Path:
    """A local catalog with ``rows`` Q&A samples and the first ``picked`` of them curated as ``best``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.curate.materialise import materialise_instructions

    cat = tmp_path / "cat"
    run_ingest([str(_jsonl(tmp_path / "a.jsonl", _qa("a", rows)))], cat, "d")
    ids = pq.read_table(Catalog.at(cat).samples_partition("instruction", "d")).column("sample_id").to_pylist()
    picks = tmp_path / "picks.parquet"
    pq.write_table(pa.table({"rank": list(range(picked)), "sample_id": ids[:picked], "gain": [1.0] * picked}),
                   picks)
    materialise_instructions(cat, "d", picks, "best")
    return cat


def test_publish_export_to_s3(bucket_url, tmp_path):
    from pipeline.curate.materialise import export
    from pipeline.io.storage import publish_export

    cat = _curated(tmp_path, 8, 5)
    local = tmp_path / "export"
    manifest = export(cat, "best", "sharegpt", local)
    target = bucket_url.rsplit("/", 1)[0] + "/exports/best"
    urls = publish_export(local, target)
    # data files, README.md card, LLaMA-Factory dataset_info.json, and the manifest last
    assert urls[-1] == target + "/.manifest.json" and len(urls) == len(manifest["files"]) + 3
    st = Catalog.at(bucket_url).storage
    assert json.loads(st.fs.cat_file(target + "/.manifest.json"))["rows"] == 5
    rows = [json.loads(line) for f in manifest["files"]
            for line in st.fs.cat_file(f"{target}/{f}").decode().splitlines() if line.strip()]
    assert len(rows) == 5

    with pytest.raises(FileExistsError, match="not empty"):
        publish_export(local, target)
    st.fs.pipe_file(target + "/stale.txt", b"old")  # replaced whole, never merged
    publish_export(local, target, overwrite=True)
    st.fs.invalidate_cache()
    assert not st.fs.exists(target + "/stale.txt") and not st.fs.exists(target + "/_PUBLISHING.json")
    other = bucket_url.rsplit("/", 1)[0] + "/not-an-export"
    st.fs.pipe_file(other + "/precious.bin", b"x")
    with pytest.raises(FileExistsError, match="no Thresher export"):
        publish_export(local, other, overwrite=True)


def test_export_command_publishes_to_s3(bucket_url, tmp_path, capsys):
    from pipeline.cli import main

    cat = _curated(tmp_path, 6, 4)
    target = bucket_url.rsplit("/", 1)[0] + "/exports/best"
    argv = ["export", "--catalog", str(cat), "--curated", "best", "--format", "openai", "--out", target]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"to {target}" in out and "published" in out
    st = Catalog.at(bucket_url).storage
    st.fs.invalidate_cache()
    assert json.loads(st.fs.cat_file(target + "/.manifest.json"))["rows"] == 4
    assert main(argv) == 2  # a second export into a non-empty target needs --overwrite
    assert main([*argv, "--overwrite"]) == 0
