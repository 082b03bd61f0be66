"""Vectors of short, recurring texts (tag descriptions, label names) stored once per model.

The tagger compares every sample with the same 431 tag descriptions, and MIG's label graph
embeds the same tag names on every run; loading a model and encoding them again each time cost
more than the rest of a re-run. They are kept in the catalog beside the model's embeddings,

    <root>/embeddings/<model key>/_texts-<model files fingerprint>.parquet   (text, vector)

and the encoder is loaded only when a text is missing. The same file is also kept per machine,
under ``$THRESHER_CACHE`` (``~/.cache/thresher``): a new catalog on a machine that has tagged
before finds the shipped vocabulary's vectors there and loads no model for them (a standalone
``thresher annotate tags`` then takes ~3 s instead of ~13 s here). A changed model (other files)
gets a new file. Two processes adding texts at once may each write their own union; the last
write wins and the other's additions are encoded again later, never wrong.
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


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    return dict(zip(table.column("text").to_pylist(), np.asarray(table.column("vector").to_pylist(), dtype=np.float32)))


def _write(known: dict[str, np.ndarray], path: Path) -> None:
    texts = list(known)
    flat = np.stack([known[t] for t in texts]).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), flat.shape[1])
    write_parquet_atomic(pa.table({"text": texts, "vector": column}), path)


def text_vectors(root: str | os.PathLike, texts: Sequence[str], model: str | None = None, tier: str = "fp32",
                 device: str | None = None) -> np.ndarray:
    """Unit-norm whole-text vectors of ``texts`` (in order) from the catalog's cache (then the
    machine's), encoding (and storing in both) only the texts neither holds yet."""
    from pipeline.embed.tiers import cache_root

    path = cache_path(root, model, tier)
    machine = cache_path(cache_root(), model, tier)
    known = _read(path)
    in_catalog = len(known)
    wanted = dict.fromkeys(texts)
    from_machine: dict[str, np.ndarray] = {}
    if machine != path and any(t not in known for t in wanted):
        from_machine = _read(machine)
        known.update((t, from_machine[t]) for t in wanted if t not in known and t in from_machine)
    missing = [t for t in wanted if t not in known]
    if missing:
        from pipeline.embed.spans import encode_texts
        from pipeline.embed.tiers import load_token_encoder

        # Few texts (labels, tag descriptions), so always full fp32: the cache is not keyed by
        # precision, and entries should not depend on which machine wrote them first.
        known.update(zip(missing, encode_texts(load_token_encoder(tier, model, device, precision="fp32"), missing)))
        if machine != path:
            _write({**from_machine, **{t: known[t] for t in missing}}, machine)
    if len(known) > in_catalog:
        _write(known, path)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([known[t] for t in texts]).astype(np.float32)
