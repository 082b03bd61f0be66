"""The one entry point for the default text embedder: the bundled MiniLM, loaded once per
process, giving the vectors a directly loaded model gives."""

from __future__ import annotations

import numpy as np

from pipeline.embed.sentence import (
    default_text_embedder,
    embed_texts,
    load_sentence_embedder,
    shared_sentence_model,
)


def test_default_text_embedder_is_the_bundled_minilm_loaded_once():
    texts = ["code generation", "mathematical reasoning", "a red square on a white table"]
    embed = default_text_embedder(batch_size=2, device="cpu")
    got = embed(texts)
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    fresh = embed_texts(load_sentence_embedder(device="cpu"), texts)
    np.testing.assert_allclose(got, fresh, atol=1e-5)
    # a second entry shares the model object (loaded once per process)
    assert shared_sentence_model(None, "cpu") is shared_sentence_model(None, "cpu")
    np.testing.assert_allclose(default_text_embedder(device="cpu")(texts[:1]), got[:1], atol=1e-5)
