"""Vectors of short, recurring texts (tag descriptions, label names) stored once per model.

The tagger compares every sample with the same 431 tag descriptions, and MIG's label graph
embeds the same tag names on every run; loading a model and encoding them again each time cost
more than the rest of a re-run. They are kept in the catalog beside the model's embeddings,

    <root>/embeddings/<model key>/_texts-<model files fingerprint>.parquet   (text, vector)

and the encoder is loaded only when a text is missing. A changed model (other files) gets a new
file. Two processes adding texts at once may each write their own union; the last write wins
and the other's additions are encoded again later, never wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed.sentence import model_files_fingerprint, text_model_key
from pipeline.io.catalog import write_parquet_atomic


def cache_path(root: str | os.PathLike, model: str | None = None, tier: str = "fp32") -> Path:
    fingerprint = model_files_fingerprint(model)[:16]
    return Path(root) / "embeddings" / text_model_key(model, tier) / f"_texts-{fingerprint}.parquet"


def text_vectors(root: str | os.PathLike, texts: Sequence[str], model: str | None = None, tier: str = "fp32",
                 device: str | None = None) -> np.ndarray:
    """Unit-norm whole-text vectors of ``texts`` (in order) from the catalog's cache, encoding
    (and storing) only the texts it does not hold yet."""
    path = cache_path(root, model, tier)
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        table = pq.read_table(path)
        vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
        known = dict(zip(table.column("text").to_pylist(), vectors))
    missing = list(dict.fromkeys(t for t in texts if t not in known))
    if missing:
        from pipeline.embed.spans import encode_texts
        from pipeline.embed.tiers import load_token_encoder

        # Few texts (labels, tag descriptions), so always full fp32: the cache is not keyed by
        # precision, and entries should not depend on which machine wrote them first.
        encoded = encode_texts(load_token_encoder(tier, model, device, precision="fp32"), missing)
        known.update(zip(missing, encoded))
        dim = encoded.shape[1]
        all_texts = list(known)
        flat = np.stack([known[t] for t in all_texts]).astype(np.float32).reshape(-1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
        write_parquet_atomic(pa.table({"text": all_texts, "vector": column}), path)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([known[t] for t in texts]).astype(np.float32)
