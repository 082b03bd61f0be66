"""MIG — Maximize Information Gain selection (Chen et al., arXiv 2504.13835), exact and sparse.

Definitions (see docs/algorithms/mig.md):
  e_i[q]  = s_i (or s_i / |L_i| with ``norm``) for each distinct label q of sample i
  P       = diag(W) + prop_weight * offdiag(W), every COLUMN divided by its sum
  ê_i     = e_i P
  E(D)    = sum_q phi(X_q),  X = sum_{i in D} ê_i
  greedy  : repeatedly take the remaining sample with the largest ê_i · phi'(X), ties to the
            lowest pool index, until the budget is reached.

Exactness. ``mig_select`` is a lazy greedy (max-heap of stale upper bounds, re-scored when
popped), compiled with numba (:func:`greedy_select`; :func:`reference_greedy_select` is the
previous heapq/numpy version, kept to test and benchmark it against). It returns the same picks
in the same order as a full re-scan, bit for bit, because:
  * phi' is decreasing and ê >= 0, so a sample's gain never rises: a stale bound is an upper
    bound, and a popped entry whose bound is fresh beats every other entry (gain first, then the
    lower index, which is also how the heap orders equal gains);
  * every floating-point quantity the comparison sees is computed in one canonical order that a
    dense transcription reproduces: column sums of P accumulate over rows in ascending order;
    ê_i[q] accumulates e_i[p] * Pn[p, q] over the labels p of row i in ascending order (scipy's
    CSR product does this); the gain accumulates ê_i[q] * phi'(X_q) left to right over ascending
    q (zeros contribute exact zeros, so skipping them changes nothing; the compiled loop adds
    in that order too, and numba, without fastmath, neither reorders nor fuses the float
    operations); phi' is evaluated per element with the C library's pow/exp (Python floats in
    the reference, the same libm calls in the compiled loop), never with vectorised SIMD kernels
    whose last bit can depend on an element's position in the array.
Ties are therefore resolved on exactly equal floats, by index, in both implementations.

Nothing here builds a dense N x K matrix.
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import scipy.sparse as sp
from numba import njit

from pipeline.annotate.deita import DeitaScore, deita_score
from pipeline.select.heap import sift_down

# Default similarity threshold for all-MiniLM-L6-v2 label embeddings. The paper's T = 0.9 is for
# E5-Mistral-7B, whose cosines sit much higher; with MiniLM, T = 0.9 leaves 99% of InsTag labels
# isolated. On 927 real InsTag labels MiniLM gives, at T = 0.7: 0.77 neighbours per label on
# average (about 3.8 for a 4.5K-label vocabulary, as degree grows with K), with pairs such as
# "code optimization"/"code analysis" or "text comparison"/"string comparison"; at 0.65 unrelated pairs
# ("movie review"/"music review") start to appear. See docs/mig.md for the sweep.
MINILM_DEFAULT_THRESHOLD = 0.7

PhiKind = Literal["pow", "exp"]

# Rows per block when scoring the whole pool at once; bounds the padded (rows x max nnz) scratch.
_SCORE_BLOCK_ROWS = 32768


@dataclass(frozen=True)
class MIGConfig:
    """Parameters of the MIG objective.

    sim_threshold: T for building the label graph from embeddings (used by the caller that builds
        W; ``mig_select`` itself takes W as given).
    prop_weight: alpha, the weight of neighbouring labels in the propagation matrix.
    phi: "pow" for phi(x) = (x + phi_a)^phi_b, "exp" for phi(x) = 1 - exp(-phi_alpha x).
    norm: divide a sample's score by its number of distinct labels.
    """

    sim_threshold: float = MINILM_DEFAULT_THRESHOLD
    prop_weight: float = 1.0
    phi: PhiKind = "pow"
    phi_b: float = 0.8
    phi_a: float = 1e-6
    phi_alpha: float = 1.0
    norm: bool = False

    def __post_init__(self) -> None:
        if not (0.0 < self.sim_threshold <= 1.0):
            raise ValueError(f"sim_threshold must be in (0, 1], got {self.sim_threshold}.")
        if not (math.isfinite(self.prop_weight) and self.prop_weight >= 0.0):
            raise ValueError(f"prop_weight must be finite and >= 0, got {self.prop_weight}.")
        if self.phi == "pow":
            if not (0.0 < self.phi_b <= 1.0):
                raise ValueError(
                    f"phi_b must be in (0, 1] so that phi = (x + a)^b is concave and increasing; "
                    f"got {self.phi_b}."
                )
            if not (math.isfinite(self.phi_a) and self.phi_a > 0.0):
                raise ValueError(
                    f"phi_a must be > 0 (phi'(0) = b * a^(b-1) is infinite at a = 0); got {self.phi_a}."
                )
        elif self.phi == "exp":
            if not (math.isfinite(self.phi_alpha) and self.phi_alpha > 0.0):
                raise ValueError(f"phi_alpha must be finite and > 0, got {self.phi_alpha}.")
        else:
            raise ValueError(f"phi must be 'pow' or 'exp', got {self.phi!r}.")


def phi(x: np.ndarray | float, config: MIGConfig) -> np.ndarray:
    """phi applied elementwise (for reporting E(D); the greedy never compares these values)."""
    x = np.asarray(x, dtype=np.float64)
    if config.phi == "pow":
        return np.power(x + config.phi_a, config.phi_b)
    return 1.0 - np.exp(-config.phi_alpha * x)


def phi_prime_scalar(x: float, config: MIGConfig) -> float:
    """phi'(x) for one Python float, through libm: the value the greedy's comparisons rely on."""
    if config.phi == "pow":
        return config.phi_b * (x + config.phi_a) ** (config.phi_b - 1.0)
    return config.phi_alpha * math.exp(-config.phi_alpha * x)


def phi_prime(x: np.ndarray | Sequence[float], config: MIGConfig) -> np.ndarray:
    """phi' elementwise, computed per element exactly as :func:`phi_prime_scalar`."""
    values = np.asarray(x, dtype=np.float64).ravel().tolist()
    out = np.fromiter((phi_prime_scalar(v, config) for v in values), dtype=np.float64, count=len(values))
    return out.reshape(np.shape(x))


