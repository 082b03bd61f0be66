"""Apache Beam RunInference model handlers for text and CLIP embeddings.

Each handler embeds a batch of plain inputs and returns one float32 vector per input, in input
order. Wrap a handler with :func:`keyed` (Beam's ``KeyedModelHandler``) so that elements travel
as ``(key, input)`` and come out as ``(key, vector)``, batched by RunInference's
``BatchElements``; or with :func:`prebatched`, so that elements are ready-made lists of
``(key, input)`` (what the embedding stages send, keyed by ``(shard, row, sample_id)``: they cut
batches themselves so that no runner can drop a partial batch, see
:mod:`pipeline.stages.embeddings`).

Handlers are pickled into Beam workers, so they hold only names and settings; the model is
loaded in ``load_model`` on the worker. Every worker checks the loaded weights against the
digest the driver recorded (``expected_digest``), so one embeddings table never mixes vectors
from two different sets of weights.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler

from pipeline.embed.clip import ClipModel, embed_captions, embed_images, shared_clip
from pipeline.embed.sentence import check_digest


def _batching(batch_size: int, min_batch_size: int | None) -> dict[str, int]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    low = batch_size if min_batch_size is None else min_batch_size
    if not 1 <= low <= batch_size:
        raise ValueError(f"min_batch_size must be between 1 and batch_size ({batch_size}), got {low}")
    # BatchElements adapts sizes between the bounds; min == max gives the fixed batches a
    # plain loop would use, which is what the model is tuned for.
    return {"min_batch_size": low, "max_batch_size": batch_size}


class SpanEmbeddingHandler(ModelHandler[Any, np.ndarray, Any]):
    """:class:`pipeline.embed.spans.SpanText` -> a (3, dim) array: whole, user and answer vectors.

    One encoder pass per text; the three rows are mean-pooled from the same token states
    (user / answer rows are NaN where that side has no token).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        tier: str = "fp32",
        device: str | None = None,
        precision: str | None = "auto",
        batch_size: int = 64,
        min_batch_size: int | None = None,
        expected_digest: str | None = None,
        fp32_digest: str | None = None,
        local_workers: int = 1,
    ) -> None:
        super().__init__(**_batching(batch_size, min_batch_size))
        self.model_ref = None if model is None else os.fspath(model)
        self.tier = tier
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.expected_digest = expected_digest
        self.fp32_digest = fp32_digest  # lets a derived tier load from the cache without torch
        self.local_workers = local_workers  # worker processes sharing this host's cores

    def load_model(self) -> Any:
        from pipeline.embed.sentence import worker_threads
        from pipeline.embed.tiers import load_token_encoder

        encoder = load_token_encoder(self.tier, self.model_ref, self.device,
                                     threads=worker_threads(self.local_workers) if self.local_workers > 1 else None,
                                     fp32_digest=self.fp32_digest, precision=self.precision)
        check_digest(encoder.digest, self.expected_digest, f"text model {self.model_ref} ({self.tier})")
        return encoder

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[np.ndarray]:
        from pipeline.embed.spans import POOLS, encode_spans

        pooled = encode_spans(model, list(batch), batch_size=max(len(batch), 1))
        stacked = np.stack([pooled[name] for name in POOLS], axis=1)  # (n, 3, dim)
        return list(stacked)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        # The default pickles the whole batch just to measure it; lengths are what we need.
        return sum(len(item.text) for item in batch)

    def get_metrics_namespace(self) -> str:
        return "thresher_embed_text"


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


class _ClipHandler(ModelHandler[Any, np.ndarray, ClipModel]):
    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        *,
        device: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        min_batch_size: int | None = None,
        normalize: bool = True,
        expected_digest: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(**_batching(batch_size, min_batch_size))
        self.model_name = model_name
        self.pretrained = None if pretrained is None else os.fspath(pretrained)
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.normalize = normalize
        self.expected_digest = expected_digest
        self.cache_dir = cache_dir

    def load_model(self) -> ClipModel:
        clip = shared_clip(self.model_name, self.pretrained, self.device, seed=self.seed, cache_dir=self.cache_dir)
        check_digest(clip.weights_digest, self.expected_digest, f"CLIP {self.model_name} ({clip.source})")
        return clip


class ClipImageEmbeddingHandler(_ClipHandler):
    """Encoded image bytes -> CLIP image embeddings (decode with PIL, open_clip preprocessing)."""

    def run_inference(
        self, batch: Sequence[bytes], model: ClipModel, inference_args: dict[str, Any] | None = None
    ) -> Iterable[np.ndarray]:
        return list(embed_images(model, list(batch), batch_size=max(len(batch), 1), normalize=self.normalize))

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(b) for b in batch)

    def get_metrics_namespace(self) -> str:
        return "thresher_embed_clip_image"


class ClipTextEmbeddingHandler(_ClipHandler):
    """Captions -> CLIP text embeddings (open_clip tokenizer, context length of the model)."""

    def run_inference(
        self, batch: Sequence[str], model: ClipModel, inference_args: dict[str, Any] | None = None
    ) -> Iterable[np.ndarray]:
        return list(embed_captions(model, list(batch), batch_size=max(len(batch), 1), normalize=self.normalize))

    def get_num_bytes(self, batch: Sequence[str]) -> int:
        return sum(len(t) for t in batch)

    def get_metrics_namespace(self) -> str:
        return "thresher_embed_clip_text"


def keyed(handler: ModelHandler) -> KeyedModelHandler:
    """``(key, input)`` elements in, ``(key, vector)`` out; batching settings are kept."""
    return KeyedModelHandler(handler)


def prebatched(handler: ModelHandler) -> ModelHandler:
    """Elements are lists of ``(key, input)`` (one batch each); ``(key, vector)`` per input out.

    RunInference then skips its ``BatchElements`` step, whose last partial batch is emitted from
    ``finish_bundle``, which Beam's Dask runner drops. The handler's own batch settings are not
    used: the batches are as the caller made them.
    """
    return KeyedModelHandler(handler).with_no_batching()
