"""The catalog's text-vector cache: encode a text once per model, load no model on a hit."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.embed import tiers
from pipeline.embed.sentence import embed_texts, shared_sentence_model
from pipeline.embed.text_cache import cache_path, text_vectors


def test_vectors_match_the_model_and_a_hit_loads_nothing(tmp_path, monkeypatch):
    texts = ["python programming: writing Python code", "arithmetic", "python programming: writing Python code"]
    first = text_vectors(tmp_path, texts)
    want = embed_texts(shared_sentence_model(), texts)
    np.testing.assert_allclose(first, want, atol=1e-5)
    assert cache_path(tmp_path).is_file() and cache_path(tmp_path).parent.name == "all-MiniLM-L6-v2"

    def no_model(*args, **kwargs):
        raise AssertionError("a cached text must not load a model")

    monkeypatch.setattr(tiers, "load_token_encoder", no_model)
    np.testing.assert_allclose(text_vectors(tmp_path, texts[::-1]), first[::-1], atol=0)
    with pytest.raises(AssertionError, match="must not load"):
        text_vectors(tmp_path, ["a text never seen"])


def test_a_new_catalog_finds_the_machines_vectors_and_loads_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "machine"))
    texts = ["creative writing: poems and stories", "code debugging"]
    first = text_vectors(tmp_path / "cat_a", texts)
    machine = cache_path(tiers.cache_root())
    assert machine.is_file() and str(machine).startswith(str(tmp_path / "machine"))

    def no_model(*args, **kwargs):
        raise AssertionError("the machine's cache must be used before loading a model")

    monkeypatch.setattr(tiers, "load_token_encoder", no_model)
    np.testing.assert_allclose(text_vectors(tmp_path / "cat_b", texts[::-1]), first[::-1], atol=0)
    assert cache_path(tmp_path / "cat_b").is_file()  # the catalog keeps its own copy
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "other_machine"))
    with pytest.raises(AssertionError, match="before loading"):
        text_vectors(tmp_path / "cat_c", texts)
