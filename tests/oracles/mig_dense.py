"""Dense, full-rescan transcription of MIG (docs/algorithms/mig.md), the reference for tests.

Written to be read against the spec, not to be fast: dense N x K arrays, every remaining sample
re-scored at every step, ties to the lowest pool index (np.argmax returns the first maximum).

Sums are written as explicit left-to-right loops in ascending index order. That is the natural
reading of the formulas, and it pins the floating-point rounding, so the fast implementation can
be required to agree bit for bit (a BLAS dot would add in an unspecified order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class DenseMIGOutput:
    picks: list[int]
    gains: list[float]
    X: np.ndarray
    ehat: np.ndarray


def dense_phi_prime(x: float, phi: str, phi_b: float, phi_a: float, phi_alpha: float) -> float:
    if phi == "pow":
        return phi_b * (x + phi_a) ** (phi_b - 1.0)  # derivative of (x + a)^b
    if phi == "exp":
        return phi_alpha * math.exp(-phi_alpha * x)  # derivative of 1 - exp(-alpha x)
    raise ValueError(phi)


def dense_ehat(
    label_ids: Sequence[Sequence[int]],
    scores: Sequence[float],
    W: np.ndarray,
    prop_weight: float = 1.0,
    norm: bool = False,
) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    n, k = len(label_ids), W.shape[0]

    # 1. raw information vectors: s_i on every distinct label (or s_i / |L_i|)
    e = np.zeros((n, k))
    for i, labels in enumerate(label_ids):
        distinct = set(int(q) for q in labels)
        for q in distinct:
            e[i, q] = scores[i] / len(distinct) if norm else scores[i]

    # 2. P = diag(W) + alpha * offdiag(W), then each column divided by its sum
    P = prop_weight * W
    for q in range(k):
        P[q, q] = W[q, q]
    colsum = np.zeros(k)
    for p in range(k):
        colsum += P[p]
    P = P / colsum[None, :]

    # ê_i = e_i P, accumulated over p = 0, 1, ..., K-1
    ehat = np.zeros((n, k))
    for p in range(k):
        rows = np.flatnonzero(e[:, p] != 0.0)
        ehat[rows] += e[rows, p][:, None] * P[p][None, :]
    return ehat


def dense_mig(
    label_ids: Sequence[Sequence[int]],
    scores: Sequence[float],
    W: np.ndarray,
    budget: int,
    prop_weight: float = 1.0,
    phi: str = "pow",
    phi_b: float = 0.8,
    phi_a: float = 1e-6,
    phi_alpha: float = 1.0,
    norm: bool = False,
    max_picks: int | None = None,
) -> DenseMIGOutput:
    """Greedy MIG by full re-scan. ``max_picks`` stops early (for timing a prefix of a long run)."""
    ehat = dense_ehat(label_ids, scores, W, prop_weight, norm)
    n, k = ehat.shape
    if budget > n:
        raise ValueError("budget exceeds pool size")
    columns = np.asfortranarray(ehat)
    X = np.zeros(k)
    remaining = np.ones(n, dtype=bool)
    picks: list[int] = []
    gains_at_pick: list[float] = []
    steps = budget if max_picks is None else min(budget, max_picks)
    for _ in range(steps):
        dphi = [dense_phi_prime(float(x), phi, phi_b, phi_a, phi_alpha) for x in X]
        gains = np.zeros(n)
        for q in range(k):  # ê_i · phi'(X), summed over q in ascending order
            gains += columns[:, q] * dphi[q]
        gains[~remaining] = -np.inf
        i = int(np.argmax(gains))
        picks.append(i)
        gains_at_pick.append(float(gains[i]))
        X = X + ehat[i]
        remaining[i] = False
    return DenseMIGOutput(picks, gains_at_pick, X, ehat)