# ---------------------------------------------------------------------------------------------
# Information vectors
# ---------------------------------------------------------------------------------------------


def label_matrix(label_ids: Sequence[Sequence[int]] | sp.spmatrix, n_labels: int) -> sp.csr_matrix:
    """N x K 0/1 CSR of distinct labels per sample (sorted column indices, repeats counted once)."""
    if sp.issparse(label_ids):
        m = sp.csr_matrix(label_ids, copy=True)
        if m.shape[1] != n_labels:
            raise ValueError(
                f"Label matrix has {m.shape[1]} columns but the label graph has {n_labels} labels."
            )
        m.sum_duplicates()
        m.eliminate_zeros()
        m.data = np.ones_like(m.data, dtype=np.float64)
        m = m.astype(np.float64)
        m.sort_indices()
        return m
    if isinstance(label_ids, np.ndarray) and label_ids.ndim == 2:
        raise TypeError(
            "label_ids as a dense 2-D array is ambiguous; pass a list of label-id lists or a "
            "scipy.sparse N x K matrix."
        )
    n = len(label_ids)
    lengths = np.fromiter((len(row) for row in label_ids), dtype=np.int64, count=n)
    flat = np.fromiter(
        (int(q) for row in label_ids for q in row), dtype=np.int64, count=int(lengths.sum())
    )
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    if flat.size:
        bad = (flat < 0) | (flat >= n_labels)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"Sample {int(rows[j])} has label id {int(flat[j])}, outside the label graph "
                f"(0..{n_labels - 1}). Map labels to ids with the graph's vocabulary "
                "(encode_labels) and drop or add the missing ones."
            )
    order = np.lexsort((flat, rows))
    rows, flat = rows[order], flat[order]
    keep = np.ones(flat.shape[0], dtype=bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (flat[1:] != flat[:-1])
    rows, flat = rows[keep], flat[keep]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sp.csr_matrix(
        (np.ones(flat.shape[0], dtype=np.float64), flat, indptr), shape=(n, n_labels)
    )


def _check_scores(scores: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape[0] != n:
        raise ValueError(f"Got {s.shape[0]} scores for {n} samples; they must match.")
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0.0):
        j = int(np.flatnonzero(~np.isfinite(s) | (s < 0.0))[0])
        raise ValueError(f"Scores must be finite and >= 0; sample {j} has score {s[j]}.")
    return s


def info_vectors(
    label_ids: Sequence[Sequence[int]] | sp.spmatrix,
    scores: Sequence[float] | np.ndarray,
    n_labels: int,
    norm: bool = False,
) -> sp.csr_matrix:
    """Raw information vectors e (N x K CSR): s_i on each distinct label, or s_i / |L_i|."""
    m = label_matrix(label_ids, n_labels)
    s = _check_scores(scores, m.shape[0])
    counts = np.diff(m.indptr)
    per_row = s / np.maximum(counts, 1) if norm else s
    m.data = np.repeat(per_row, counts).astype(np.float64)
    return m


def _check_graph(W: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    W = sp.csr_matrix(W, dtype=np.float64)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"The label graph W must be square, got shape {W.shape}.")
    if W.nnz and (not np.all(np.isfinite(W.data)) or W.data.min() < 0.0):
        raise ValueError("The label graph W must have finite, non-negative weights.")
    W = W.copy()
    W.sum_duplicates()
    W.sort_indices()
    return W


def propagation_matrix(W: sp.spmatrix | np.ndarray, prop_weight: float = 1.0) -> sp.csr_matrix:
    """Column-normalised P = diag(W) + prop_weight * offdiag(W) as CSR (sorted indices)."""
    W = _check_graph(W)
    k = W.shape[0]
    rows = np.repeat(np.arange(k), np.diff(W.indptr))
    on_diag = rows == W.indices
    P = W.copy()
    P.data = np.where(on_diag, W.data, prop_weight * W.data)
    # bincount adds in storage order: rows ascending within every column, the order a dense
    # row-by-row accumulation uses.
    colsum = np.bincount(P.indices, weights=P.data, minlength=k)
    empty = np.flatnonzero(colsum <= 0.0)
    if empty.size:
        raise ValueError(
            f"Column(s) {empty[:5].tolist()} of the propagation matrix sum to 0: those labels have "
            "no self-weight and no neighbour. Build W with a diagonal of 1 (label_graph does)."
        )
    P.data = P.data / colsum[P.indices]
    return P


def propagate(e: sp.csr_matrix, P: sp.csr_matrix) -> sp.csr_matrix:
    """ê = e P (N x K CSR with sorted indices)."""
    if e.shape[1] != P.shape[0]:
        raise ValueError(f"e has {e.shape[1]} label columns but P is {P.shape[0]} x {P.shape[1]}.")
    e = sp.csr_matrix(e)
    e.sort_indices()  # the product accumulates over e's stored order: ascending labels
    ehat = (e @ P).tocsr()
    ehat.sort_indices()
    return ehat


def propagated_vectors(
    label_ids: Sequence[Sequence[int]] | sp.spmatrix,
    scores: Sequence[float] | np.ndarray,
    W: sp.spmatrix | np.ndarray,
    config: MIGConfig = MIGConfig(),
) -> sp.csr_matrix:
    """ê for a pool: raw vectors from labels and scores, propagated over the label graph W."""
    P = propagation_matrix(W, config.prop_weight)
    e = info_vectors(label_ids, scores, P.shape[0], config.norm)
    return propagate(e, P)


# ---------------------------------------------------------------------------------------------
# Gains and the lazy greedy
# ---------------------------------------------------------------------------------------------


def _row_gains(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    dphi: np.ndarray,
    rows: np.ndarray,
) -> np.ndarray:
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    width = int(lengths.max()) if rows.shape[0] else 0
    if width == 0:
        return np.zeros(rows.shape[0], dtype=np.float64)
    offsets = np.arange(width, dtype=np.int64)
    inside = offsets < lengths[:, None]
    # Padding reads slot 0 (width > 0 means there is one) and is multiplied by 0.0: an exact zero.
    pos = np.where(inside, starts[:, None] + offsets, 0)
    terms = data[pos] * dphi[indices[pos]] * inside
    return np.cumsum(terms, axis=1)[:, -1]


class _PaddedRows:
    """ê rows as a dense (N x max nnz) block, zero-padded on the right, when that fits.

    Scoring a batch is then a gather, a multiply and a cumsum; the CSR path needs about three
    times as many numpy calls. Padding holds value 0.0 at column 0, so it adds exact zeros and
    the sums are the same floats as the CSR path's.
    """

    def __init__(self, ehat: sp.csr_matrix, max_bytes: int) -> None:
        n = ehat.shape[0]
        lengths = np.diff(ehat.indptr)
        self.width = int(lengths.max()) if n else 0
        self.enabled = 0 < self.width and n * self.width * 12 <= max_bytes
        if not self.enabled:
            return
        inside = np.arange(self.width) < lengths[:, None]
        self.data = np.zeros((n, self.width), dtype=np.float64)
        self.cols = np.zeros((n, self.width), dtype=np.int32)
        self.data[inside] = ehat.data
        self.cols[inside] = ehat.indices

    def gains(self, dphi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.cumsum(self.data[rows] * dphi[self.cols[rows]], axis=1)[:, -1]


def row_gains(ehat: sp.csr_matrix, dphi: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """ê_i · dphi for the given rows, summed left to right over each row's ascending columns.

    The rows are laid out as a zero-padded (len(rows) x max nnz) block and summed with cumsum,
    which is a strictly sequential accumulation; the padding adds exact zeros. Rows must have
    sorted column indices.
    """
    rows = np.asarray(rows, dtype=np.int64)
    return _row_gains(ehat.indptr, ehat.indices, ehat.data, np.asarray(dphi, dtype=np.float64), rows)


def all_gains(ehat: sp.csr_matrix, dphi: np.ndarray) -> np.ndarray:
    """Gains of every row, in blocks so the padded scratch stays small."""
    n = ehat.shape[0]
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _SCORE_BLOCK_ROWS):
        stop = min(start + _SCORE_BLOCK_ROWS, n)
        out[start:stop] = row_gains(ehat, dphi, np.arange(start, stop))
    return out


@dataclass
class MIGResult:
    """Outcome of a MIG selection.

    picks: pool indices in selection order. gains: the linearised gain ê_i · phi'(X) of each pick
    at the moment it was picked. X: final label-information vector (length K). information: E(D)
    of the selection. evaluations: gain evaluations the lazy greedy needed (the pool's initial
    scoring included). ehat: the propagated vectors (N x K CSR), kept for baselines and E(D) of
    other index sets. seconds: wall time of the stages.
    """

    picks: np.ndarray
    gains: np.ndarray
    X: np.ndarray
    information: float
    evaluations: int
    ehat: sp.csr_matrix = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)


def _check_budget(budget: int, n: int) -> int:
    if isinstance(budget, bool) or int(budget) != budget:
        raise TypeError(f"budget must be an integer, got {budget!r}.")
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}.")
    if budget > n:
        raise ValueError(
            f"budget {budget} exceeds the pool size {n}; ask for at most {n} samples."
        )
    return budget


