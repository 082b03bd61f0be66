"""GAIS extension: attention-weighted coverage (scoring rule ``same_class_coverage``).

The paper's rule keeps the top same-class-attention instances of each class. Those are hubs of
the dense cores, so at high reduction the kept set bunches up and leaves parts of a class
uncovered: per-class k-medoids or herding subsets of the same size then beat it on 1-NN
(docs/gais.md, "Baselines"). This extension keeps the attention as an importance weight and
adds coverage. In each class c with quota q_c:

    choose S (|S| = q_c) to minimise   sum_i  w_i * min_{s in S} ||x_i - x_s||,
    w_i = (score_i / mean score of the class) ** ATTENTION_POWER

i.e. an attention-weighted k-median (facility location), solved greedily: each step adds the
member that most lowers the weighted cost (the objective is submodular, so greedy is within
1 - 1/e of the optimum of the equivalent coverage form). An instance many same-class neighbours
attend to must be close to a kept instance; one nobody attends to (isolated, or inside another
class's region) barely needs covering. With uniform scores this is plain greedy k-median.
``ATTENTION_POWER`` = 0.5 flattens the heavy-tailed scores so coverage is not handed to the few
hubs again (0 = ignore attention, 1 = raw scores; see docs/gais.md for the ablation).

Cost: the greedy step is O(b^2) per pick over a block of b rows, so a class is first cut into
blocks of at most ``block_rows`` (512) rows by recursive median splits along the top principal axis
(a PCA tree: neighbouring rows stay together, sizes stay balanced), the quota is shared among
blocks in proportion to size (largest remainder), and each block is solved on its own. Classes
of the bundled data sets (at most 286 rows per class and training fold) are one block.

Ties: every argmax/argmin takes the first extremum, i.e. the lower row index; the median split
sorts stably, so equal projections keep row order. Deterministic for a seed (the seed only
starts the power iteration of the PCA tree).
"""

from __future__ import annotations

import numpy as np

ATTENTION_POWER = 0.5
# 512: greedy cost per class is ~(reduction gap) * N * block_rows^2 / block_rows; at 100k x 64-d
# rows, 1024-row blocks took 37 s on the loaded 2-core machine, 512 about a quarter of that.
BLOCK_ROWS = 512


def attention_weights(scores: np.ndarray, power: float = ATTENTION_POWER) -> np.ndarray:
    """(score / mean score) ** power; all ones when every score is 0 (nothing to go on)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("scores must be finite and non-negative (attention received)")
    mean = scores.mean() if scores.size else 0.0
    if mean <= 0:
        return np.ones_like(scores)
    return (scores / mean) ** power


def greedy_weighted_kmedian(Xb: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` distinct rows of ``Xb`` chosen greedily for the weighted k-median."""
    n = Xb.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == n:
        return np.arange(n, dtype=np.int64)
    Xb = np.asarray(Xb, dtype=np.float64)
    sq = (Xb * Xb).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] - 2.0 * Xb @ Xb.T + sq[None, :], 0.0))
    # Coverage form: sim = dmax - d >= 0; maximising sum_i w_i max_s sim(i, s) is the k-median.
    sim = dist.max() - dist
    del dist
    best = np.zeros(n)  # each row's similarity to its closest chosen row so far
    chosen = np.zeros(n, dtype=bool)
    out = np.empty(k, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    buf = np.empty_like(sim)  # one scratch matrix instead of three temporaries per pick
    for t in range(k):
        np.subtract(sim, best[:, None], out=buf)
        np.maximum(buf, 0.0, out=buf)
        buf *= w
        gain = buf.sum(axis=0)
        gain[chosen] = -np.inf
        j = int(np.argmax(gain))
        out[t] = j
        chosen[j] = True
        np.maximum(best, sim[:, j], out=best)
    return out


def pca_tree_blocks(X: np.ndarray, block_rows: int = BLOCK_ROWS, seed: int = 0
                    ) -> list[np.ndarray]:
    """Split row positions 0..n-1 into blocks of at most ``block_rows`` (512) rows, each split at the
    median of the projection on the block's top principal axis (power iteration)."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    rng = np.random.default_rng(seed)
    pending = [np.arange(X.shape[0], dtype=np.int64)]
    blocks: list[np.ndarray] = []
    while pending:
        rows = pending.pop()
        if rows.size <= block_rows:
            blocks.append(rows)
            continue
        Z = np.asarray(X[rows], dtype=np.float64)
        Z = Z - Z.mean(axis=0)
        v = rng.standard_normal(Z.shape[1])
        for _ in range(20):
            v = Z.T @ (Z @ v)
            norm = np.linalg.norm(v)
            if norm == 0:  # all rows identical: any balanced split will do
                break
            v /= norm
        order = np.argsort(Z @ v, kind="stable")
        half = rows.size // 2
        pending += [rows[order[half:]], rows[order[:half]]]
    return sorted(blocks, key=lambda b: int(b.min()))


def share_quota(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` among blocks in proportion to ``sizes`` by largest remainder (ties to the
    earlier block), never more than a block's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    ideal = sizes * (total / sizes.sum())
    share = np.minimum(np.floor(ideal).astype(np.int64), sizes)
    while share.sum() < total:
        gap = np.where(share < sizes, ideal - share, -np.inf)
        share[int(np.argmax(gap))] += 1
    return share


def coverage_select(
    X: np.ndarray, scores: np.ndarray, y_codes: np.ndarray, quota: np.ndarray, *,
    seed: int = 0, power: float = ATTENTION_POWER, block_rows: int = BLOCK_ROWS,
) -> np.ndarray:
    """Boolean mask keeping ``quota[c]`` rows of each class c by attention-weighted greedy
    k-median (see the module docstring)."""
    X = np.asarray(X)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != y_codes.shape or X.shape[0] != y_codes.shape[0]:
        raise ValueError(f"X {X.shape}, scores {scores.shape} and y {y_codes.shape} disagree")
    from threadpoolctl import threadpool_limits

    mask = np.zeros(y_codes.shape[0], dtype=bool)
    # One BLAS thread: the products here are small (512 x d); on the shared 2-core machine two
    # OpenBLAS threads made the whole selection 3-4x slower (10k rows: 4.9 s vs 1.3 s).
    with threadpool_limits(limits=1, user_api="blas"):
        for c, q in enumerate(np.asarray(quota).tolist()):
            rows = np.flatnonzero(y_codes == c)
            if q <= 0:
                continue
            if q > rows.size:
                raise ValueError(f"class code {c}: quota {q} exceeds its {rows.size} rows")
            weights = attention_weights(scores[rows], power)
            blocks = pca_tree_blocks(X[rows], block_rows, seed)
            shares = share_quota(np.array([b.size for b in blocks]), int(q))
            for block, k in zip(blocks, shares):
                if k:
                    picked = greedy_weighted_kmedian(X[rows[block]], weights[block], int(k))
                    mask[rows[block[picked]]] = True
    return mask
