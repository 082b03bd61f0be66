"""LLM annotator against a fake OpenAI-compatible server: parsing, errors, retries, timeouts, cache, stage."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from pipeline.annotate.llm import (
    LLMAnnotator,
    LLMConfig,
    MalformedReply,
    extract_json,
    parse_quality_reply,
    parse_tag_reply,
)

GOOD_TAGS = {"tags": [{"tag": "Python Programming", "explanation": "asks for Python code"},
                      {"tag": "code generation", "explanation": "write a function"}]}


class _FakeChat(BaseHTTPRequestHandler):
    """Answers by a marker word in the prompt: GOOD, FENCED, MALFORMED, FLAKY (500 once), RATE (429 once),
    SLOW (sleeps past the client's timeout), WRONGCOUNT (quality reply with too many rounds)."""

    calls: Counter = Counter()
    seen_flaky: set = set()
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: str, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body.encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_POST(self):  # noqa: N802 - http.server naming
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = payload["messages"][-1]["content"]
        marker = next((m for m in ("WRONGCOUNT", "MALFORMED", "FENCED", "FLAKY", "RATE", "SLOW", "GOOD") if m in prompt), "GOOD")
        with self.lock:
            self.calls[marker] += 1
            first = (marker, prompt) not in self.seen_flaky
            self.seen_flaky.add((marker, prompt))
        quality = '"rounds"' in prompt
        n = prompt.count("### Round ")
        if marker in ("FLAKY", "RATE") and first:
            status = 500 if marker == "FLAKY" else 429
            return self._send(status, '{"error": "try later"}', {"Retry-After": "0"})
        if marker == "SLOW":
            time.sleep(1.0)
        if marker == "MALFORMED":
            content = "Sure! The tags are python and code, hope that helps."
        elif quality:
            rounds = [{"complexity": 3, "quality": 5}] * (n + 1 if marker == "WRONGCOUNT" else n)
            content = json.dumps({"rounds": rounds})
        elif marker == "FENCED":
            content = "Here you go:\n```json\n" + json.dumps({"tags": [{"tag": "Poetry", "explanation": "a poem"}]}) + "\n```"
        else:
            content = json.dumps(GOOD_TAGS)
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))


@pytest.fixture
def fake_server():
    _FakeChat.calls = Counter()
    _FakeChat.seen_flaky = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, server.shutdown)  # never outlive a hung test
    watchdog.daemon = True
    watchdog.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _FakeChat.calls
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _config(url: str, **kw) -> LLMConfig:
    defaults = dict(endpoint=url, model="fake-model", concurrency=4, timeout_s=0.4, max_retries=2, backoff_s=0.01)
    return LLMConfig(**{**defaults, **kw})


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "an answer"}]


def test_tags_errors_retries_and_timeouts_are_recorded_per_sample(fake_server, tmp_path):
    url, calls = fake_server
    convs = [_user("GOOD: write a python function"), _user("FENCED: a poem please"), _user("MALFORMED: ?"),
             _user("FLAKY: sort a list"), _user("RATE: reverse a string"), _user("SLOW: anything")]
    with LLMAnnotator(_config(url), cache_path=tmp_path / "cache.sqlite") as llm:
        results = llm.tag_many(convs)
        stats = llm.stats
    good, fenced, malformed, flaky, rate, slow = results
    assert [t.tag for t in good.tags] == ["python programming", "code generation"] and good.error is None
    assert [t.tag for t in fenced.tags] == ["poetry"]
    assert malformed.error == "malformed_reply" and malformed.tags == [] and "Sure!" in malformed.detail
    assert flaky.error is None and flaky.attempts == 2 and calls["FLAKY"] == 2
    assert rate.error is None and rate.attempts == 2 and calls["RATE"] == 2
    assert slow.error == "timeout" and slow.attempts == 3  # first try + max_retries
    assert stats.retries >= 4 and stats.errors == {"malformed_reply": 1, "timeout": 1}


def test_cache_hits_avoid_calls_and_failures_are_asked_again(fake_server, tmp_path):
    url, calls = fake_server
    convs = [_user("GOOD: one"), _user("FLAKY: two"), _user("MALFORMED: three")]
    cache = tmp_path / "cache.sqlite"
    with LLMAnnotator(_config(url), cache_path=cache) as llm:
        first = llm.tag_many(convs)
    before = Counter(calls)
    with LLMAnnotator(_config(url), cache_path=cache) as llm:
        second = llm.tag_many(convs)
        assert llm.stats.cache_hits == 2
    assert [r.cached for r in second] == [True, True, False]
    assert [t.tag for t in second[0].tags] == [t.tag for t in first[0].tags]
    assert calls["GOOD"] == before["GOOD"] and calls["FLAKY"] == before["FLAKY"]
    assert calls["MALFORMED"] == before["MALFORMED"] + 1  # not cached: asked again
    with LLMAnnotator(_config(url, model="other-model"), cache_path=cache) as llm:
        llm.tag_many(convs[:1])
    assert calls["GOOD"] == before["GOOD"] + 1  # the model is part of the key


