"""open_clip loading (random / checkpoint / cached tag / missing tag), digests, image and caption embeddings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.embed.clip import (
    TINY_MODEL,
    PretrainedWeightsUnavailable,
    clip_key,
    embed_captions,
    embed_images,
    load_clip,
    load_state_dict_safely,
    weights_digest,
)
from pipeline.embed.sentence import WeightsMismatch
from pipeline.stages.model_handlers import (
    ClipImageEmbeddingHandler,
    ClipTextEmbeddingHandler,
    keyed,
)


class NotATensor:
    """Stands for arbitrary pickled objects that weights_only loading must refuse."""

    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def dupes(demo_data) -> dict[str, bytes]:
    folder = demo_data / "image_text" / "small_dupes"
    return {p.stem: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".png", ".jpg")}


def test_random_init_is_seeded_and_digest_is_recorded(tiny):
    again = load_clip(TINY_MODEL, device="cpu")
    other = load_clip(TINY_MODEL, device="cpu", seed=1)
    assert tiny.embed_dim == 64 and tiny.image_size == (64, 64)
    assert tiny.source == "random(seed=0)"
    assert tiny.weights_digest == again.weights_digest == weights_digest(again.model)
    assert len(tiny.weights_digest) == 64
    assert other.weights_digest != tiny.weights_digest
    # the digest sees every tensor: one changed weight changes it
    with torch.no_grad():
        next(again.model.parameters()).view(-1)[0] += 1.0
    assert weights_digest(again.model) != tiny.weights_digest
    assert clip_key(TINY_MODEL, None) == f"{TINY_MODEL}-random"
    assert clip_key(TINY_MODEL, None, seed=3) == f"{TINY_MODEL}-random3"


def test_exact_copy_images_get_identical_embeddings(tiny, dupes):
    names = ["img1", "img2", "img3", "img4", "img5", "img6", "img7"]
    vecs = embed_images(tiny, [dupes[n] for n in names], batch_size=4)
    assert vecs.shape == (7, 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    by = dict(zip(names, vecs))
    # the same bytes in different batch positions and batches give the same vector
    np.testing.assert_allclose(by["img1"], by["img4"], atol=1e-6)
    np.testing.assert_allclose(by["img2"], by["img5"], atol=1e-6)
    np.testing.assert_allclose(by["img3"], by["img6"], atol=1e-6)
    np.testing.assert_allclose(by["img3"], by["img7"], atol=1e-6)
    # different photos are not collapsed onto one vector
    assert float(by["img1"] @ by["img2"]) < 0.999 and float(by["img2"] @ by["img3"]) < 0.999


def test_caption_embeddings_and_clip_score_range(tiny):
    caps = ["a white bed in a bright bedroom", "a tour bus on a street", "a white bed in a bright bedroom", ""]
    vecs = embed_captions(tiny, caps, batch_size=3)
    assert vecs.shape == (4, 64)
    np.testing.assert_allclose(vecs[0], vecs[2], atol=1e-6)
    assert float(vecs[0] @ vecs[1]) < 0.999
    with pytest.raises(TypeError, match="sequence of strings"):
        embed_captions(tiny, "one string")


def test_local_checkpoint_round_trip_with_weights_only(tmp_path, dupes):
    trained = load_clip(TINY_MODEL, device="cpu", seed=7)  # stands for fine-tuned weights
    path = tmp_path / "tiny.pt"
    torch.save(trained.model.state_dict(), path)
    loaded = load_clip(TINY_MODEL, pretrained=path, device="cpu")  # built with seed 0, then overwritten
    assert loaded.weights_digest == trained.weights_digest
    assert loaded.source == f"file:{path.resolve()}"
    images = [dupes["img1"], dupes["img2"]]
    np.testing.assert_array_equal(embed_images(loaded, images), embed_images(trained, images))
    np.testing.assert_array_equal(embed_captions(loaded, ["a cat"]), embed_captions(trained, ["a cat"]))
    assert clip_key(TINY_MODEL, str(path), digest=loaded.weights_digest) == f"{TINY_MODEL}-ckpt{trained.weights_digest[:12]}"

    # training-loop checkpoints: {"state_dict": ...} with DataParallel "module." prefixes
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.model.state_dict().items()}}, wrapped)
    assert load_clip(TINY_MODEL, pretrained=str(wrapped), device="cpu").weights_digest == trained.weights_digest

    from safetensors.torch import save_file

    safe = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(safe))
    assert load_clip(TINY_MODEL, pretrained=safe, device="cpu").weights_digest == trained.weights_digest


def test_checkpoints_with_pickled_objects_or_wrong_shapes_are_refused(tmp_path):
    tiny = load_clip(TINY_MODEL, device="cpu")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny.model.state_dict(), "extra": NotATensor()}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_safely(evil)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="do not fit"):
        load_clip(TINY_MODEL, pretrained=wrong, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(TINY_MODEL, pretrained=str(tmp_path / "missing.pt"), device="cpu")


def test_uncached_pretrained_tag_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match="not in the local cache") as err:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10
    assert "laion2b_s34b_b79k" in str(err.value) and "checkpoint file path" in str(err.value)
    with pytest.raises(ValueError, match="known tags"):
        load_clip("ViT-B-32", pretrained="no_such_tag", device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip("ViT-Nope-1", device="cpu")


def _fake_hub_cache(root: Path, repo: str, filename: str, payload_path: Path) -> None:
    """Lay a file out the way huggingface_hub caches it (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(payload_path.read_bytes())


def test_pretrained_tag_in_local_cache_loads_offline(tmp_path, monkeypatch):
    import open_clip.pretrained as pretrained_registry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = load_clip(TINY_MODEL, device="cpu", seed=11)
    weights = tmp_path / "w.bin"
    torch.save(source.model.state_dict(), weights)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "thresher/tiny-unit", "open_clip_pytorch_model.bin", weights)
    url_cache = tmp_path / "urlcache"
    url_cache.mkdir()
    (url_cache / "tiny-url.pt").write_bytes(weights.read_bytes())
    monkeypatch.setitem(pretrained_registry._PRETRAINED, TINY_MODEL, {
        "unit": {"hf_hub": "thresher/tiny-unit/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        "url_only": {"url": "https://example.invalid/tiny-url.pt"},
    })
    from_hub = load_clip(TINY_MODEL, pretrained="unit", device="cpu", cache_dir=str(cache))
    assert from_hub.weights_digest == source.weights_digest
    assert from_hub.source.startswith("tag:unit:")
    assert tuple(from_hub.model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)  # the tag's preprocessing
    assert clip_key(TINY_MODEL, "unit") == f"{TINY_MODEL}-unit"
    from_url = load_clip(TINY_MODEL, pretrained="url_only", device="cpu", cache_dir=str(url_cache))
    assert from_url.weights_digest == source.weights_digest
    with pytest.raises(PretrainedWeightsUnavailable):
        load_clip(TINY_MODEL, pretrained="unit", device="cpu", cache_dir=str(tmp_path / "empty"))


def test_keyed_handlers_keep_keys_and_check_the_digest(tiny, dupes):
    image_handler = ClipImageEmbeddingHandler(TINY_MODEL, device="cpu", batch_size=8,
                                              expected_digest=tiny.weights_digest)
    assert image_handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    handler = keyed(image_handler)
    model = handler.load_model()
    batch = [(("s", 0, "a"), dupes["img1"]), (("s", 1, "b"), dupes["img2"]), (("s", 2, "c"), dupes["img4"])]
    out = list(handler.run_inference(batch, model))
    assert [k for k, _ in out] == [k for k, _ in batch]
    np.testing.assert_allclose(out[0][1], out[2][1], atol=1e-6)
    text = keyed(ClipTextEmbeddingHandler(TINY_MODEL, device="cpu"))
    res = list(text.run_inference([("x", "a dog"), ("y", "a cat")], text.load_model()))
    np.testing.assert_allclose(res[0][1], embed_captions(tiny, ["a dog"])[0], atol=1e-6)
    with pytest.raises(WeightsMismatch, match="digest"):
        ClipTextEmbeddingHandler(TINY_MODEL, device="cpu", expected_digest="0" * 64).load_model()
    with pytest.raises(ValueError, match="min_batch_size"):
        ClipTextEmbeddingHandler(TINY_MODEL, batch_size=4, min_batch_size=8)