# Heap keys are Python ints that order exactly like (-gain, index): for gain >= 0 the IEEE bit
# pattern is monotone in the value, so key = ((2^63 - 1 - bits(gain)) << shift) | index. One int
# comparison is about twice as fast in heapq as a (float, int) tuple comparison.
_TOP_BITS = (1 << 63) - 1


def _gain_bits(values: np.ndarray) -> list[int]:
    return np.ascontiguousarray(values, dtype=np.float64).view(np.int64).tolist()


def _bits_gain(bits: int) -> float:
    return float(np.array([bits], dtype=np.int64).view(np.float64)[0])


def greedy_select(
    ehat: sp.csr_matrix, budget: int, config: MIGConfig = MIGConfig(), hot_size: int = 1 << 16
) -> MIGResult:
    """Exact lazy greedy on precomputed propagated vectors ê (see the module docstring).

    ê must be non-negative; ``propagated_vectors`` builds it from labels, scores and W. The
    greedy runs compiled (:func:`_greedy_kernel`); its picks and gains are those of
    :func:`reference_greedy_select` bit for bit (same summation order, same libm calls).
    ``hot_size``: bounds kept in the heap, the rest wait in arrays; only the speed depends on it.
    """
    started = time.perf_counter()
    ehat, indptr, indices, data = _greedy_inputs(ehat)
    n, k = ehat.shape
    budget = _check_budget(budget, n)
    if isinstance(hot_size, bool) or int(hot_size) != hot_size or hot_size < 1:
        raise ValueError(f"hot_size must be an integer >= 1, got {hot_size!r}.")
    pow_form = config.phi == "pow"
    picks, gains, X, evaluations = _greedy_kernel(
        indptr, indices, data, k, budget, pow_form, config.phi_b, config.phi_a, config.phi_alpha,
        phi_prime_scalar(0.0, config), int(hot_size),
    )
    return MIGResult(
        picks=picks,
        gains=gains,
        X=X,
        information=dataset_information(X, config),
        evaluations=int(evaluations),
        ehat=ehat,
        seconds={"greedy": time.perf_counter() - started},
    )


