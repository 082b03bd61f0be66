"""Obviously-correct CABS references: re-score every remaining sample at every pick.

Written straight from the definitions in docs/cabs.md, with no incremental state, so the fast
implementation in pipeline/select/cabs.py can be checked pick for pick. Gains are computed with
the same float recipe the definition fixes (sum the per-concept terms left to right, then divide
by their number), so ties are decided on identical values.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def naive_fm(concepts: list[list[int]], b: int) -> list[int]:
    return sorted(range(len(concepts)), key=lambda i: -len(concepts[i]))[:b]


def naive_dm_paper(concepts: list[list[int]], b: int) -> tuple[list[int], list[float]]:
    sets = [sorted(set(c)) for c in concepts]
    freq = Counter(c for s in sets for c in s)
    target = max(1.0, b / len(freq)) if freq else 1.0
    count: Counter = Counter()
    remaining = list(range(len(concepts)))
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(b):
        best, best_gain = -1, -1.0
        for i in remaining:  # ascending, so ">" keeps the lowest index on ties
            gain = 0.0
            if sets[i]:
                s = 0.0
                for c in sets[i]:
                    s += (target - count[c]) / target + 1 / freq[c] if count[c] < target else 0.0
                gain = s / len(sets[i])
            if gain > best_gain:
                best, best_gain = i, gain
        picks.append(best)
        gains.append(best_gain)
        remaining.remove(best)
        for c in sets[best]:
            count[c] += 1
    return picks, gains


def naive_reference_targets(concepts: list[list[int]], b: int, cap: int, names: list[str] | None = None) -> dict[int, int]:
    present = sorted({c for row in concepts for c in row}, key=(lambda c: names[c]) if names else None)
    k = len(present)
    base = min(b // k, cap)
    targets = {}
    for r, c in enumerate(present):
        t = base + (1 if r < b % k and base < cap else 0)
        targets[c] = max(min(t, cap), 1)
    total = sum(targets.values())
    if total > b:
        targets = {c: max(1, min(int(t * (b / total)), cap)) for c, t in targets.items()}
    return targets


def naive_dm_reference(
    concepts: list[list[int]], b: int, cap: int = 10, seed: int = 0, names: list[str] | None = None
) -> tuple[list[int], list[float], int, int]:
    """(picks, greedy gains, random fill count, padded count) of the reference-mode definition."""
    n = len(concepts)
    freq = Counter(c for row in concepts for c in set(row))
    targets = naive_reference_targets(concepts, b, cap, names) if freq else {}
    count: Counter = Counter()
    taken = [False] * n
    picks: list[int] = []
    gains: list[float] = []
    while len(picks) < b:
        best, best_gain = -1, -np.inf
        for i in range(n):
            row = concepts[i]
            if taken[i] or not row or any(count[c] >= cap for c in row):
                continue
            s = 0.0
            for c in row:
                t = targets[c]
                s += (t - count[c]) / t + 1 / freq[c] if count[c] < t else -0.5
            gain = s / len(row)
            if gain > best_gain:
                best, best_gain = i, gain
        if best < 0:
            break
        taken[best] = True
        picks.append(best)
        gains.append(best_gain)
        for c in concepts[best]:
            count[c] += 1
    need = b - len(picks)
    fill: list[int] = []
    if need:
        valid = np.array([i for i in range(n) if not taken[i] and not any(count[c] >= cap for c in concepts[i])],
                         dtype=np.int64)
        if valid.size:
            fill = np.random.default_rng(seed).choice(valid, size=min(need, valid.size), replace=False).tolist()
        for i in fill:
            taken[i] = True
    pad = [i for i in range(n) if not taken[i]][: b - len(picks) - len(fill)]
    return picks + fill + pad, gains, len(fill), len(pad)


def rescan_dm_paper_numpy(concepts: list[list[int]], b: int) -> list[int]:
    """The naive algorithm vectorised: every pick re-scores all B samples with numpy.

    This is the fair baseline for the benchmark (O(b * B * |C|) work, but no Python per sample).
    """
    sets = [sorted(set(c)) for c in concepts]
    n = len(sets)
    width = max((len(s) for s in sets), default=0)
    vocab = 1 + max((c for s in sets for c in s), default=-1)
    pad = np.full((width, n), vocab, dtype=np.int64)  # sentinel concept `vocab` always scores 0.0
    for i, s in enumerate(sets):
        pad[: len(s), i] = s
    lengths = np.array([len(s) for s in sets], dtype=np.float64)
    freq = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in sets] + [np.zeros(0, np.int64)]),
                       minlength=vocab + 1)
    k = int(np.count_nonzero(freq))
    target = max(1.0, b / k) if k else 1.0
    inv = np.zeros(vocab + 1)
    inv[freq > 0] = 1.0 / freq[freq > 0]
    count = np.zeros(vocab + 1)
    taken = np.zeros(n, dtype=bool)
    picks = []
    for _ in range(b):
        terms = np.where(count < target, (target - count) / target + inv, 0.0)
        terms[vocab] = 0.0
        s = np.zeros(n)
        for w in range(width):
            s += terms[pad[w]]
        gain = np.divide(s, lengths, out=np.zeros(n), where=lengths > 0)
        gain[taken] = -np.inf
        i = int(np.argmax(gain))
        picks.append(i)
        taken[i] = True
        count[sets[i]] += 1
    return picks
