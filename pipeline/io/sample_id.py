"""Stable content ids: the same conversation or image+caption gets the same id from any file."""

from __future__ import annotations

import hashlib
import unicodedata


def _canonical_text(text: str) -> str:
    # NFC + stripped ends: the same text typed or exported differently must hash the same.
    return unicodedata.normalize("NFC", text).strip()


def conversation_id(messages: list[dict[str, str]]) -> str:
    h = hashlib.blake2b(digest_size=16, person=b"thresher-conv")
    for m in messages:
        text = _canonical_text(m["content"]).encode("utf-8")
        # Length-prefixed fields make the encoding unambiguous without JSON's cost.
        h.update(b"%s\x1f%d\x1f" % (m["role"].encode("utf-8"), len(text)))
        h.update(text)
    return h.hexdigest()


def image_text_id(image_sha256: str, caption: str) -> str:
    payload = f"{image_sha256}\x00{_canonical_text(caption)}".encode("utf-8")
    return hashlib.blake2b(payload, digest_size=16, person=b"thresher-imtx").hexdigest()


def shard_of(sample_id: str, num_shards: int) -> int:
    """Shard by id so that duplicates meet in one shard and re-runs produce the same files."""
    return int(sample_id[:8], 16) % num_shards
