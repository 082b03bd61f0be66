"""Embedding Beam jobs: text (MiniLM) and CLIP (tiny config) over small demo catalogs."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embed.clip import TINY_MODEL, embed_captions, embed_images, shared_clip
from pipeline.embed.sentence import embed_texts, shared_sentence_model
from pipeline.io.catalog import Catalog
from pipeline.stages.embeddings import (
    conversation_text,
    read_embedding_metadata,
    read_embeddings,
    run_clip_embedding,
    run_text_embedding,
)
from pipeline.stages.ingest import run_ingest

TINY_KEY = f"{TINY_MODEL}-random"


def _samples(cat: Catalog, kind: str, dataset: str, columns: list[str]):
    return pq.read_table(cat.samples_partition(kind, dataset), columns=columns)


@pytest.fixture(scope="module")
def text_catalog(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("text_cat")
    # mt_bench: two-turn questions (30 in the demo subset), the smallest file with real conversations
    run_ingest([str(demo_data / "instructions" / "mt_bench_questions.jsonl.gz")], root, "mt", num_shards=3)
    return Catalog.at(root)


@pytest.fixture(scope="module")
def image_catalog(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("img_cat")
    run_ingest([str(demo_data / "image_text" / "dreambooth" / "images")], root, "db", kind="image_text",
               container="image_folder", options={"caption_from": "dirname"}, num_shards=2)
    return Catalog.at(root)


def test_conversation_text_keeps_both_sides_within_budget():
    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Q" * 50},
            {"role": "assistant", "content": "A" * 5000}]
    text = conversation_text(msgs, max_chars=200)
    assert len(text) <= 200 and "You are helpful" not in text
    assert text.startswith("Q" * 50 + "\n\n") and text.count("A") == 200 - 52  # the answer takes what is left
    long_both = conversation_text([{"role": "user", "content": "word " * 500},
                                   {"role": "assistant", "content": "reply " * 500}], max_chars=300)
    user, reply = long_both.split("\n\n")
    assert len(long_both) <= 300 and 120 <= len(user) <= 150 and 120 <= len(reply) <= 150
    multi = conversation_text([{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
                               {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}])
    assert multi == "first\nsecond\n\none\ntwo"
    assert conversation_text([{"role": "user", "content": "only a question"}]) == "only a question"
    with pytest.raises(ValueError):
        conversation_text(msgs, max_chars=4)


def test_text_embedding_covers_every_sample_matches_the_model_and_is_deterministic(text_catalog):
    cat = text_catalog
    # fp32 compute, so it can be held to a direct sentence-transformers call (auto may pick bf16)
    res = run_text_embedding(cat.root, "mt", batch_size=16, max_chars=384, precision="fp32")
    assert not res.skipped and res.model == "all-MiniLM-L6-v2" and res.dim == 384
    part = cat.embedding_partition("all-MiniLM-L6-v2", "mt")
    src = cat.samples_partition("instruction", "mt")
    # one output shard per input shard, same names, same row order
    assert sorted(p.name for p in part.glob("part-*")) == sorted(p.name for p in src.glob("part-*"))
    for shard in src.glob("part-*.parquet"):
        assert pq.read_table(part / shard.name).column("sample_id").to_pylist() == \
            pq.read_table(shard, columns=["sample_id"]).column("sample_id").to_pylist()
    ids, vecs = read_embeddings(part)
    samples = _samples(cat, "instruction", "mt", ["sample_id", "messages"])
    assert sorted(ids) == sorted(samples.column("sample_id").to_pylist()) and len(ids) == res.rows == samples.num_rows >= 20
    assert pq.read_schema(next(part.glob("part-*"))).field("embedding").type.list_size == 384
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    meta = read_embedding_metadata(part)
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["normalized"] == "true" and meta["dim"] == "384"
    assert meta["weights_digest"] == res.weights_digest and len(res.weights_digest) == 64
    assert meta["thresher.schema"] == "embeddings"

    # the Beam job gives what a direct call on the same texts gives
    texts = {sid: conversation_text(m, 384) for sid, m in zip(samples.column("sample_id").to_pylist(),
                                                              samples.column("messages").to_pylist())}
    direct = embed_texts(shared_sentence_model(), [texts[s] for s in ids])
    np.testing.assert_allclose(vecs, direct, atol=2e-5)

    assert run_text_embedding(cat.root, "mt", batch_size=16, max_chars=384, precision="fp32").skipped
    again = run_text_embedding(cat.root, "mt", batch_size=16, max_chars=384, force=True, precision="fp32")
    assert not again.skipped
    ids2, vecs2 = read_embeddings(part)
    assert ids2 == ids
    np.testing.assert_allclose(vecs2, vecs, atol=1e-6)

    # bf16 compute (emulated where the CPU lacks it: slower, same numbers): a changed precision
    # re-embeds, is recorded, and stays within bf16 rounding of fp32
    bf16 = run_text_embedding(cat.root, "mt", batch_size=16, max_chars=384, precision="bf16")
    assert not bf16.skipped and bf16.extra["precision"] == "bf16" and "bf16 compute" in bf16.summary()
    assert read_embedding_metadata(part)["precision"] == "bf16"
    ids3, vecs3 = read_embeddings(part)
    assert ids3 == ids
    cos = (vecs3 * vecs).sum(1)
    assert cos.min() > 0.999 and cos.mean() > 0.9999


def test_clip_embedding_writes_image_text_and_scores(image_catalog):
    cat = image_catalog
    res = run_clip_embedding(cat.root, "db", TINY_MODEL, batch_size=8)
    assert res.image.model == f"{TINY_KEY}-image" and res.text.model == f"{TINY_KEY}-text"
    samples = _samples(cat, "image_text", "db", ["sample_id", "caption", "image"])
    sample_ids = samples.column("sample_id").to_pylist()
    img_ids, img = read_embeddings(cat.embedding_partition(f"{TINY_KEY}-image", "db"))
    txt_ids, txt = read_embeddings(cat.embedding_partition(f"{TINY_KEY}-text", "db"))
    assert sorted(img_ids) == sorted(sample_ids) and img_ids == txt_ids and img.shape == (21, 64)
    clip = shared_clip(TINY_MODEL, device=None)
    for part in ("image", "text"):
        meta = read_embedding_metadata(cat.embedding_partition(f"{TINY_KEY}-{part}", "db"))
        assert meta["weights_digest"] == clip.weights_digest and meta["tower"] == part
        assert meta["model"] == f"{TINY_KEY}-{part}" and meta["normalized"] == "true"
    # same vectors as embedding directly
    order = [sample_ids.index(s) for s in img_ids]
    direct_img = embed_images(clip, [samples.column("image")[i].as_py() for i in order])
    direct_txt = embed_captions(clip, [samples.column("caption")[i].as_py() for i in order])
    np.testing.assert_allclose(img, direct_img, atol=1e-5)
    np.testing.assert_allclose(txt, direct_txt, atol=1e-5)
    # CLIP score = cosine(image, caption), one per sample, in [-1, 1]
    scores = pq.read_table(cat.annotation_partition("clip_score", "db"))
    by_id = dict(zip(scores.column("sample_id").to_pylist(), scores.column("clip_score").to_pylist()))
    assert set(by_id) == set(sample_ids)
    expected = np.einsum("ij,ij->i", img, txt)
    for sid, e in zip(img_ids, expected):
        assert -1.0 <= by_id[sid] <= 1.0 and by_id[sid] == pytest.approx(float(e), abs=1e-5)
    assert res.clip_score_stats["n"] == 21
    assert set(scores.column("model").to_pylist()) == {TINY_KEY}

    assert run_clip_embedding(cat.root, "db", TINY_MODEL, batch_size=8).image.skipped
    # a partition lost after the commit is noticed and the job redone
    shutil.rmtree(cat.embedding_partition(f"{TINY_KEY}-text", "db"))
    redo = run_clip_embedding(cat.root, "db", TINY_MODEL, batch_size=8)
    assert not redo.image.skipped
    ids2, txt2 = read_embeddings(cat.embedding_partition(f"{TINY_KEY}-text", "db"))
    assert ids2 == txt_ids
    np.testing.assert_allclose(txt2, txt, atol=1e-6)


def test_exact_copy_images_embed_identically_and_empty_captions_get_no_score(tmp_path, demo_data):
    src = demo_data / "image_text" / "small_dupes"
    root = tmp_path / "cat"
    # as shipped, copies with equal captions are exact duplicates: ingest keeps one of each
    r = run_ingest([str(src)], root, "as_is", kind="image_text", container="image_folder")
    assert (r.counts["samples"], r.counts["duplicates"]) == (3, 4)
    # the same bytes under different captions are distinct samples with identical images
    folders = {"img1.png": "bed", "img4.png": "mattress", "img3.jpg": "alley", "img6.jpg": "umbrella",
               "img7.jpg": "woman", "img2.jpg": "bus"}
    for name, caption in folders.items():
        (tmp_path / "imgs" / caption).mkdir(parents=True)
        shutil.copy(src / name, tmp_path / "imgs" / caption / name)
    run_ingest([str(tmp_path / "imgs")], root, "copies", kind="image_text", container="image_folder",
               options={"caption_from": "dirname"})
    run_clip_embedding(root, "copies", TINY_MODEL, batch_size=4)
    cat = Catalog.at(root)
    samples = _samples(cat, "image_text", "copies", ["sample_id", "caption"])
    caption_of = dict(zip(samples.column("sample_id").to_pylist(), samples.column("caption").to_pylist()))
    ids, img = read_embeddings(cat.embedding_partition(f"{TINY_KEY}-image", "copies"))
    vec = {caption_of[s]: v for s, v in zip(ids, img)}
    np.testing.assert_allclose(vec["bed"], vec["mattress"], atol=1e-6)
    np.testing.assert_allclose(vec["alley"], vec["umbrella"], atol=1e-6)
    np.testing.assert_allclose(vec["alley"], vec["woman"], atol=1e-6)
    assert float(vec["bed"] @ vec["bus"]) < 0.999

    run_ingest([str(src)], root, "nocap", kind="image_text", container="image_folder",
               options={"caption_from": "none"})
    run_clip_embedding(root, "nocap", TINY_MODEL, batch_size=4)
    scores = pq.read_table(cat.annotation_partition("clip_score", "nocap"))
    assert scores.num_rows == 3 and scores.column("clip_score").null_count == 3
    assert read_embeddings(cat.embedding_partition(f"{TINY_KEY}-text", "nocap"))[1].shape == (3, 64)


def test_embed_stage_errors_name_the_problem(tmp_path, text_catalog):
    with pytest.raises(FileNotFoundError, match="no shards"):
        run_text_embedding(tmp_path / "empty", "nothing")
    with pytest.raises(FileNotFoundError, match="no shards"):
        run_clip_embedding(text_catalog.root, "mt", TINY_MODEL)  # an instruction dataset has no images


@pytest.mark.slow
def test_clip_embedding_with_two_worker_processes_matches_one(image_catalog):
    cat = image_catalog
    run_clip_embedding(cat.root, "db", TINY_MODEL, batch_size=8, name="one")
    run_clip_embedding(cat.root, "db", TINY_MODEL, batch_size=8, name="two", workers=2)
    ids1, v1 = read_embeddings(cat.embedding_partition("one-image", "db"))
    ids2, v2 = read_embeddings(cat.embedding_partition("two-image", "db"))
    assert ids1 == ids2
    np.testing.assert_allclose(v1, v2, atol=1e-5)


def test_one_pass_writes_user_and_answer_vectors_and_a_skip_loads_no_model(tmp_path, demo_data, monkeypatch):
    from pipeline.annotate.tags import assistant_text, user_text
    from pipeline.embed import sentence

    root = tmp_path / "cat"
    run_ingest([str(demo_data / "instructions" / "gsm8k_train.jsonl.gz")], root, "gsm", num_shards=2)
    res = run_text_embedding(root, "gsm", batch_size=16)
    part = Catalog.at(root).embedding_partition("all-MiniLM-L6-v2", "gsm")
    table = pq.read_table(part)
    assert {"user_embedding", "answer_embedding"} <= set(table.column_names) and table.num_rows == res.rows >= 20
    user = np.asarray(table.column("user_embedding").to_pylist(), dtype=np.float32)
    answer = np.asarray(table.column("answer_embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(user, axis=1), 1.0, atol=1e-5)
    # Pooled from the shared pass, each side stays close to encoding that side alone.
    samples = {r["sample_id"]: r["messages"] for r in pq.read_table(Catalog.at(root).samples_partition(
        "instruction", "gsm"), columns=["sample_id", "messages"]).to_pylist()}
    ids = table.column("sample_id").to_pylist()
    model = shared_sentence_model()
    alone_u = embed_texts(model, [user_text(samples[s]) for s in ids])
    alone_a = embed_texts(model, [assistant_text(samples[s]) for s in ids])
    cos_u, cos_a = np.einsum("ij,ij->i", user, alone_u), np.einsum("ij,ij->i", answer, alone_a)
    assert cos_u.mean() > 0.9 and cos_u.min() > 0.75, (cos_u.mean(), cos_u.min())
    assert cos_a.mean() > 0.85 and cos_a.min() > 0.6, (cos_a.mean(), cos_a.min())

    def no_model(*args, **kwargs):
        raise AssertionError("an unchanged stage must skip before loading its model")

    monkeypatch.setattr(sentence, "shared_sentence_model", no_model)
    assert run_text_embedding(root, "gsm", batch_size=16).skipped


def test_a_side_without_tokens_is_nan(text_catalog):
    # mt_bench rows are questions only: no answer side
    run_text_embedding(text_catalog.root, "mt", batch_size=16, max_chars=384)
    table = pq.read_table(text_catalog.embedding_partition("all-MiniLM-L6-v2", "mt"))
    answer = np.asarray(table.column("answer_embedding").to_pylist(), dtype=np.float32)
    user = np.asarray(table.column("user_embedding").to_pylist(), dtype=np.float32)
    assert np.isnan(answer).all() and np.isfinite(user).all()


def test_batch_size_and_threads_follow_the_device_and_the_workers(monkeypatch):
    from pipeline.embed.sentence import pick_batch_size, worker_threads

    assert pick_batch_size(None, "cpu") == 64 and pick_batch_size(8, "cuda") == 8
    # On a GPU, half of the free memory over ~8 MiB per text, within [16, 1024].
    assert pick_batch_size(None, "cuda:0", free_bytes=4 << 30) == 256
    assert pick_batch_size(None, "cuda", free_bytes=64 << 20) == 16
    assert pick_batch_size(None, "cuda", free_bytes=140 << 30) == 1024
    with pytest.raises(ValueError):
        pick_batch_size(0, "cpu")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert worker_threads(1) == 16 and worker_threads(4) == 4 and worker_threads(32) == 1
