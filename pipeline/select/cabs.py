"""CABS: concept-aware batch sampling (Ghosh, Udandarao et al., arXiv 2511.20643).

From an IID super-batch of B samples, each carrying a list of concept instances (one entry per
grounded box, so a concept repeats once per instance), keep b samples:

* CABS-FM (:func:`cabs_fm`): the b samples with the most concept instances (stable sort).
* CABS-DM (:func:`cabs_dm`): a greedy diversity maximiser. ``mode="paper"`` implements the
  paper's definition; ``mode="reference"`` reproduces the choices of the authors' code
  (negative score past the target, a per-concept cap, random fill of a shortfall).

Every choice the paper leaves open is fixed and documented in ``docs/cabs.md``. In short:

* paper mode: t = max(1, b / K) with REAL division (K = distinct concepts in the super-batch);
  n_c counts selected samples that contain c; the gain of a sample is the mean over its
  DISTINCT concepts, summed in ascending concept-id order and divided by their number
  (this exact float recipe is what ties are decided on); ties go to the lowest super-batch
  position; samples without concepts have gain 0.
* reference mode: integer targets min(b // K, cap) plus one for the first ``b % K`` concepts in
  alphabetical order; n_c counts instances; the gain is the mean over INSTANCES in stored order.

Speed. The greedy runs inside the training loop at every step, so it is built around one fact
that holds in both modes: a sample's gain never increases (counts only grow and every per-concept
term is non-increasing in its count). That makes a lazy max-structure exact: a sample is
re-scored only when it reaches the top of a max-heap after one of its concepts changed, so a step
costs O(B + re-scores x log B) instead of the naive O(b * B * |C|). The loop is compiled with
numba (:func:`_dm_kernel`, cached on disk); :func:`cabs_dm_python` runs the previous pure-Python
lazy greedy (:func:`_lazy_greedy`), which the tests and the benchmark hold it to, pick for pick.
"""

from __future__ import annotations

import bisect
import heapq
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numba import njit

from pipeline.select.heap import sift_down

DmMode = Literal["paper", "reference"]
REFERENCE_CAP = 10  # per-concept cap of the reference code ("per device")
REFERENCE_PAST_TARGET = -0.5  # the reference's per-concept score once c reached its target