def _greedy_inputs(ehat: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    ehat = sp.csr_matrix(ehat, dtype=np.float64)
    if not ehat.has_sorted_indices:
        ehat = ehat.copy()
        ehat.sort_indices()
    data = np.ascontiguousarray(ehat.data, dtype=np.float64)
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0.0):
        raise ValueError("Propagated vectors must be finite and >= 0.")
    indptr = np.ascontiguousarray(ehat.indptr, dtype=np.int64)
    # int32 columns (scipy's own dtype, no copy): half the memory traffic of a re-score.
    indices = np.ascontiguousarray(ehat.indices, dtype=np.int32)
    return ehat, indptr, indices, data


@njit(cache=True, nogil=True)
def _row_gain(indptr, indices, data, dphi, i):
    s = 0.0
    for p in range(indptr[i], indptr[i + 1]):
        s += data[p] * dphi[indices[p]]
    return s


@njit(cache=True, nogil=True)
def _kth_smallest(values, kth):
    """The ``kth`` smallest (0-based) of ``values``, which it reorders (Hoare quickselect).

    Written out rather than ``np.partition``, whose compiled implementation took numba several
    seconds of extra compile time on the first run.
    """
    lo, hi = 0, values.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        # median of three as the pivot, so sorted or constant runs do not go quadratic
        a, b, c = values[lo], values[mid], values[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
            if a > b:
                b = a
        pivot = b
        i, j = lo, hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return values[kth]
    return values[kth]


@njit(cache=True, nogil=True)
def _refill(keys, rows, cold_keys, cold_rows, n_cold, hot_size):
    """Move the ``hot_size`` largest cold bounds (and every bound equal to the smallest of them)
    into the empty heap; return the new threshold theta, the heap size and the cold count."""
    if n_cold > hot_size:
        cut = _kth_smallest(cold_keys[:n_cold].copy(), n_cold - hot_size)
    else:
        cut = -1.0  # everything moves; bounds are >= 0
    size = 0
    kept = 0
    for j in range(n_cold):
        if cold_keys[j] >= cut:  # equal bounds move together, so every cold bound stays < cut
            keys[size], rows[size] = cold_keys[j], cold_rows[j]
            size += 1
        else:
            cold_keys[kept], cold_rows[kept] = cold_keys[j], cold_rows[j]
            kept += 1
    for pos in range(size // 2 - 1, -1, -1):
        sift_down(keys, rows, size, pos)
    return cut, size, kept


@njit(cache=True, nogil=True)
def _greedy_kernel(indptr, indices, data, k, budget, pow_form, phi_b, phi_a, phi_alpha, dphi0, hot_size):
    """The lazy greedy over ê in CSR form, bounds in two tiers.

    A binary max-heap keyed by (bound, -row) holds every entry whose bound is >= a threshold
    theta; "cold" arrays hold the rest, all < theta. A heap top scored at the current version of X
    is then the exact arg-max (bounds only fall). A stale top is re-scored: it stays in the heap
    (sifted down) while its bound is >= theta, else it moves to the cold arrays. When the heap runs
    dry, theta drops to the ``hot_size``-th largest cold bound and those entries form a new heap:
    a small heap stays in cache. Each gain is the left-to-right sum of data * dphi over the row's
    ascending columns, and phi' the expression of ``phi_prime_scalar`` (libm pow / exp): the floats
    of :func:`reference_greedy_select`, so the same picks and gains.
    """
    n = indptr.shape[0] - 1
    X = np.zeros(k, dtype=np.float64)
    dphi = np.full(k, dphi0, dtype=np.float64)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    if budget == 0:
        return picks, gains, X, 0
    cold_keys = np.empty(n, dtype=np.float64)
    cold_rows = np.arange(n, dtype=np.int64)
    for i in range(n):
        cold_keys[i] = _row_gain(indptr, indices, data, dphi, i)
    evaluations = n
    keys = np.empty(n, dtype=np.float64)
    rows = np.empty(n, dtype=np.int64)
    theta, size, n_cold = _refill(keys, rows, cold_keys, cold_rows, n, hot_size)
    # X changes only when a pick has a non-zero entry; bounds scored at the current version are
    # exact, so picking an empty or zero-score sample invalidates nothing.
    version = 0
    scored_at = np.zeros(n, dtype=np.int64)
    exponent = phi_b - 1.0
    for t in range(budget):
        while True:
            if size == 0:
                theta, size, n_cold = _refill(keys, rows, cold_keys, cold_rows, n_cold, hot_size)
            top = rows[0]
            if scored_at[top] == version:
                break
            g = _row_gain(indptr, indices, data, dphi, top)
            scored_at[top] = version
            evaluations += 1
            if g >= theta:
                keys[0] = g
            else:
                cold_keys[n_cold], cold_rows[n_cold] = g, top
                n_cold += 1
                size -= 1
                keys[0], rows[0] = keys[size], rows[size]
            if size > 0:
                sift_down(keys, rows, size, 0)
        picks[t] = top
        gains[t] = keys[0]
        size -= 1
        keys[0], rows[0] = keys[size], rows[size]
        if size > 0:
            sift_down(keys, rows, size, 0)
        lo, hi = indptr[top], indptr[top + 1]
        touched = False
        for p in range(lo, hi):
            if data[p] != 0.0:
                touched = True
                break
        if touched:
            for p in range(lo, hi):
                q = indices[p]
                X[q] += data[p]
                if pow_form:
                    dphi[q] = phi_b * (X[q] + phi_a) ** exponent
                else:
                    dphi[q] = phi_alpha * math.exp(-phi_alpha * X[q])
            version += 1
    return picks, gains, X, evaluations


def reference_greedy_select(
    ehat: sp.csr_matrix,
    budget: int,
    config: MIGConfig = MIGConfig(),
    padded_bytes: int = 1 << 30,
    hot_size: int = 1 << 16,
) -> MIGResult:
    """The previous lazy greedy (heapq in Python, numpy re-scoring), kept as the reference.

    :func:`greedy_select` (compiled) must return exactly its picks and gains; tests and
    ``benchmarks/mig.py`` compare the two. Same contract as :func:`greedy_select`.
    ``padded_bytes``: memory allowed for a padded copy of ê that speeds up re-scoring.
    ``hot_size``: entries kept in the heap; the rest wait in numpy arrays. Neither changes
    the result, only the speed.

    The bounds live in two tiers: a heap holding every entry whose bound is >= a threshold
    theta, and "cold" numpy arrays holding the entries below it. A fresh heap top is >= theta
    > every cold bound, so it is the true maximum. When the heap runs dry, theta drops to the
    ``hot_size``-th largest cold bound and those entries move into the heap. A small heap is
    cache-resident and cheap to pop, and low re-scored bounds skip the heap entirely.
    """
    started = time.perf_counter()
    ehat = sp.csr_matrix(ehat, dtype=np.float64)
    if not ehat.has_sorted_indices:
        ehat = ehat.copy()
        ehat.sort_indices()
    n, k = ehat.shape
    budget = _check_budget(budget, n)
    if hot_size < 1:
        raise ValueError(f"hot_size must be >= 1, got {hot_size}.")
    indptr = ehat.indptr.astype(np.int64, copy=False)
    indices, data = ehat.indices, ehat.data
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0.0):
        raise ValueError("Propagated vectors must be finite and >= 0.")

    X = np.zeros(k, dtype=np.float64)
    dphi = np.full(k, phi_prime_scalar(0.0, config), dtype=np.float64)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    if budget == 0:
        return MIGResult(picks, gains, X, dataset_information(X, config), 0, ehat,
                         {"greedy": time.perf_counter() - started})

    shift = max(1, (n - 1).bit_length())
    mask = (1 << shift) - 1
    heap: list[int] = []
    cold_rows: list[np.ndarray] = [np.arange(n, dtype=np.int64)]
    cold_bounds: list[np.ndarray] = [all_gains(ehat, dphi)]
    evaluations = n
    theta = math.inf

    def refill() -> float:
        rows = np.concatenate(cold_rows)
        bounds = np.concatenate(cold_bounds)
        if rows.shape[0] > hot_size:
            cut = float(np.partition(bounds, rows.shape[0] - hot_size)[rows.shape[0] - hot_size])
            move = bounds >= cut  # equal bounds move together, so every cold bound is < cut
        else:
            cut = -1.0  # everything is hot; gains are >= 0
            move = np.ones(rows.shape[0], dtype=bool)
        heap.extend(((_TOP_BITS - b) << shift) | j
                    for b, j in zip(_gain_bits(bounds[move]), rows[move].tolist()))
        heapq.heapify(heap)
        keep = ~move
        cold_rows[:] = [rows[keep]]
        cold_bounds[:] = [bounds[keep]]
        return cut

    theta = refill()
    # X changes only when a pick has a non-zero entry; bounds scored at the current version are
    # exact, so picking an empty or zero-score sample invalidates nothing.
    version = 0
    scored_at = [0] * n
    padded = _PaddedRows(ehat, padded_bytes)
    if padded.enabled:
        score = padded.gains
    else:
        def score(d: np.ndarray, rows: np.ndarray) -> np.ndarray:
            return _row_gains(indptr, indices, data, d, rows)

    heappop, heappush = heapq.heappop, heapq.heappush
    pow_form = config.phi == "pow"
    b_, a_, e_, alpha = config.phi_b, config.phi_a, config.phi_b - 1.0, config.phi_alpha
    exp = math.exp
    min_batch, max_batch = 16, 4096

    for t in range(budget):
        batch_size = min_batch
        while True:
            if not heap:
                theta = refill()
            top = heap[0]
            if scored_at[top & mask] == version:
                break
            # Pop a batch blindly; entries already fresh at this version go back unchanged.
            popped = [heappop(heap) for _ in range(min(batch_size, len(heap)))]
            stale = [key & mask for key in popped if scored_at[key & mask] != version]
            for key in popped:
                if scored_at[key & mask] == version:
                    heappush(heap, key)
            rows = np.array(stale, dtype=np.int64)
            fresh = score(dphi, rows)
            evaluations += len(stale)
            for j in stale:
                scored_at[j] = version
            hot = fresh >= theta
            for g, j in zip(_gain_bits(fresh[hot]), rows[hot].tolist()):
                heappush(heap, ((_TOP_BITS - g) << shift) | j)
            if not hot.all():
                cold = ~hot
                cold_rows.append(rows[cold])
                cold_bounds.append(fresh[cold])
            batch_size = min(batch_size * 2, max_batch)
        heappop(heap)
        i = top & mask
        picks[t] = i
        gains[t] = _bits_gain(_TOP_BITS - (top >> shift))
        lo, hi = indptr[i], indptr[i + 1]
        if hi > lo and np.any(data[lo:hi] != 0.0):
            cols = indices[lo:hi]
            X[cols] += data[lo:hi]
            # Same expression as phi_prime_scalar, inlined: this runs for every touched label.
            if pow_form:
                dphi[cols] = [b_ * (x + a_) ** e_ for x in X[cols].tolist()]
            else:
                dphi[cols] = [alpha * exp(-alpha * x) for x in X[cols].tolist()]
            version += 1

    return MIGResult(
        picks=picks,
        gains=gains,
        X=X,
        information=dataset_information(X, config),
        evaluations=evaluations,
        ehat=ehat,
        seconds={"greedy": time.perf_counter() - started},
    )


def mig_select(
    label_ids: Sequence[Sequence[int]] | sp.spmatrix,
    scores: Sequence[float] | np.ndarray,
    W: sp.spmatrix | np.ndarray,
    budget: int,
    config: MIGConfig = MIGConfig(),
) -> MIGResult:
    """Select ``budget`` samples by MIG.

    label_ids: per sample, the ids (0..K-1, rows of W) of its labels (repeats count once; an
    empty list is allowed), or an N x K sparse matrix whose non-zero pattern marks the labels.
    scores: s_i >= 0 per sample. W: K x K label graph (sparse or dense, non-negative, positive
    diagonal). budget: number of picks, 0..N.
    """
    t0 = time.perf_counter()
    ehat = propagated_vectors(label_ids, scores, W, config)
    t1 = time.perf_counter()
    result = greedy_select(ehat, budget, config)
    result.seconds = {"propagation": t1 - t0, **result.seconds}
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------


def dataset_information(X: np.ndarray, config: MIGConfig = MIGConfig()) -> float:
    """E(D) = sum_q phi(X_q) for a label-information vector X."""
    return float(phi(np.asarray(X, dtype=np.float64), config).sum())


def information_vector(ehat: sp.csr_matrix, indices: Iterable[int]) -> np.ndarray:
    """X = sum of ê_i over ``indices`` (length K)."""
    idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
    if idx.size == 0:
        return np.zeros(ehat.shape[1], dtype=np.float64)
    if idx.min() < 0 or idx.max() >= ehat.shape[0]:
        raise IndexError(f"Indices must lie in 0..{ehat.shape[0] - 1}.")
    return np.asarray(ehat[idx].sum(axis=0), dtype=np.float64).ravel()


def information_of(ehat: sp.csr_matrix, indices: Iterable[int], config: MIGConfig = MIGConfig()) -> float:
    """E(D) for any index set D of the pool."""
    return dataset_information(information_vector(ehat, indices), config)


def random_baseline(
    ehat: sp.csr_matrix,
    size: int,
    config: MIGConfig = MIGConfig(),
    n_trials: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """E(D) of ``n_trials`` uniformly random subsets of ``size`` samples (without replacement)."""
    n = ehat.shape[0]
    size = _check_budget(size, n)
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}.")
    rng = np.random.default_rng(seed)
    return np.array(
        [information_of(ehat, rng.choice(n, size=size, replace=False), config) for _ in range(n_trials)]
    )


@dataclass(frozen=True)
class Coverage:
    covered: int  # distinct labels present in the selection
    total: int  # distinct labels present in the whole pool

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 0.0


def tag_coverage(
    label_ids: Sequence[Sequence[int]] | sp.spmatrix, selection: Iterable[int]
) -> Coverage:
    """Distinct labels covered by ``selection`` versus those occurring anywhere in the pool."""
    if sp.issparse(label_ids):
        m = sp.csr_matrix(label_ids)
        m.eliminate_zeros()
        idx = np.asarray(list(selection), dtype=np.int64)
        covered = np.unique(m[idx].indices).size if idx.size else 0
        return Coverage(int(covered), int(np.unique(m.indices).size))
    covered = {int(q) for i in selection for q in label_ids[int(i)]}
    total = {int(q) for row in label_ids for q in row}
    return Coverage(len(covered), len(total))


# ---------------------------------------------------------------------------------------------
# Labels as strings, and the MIG/xsample JSONL layout
# ---------------------------------------------------------------------------------------------


def pool_vocabulary(labels: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """Sorted distinct labels of a pool (label id = position)."""
    return tuple(sorted({label for row in labels for label in row}))


@dataclass(frozen=True)
class EncodedLabels:
    label_ids: list[list[int]]
    unknown: int  # label occurrences not in the vocabulary (dropped)
    unknown_examples: tuple[str, ...]


def encode_labels(
    labels: Sequence[Iterable[str]],
    vocabulary: Sequence[str],
    unknown: Literal["drop", "error"] = "drop",
) -> EncodedLabels:
    """Map label strings to ids of ``vocabulary``; labels outside it are dropped or rejected."""
    lookup = {label: i for i, label in enumerate(vocabulary)}
    out: list[list[int]] = []
    missing = 0
    examples: list[str] = []
    for r, row in enumerate(labels):
        ids: list[int] = []
        for label in row:
            q = lookup.get(label)
            if q is None:
                if unknown == "error":
                    raise KeyError(
                        f"Sample {r} has label {label!r}, which is not in the label graph's "
                        "vocabulary; rebuild the graph over the pool's labels or use unknown='drop'."
                    )
                missing += 1
                if len(examples) < 5 and label not in examples:
                    examples.append(label)
                continue
            ids.append(q)
        out.append(ids)
    return EncodedLabels(out, missing, tuple(examples))


@dataclass(frozen=True)
class XSamplePool:
    """Rows of a MIG/xsample JSONL file that carry both annotations.

    labels: distinct tags per row, first-seen order. scores: mean over rounds of DEITA
    quality x complexity. vocabulary: sorted distinct tags. label_ids: tags as vocabulary ids.
    line_numbers: 0-based record index in the file of each kept row. skipped: records without
    the instag or deita annotation (left out, as the reference does), or whose deita lists rate
    no round with both scores.
    """

    labels: list[list[str]]
    scores: np.ndarray
    vocabulary: tuple[str, ...]
    label_ids: list[list[int]]
    line_numbers: np.ndarray
    skipped: int


def _tag_text(item: object, where: str) -> str:
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict) and isinstance(item.get("tag"), str):
        return item["tag"].strip()
    raise ValueError(
        f"{where}: a tag must be a string or an object with a string 'tag' field, got {item!r}."
    )


def _deita_score(deita: dict, where: str) -> DeitaScore:
    """The record's DEITA score by the one rule (:func:`pipeline.annotate.deita.deita_score`)."""
    quality = deita.get("quality_scores")
    complexity = deita.get("complexity_scores")
    if not isinstance(quality, list) or not isinstance(complexity, list):
        raise ValueError(f"{where}: annotation.deita needs lists quality_scores and complexity_scores.")
    try:
        return deita_score(quality, complexity)
    except ValueError as exc:
        raise ValueError(f"{where}: annotation.deita: {exc}.") from None


def read_xsample_jsonl(
    path: str | Path,
    valid_tags: Iterable[str] | None = None,
    strict: bool = False,
) -> XSamplePool:
    """Read labels and scores from the MIG/xsample JSONL layout (plain or .gz).

    Each record: ``annotation.instag.content`` = tags (strings or {"tag", "explanation"} objects);
    ``annotation.deita.quality_scores`` / ``complexity_scores`` = one score per round. With
    ``valid_tags`` only those tags are kept. Records lacking either annotation are skipped and
    counted, or rejected when ``strict``.
    """
    path = Path(path)
    valid = None if valid_tags is None else set(valid_tags)
    opener = gzip.open if path.suffix == ".gz" else open
    labels: list[list[str]] = []
    scores: list[float] = []
    lines: list[int] = []
    skipped = 0
    partial, first_partial = 0, None  # records whose DEITA score leaves rounds out
    record_no = -1
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record_no += 1
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}).") from exc
            annotation = record.get("annotation") if isinstance(record, dict) else None
            instag = annotation.get("instag") if isinstance(annotation, dict) else None
            deita = annotation.get("deita") if isinstance(annotation, dict) else None
            if not instag or not deita or not isinstance(instag, dict) or not isinstance(deita, dict):
                if strict:
                    raise ValueError(f"{where}: record lacks annotation.instag or annotation.deita.")
                skipped += 1
                continue
            content = instag.get("content") or []
            if not isinstance(content, list):
                raise ValueError(f"{where}: annotation.instag.content must be a list of tags.")
            row: list[str] = []
            seen: set[str] = set()
            for item in content:
                tag = _tag_text(item, where)
                if not tag or tag in seen or (valid is not None and tag not in valid):
                    continue
                seen.add(tag)
                row.append(tag)
            deita_result = _deita_score(deita, where)
            if deita_result.score is None:  # no round rated twice: as good as no deita annotation
                if strict:
                    raise ValueError(f"{where}: annotation.deita rates no round with both scores.")
                skipped += 1
                continue
            if deita_result.left_out:
                partial += 1
                first_partial = first_partial or where
            labels.append(row)
            scores.append(deita_result.score)
            lines.append(record_no)
    if partial:
        warnings.warn(f"{path}: {partial} record(s) score fewer rounds than they have (quality and "
                      f"complexity lists of different lengths, or null entries; first at {first_partial}); "
                      "their DEITA score is the mean over the rounds rated twice.", stacklevel=2)
    vocabulary = pool_vocabulary(labels)
    encoded = encode_labels(labels, vocabulary, unknown="error")
    return XSamplePool(
        labels=labels,
        scores=np.asarray(scores, dtype=np.float64),
        vocabulary=vocabulary,
        label_ids=encoded.label_ids,
        line_numbers=np.asarray(lines, dtype=np.int64),
        skipped=skipped,
    )
