"""FAISS index stage, neighbour look-ups and near-duplicate annotations over catalog embeddings."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.commands import neighbors as neighbors_command
from pipeline.embed.clip import TINY_MODEL
from pipeline.index.faiss_index import FaissIndex, drop_self
from pipeline.io.catalog import Catalog
from pipeline.stages.embeddings import (
    read_embeddings,
    run_clip_embedding,
    run_text_embedding,
)
from pipeline.stages.index import (
    NEAR_DUP_SCHEMA,
    duplicate_groups,
    nearest_other_similarity,
    neighbors,
    read_near_duplicates,
    run_index_build,
    run_near_duplicates,
    spec_for_kind,
)
from pipeline.stages.ingest import run_ingest

TEXT = "all-MiniLM-L6-v2"
IMAGE = f"{TINY_MODEL}-random-image"


@pytest.fixture(scope="module")
def predictions(tmp_path_factory, demo_data):
    """The first 10 self-instruct instructions, each answered by the 8 models in the demo file."""
    rows = [json.loads(line) for line in
            gzip.open(demo_data / "instructions" / "self_instruct_user_oriented_predictions.jsonl.gz", "rt")]
    first: list[str] = []
    for r in rows:
        if r["instruction"] not in first:
            first.append(r["instruction"])
    chosen = set(first[:10])
    folder = tmp_path_factory.mktemp("preds")
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["instruction"] in chosen))
    root = folder / "cat"
    ingest = run_ingest([str(path)], root, "preds", num_shards=2)
    # a short text budget keeps the test quick; the instruction then weighs as much as the answer
    run_text_embedding(root, "preds", max_chars=256)
    return Catalog.at(root), ingest


@pytest.fixture(scope="module")
def copies(tmp_path_factory, demo_data):
    """small_dupes copies filed under different captions: distinct samples, byte-identical images."""
    folder = tmp_path_factory.mktemp("copies")
    src = demo_data / "image_text" / "small_dupes"
    for name, caption in {"img1.png": "bed", "img4.png": "mattress", "img3.jpg": "alley",
                          "img6.jpg": "umbrella", "img7.jpg": "woman", "img2.jpg": "bus"}.items():
        (folder / "imgs" / caption).mkdir(parents=True)
        shutil.copy(src / name, folder / "imgs" / caption / name)
    root = folder / "cat"
    run_ingest([str(folder / "imgs")], root, "copies", kind="image_text", container="image_folder",
               options={"caption_from": "dirname"})
    run_clip_embedding(root, "copies", TINY_MODEL, batch_size=4)
    return Catalog.at(root)


def _first_user_turn(cat: Catalog, dataset: str) -> dict[str, str]:
    t = pq.read_table(cat.samples_partition("instruction", dataset), columns=["sample_id", "messages"])
    return {sid: m[0]["content"] for sid, m in zip(t.column("sample_id").to_pylist(), t.column("messages").to_pylist())}


TIE = 1e-5  # cosines closer than this may be ordered either way (float32 sums differ by kernel)


def _assert_top_k_up_to_ties(found: np.ndarray, row_sims: np.ndarray, k: int) -> None:
    """``found`` (positions) are ``k`` distinct rows whose similarities are the ``k`` best, up to ties."""
    assert len(found) == k and len(set(found.tolist())) == k and (found >= 0).all()
    best = np.sort(row_sims)[::-1][:k]
    np.testing.assert_allclose(np.sort(row_sims[found])[::-1], best, atol=TIE)


def _tie_slack(sims: np.ndarray, k: int) -> float:
    """The fraction of top-k slots whose neighbour is tied (within TIE) with one left out.

    recall@k against one exact top-k list can only miss those: another tie order is as exact.
    """
    ambiguous = 0
    for row_sims in sims:
        s = np.sort(row_sims)[::-1]
        kth = s[k - 1]
        sure = int((s > kth + TIE).sum())  # slots no tie can take
        tied = int((np.abs(s - kth) <= TIE).sum())
        ambiguous += min(k - sure, tied - (k - sure))
    return ambiguous / (len(sims) * k)


def test_index_build_neighbours_and_skip(predictions):
    cat, _ = predictions
    res = run_index_build(cat.root, "preds", TEXT)
    ids, vecs = read_embeddings(cat.embedding_partition(TEXT, "preds"))
    assert (res.kind, res.metric, res.n, res.d) == ("flat", "ip", len(ids), 384) and not res.skipped
    index = FaissIndex.load(cat.index_dir(TEXT, "preds"))
    # A flat index is exact, but only up to ties: answers that embed alike (identical vectors here)
    # come back in an order set by the BLAS kernel and thread count. So the exact check is
    # tie-aware, and the stage's own recall may miss at most the tied boundary neighbours.
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)  # neighbours are the *other* samples
    _, positions = index.search_positions(vecs, 11)
    found = drop_self(positions, np.arange(len(ids)), 10)
    for row in range(len(ids)):
        _assert_top_k_up_to_ties(found[row], sims[row], 10)
    assert res.recall_at_10 is not None and res.recall_at_10 >= 1.0 - _tie_slack(sims, 10) - 1e-9
    assert index.sample_ids.tolist() == ids and index.n == len(ids)
    assert json.loads((cat.index_dir(TEXT, "preds") / "source.json").read_text())["model"] == TEXT
    assert not (cat.root / "_staging").exists()
    assert run_index_build(cat.root, "preds", TEXT).skipped

    where = {sid: i for i, sid in enumerate(ids)}
    for row in (0, 17, len(ids) - 1):
        hits = neighbors(cat.root, "preds", TEXT, ids[row], k=5)
        assert hits[0][0] == ids[row] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        others = neighbors(cat.root, "preds", TEXT, ids[row], k=4, include_self=False)
        assert ids[row] not in [s for s, _ in others] and len(others) == 4
        # the same neighbours as with the sample itself included; tied ones may swap places
        for (a, score_a), (b, score_b) in zip(others, hits[1:]):
            assert a == b or abs(score_a - score_b) <= TIE
        np.testing.assert_allclose([s for _, s in others], [s for _, s in hits[1:]], atol=TIE)
        # each score is that sample's cosine, and together they are the 4 best
        np.testing.assert_allclose([s for _, s in others], [sims[row, where[sid]] for sid, _ in others], atol=TIE)
        _assert_top_k_up_to_ties(np.array([where[sid] for sid, _ in others]), sims[row], 4)
    with pytest.raises(KeyError, match="not in the"):
        neighbors(cat.root, "preds", TEXT, "no-such-sample")
    with pytest.raises(FileNotFoundError, match="thresher embed"):
        run_index_build(cat.root, "preds", "no-such-model")

    text = neighbors_command.snippets(cat.root, "preds", [ids[0]], width=40)
    assert len(text[ids[0]]) <= 40 and _first_user_turn(cat, "preds")[ids[0]].split()[0] in text[ids[0]]


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", "ivf_pq"])
def test_other_index_kinds_build_and_answer(predictions, kind):
    cat, _ = predictions
    res = run_index_build(cat.root, "preds", TEXT, kind=kind, force=True)
    assert res.kind == kind and res.recall_at_10 is not None and 0.0 <= res.recall_at_10 <= 1.0
    ids, _ = read_embeddings(cat.embedding_partition(TEXT, "preds"))
    hits = neighbors(cat.root, "preds", TEXT, ids[3], k=3)
    assert hits[0][0] == ids[3] and len(hits) == 3
    run_index_build(cat.root, "preds", TEXT, force=True)  # back to flat for the other tests


def test_spec_for_kind_sizes_small_collections():
    spec = spec_for_kind(74, 384, "ivf_pq")
    spec.validate(74, 384)
    assert spec.nlist == 1 and spec.pq_m == 48 and spec.pq_nbits == 6
    big = spec_for_kind(1_000_000, 64, "ivf_flat")
    assert big.nlist == 4000 and big.nprobe == 62
    with pytest.raises(ValueError, match="kind"):
        spec_for_kind(10, 4, "annoy")


def test_near_duplicates_on_model_answers_group_answers_to_one_instruction(predictions):
    cat, ingest = predictions
    nd = run_near_duplicates(cat.root, "preds", TEXT, 0.95)
    assert nd.exact_duplicates_at_ingest == ingest.counts["duplicates"] > 0  # ingest dropped identical answers
    table = read_near_duplicates(cat.root, "preds", TEXT)
    assert table.schema.remove_metadata() == NEAR_DUP_SCHEMA.remove_metadata()
    ids, vecs = read_embeddings(cat.embedding_partition(TEXT, "preds"))
    assert sorted(table.column("sample_id").to_pylist()) == sorted(ids) and nd.n == len(ids)
    groups = duplicate_groups(table)
    assert len(groups) == nd.n_groups >= 3
    instruction = _first_user_turn(cat, "preds")
    keep = dict(zip(table.column("sample_id").to_pylist(), table.column("keep").to_pylist()))
    for gid, members in groups.items():
        assert len({instruction[m] for m in members}) == 1  # the 8 models answered the same prompt
        assert keep[gid] and sum(keep[m] for m in members) == 1
    assert nd.n_removed == sum(len(m) - 1 for m in groups.values()) == sum(not k for k in keep.values())
    # max_similarity is the exact cosine to the nearest other sample
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    got = dict(zip(table.column("sample_id").to_pylist(), table.column("max_similarity").to_pylist()))
    np.testing.assert_allclose([got[s] for s in ids], sims.max(axis=1), atol=1e-5)
    for members in groups.values():
        assert max(got[m] for m in members) >= 0.95
    assert run_near_duplicates(cat.root, "preds", TEXT, 0.95).skipped
    stricter = run_near_duplicates(cat.root, "preds", TEXT, 0.99)
    assert stricter.n_removed < nd.n_removed


def test_near_duplicates_find_byte_identical_images(copies):
    cat = copies
    run_index_build(cat.root, "copies", IMAGE)
    nd = run_near_duplicates(cat.root, "copies", IMAGE, 0.999)
    table = read_near_duplicates(cat.root, "copies", IMAGE)
    s = pq.read_table(cat.samples_partition("image_text", "copies"), columns=["sample_id", "caption"])
    caption = dict(zip(s.column("sample_id").to_pylist(), s.column("caption").to_pylist()))
    groups = sorted(sorted(caption[m] for m in members) for members in duplicate_groups(table).values())
    assert groups == [["alley", "umbrella", "woman"], ["bed", "mattress"]]
    assert (nd.n, nd.n_kept, nd.n_removed) == (6, 3, 3)
    sim = dict(zip(table.column("sample_id").to_pylist(), table.column("max_similarity").to_pylist()))
    assert all(sim[sid] == pytest.approx(1.0, abs=1e-5) for sid, c in caption.items() if c != "bus")
    assert sim[next(sid for sid, c in caption.items() if c == "bus")] < 0.999
    # the exact scan and the saved flat index agree
    ids, vecs = read_embeddings(cat.embedding_partition(IMAGE, "copies"))
    index = FaissIndex.load(cat.index_dir(IMAGE, "copies"))
    np.testing.assert_allclose(nearest_other_similarity(vecs), nearest_other_similarity(vecs, index), atol=1e-6)
    assert np.isnan(nearest_other_similarity(vecs[:1]))[0]
    with pytest.raises(ValueError, match="threshold"):
        run_near_duplicates(cat.root, "copies", IMAGE, 1.5)