# ---------------------------------------------------------------------------------------------
# Input representation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConceptTable:
    """Concept instances per sample in CSR layout, built once and sliced per super-batch.

    ``concept_ids[indptr[i]:indptr[i + 1]]`` are sample i's concept instances in stored order
    (repeats = instances). The distinct view (``distinct_indptr``/``distinct_ids``, ascending
    ids per sample, with ``distinct_counts`` instances each) is derived at construction so that
    per-step code never sorts or deduplicates.
    """

    indptr: np.ndarray
    concept_ids: np.ndarray
    n_concepts: int
    vocabulary: tuple[str, ...] | None = None
    distinct_indptr: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    distinct_ids: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    distinct_counts: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        ids = np.ascontiguousarray(self.concept_ids, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0:
            raise ValueError("indptr must be a 1-D array starting at 0 with one entry per sample plus one")
        if np.any(np.diff(indptr) < 0):
            raise ValueError("indptr must be non-decreasing (row i spans concept_ids[indptr[i]:indptr[i+1]])")
        if indptr[-1] != ids.size:
            raise ValueError(f"indptr ends at {int(indptr[-1])} but there are {ids.size} concept ids")
        n_concepts = int(self.n_concepts)
        if ids.size and (ids.min() < 0 or ids.max() >= n_concepts):
            raise ValueError(
                f"concept ids must lie in [0, n_concepts={n_concepts}); got range "
                f"[{int(ids.min())}, {int(ids.max())}]. Pass a larger n_concepts or remap the ids."
            )
        if self.vocabulary is not None and len(self.vocabulary) != n_concepts:
            raise ValueError(f"vocabulary has {len(self.vocabulary)} names but n_concepts is {n_concepts}")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "concept_ids", ids)
        object.__setattr__(self, "n_concepts", n_concepts)
        if self.vocabulary is not None:
            object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if self.distinct_indptr is None:
            d_ptr, d_ids, d_cnt = _distinct_csr(indptr, ids)
            object.__setattr__(self, "distinct_indptr", d_ptr)
            object.__setattr__(self, "distinct_ids", d_ids)
            object.__setattr__(self, "distinct_counts", d_cnt)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_id_lists(cls, concepts: Sequence[Sequence[int]], n_concepts: int | None = None) -> ConceptTable:
        """Build from one list of integer concept ids (instances, repeats allowed) per sample."""
        lengths = np.fromiter((len(c) for c in concepts), dtype=np.int64, count=len(concepts))
        indptr = np.zeros(len(concepts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = np.fromiter((int(c) for row in concepts for c in row), dtype=np.int64, count=int(indptr[-1]))
        if n_concepts is None:
            n_concepts = int(flat.max()) + 1 if flat.size else 0
        return cls(indptr, flat, n_concepts)

    @classmethod
    def from_name_lists(
        cls,
        concepts: Sequence[Sequence[str]],
        vocabulary: Sequence[str] | Mapping[str, int] | None = None,
        unknown: Literal["error", "skip"] = "error",
    ) -> ConceptTable:
        """Build from concept names per sample.

        ``vocabulary`` is a list of names (id = position) or a name -> id mapping with ids
        0..V-1. Without one, the vocabulary is the sorted set of names seen, so ids follow
        alphabetical order. Names outside the vocabulary raise unless ``unknown="skip"``.
        """
        if vocabulary is None:
            names = sorted({name for row in concepts for name in row})
            index = {name: i for i, name in enumerate(names)}
        elif isinstance(vocabulary, Mapping):
            index = dict(vocabulary)
            names = [""] * len(index)
            for name, i in index.items():
                if not 0 <= i < len(index) or names[i]:
                    raise ValueError("a vocabulary mapping must assign each of its V names a distinct id in 0..V-1")
                names[i] = name
        else:
            names = list(vocabulary)
            index = {name: i for i, name in enumerate(names)}
            if len(index) != len(names):
                raise ValueError("vocabulary has duplicate names; each concept name must appear once")
        rows: list[list[int]] = []
        for r, row in enumerate(concepts):
            ids = []
            for name in row:
                i = index.get(name)
                if i is None:
                    if unknown == "skip":
                        continue
                    raise ValueError(
                        f"sample {r}: concept {name!r} is not in the vocabulary; add it or pass unknown='skip'"
                    )
                ids.append(i)
            rows.append(ids)
        table = cls.from_id_lists(rows, n_concepts=len(names))
        return cls(table.indptr, table.concept_ids, len(names), tuple(names),
                   table.distinct_indptr, table.distinct_ids, table.distinct_counts)

    # -- access ---------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1

    def __len__(self) -> int:
        return self.n_rows

    def instance_counts(self) -> np.ndarray:
        """Concept instances per sample (|C_i| with repeats), int64."""
        return np.diff(self.indptr)

    def row(self, i: int) -> np.ndarray:
        return self.concept_ids[self.indptr[i]:self.indptr[i + 1]]

    def take(self, rows: np.ndarray | Sequence[int]) -> ConceptTable:
        """The sub-table of ``rows`` (in that order), gathered without re-sorting anything."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError("rows must be a 1-D sequence of sample indices")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row indices must lie in [0, {self.n_rows}); got [{int(rows.min())}, {int(rows.max())}]")
        ptr, pos = _gather_csr(self.indptr, rows)
        dptr, dpos = _gather_csr(self.distinct_indptr, rows)
        # rows of a valid table need no re-validation (this runs once per training step)
        sub = object.__new__(ConceptTable)
        for name, value in (("indptr", ptr), ("concept_ids", self.concept_ids[pos]), ("n_concepts", self.n_concepts),
                            ("vocabulary", self.vocabulary), ("distinct_indptr", dptr),
                            ("distinct_ids", self.distinct_ids[dpos]), ("distinct_counts", self.distinct_counts[dpos])):
            object.__setattr__(sub, name, value)
        if "_alpha_rank" in self.__dict__:
            object.__setattr__(sub, "_alpha_rank", self.__dict__["_alpha_rank"])
        return sub

    def alphabetical_rank(self) -> np.ndarray:
        """Rank of each concept id in alphabetical order of its name (the id itself without names).

        Computed once per vocabulary and shared by the tables ``take`` derives from this one.
        """
        cached = self.__dict__.get("_alpha_rank")
        if cached is not None:
            return cached
        if self.vocabulary is None:
            rank = np.arange(self.n_concepts, dtype=np.int64)
        else:
            order = sorted(range(self.n_concepts), key=self.vocabulary.__getitem__)
            rank = np.empty(self.n_concepts, dtype=np.int64)
            rank[np.asarray(order, dtype=np.int64)] = np.arange(self.n_concepts, dtype=np.int64)
        object.__setattr__(self, "_alpha_rank", rank)
        return rank


def _distinct_csr(indptr: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = indptr.size - 1
    row_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    order = np.lexsort((ids, row_of))
    r, c = row_of[order], ids[order]
    first = np.ones(c.size, dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, c.size))
    d_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(r[starts], minlength=n), out=d_ptr[1:])
    return d_ptr, c[starts], counts.astype(np.int64)


def _gather_csr(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New indptr and the flat positions of ``rows``' entries, vectorised."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    new_ptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_ptr[1:])
    total = int(new_ptr[-1])
    # position k of the output belongs to row j: source = starts[j] + (k - new_ptr[j])
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - new_ptr[:-1], lengths)
    return new_ptr, pos


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CabsResult:
    """A selected batch.

    ``indices`` are positions in the super-batch table, in pick order (FM: sorted order), always
    exactly b of them. ``gains[k]`` is the score of pick k when it was taken (FM: its instance
    count; NaN for reference-mode random fill and padding). ``zero_gain_count`` counts greedy picks
    that added nothing (gain 0 in paper mode, gain <= 0 in reference mode, instance count 0 in FM).
    ``random_fill_count`` and ``padded_count`` (reference mode only) count picks taken at random
    from the remaining valid samples, and picks taken from invalidated samples because even the
    random fill could not reach b (the reference code would have returned a short batch).
    """

    indices: np.ndarray
    gains: np.ndarray
    mode: str
    zero_gain_count: int
    random_fill_count: int = 0
    padded_count: int = 0
    n_distinct_concepts: int = 0
    target: float | None = None

    def __len__(self) -> int:
        return int(self.indices.size)


def _check_b(table: ConceptTable, b: int) -> int:
    if not isinstance(table, ConceptTable):
        raise TypeError(f"expected a ConceptTable, got {type(table).__name__}; build one with ConceptTable.from_id_lists")
    b = int(b)
    if not 1 <= b <= table.n_rows:
        raise ValueError(f"batch size b={b} must lie in [1, super-batch size {table.n_rows}]")
    return b


# ---------------------------------------------------------------------------------------------
# CABS-FM
# ---------------------------------------------------------------------------------------------


def cabs_fm(table: ConceptTable, b: int) -> CabsResult:
    """Keep the b samples with the most concept instances; ties keep super-batch order."""
    b = _check_b(table, b)
    h = table.instance_counts()
    picks = np.argsort(-h, kind="stable")[:b]
    gains = h[picks].astype(np.float64)
    return CabsResult(picks, gains, "fm", int(np.count_nonzero(gains == 0)),
                      n_distinct_concepts=int(np.count_nonzero(np.bincount(table.distinct_ids, minlength=table.n_concepts))))


# ---------------------------------------------------------------------------------------------
# CABS-DM
# ---------------------------------------------------------------------------------------------


def cabs_dm(
    table: ConceptTable,
    b: int,
    mode: DmMode = "paper",
    *,
    cap: int = REFERENCE_CAP,
    seed: int | np.random.Generator | None = 0,
) -> CabsResult:
    """Greedy diversity-maximising selection of exactly b samples from the super-batch ``table``.

    ``cap`` and ``seed`` are used by ``mode="reference"`` only (the concept cap and the random
    fill of a shortfall).
    """
    return _dm(table, b, mode, cap, seed, compiled=True)


def cabs_dm_python(
    table: ConceptTable,
    b: int,
    mode: DmMode = "paper",
    *,
    cap: int = REFERENCE_CAP,
    seed: int | np.random.Generator | None = 0,
) -> CabsResult:
    """:func:`cabs_dm` through the previous pure-Python lazy greedy (:func:`_lazy_greedy`).

    Kept as the baseline the compiled greedy is checked against, pick for pick and gain for gain,
    by tests/test_cabs.py and timed against by benchmarks/cabs.py. Same arguments and result.
    """
    return _dm(table, b, mode, cap, seed, compiled=False)


def _dm(table: ConceptTable, b: int, mode: DmMode, cap: int, seed: int | np.random.Generator | None,
        compiled: bool) -> CabsResult:
    b = _check_b(table, b)
    if mode == "paper":
        return _dm_paper(table, b, compiled)
    if mode == "reference":
        if isinstance(cap, bool) or int(cap) != cap or int(cap) < 1:
            raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
        return _dm_reference(table, b, int(cap), seed, compiled)
    raise ValueError(f"unknown DM mode {mode!r}; use 'paper' or 'reference'")


class _RowScorer:
    """Gains of any set of rows: per-concept terms summed left to right, divided by the row length.

    The sums are accumulated in a fixed left-to-right order, bit-identical to
    ``s = 0.0; for v in row: s += v`` (np.add.reduceat would switch to pairwise summation on longer
    rows), because the greedy's tie-breaking depends on the exact float result. Rows are held as a
    padded (width x n) matrix of concept ids whose padding points at a sentinel concept scoring
    0.0, unless a few very long rows would make that matrix wasteful.
    """

    def __init__(self, indptr: np.ndarray, ids: np.ndarray, sentinel: int) -> None:
        self.indptr = indptr
        self.ids = ids
        n = indptr.size - 1
        self.lengths = np.diff(indptr)
        self.divisor = np.maximum(self.lengths, 1)  # empty rows: 0.0 / 1
        width = int(self.lengths.max()) if n else 0
        self.padded: np.ndarray | None = None
        if width * n <= 4 * ids.size + 16 * n:
            padded = np.full((width, n), sentinel, dtype=np.int64)
            row_of = np.repeat(np.arange(n, dtype=np.int64), self.lengths)
            padded[np.arange(ids.size, dtype=np.int64) - indptr[:-1][row_of], row_of] = ids
            self.padded = padded

    def gains_all(self, terms: np.ndarray) -> np.ndarray:
        return _sequential_row_sums(terms[self.ids], self.indptr) / self.divisor

    def gains(self, terms: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.padded is not None:
            width = int(self.lengths[rows].max()) if rows.size else 0
            if width == 0:
                return np.zeros(rows.size, dtype=np.float64)
            t = terms[self.padded[:width, rows]]
            sums = t[0].copy()
            for w in range(1, width):
                sums += t[w]
        else:
            ptr, pos = _gather_csr(self.indptr, rows)
            sums = _sequential_row_sums(terms[self.ids[pos]], ptr)
        return sums / self.divisor[rows]


def _sequential_row_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Left-to-right row sums of CSR ``values`` (see _RowScorer for why the order matters)."""
    n = indptr.size - 1
    lengths = np.diff(indptr)
    sums = np.zeros(n, dtype=np.float64)
    if n == 0 or values.size == 0:
        return sums
    by_len = np.argsort(-lengths, kind="stable")
    n_longer = np.searchsorted(-lengths[by_len], -np.arange(int(lengths.max())), side="left")
    starts = indptr[:-1]
    for w, k in enumerate(n_longer.tolist()):  # rows with length > w are by_len[:k]
        rows = by_len[:k]
        sums[rows] += values[starts[rows] + w]
    return sums


# Tuning of the lazy greedy (measured on the Zipf benchmark; any values give the same picks).
_SINGLE_MAX = 32  # stale stretches up to this long are re-scored one by one in Python
_BLOCK_MAX = 256  # longer ones in numpy blocks of at most this many rows
_SINGLE_COST = 6  # a Python re-score costs about as much as this many rows of a numpy block
_BLOCK_COST = 100  # fixed cost of one numpy block, in rows
_REBUILD_FRACTION: float | None = 1.0  # rebuild once re-score work exceeds this x remaining candidates


def _lazy_greedy(
    b: int,
    candidates: np.ndarray,
    scorer: _RowScorer,
    pl: list[int],
    cl: list[int],
    terms: np.ndarray,
    term_list: list[float],
    pending: list[int],
    changed_at: list[int],
    on_pick: Callable[[int, int, int, int], None],
    stop_at_zero: bool,
) -> tuple[list[int], list[float]]:
    """Exact greedy arg-max selection (ties to the lowest index) under non-increasing gains.

    Candidates live in sorted "runs" of (gain desc, index asc) whose entries were all scored at
    the same moment (the run's stamp = picks done then), and as single re-scored entries with
    their own stamp. A heap holds each run's front and every single. The best heap entry is the
    true arg-max unless one of its concepts changed after its stamp, because gains only fall and
    so every other stored gain bounds its true gain from above. The loop walks the best run while
    its entries stay fresh and ahead of the next heap entry. At a stale front, the entries of that
    run ahead of the next heap entry are re-scored: a short stretch one by one in Python (each
    becomes a single), a long one in a vectorised block that becomes a new run. Once the re-score
    work since the last rebuild exceeds ``_REBUILD_FRACTION`` x the remaining candidates (a
    ski-rental rule), every remaining candidate is re-scored in one vectorised pass and sorted
    into a single fresh run: after popular concepts reach their targets most stored gains are
    stale, and one pass is cheaper than finding them piecemeal.

    ``on_pick(i, lo, hi, done)`` updates ``term_list``, appends each changed concept to
    ``pending`` (copied into the ``terms`` array before the next block re-score) and sets
    ``changed_at[c] = done``. A gain of -inf marks a sample that can no longer be chosen; it is
    dropped when re-scored. With ``stop_at_zero`` the loop ends after the first pick of gain 0
    (every remaining gain is then 0; the caller fills).
    """
    g = scorer.gains_all(terms)[candidates]
    order = np.argsort(-g, kind="stable")  # candidates ascend, so ties keep the lowest index
    run_arr = [candidates[order]]
    run_idx = [run_arr[0].tolist()]
    run_neg = [(-g[order]).tolist()]  # negated gains, ascending
    run_pos = [0]
    # heap entries: (-gain, index, run or -1 for a single, stamp)
    heap = [(run_neg[0][0], run_idx[0][0], 0, 0)] if candidates.size else []
    heappush, heappop = heapq.heappush, heapq.heappop
    bisect_right = bisect.bisect_right
    neg_inf, inf = -math.inf, math.inf
    picks: list[int] = []
    gains: list[float] = []
    done = 0
    work = 0
    rebuild_at = _REBUILD_FRACTION * candidates.size if _REBUILD_FRACTION else inf
    while done < b and heap:
        if work > rebuild_at:
            terms[pending] = [term_list[c] for c in pending]
            pending.clear()
            work = 0
            free = np.ones(scorer.lengths.size, dtype=bool)
            free[picks] = False
            cand = candidates[free[candidates]]
            g = scorer.gains_all(terms)[cand]
            alive = g != neg_inf
            cand, g = cand[alive], g[alive]
            order = np.argsort(-g, kind="stable")
            run_arr = [cand[order]]
            run_idx = [run_arr[0].tolist()]
            run_neg = [(-g[order]).tolist()]
            run_pos = [0]
            heap = [(run_neg[0][0], run_idx[0][0], 0, done)] if cand.size else []
            rebuild_at = _REBUILD_FRACTION * cand.size
            continue
        neg, i, r, stamp = heappop(heap)
        if r < 0:  # a single
            lo, hi = pl[i], pl[i + 1]
            for c in cl[lo:hi]:
                if changed_at[c] > stamp:
                    s = 0.0
                    for c2 in cl[lo:hi]:
                        s += term_list[c2]
                    if s != neg_inf:
                        heappush(heap, (-(s / (hi - lo)), i, -1, done))
                    work += _SINGLE_COST
                    break
            else:
                done += 1
                picks.append(i)
                gains.append(-neg)
                if stop_at_zero and neg == 0.0:
                    break
                on_pick(i, lo, hi, done)
            continue
        if heap:
            other_neg, other_i = heap[0][0], heap[0][1]
        else:
            other_neg, other_i = inf, -1
        idx, ng, p = run_idx[r], run_neg[r], run_pos[r]
        end = len(idx)
        stale = zero = False
        while p < end and done < b:
            i = idx[p]
            neg = ng[p]
            if neg > other_neg or (neg == other_neg and i > other_i):
                break  # another heap entry is ahead now
            lo, hi = pl[i], pl[i + 1]
            for c in cl[lo:hi]:
                if changed_at[c] > stamp:
                    stale = True
                    break
            if stale:
                break
            p += 1
            done += 1
            picks.append(i)
            gains.append(-neg)
            if stop_at_zero and neg == 0.0:
                zero = True
                break
            on_pick(i, lo, hi, done)
        if zero:
            break
        if stale:
            # entries behind the next heap entry cannot be picked before it: leave them be
            q = bisect_right(ng, other_neg, p + 1, min(p + _BLOCK_MAX, end))
            if q - p <= _SINGLE_MAX:
                for j in range(p, q):
                    i = idx[j]
                    lo, hi = pl[i], pl[i + 1]
                    for c in cl[lo:hi]:
                        if changed_at[c] > stamp:
                            s = 0.0
                            for c2 in cl[lo:hi]:
                                s += term_list[c2]
                            if s != neg_inf:
                                heappush(heap, (-(s / (hi - lo)), i, -1, done))
                            work += _SINGLE_COST
                            break
                    else:
                        heappush(heap, (ng[j], i, -1, stamp))
            else:
                if pending:
                    terms[pending] = [term_list[c] for c in pending]
                    pending.clear()
                block = np.sort(run_arr[r][p:q])  # index order: the stable sort below breaks ties low
                bg = scorer.gains(terms, block)
                work += block.size + _BLOCK_COST
                alive = bg != neg_inf
                if not alive.all():
                    block, bg = block[alive], bg[alive]
                if block.size:
                    o = np.argsort(-bg, kind="stable")
                    block = block[o]
                    run_arr.append(block)
                    run_idx.append(block.tolist())
                    run_neg.append((-bg[o]).tolist())
                    run_pos.append(0)
                    heappush(heap, (run_neg[-1][0], run_idx[-1][0], len(run_arr) - 1, done))
            p = q
        run_pos[r] = p
        if p < end:
            heappush(heap, (ng[p], idx[p], r, stamp))
        else:
            run_arr[r] = run_idx[r] = run_neg[r] = None  # type: ignore[call-overload]
    return picks, gains


# ---------------------------------------------------------------------------------------------
# The compiled greedy (both modes)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _dm_kernel(ptr, cl, candidates, terms, b, paper, target, targets, inv_freq, cap, stop_at_zero):
    """Exact lazy greedy of both DM modes over the rows ``cl[ptr[i]:ptr[i + 1]]``.

    One binary max-heap of candidate rows keyed by (stored gain, -position). Gains never rise, so
    a heap top none of whose concepts changed since it was scored is the true arg-max (ties to the
    lowest position); a stale top is re-scored in place and sifted down, and dropped once its gain
    is -inf (reference mode: it holds a capped concept). A gain is the left-to-right sum of the
    row's per-concept terms divided by the row length, and every term update is the expression
    of the Python greedy (:func:`_lazy_greedy` with ``on_pick``), so the floats and therefore the
    picks are the same. ``paper``: terms of distinct concepts, real target ``target``;
    otherwise per-instance counts, integer ``targets`` (as floats) and the ``cap``. Returns the
    picks and gains (the first ``done`` entries), ``done``, the per-concept counts and the number
    of stale re-scores.
    """
    n = ptr.shape[0] - 1
    n_concepts = terms.shape[0] - 1
    stamp = np.zeros(n, dtype=np.int64)
    changed_at = np.zeros(n_concepts, dtype=np.int64)
    count = np.zeros(n_concepts, dtype=np.int64)
    picks = np.empty(b, dtype=np.int64)
    gains = np.empty(b, dtype=np.float64)
    size = candidates.shape[0]
    rows = candidates.copy()
    keys = np.empty(size, dtype=np.float64)
    for j in range(size):
        i = rows[j]
        s = 0.0
        for p in range(ptr[i], ptr[i + 1]):
            s += terms[cl[p]]
        keys[j] = s / max(ptr[i + 1] - ptr[i], 1)
    for pos in range(size // 2 - 1, -1, -1):
        sift_down(keys, rows, size, pos)
    done = 0
    rescored = 0
    while done < b and size > 0:
        top = rows[0]
        lo, hi = ptr[top], ptr[top + 1]
        stale = False
        for p in range(lo, hi):
            if changed_at[cl[p]] > stamp[top]:
                stale = True
                break
        if stale:
            rescored += 1
            s = 0.0
            for p in range(lo, hi):
                s += terms[cl[p]]
            if s == -np.inf:  # holds a capped concept: never eligible again
                size -= 1
                keys[0], rows[0] = keys[size], rows[size]
            else:
                keys[0] = s / (hi - lo)
                stamp[top] = done
            if size > 0:
                sift_down(keys, rows, size, 0)
            continue
        g = keys[0]
        size -= 1
        keys[0], rows[0] = keys[size], rows[size]
        if size > 0:
            sift_down(keys, rows, size, 0)
        picks[done] = top
        gains[done] = g
        done += 1
        if stop_at_zero and g == 0.0:
            break
        for p in range(lo, hi):
            c = cl[p]
            if paper:
                cnt = count[c]
                if cnt < target:
                    cnt += 1
                    count[c] = cnt
                    terms[c] = (target - cnt) / target + inv_freq[c] if cnt < target else 0.0
                    changed_at[c] = done
            else:  # one increment per instance, as the reference counts
                cnt = count[c] + 1
                count[c] = cnt
                t = targets[c]
                if cnt <= t:
                    terms[c] = (t - cnt) / t + inv_freq[c] if cnt < t else REFERENCE_PAST_TARGET
                    changed_at[c] = done
                if cnt == cap:  # every other sample containing c becomes invalid
                    terms[c] = -np.inf
                    changed_at[c] = done
    return picks, gains, done, count, rescored


def _dm_paper(table: ConceptTable, b: int, compiled: bool = True) -> CabsResult:
    n = table.n_rows
    ptr, ids = table.distinct_indptr, table.distinct_ids
    n_concepts = table.n_concepts
    freq = np.bincount(ids, minlength=n_concepts)
    n_distinct = int(np.count_nonzero(freq))
    target = max(1.0, b / n_distinct) if n_distinct else 1.0
    present = freq > 0
    inv_freq = np.zeros(n_concepts, dtype=np.float64)
    inv_freq[present] = 1.0 / freq[present]
    terms = np.zeros(n_concepts + 1, dtype=np.float64)  # last slot: padding sentinel, always 0.0
    # (t - 0) / t is exactly 1.0, so this equals the per-pick update formula bit for bit
    terms[:n_concepts][present] = 1.0 + inv_freq[present]
    if compiled:
        k_picks, k_gains, done, _, _ = _dm_kernel(ptr, ids, np.arange(n, dtype=np.int64), terms, b, True, target,
                                               inv_freq, inv_freq, 0, True)
        picks, gains = k_picks[:done].tolist(), k_gains[:done].tolist()
    else:
        picks, gains = _python_dm_paper(b, n, ptr, ids, n_concepts, target, inv_freq, terms)
    return _finish_paper(picks, gains, n, b, n_distinct, target)


def _python_dm_paper(b: int, n: int, ptr: np.ndarray, ids: np.ndarray, n_concepts: int, target: float,
                     inv_freq: np.ndarray, terms: np.ndarray) -> tuple[list[int], list[float]]:
    scorer = _RowScorer(ptr, ids, n_concepts)
    pl, cl = ptr.tolist(), ids.tolist()
    invf = inv_freq.tolist()
    term_list = terms.tolist()
    pending: list[int] = []
    count = [0] * n_concepts
    changed_at = [0] * n_concepts

    def on_pick(i: int, lo: int, hi: int, done: int) -> None:
        for c in cl[lo:hi]:
            cnt = count[c]
            if cnt < target:
                cnt += 1
                count[c] = cnt
                term_list[c] = (target - cnt) / target + invf[c] if cnt < target else 0.0
                changed_at[c] = done
                pending.append(c)

    def on_pick_unit_target(i: int, lo: int, hi: int, done: int) -> None:
        # t = 1: a concept's first pick takes its term straight to 0.0 (same values as above)
        for c in cl[lo:hi]:
            if not count[c]:
                count[c] = 1
                term_list[c] = 0.0
                changed_at[c] = done
                pending.append(c)

    return _lazy_greedy(b, np.arange(n, dtype=np.int64), scorer, pl, cl, terms, term_list, pending,
                        changed_at, on_pick_unit_target if target == 1.0 else on_pick, True)


def _finish_paper(picks: list[int], gains: list[float], n: int, b: int, n_distinct: int,
                  target: float) -> CabsResult:
    if len(picks) < b:
        # the last pick scored 0 and gains are >= 0, so every remaining gain is 0: the tie rule
        # takes the rest by ascending index
        free = np.ones(n, dtype=bool)
        free[picks] = False
        rest = np.flatnonzero(free)[: b - len(picks)]
        picks.extend(rest.tolist())
        gains.extend([0.0] * rest.size)
    gains_arr = np.asarray(gains, dtype=np.float64)
    return CabsResult(np.asarray(picks, dtype=np.int64), gains_arr, "dm-paper",
                      int(np.count_nonzero(gains_arr == 0.0)), n_distinct_concepts=n_distinct, target=target)


def reference_targets(
    table: ConceptTable, b: int, cap: int = REFERENCE_CAP, alpha_rank: np.ndarray | None = None
) -> np.ndarray:
    """Per-concept integer targets as the reference code sets them (0 for absent concepts).

    base = min(b // K, cap); the first ``b % K`` present concepts in alphabetical order get one
    more while base < cap; every target is clipped to [1, cap]; if they then sum to more than b
    they are scaled by b / sum, truncated, and clipped to [1, cap] again.
    """
    freq = np.bincount(table.distinct_ids, minlength=table.n_concepts)
    present = np.flatnonzero(freq)
    k = present.size
    targets = np.zeros(table.n_concepts, dtype=np.int64)
    if k == 0:
        return targets
    if alpha_rank is None:
        alpha_rank = table.alphabetical_rank()
    base = min(b // k, cap)
    remainder = b % k
    alpha_order = present[np.argsort(alpha_rank[present], kind="stable")]
    t = np.full(k, base, dtype=np.int64)
    if base < cap:
        t[:remainder] += 1
    t = np.maximum(np.minimum(t, cap), 1)
    total = int(t.sum())
    if total > b:
        t = np.maximum(1, np.minimum((t * (b / total)).astype(np.int64), cap))
    targets[alpha_order] = t
    return targets

def _dm_reference(table: ConceptTable, b: int, cap: int, seed: int | np.random.Generator | None,
                  compiled: bool = True) -> CabsResult:
    n = table.n_rows
    ptr, ids = table.indptr, table.concept_ids  # instances in stored order: the reference's mean
    n_concepts = table.n_concepts
    freq = np.bincount(table.distinct_ids, minlength=n_concepts)  # super-batch document frequency
    n_distinct = int(np.count_nonzero(freq))
    targets = reference_targets(table, b, cap)
    present = freq > 0
    inv_freq = np.zeros(n_concepts, dtype=np.float64)
    inv_freq[present] = 1.0 / freq[present]
    terms = np.zeros(n_concepts + 1, dtype=np.float64)  # last slot: padding sentinel
    # (t - 0) / t is exactly 1.0 (every present concept has a target >= 1)
    terms[:n_concepts][present] = 1.0 + inv_freq[present]
    lengths = np.diff(ptr)
    # samples without concepts score -inf in the reference: only the random fill can take them
    candidates = np.flatnonzero(lengths > 0)
    if compiled:
        k_picks, k_gains, done, k_count, _ = _dm_kernel(ptr, ids, candidates, terms, b, False, 1.0,
                                                     targets.astype(np.float64), inv_freq, cap, False)
        picks, gains, count = k_picks[:done].tolist(), k_gains[:done].tolist(), k_count
    else:
        picks, gains, count = _python_dm_reference(b, cap, ptr, ids, n_concepts, candidates, targets, inv_freq,
                                                   terms)
    n_greedy = len(picks)
    zero_gain = sum(1 for g in gains if g <= 0.0)
    random_fill = padded = 0
    if n_greedy < b:
        taken = np.zeros(n, dtype=bool)
        taken[picks] = True
        capped = np.asarray(count, dtype=np.int64) >= cap
        has_capped = np.zeros(n, dtype=bool)
        has_capped[np.repeat(np.arange(n, dtype=np.int64), lengths)[capped[ids]]] = True
        valid = np.flatnonzero(~taken & ~has_capped)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        fill = rng.choice(valid, size=min(b - n_greedy, valid.size), replace=False) if valid.size else valid
        random_fill = int(fill.size)
        picks.extend(fill.tolist())
        taken[fill] = True
        if len(picks) < b:
            pad = np.flatnonzero(~taken)[: b - len(picks)]
            padded = int(pad.size)
            picks.extend(pad.tolist())
            warnings.warn(
                f"CABS-DM reference mode: only {n_greedy} greedy picks and {random_fill} valid samples for the "
                f"random fill; padded the batch with {padded} samples that contain capped concepts "
                f"(cap={cap}) so that it still has b={b} samples. Raise cap (thresher select cabs --cap) or the "
                "super-batch size to avoid this.",
                RuntimeWarning,
                stacklevel=4,
            )
    gains_arr = np.full(b, math.nan, dtype=np.float64)
    gains_arr[:n_greedy] = gains
    return CabsResult(np.asarray(picks, dtype=np.int64), gains_arr, "dm-reference", zero_gain,
                      random_fill, padded, n_distinct_concepts=n_distinct)


def _python_dm_reference(b: int, cap: int, ptr: np.ndarray, ids: np.ndarray, n_concepts: int,
                         candidates: np.ndarray, targets: np.ndarray, inv_freq: np.ndarray,
                         terms: np.ndarray) -> tuple[list[int], list[float], list[int]]:
    scorer = _RowScorer(ptr, ids, n_concepts)
    pl, cl = ptr.tolist(), ids.tolist()
    invf = inv_freq.tolist()
    tl = targets.astype(np.float64).tolist()
    term_list = terms.tolist()
    pending: list[int] = []
    count = [0] * n_concepts
    changed_at = [0] * n_concepts
    past, neg_inf = REFERENCE_PAST_TARGET, -math.inf

    def on_pick(i: int, lo: int, hi: int, done: int) -> None:
        for c in cl[lo:hi]:  # one increment per instance, as the reference counts
            cnt = count[c] + 1
            count[c] = cnt
            t = tl[c]
            if cnt <= t:  # the term moves while the count was below its target
                term_list[c] = (t - cnt) / t + invf[c] if cnt < t else past
                changed_at[c] = done
                pending.append(c)
            if cnt == cap:  # every other sample containing c becomes invalid
                term_list[c] = neg_inf
                changed_at[c] = done
                pending.append(c)

    picks, gains = _lazy_greedy(b, candidates, scorer, pl, cl, terms, term_list, pending, changed_at, on_pick,
                                False)
    return picks, gains, count


# ---------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------


def select_batch(
    table: ConceptTable,
    b: int,
    method: Literal["dm", "fm"] = "dm",
    dm_mode: DmMode = "paper",
    *,
    cap: int = REFERENCE_CAP,
    seed: int | np.random.Generator | None = 0,
) -> CabsResult:
    """CABS-DM or CABS-FM on one super-batch."""
    if method == "fm":
        return cabs_fm(table, b)
    if method == "dm":
        return cabs_dm(table, b, dm_mode, cap=cap, seed=seed)
    raise ValueError(f"unknown CABS method {method!r}; use 'dm' or 'fm'")


def batch_size_for(superbatch: int, filter_ratio: float, power_of_two: bool = False) -> int:
    """b = round((1 - f) * B), at least 1.

    ``power_of_two``: the largest power of two not above that, as the reference's batch sizes
    are (B = 20,480 -> 4,096 and 5,120 -> 1,024 at f = 0.8 are unchanged; B = 10,000 keeps 1,024
    instead of 2,000). Rounding down keeps at least the fraction f filtered out.
    """
    if not 0.0 <= filter_ratio < 1.0:
        raise ValueError(f"filter ratio must lie in [0, 1), got {filter_ratio}")
    if superbatch < 1:
        raise ValueError(f"super-batch size must be >= 1, got {superbatch}")
    b = max(1, int(round((1.0 - filter_ratio) * superbatch)))
    return 1 << (b.bit_length() - 1) if power_of_two else b
