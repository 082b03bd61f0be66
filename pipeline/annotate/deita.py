"""The DEITA score of a conversation: the one place it is computed.

DEITA (Liu et al., 2024) rates every round of a dialogue twice, complexity of the instruction and
quality of the response (1..6 each), and scores the dialogue by the mean over its rounds of
quality x complexity (MIG's s_i, see ../shared/docs/algorithms/mig.md). Used by the MIG/xsample
reader (pipeline/select/mig.py), the ingest of input annotations (pipeline/io/records.py), and
the offline and LLM quality annotators (pipeline/annotate/quality.py ``combine_rounds``).

Rounds the two lists do not both score. The score lists are positional (entry k belongs to
round k), so a quality list and a complexity list of different lengths, or a ``None`` / NaN entry,
leave some rounds with only one of the two ratings. Such a round has no quality x complexity
product, and nothing says what the missing rating would have been: it is left out, and the score
is the mean over the rounds that have both (the first min(len) rounds, minus those with a missing
entry). Guessing a value (0, the other list's mean) would put a made-up number on DEITA's scale,
and refusing the whole sample would throw away the ratings that are there. ``left_out`` counts
the rounds dropped so that callers can say so; ``score`` is None when no round has both ratings.

Ratings must be real numbers >= 0 (DEITA's are 1..6; MIG needs s_i >= 0): a negative or infinite
value, a bool or a string is an error, not a missing round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class DeitaScore:
    score: float | None  # mean over the rounds rated twice of quality x complexity; None: no such round
    rounds: int  # rounds that had both ratings (the mean's denominator)
    left_out: int  # rounds with one rating only: past the shorter list, or a None / NaN entry

    @property
    def complete(self) -> bool:
        return self.left_out == 0 and self.score is not None


def _rating(value: Any, name: str, k: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}[{k}] = {value!r} is not a number")
    v = float(value)
    if math.isnan(v):
        return None
    if math.isinf(v) or v < 0.0:
        raise ValueError(f"{name}[{k}] = {v} is not a finite rating >= 0")
    return v


def deita_score(quality: Sequence[Any] | None, complexity: Sequence[Any] | None) -> DeitaScore:
    """DEITA score of one dialogue from its per-round quality and complexity ratings.

    Mean over rounds of quality x complexity, over the rounds both lists rate (position k of each
    list is round k; a None or NaN entry is a round not rated). Rounds rated by one list only are
    left out and counted in ``left_out``; with no round rated by both, ``score`` is None. ``None``
    for a whole list means no ratings of that kind. Raises ValueError for a rating that is not a
    finite number >= 0.
    """
    qs = [_rating(v, "quality", k) for k, v in enumerate(quality or ())]
    cs = [_rating(v, "complexity", k) for k, v in enumerate(complexity or ())]
    products = [q * c for q, c in zip(qs, cs) if q is not None and c is not None]
    left_out = max(len(qs), len(cs)) - len(products)
    # a plain left-to-right sum, as every copy before this one did (bit-identical scores)
    score = sum(products) / len(products) if products else None
    return DeitaScore(score, len(products), left_out)