def test_quality_scores_per_round_and_a_wrong_round_count_is_malformed(fake_server):
    url, _ = fake_server
    two_rounds = [{"role": "user", "content": "GOOD: q1"}, {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": "q2"}]
    with LLMAnnotator(_config(url)) as llm:
        ok, wrong = llm.score_many([two_rounds, _user("WRONGCOUNT: q")])
    assert ok.error is None and ok.complexity_per_round == [3.0, 3.0]
    assert ok.quality_per_round == [5.0, 1.0]  # the unanswered round has nothing to learn from
    assert wrong.error == "malformed_reply" and "expected 1 round(s)" in wrong.detail


def test_unreachable_endpoint_and_client_errors_never_raise(tmp_path):
    with LLMAnnotator(_config("http://127.0.0.1:9/v1", max_retries=1)) as llm:  # port 9: nothing listens
        [r] = llm.tag_many([_user("GOOD")])
    assert r.error == "transport_error" and r.attempts == 2
    with pytest.raises(ValueError, match="http"):
        LLMConfig(endpoint="localhost:8000", model="m")


def test_reply_parsers():
    assert extract_json('blah {"a": 1} trailing') == {"a": 1}
    assert [t.tag for t in parse_tag_reply('["Math", "math", "  Word   Problem "]')] == ["math", "word problem"]
    with pytest.raises(MalformedReply):
        parse_tag_reply('{"tags": []}')
    with pytest.raises(MalformedReply, match="outside"):
        parse_quality_reply('{"rounds": [{"complexity": 9, "quality": 2}]}', 1)
    assert parse_quality_reply('{"complexity": "4", "quality": 2}', 1) == ([2.0], [4.0])


def test_llm_stages_write_rows_with_errors_and_leave_input_annotations_alone(fake_server, tmp_path):
    from pipeline.io.catalog import Catalog
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.instruction_annotations import (
        run_quality_annotation,
        run_tag_annotation,
    )
    from schemas import LLM_TAG_ANNOTATIONS

    url, calls = fake_server
    src = tmp_path / "in"
    src.mkdir()
    records = [{"dialogs": ["GOOD: write code", "def f(): pass"],
                "annotation": {"instag": {"content": [{"tag": "coding"}]},
                               "deita": {"quality_scores": [4.0], "complexity_scores": [2.0]}}},
               {"dialogs": ["MALFORMED: tag me", "ok"]},
               {"dialogs": ["GOOD: second task", "done"]}]
    (src / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    run_ingest([str(src)], tmp_path / "cat", "d")
    cat = Catalog.at(tmp_path / "cat")
    input_tags = cat.annotation_partition("input_tags", "d")
    before = pq.read_table(input_tags).to_pylist()

    config = _config(url)
    result = run_tag_annotation(cat.root, "d", "llm_tags", llm=config)
    rows = {r["error"]: r for r in pq.read_table(result.output).to_pylist()}
    assert result.rows_out == 3 and result.extra["errors"] == {"malformed_reply": 1}
    assert rows[None]["annotator"] == "llm_tags" and rows[None]["tags"][0]["tag"] == "python programming"
    assert rows["malformed_reply"]["tags"] == [] and rows["malformed_reply"]["error_detail"]
    assert pq.read_schema(next(cat.annotation_partition("llm_tags", "d").glob("*.parquet"))).names == LLM_TAG_ANNOTATIONS.names
    assert (cat.root / "cache" / "llm_annotations.sqlite").is_file()

    n_good = calls["GOOD"]
    again = run_tag_annotation(cat.root, "d", "llm_tags", llm=config, force=True)
    assert calls["GOOD"] == n_good and again.rows_out == 3  # answered from the cache

    q = run_quality_annotation(cat.root, "d", "llm_quality", llm=config)
    qrows = sorted(pq.read_table(q.output).to_pylist(), key=lambda r: r["error"] or "")
    assert [r["error"] for r in qrows] == [None, None, "malformed_reply"]
    assert [r["score"] for r in qrows] == [pytest.approx(15.0), pytest.approx(15.0), 0.0]  # 5 x 3; failed: 0
    assert qrows[2]["quality"] is None and q.extra["errors"] == {"malformed_reply": 1}
    assert pq.read_table(input_tags).to_pylist() == before
    with pytest.raises(ValueError, match="came with the input"):
        run_tag_annotation(cat.root, "d", "llm_tags", llm=config, name="input_tags")
