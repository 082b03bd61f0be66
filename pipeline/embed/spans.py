"""One encoder pass per conversation, pooled per span: the whole text, the user side, the answer.

Tagging wants a vector of what the user asked, quality scoring wants the instruction and the
answer apart, the index and MIG want the whole conversation. Encoding each of those texts on its
own runs the transformer three times over mostly the same tokens. Here the conversation text
(:func:`conversation_spans`, the same text :func:`pipeline.stages.embeddings.conversation_text` makes)
is encoded once and its token states are mean-pooled three ways:

* ``whole``  — every token (exactly what sentence-transformers' mean pooling computes, so the
  stored ``embedding`` column is unchanged);
* ``user``   — the tokens of the user turns;
* ``answer`` — the tokens of the assistant turns.

Span vectors are contextual (a user token has also attended to the answer), so they are close to,
not equal to, encoding each side alone; ``docs/embeddings.md`` gives the measured agreement.

Backends implement :class:`TokenEncoder`: token states, attention mask and character offsets for
a batch of texts. :class:`TorchTokenEncoder` runs a sentence-transformers model's transformer in
fp32 (fp16 on CUDA); cheaper tiers plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

SPANS = ("user", "answer")
POOLS = ("whole", *SPANS)


@dataclass(frozen=True)
class SpanText:
    text: str
    spans: dict[str, tuple[int, int]]  # name -> [start, stop) character range in text


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, preferring to end at whitespace near the limit."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    head = text[:limit]
    space = head.rfind(" ", int(limit * 0.9))
    return head[:space] if space > 0 else head


def conversation_spans(messages: Sequence[dict[str, str]], max_chars: int = 1024) -> SpanText:
    """The text one conversation is embedded as, with where its user and answer sides are.

    User turns first (in order), then assistant turns, separated by a blank line. System turns
    are left out: they are mostly shared boilerplate and would pull unrelated conversations
    together. When the whole does not fit ``max_chars``, each side gets half of the budget and
    a side that needs less gives the rest to the other, so a long answer never crowds out the
    instruction and a long instruction never hides the answer entirely.
    """
    if max_chars < 16:
        raise ValueError(f"max_chars must be at least 16, got {max_chars}")
    user = "\n".join(m["content"].strip() for m in messages if m.get("role") == "user" and m.get("content"))
    reply = "\n".join(m["content"].strip() for m in messages if m.get("role") == "assistant" and m.get("content"))
    sep = "\n\n" if user and reply else ""
    budget = max_chars - len(sep)
    if len(user) + len(reply) > budget:
        half = budget // 2
        if len(user) <= half:
            reply = _cut(reply, budget - len(user))
        elif len(reply) <= half:
            user = _cut(user, budget - len(reply))
        else:
            user = _cut(user, half)
            reply = _cut(reply, budget - len(user))
    start = len(user) + len(sep)
    return SpanText(f"{user}{sep}{reply}", {"user": (0, len(user)), "answer": (start, start + len(reply))})


class TokenEncoder(Protocol):
    """A text encoder that exposes its token states (before pooling)."""

    dim: int

    def token_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(states (B, T, dim) float32, mask (B, T) bool, offsets (B, T, 2) int)``.

        ``mask`` marks the tokens sentence-transformers' mean pooling averages (special tokens
        included); ``offsets`` are character ranges in the text, ``(0, 0)`` for special tokens.
        """
        ...


def pool(states: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
         spans: Sequence[dict[str, tuple[int, int]]]) -> dict[str, np.ndarray]:
    """Mean-pool token states over the whole text and over each named character span.

    Returns unit-norm float32 rows per pool; a span with no token in it (empty, or cut off by the
    encoder's token limit) is a row of NaN, so a consumer can tell "absent" from "zero".
    """
    states = states.astype(np.float32, copy=False)
    m = mask.astype(np.float32)
    out = {"whole": _normalise(np.einsum("btd,bt->bd", states, m) / np.maximum(m.sum(1, keepdims=True), 1e-9))}
    real = offsets[:, :, 1] > offsets[:, :, 0]  # special and padding tokens have empty ranges
    for name in SPANS:
        lo = np.array([s[name][0] for s in spans])[:, None]
        hi = np.array([s[name][1] for s in spans])[:, None]
        inside = (mask.astype(bool) & real & (offsets[:, :, 0] >= lo) & (offsets[:, :, 0] < hi)).astype(np.float32)
        count = inside.sum(1, keepdims=True)
        pooled = np.einsum("btd,bt->bd", states, inside) / np.maximum(count, 1.0)
        pooled = _normalise(pooled)
        pooled[count[:, 0] == 0] = np.nan
        out[name] = pooled
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def encode_spans(encoder: TokenEncoder, items: Sequence[SpanText], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Pooled vectors (see :func:`pool`) for ``items``, batched shortest-first to limit padding."""
    n = len(items)
    out = {name: np.empty((n, encoder.dim), dtype=np.float32) for name in POOLS}
    order = sorted(range(n), key=lambda i: len(items[i].text))
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        states, mask, offsets = encoder.token_states([items[i].text for i in rows])
        for name, vectors in pool(states, mask, offsets, [items[i].spans for i in rows]).items():
            out[name][rows] = vectors
    return out


class TorchTokenEncoder:
    """The transformer of a sentence-transformers model (e.g. all-MiniLM-L6-v2), run directly.

    Only models whose pooling is a plain mean (the common case) can be span-pooled; others are
    refused rather than silently pooled differently from how they were trained.
    """

    def __init__(self, st_model: Any, precision: str | None = "fp32"):
        """``st_model``: a sentence-transformers model, or a :class:`pipeline.embed.sentence.SpanModel`
        (the same parts loaded without sentence-transformers)."""
        import torch

        from pipeline.embed.sentence import SpanModel, pick_precision

        if isinstance(st_model, SpanModel):
            self.transformer, self.tokenizer = st_model.transformer, st_model.tokenizer
            self.max_tokens, self.dim = st_model.max_seq_length, st_model.dim
        else:
            modules = list(st_model)
            pooling = next((m for m in modules if type(m).__name__ == "Pooling"), None)
            mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers >= 5; older: a method
            if mode is None and pooling is not None and hasattr(pooling, "get_pooling_mode_str"):
                mode = pooling.get_pooling_mode_str()
            if mode != "mean":
                raise ValueError(f"span pooling needs a mean-pooling sentence model; this one pools by {mode!r}")
            self.transformer = modules[0].auto_model
            self.tokenizer = st_model.tokenizer
            self.max_tokens = int(st_model.max_seq_length or 256)
            get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
            self.dim = int(get_dim())
        self.device = next(self.transformer.parameters()).device
        # Weights stay fp32; matrix products run under autocast at ``precision`` (layer norms and
        # softmax stay fp32): fp16 on a GPU, bf16 on CPUs with native bf16 (see pick_precision).
        self.precision = pick_precision(precision, self.device.type)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def token_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                             return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").numpy()
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            states = self.transformer(**enc).last_hidden_state
        return (states.float().cpu().numpy(), enc["attention_mask"].bool().cpu().numpy(), offsets)


def encode_texts(encoder: TokenEncoder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Whole-text vectors of plain texts (e.g. tag descriptions) from the same encoder."""
    items = [SpanText(t, {name: (0, 0) for name in SPANS}) for t in texts]
    return encode_spans(encoder, items, batch_size)["whole"]
