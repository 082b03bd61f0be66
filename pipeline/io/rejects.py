"""Reject records: every input that cannot be used is kept with where it came from and why."""

from __future__ import annotations

from dataclasses import dataclass

RAW_EXCERPT_BYTES = 512


class JobError(RuntimeError):
    """A problem of the whole job (configuration, environment), never one record's fault.

    Per-record parsing turns every other exception into a reject; this one stops the job, because
    every record would fail the same way (or, worse, pass when it should not).
    """


class RecordRejected(Exception):
    """Raised by readers and normalisers for one bad input record; never escapes a pipeline."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reject:
    kind: str
    source_uri: str
    source_offset: int
    source_member: str | None
    reason: str
    detail: str
    raw_excerpt: str | None = None

    @staticmethod
    def excerpt(raw: bytes | str | None) -> str | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            return raw[:RAW_EXCERPT_BYTES]
        return raw[:RAW_EXCERPT_BYTES].decode("utf-8", errors="replace")

    def as_row(self) -> dict:
        return {
            "kind": self.kind,
            "source_uri": self.source_uri,
            "source_offset": self.source_offset,
            "source_member": self.source_member,
            "reason": self.reason,
            "detail": self.detail,
            "raw_excerpt": self.raw_excerpt,
        }
