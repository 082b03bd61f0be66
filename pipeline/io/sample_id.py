"""Stable content ids: the same conversation or image+caption gets the same id from any file."""

from __future__ import annotations

import hashlib
import json
import unicodedata


def _canonical_text(text: str) -> str:
    # NFC + stripped ends: the same text typed or exported differently must hash the same.
    return unicodedata.normalize("NFC", text).strip()


def conversation_id(messages: list[dict[str, str]]) -> str:
    canonical = [[m["role"], _canonical_text(m["content"])] for m in messages]
    payload = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.blake2b(payload, digest_size=16, person=b"thresher-conv").hexdigest()


def image_text_id(image_sha256: str, caption: str) -> str:
    payload = f"{image_sha256}\x00{_canonical_text(caption)}".encode("utf-8")
    return hashlib.blake2b(payload, digest_size=16, person=b"thresher-imtx").hexdigest()


def shard_of(sample_id: str, num_shards: int) -> int:
    """Shard by id so that duplicates meet in one shard and re-runs produce the same files."""
    return int(sample_id[:8], 16) % num_shards
