"""Instance graphs for GAIS: five ways to connect N labelled instances.

Every builder returns a :class:`Graph` whose edge list is directed with both directions present,
free of self loops and duplicates, so that a GAT can treat ``src -> dst`` as "dst attends to src".

Scalable variants (``minibatch``, ``hash``, ``multilevel``, ``multiview``) only ever compare an
instance with the members of a small group (a mini-batch or a hash bucket whose size is capped),
so their cost is O(N * group size * d) plus an O(E log E) deduplication sort. ``knn`` is the exact
FAISS baseline, O(N^2 d), meant for small N.

Hashing centres the projections on the data mean (the hyperplanes pass through the centre of the
data; otherwise, for data far from the origin, every instance would land on the same side). That
is an offset of the hyperplanes, not a rescaling: feature scaling is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

VARIANTS: tuple[str, ...] = ("minibatch", "hash", "multilevel", "multiview", "knn")

# Codes are packed into int64; one bit is kept free so shifts never reach the sign bit.
_MAX_BITS = 62


@dataclass(frozen=True)
class MiniBatchConfig:
    """Stratified mini-batches; k nearest neighbours inside each batch.

    kNN (rather than "all pairs under a distance quantile") keeps the degree, and so the GAT's
    memory, fixed and predictable whatever the local density.
    """

    batch_size: int = 1024
    k: int = 10
    block_rows: int = 1024


@dataclass(frozen=True)
class HashConfig:
    """Single-level sign-of-random-projection LSH; k nearest neighbours inside each bucket.

    ``n_bits=None`` picks ``round(log2(N / target_bucket_size))`` (at least 1) so the average
    bucket holds about ``target_bucket_size`` instances. Buckets above ``max_bucket_size`` are
    cut into near-equal contiguous chunks along one extra random direction. Instances that end
    with fewer than ``min_neighbors`` neighbours are attached by dropping trailing code bits
    until the coarser bucket holds other instances (see :func:`_attach_orphans`).
    """

    n_bits: int | None = None
    target_bucket_size: int = 64
    k: int = 10
    max_bucket_size: int = 512
    min_neighbors: int = 1
    block_rows: int = 1024


@dataclass(frozen=True)
class MultiLevelConfig:
    """Coarse-to-fine LSH.

    Level 0: ``coarse_bits`` hyperplanes through the data mean (``None``: ``round(log2(N /
    coarse_target_size))``, at least 0). Level 1: every coarse bucket larger than
    ``2 * fine_target_size`` is split by ``ceil(log2(size / fine_target_size))`` further
    hyperplanes through *that bucket's* mean, so fine buckets are balanced even when coarse
    buckets are not. Edges = kNN (``k``) inside each fine bucket UNION, for every instance of a
    split coarse bucket, its ``k_cross`` nearest among the fine buckets at Hamming distance 1
    inside the same coarse bucket (capped at ``max_cross_candidates``, seeded subsample): two
    neighbours separated by one fine hyperplane therefore still meet at the coarse level.
    """

    coarse_bits: int | None = None
    coarse_target_size: int = 1024
    fine_target_size: int = 64
    k: int = 10
    k_cross: int = 3
    max_bucket_size: int = 512
    max_cross_candidates: int = 2048
    min_neighbors: int = 1
    block_rows: int = 1024


@dataclass(frozen=True)
class MultiViewConfig:
    """``n_views`` independent single-level hash tables; their edge sets are united."""

    n_views: int = 4
    n_bits: int | None = None
    target_bucket_size: int = 64
    k: int = 5
    max_bucket_size: int = 512
    min_neighbors: int = 1
    block_rows: int = 1024


@dataclass(frozen=True)
class KNNConfig:
    """Exact k nearest neighbours over all instances (FAISS IndexFlatL2): the quadratic baseline."""

    k: int = 10


GraphConfig = MiniBatchConfig | HashConfig | MultiLevelConfig | MultiViewConfig | KNNConfig

_CONFIG_TYPES: dict[str, type] = {
    "minibatch": MiniBatchConfig,
    "hash": HashConfig,
    "multilevel": MultiLevelConfig,
    "multiview": MultiViewConfig,
    "knn": KNNConfig,
}


@dataclass
class Graph:
    """Directed edge list ``src -> dst`` over ``n_nodes`` nodes (both directions present).

    ``groups`` labels each node with the mini-batch or (fine) bucket it was compared within;
    the GAT trains on unions of whole groups when the graph is too large for one pass, so most
    edges survive in the induced subgraphs. ``None`` for ``knn``.
    """

    src: np.ndarray
    dst: np.ndarray
    n_nodes: int
    variant: str
    groups: np.ndarray | None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.src.shape[0])

    def degree(self) -> np.ndarray:
        return np.bincount(self.src, minlength=self.n_nodes)


def default_config(variant: str) -> GraphConfig:
    _check_variant(variant)
    return _CONFIG_TYPES[variant]()


def build_graph(
    X: np.ndarray,
    variant: str,
    config: GraphConfig | None = None,
    *,
    y: np.ndarray | None = None,
    seed: int = 0,
) -> Graph:
    """Build the ``variant`` graph over the rows of ``X``.

    ``y`` (class labels) is required by ``minibatch`` (stratified batches) and ignored otherwise.
    """
    _check_variant(variant)
    X = _as_features(X)
    if config is None:
        config = default_config(variant)
    expected = _CONFIG_TYPES[variant]
    if not isinstance(config, expected):
        raise TypeError(
            f"variant {variant!r} takes a {expected.__name__}, got {type(config).__name__}"
        )
    with single_torch_thread():
        return _build(X, variant, config, y, seed)


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch ops single-threaded inside the block, restoring the thread count after.

    Graph building is thousands of small GEMM + top-k calls. On the shared 2-core development
    machine, under load from other processes, two intra-op threads made those calls 3-40x slower
    (spinning threads wait on a busy core) while one thread lost at most 2x on an idle machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(
    X: np.ndarray, variant: str, config: GraphConfig, y: np.ndarray | None, seed: int
) -> Graph:
    if variant == "minibatch":
        if y is None:
            raise ValueError("the minibatch variant needs class labels y for stratified batches")
        return minibatch_graph(X, y, config, seed=seed)
    if variant == "hash":
        return hash_graph(X, config, seed=seed)
    if variant == "multilevel":
        return multilevel_graph(X, config, seed=seed)
    if variant == "multiview":
        return multiview_graph(X, config, seed=seed)
    return knn_graph(X, config)


# --------------------------------------------------------------------------------------------
# Variants


def minibatch_graph(
    X: np.ndarray, y: np.ndarray, config: MiniBatchConfig = MiniBatchConfig(), *, seed: int = 0
) -> Graph:
    """Stratified mini-batches of at most ``batch_size``; kNN inside each batch.

    Each class is shuffled (seeded), classes are laid end to end and position p goes to batch
    ``p % n_batches``: every batch then holds floor or ceil of ``n_c / n_batches`` instances of
    each class c, and batch sizes differ by at most one.
    """
    X = _as_features(X)
    n = X.shape[0]
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must have one label per row of X ({n}), got shape {y.shape}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be at least 2, got {config.batch_size}")
    _check_k(config.k)
    rng = np.random.default_rng(seed)
    _, y_codes = np.unique(y, return_inverse=True)
    parts = []
    for c in range(int(y_codes.max()) + 1):
        members = np.flatnonzero(y_codes == c)
        parts.append(members[rng.permutation(members.size)])
    laid_out = np.concatenate(parts)
    n_batches = max(1, math.ceil(n / config.batch_size))
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[laid_out] = np.arange(n, dtype=np.int64) % n_batches
    src, dst, group_stats = _knn_within_groups(X, batch_of, config.k, config.block_rows)
    src, dst = symmetrize(src, dst, n)
    return _finish(src, dst, n, "minibatch", batch_of, {**group_stats, "n_batches": n_batches})


def hash_graph(X: np.ndarray, config: HashConfig = HashConfig(), *, seed: int = 0) -> Graph:
    """Single-level random-projection LSH: kNN within each (capped) bucket, orphans attached."""
    X = _as_features(X)
    n = X.shape[0]
    _check_k(config.k)
    _check_cap(config.max_bucket_size)
    rng = np.random.default_rng(seed)
    n_bits = _auto_bits(n, config.n_bits, config.target_bucket_size, minimum=1)
    codes = _sign_codes(X, n_bits, rng)
    groups = _split_large_groups(X, codes, config.max_bucket_size, rng)
    src, dst, group_stats = _knn_within_groups(X, groups, config.k, config.block_rows)
    src, dst = symmetrize(src, dst, n)
    src, dst, orphan_stats = _attach_orphans(
        X, codes, n_bits, src, dst, config.min_neighbors, config.k, config.max_bucket_size, rng,
        config.block_rows,
    )
    stats = {**group_stats, **orphan_stats, "n_bits": n_bits}
    return _finish(src, dst, n, "hash", groups, stats)


def multilevel_graph(
    X: np.ndarray, config: MultiLevelConfig = MultiLevelConfig(), *, seed: int = 0
) -> Graph:
    """Coarse buckets, each large one split by bucket-centred fine hyperplanes; see the config."""
    X = _as_features(X)
    n = X.shape[0]
    _check_k(config.k)
    _check_cap(config.max_bucket_size)
    if config.k_cross < 0:
        raise ValueError(f"k_cross must be >= 0, got {config.k_cross}")
    if config.fine_target_size < 2:
        raise ValueError(f"fine_target_size must be at least 2, got {config.fine_target_size}")
    rng = np.random.default_rng(seed)
    coarse_bits = _auto_bits(n, config.coarse_bits, config.coarse_target_size, minimum=0)
    coarse = _sign_codes(X, coarse_bits, rng) if coarse_bits else np.zeros(n, dtype=np.int64)

    order = np.argsort(coarse, kind="stable")
    starts, sizes = _runs(coarse[order])
    split_threshold = 2 * config.fine_target_size
    fine_bits_per_bucket = np.where(
        sizes > split_threshold,
        np.ceil(np.log2(np.maximum(sizes, 1) / config.fine_target_size)).astype(np.int64),
        0,
    )
    max_fine = int(fine_bits_per_bucket.max()) if sizes.size else 0
    if coarse_bits + max_fine > _MAX_BITS:
        raise ValueError(
            f"multilevel needs {coarse_bits}+{max_fine} code bits, more than {_MAX_BITS}; "
            "raise fine_target_size or coarse_target_size"
        )
    fine = np.zeros(n, dtype=np.int64)
    fine_bits_of_node = np.zeros(n, dtype=np.int64)
    if max_fine:
        # One shared set of fine directions, but each coarse bucket centres them on its own mean.
        directions = rng.standard_normal((X.shape[1], max_fine)).astype(np.float32)
        for start, size, bits in zip(starts, sizes, fine_bits_per_bucket):
            if bits == 0:
                continue
            idx = order[start:start + size]
            proj = X[idx] @ directions[:, :bits]
            proj -= proj.mean(axis=0, keepdims=True)
            fine[idx] = _pack_bits(proj > 0)
            fine_bits_of_node[idx] = bits
    # Full code: coarse bits on top, the node's fine bits left-aligned below them, so dropping
    # trailing bits coarsens fine bits first, then coarse bits.
    full_code = (coarse << max_fine) | (fine << (max_fine - fine_bits_of_node))
    n_bits_total = coarse_bits + max_fine

    groups = _split_large_groups(X, full_code, config.max_bucket_size, rng)
    src_f, dst_f, group_stats = _knn_within_groups(X, groups, config.k, config.block_rows)
    src_c, dst_c, cross_stats = _cross_sibling_edges(
        X, full_code, fine_bits_of_node, max_fine, config.k_cross,
        config.max_cross_candidates, rng, config.block_rows,
    )
    src, dst = symmetrize(np.concatenate([src_f, src_c]), np.concatenate([dst_f, dst_c]), n)
    src, dst, orphan_stats = _attach_orphans(
        X, full_code, n_bits_total, src, dst, config.min_neighbors, config.k,
        config.max_bucket_size, rng, config.block_rows,
    )
    stats = {
        **group_stats, **cross_stats, **orphan_stats,
        "coarse_bits": coarse_bits, "max_fine_bits": max_fine,
        "n_coarse_buckets": int(sizes.size), "max_coarse_bucket_size": int(sizes.max()),
        "n_fine_edges": int(src_f.size), "n_cross_edges": int(src_c.size),
    }
    return _finish(src, dst, n, "multilevel", groups, stats)


def multiview_graph(
    X: np.ndarray, config: MultiViewConfig = MultiViewConfig(), *, seed: int = 0
) -> Graph:
    """Union of ``n_views`` independent hash tables' bucket-kNN edges.

    Orphans are attached once, after the union, along view 0's code (the union rarely leaves any).
    ``groups`` are view 0's buckets.
    """
    X = _as_features(X)
    n = X.shape[0]
    if config.n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {config.n_views}")
    _check_k(config.k)
    _check_cap(config.max_bucket_size)
    rng = np.random.default_rng(seed)
    n_bits = _auto_bits(n, config.n_bits, config.target_bucket_size, minimum=1)
    srcs, dsts = [], []
    first_codes = first_groups = None
    max_group = 0
    for _view in range(config.n_views):
        codes = _sign_codes(X, n_bits, rng)
        groups = _split_large_groups(X, codes, config.max_bucket_size, rng)
        s, d, group_stats = _knn_within_groups(X, groups, config.k, config.block_rows)
        max_group = max(max_group, int(group_stats["max_group_size"]))
        srcs.append(s)
        dsts.append(d)
        if first_codes is None:
            first_codes, first_groups = codes, groups
    src, dst = symmetrize(np.concatenate(srcs), np.concatenate(dsts), n)
    del srcs, dsts
    src, dst, orphan_stats = _attach_orphans(
        X, first_codes, n_bits, src, dst, config.min_neighbors, config.k,
        config.max_bucket_size, rng, config.block_rows,
    )
    stats = {**orphan_stats, "n_bits": n_bits, "n_views": config.n_views,
             "max_group_size": max_group}
    return _finish(src, dst, n, "multiview", first_groups, stats)


def knn_graph(X: np.ndarray, config: KNNConfig = KNNConfig()) -> Graph:
    """Exact kNN over all instances with a FAISS flat (brute-force L2) index."""
    import faiss  # local: only this baseline needs it

    X = np.ascontiguousarray(_as_features(X), dtype=np.float32)
    n = X.shape[0]
    _check_k(config.k)
    k = min(config.k, n - 1)
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    # Ask for one extra hit: the query itself normally comes back first, but exact duplicates
    # can push it down, so self is filtered by id rather than by position.
    _, nbrs = index.search(X, k + 1)
    rows = np.repeat(np.arange(n, dtype=np.int64), k + 1)
    cols = nbrs.reshape(-1).astype(np.int64)
    keep = (cols != rows) & (cols >= 0)
    rows, cols = rows[keep], cols[keep]
    # Keep at most k per query (when self was absent, k + 1 others came back).
    rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    keep = rank < k
    src, dst = symmetrize(cols[keep], rows[keep], n)
    return _finish(src, dst, n, "knn", None, {"max_group_size": n, "k": k})


# --------------------------------------------------------------------------------------------
# Edge-list helpers


def symmetrize(src: np.ndarray, dst: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of every edge, no self loops, no duplicates; sorted by (src, dst)."""
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    both_src = np.concatenate([src, dst])
    both_dst = np.concatenate([dst, src])
    keep = both_src != both_dst
    keys = both_src[keep] * np.int64(n_nodes) + both_dst[keep]
    del both_src, both_dst, keep
    # Sort-and-compare rather than np.unique: numpy 2's hash-based unique is several times
    # slower on tens of millions of int64 keys.
    keys.sort()
    if keys.size:
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return keys // n_nodes, keys % n_nodes


def _finish(
    src: np.ndarray, dst: np.ndarray, n: int, variant: str, groups: np.ndarray | None,
    stats: dict,
) -> Graph:
    degree = np.bincount(src, minlength=n)
    stats = {
        **{k: float(v) for k, v in stats.items()},
        "n_edges": float(src.size),
        "mean_degree": float(degree.mean()),
        "max_degree": float(degree.max()),
        "n_isolated": float(np.count_nonzero(degree == 0)),
    }
    return Graph(src=src, dst=dst, n_nodes=n, variant=variant, groups=groups, stats=stats)


def _knn_within_groups(
    X: np.ndarray, labels: np.ndarray, k: int, block_rows: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Directed edges neighbour -> node for the k nearest neighbours of each node in its group."""
    order = np.argsort(labels, kind="stable")
    starts, sizes = _runs(labels[order])
    n_out = int(np.sum(sizes * np.minimum(k, sizes - 1)))
    src = np.empty(n_out, dtype=np.int64)
    dst = np.empty(n_out, dtype=np.int64)
    pos = 0
    for start, size in zip(starts.tolist(), sizes.tolist()):
        kk = min(k, size - 1)
        if kk <= 0:
            continue
        idx = order[start:start + size]
        nbr_local = _block_knn(X[idx], X[idx], kk, block_rows, exclude_diagonal=True)
        m = size * kk
        src[pos:pos + m] = idx[nbr_local.reshape(-1)]
        dst[pos:pos + m] = np.repeat(idx, kk)
        pos += m
    stats = {
        "n_groups": int(sizes.size),
        "max_group_size": int(sizes.max()),
        "median_group_size": float(np.median(sizes)),
        "n_singleton_groups": int(np.count_nonzero(sizes == 1)),
    }
    return src[:pos], dst[:pos], stats


def _block_knn(
    queries: np.ndarray,
    cands: np.ndarray,
    k: int,
    block_rows: int,
    *,
    exclude_diagonal: bool = False,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Indices into ``cands`` of the k nearest candidates of each query (unordered).

    Squared distances come from one matrix multiply per block of ``block_rows`` queries, so
    memory stays at block_rows x len(cands). ``exclude_diagonal`` (queries are the candidates)
    or ``exclude[i]`` (candidate index to skip for query i, -1 for none) removes self matches.
    Runs on torch: its threaded GEMM + topk stayed fast on this shared 2-core machine where
    OpenBLAS's spinning threads slowed numpy's matmul several-fold under load.
    """
    q_all = torch.from_numpy(np.ascontiguousarray(queries))
    c = torch.from_numpy(np.ascontiguousarray(cands))
    cn = (c * c).sum(dim=1)
    ct = c.T.contiguous()
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for b0 in range(0, queries.shape[0], block_rows):
        q = q_all[b0:b0 + block_rows]
        d = torch.addmm(cn.unsqueeze(0), q, ct, alpha=-2.0)
        rows = torch.arange(q.shape[0])
        if exclude_diagonal:
            d[rows, rows + b0] = float("inf")
        if exclude is not None:
            ex = torch.from_numpy(exclude[b0:b0 + block_rows])
            has = ex >= 0
            d[rows[has], ex[has]] = float("inf")
        out[b0:b0 + q.shape[0]] = d.topk(k, dim=1, largest=False, sorted=False).indices.numpy()
    return out


def _cross_sibling_edges(
    X: np.ndarray,
    full_code: np.ndarray,
    fine_bits_of_node: np.ndarray,
    max_fine: int,
    k_cross: int,
    max_candidates: int,
    rng: np.random.Generator,
    block_rows: int,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """For each fine bucket, k_cross nearest among its Hamming-1 siblings in the same coarse bucket."""
    empty = np.empty(0, dtype=np.int64)
    split = np.flatnonzero(fine_bits_of_node > 0)
    if k_cross == 0 or split.size == 0:
        return empty, empty, {"max_cross_candidates_used": 0}
    order = split[np.argsort(full_code[split], kind="stable")]
    starts, sizes = _runs(full_code[order])
    bucket_key = full_code[order[starts]]
    lookup = {int(key): (int(s), int(z)) for key, s, z in zip(bucket_key, starts, sizes)}
    srcs, dsts = [], []
    max_used = 0
    for key, start, size in zip(bucket_key.tolist(), starts.tolist(), sizes.tolist()):
        bits = int(fine_bits_of_node[order[start]])
        # Fine bits are left-aligned under the coarse bits, so the lowest one sits at max_fine - bits.
        sib_parts = []
        for j in range(bits):
            sib_key = key ^ (1 << (max_fine - bits + j))
            hit = lookup.get(sib_key)
            if hit is not None:
                sib_parts.append(order[hit[0]:hit[0] + hit[1]])
        if not sib_parts:
            continue
        cands = np.concatenate(sib_parts)
        if cands.size > max_candidates:
            cands = np.sort(rng.choice(cands, size=max_candidates, replace=False))
        kk = min(k_cross, cands.size)
        queries = order[start:start + size]
        nbr_local = _block_knn(X[queries], X[cands], kk, block_rows)
        srcs.append(cands[nbr_local.reshape(-1)])
        dsts.append(np.repeat(queries, kk))
        max_used = max(max_used, int(cands.size))
    if not srcs:
        return empty, empty, {"max_cross_candidates_used": 0}
    return np.concatenate(srcs), np.concatenate(dsts), {"max_cross_candidates_used": max_used}


def _attach_orphans(
    X: np.ndarray,
    codes: np.ndarray,
    n_bits: int,
    src: np.ndarray,
    dst: np.ndarray,
    min_neighbors: int,
    k: int,
    cap: int,
    rng: np.random.Generator,
    block_rows: int,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Give every node with fewer than ``min_neighbors`` neighbours up to k more.

    Trailing code bits are dropped one at a time; at the first level where the node's coarser
    bucket holds at least ``min_neighbors`` other nodes, the node is joined to its k nearest
    members of that bucket (a seeded subsample of ``cap`` if larger). Dropping one bit merges a
    bucket with its Hamming-distance-1 sibling, so this is "merge with the nearest bucket in
    Hamming distance along the bit order"; at 0 bits the bucket is the whole data set, so the
    loop always ends.
    """
    n = X.shape[0]
    if min_neighbors > k:
        raise ValueError(
            f"min_neighbors ({min_neighbors}) cannot exceed k ({k}): a fallback adds at most k"
        )
    need = min(max(min_neighbors, 1), n - 1)
    degree = np.bincount(src, minlength=n)
    orphans = np.flatnonzero(degree < need)
    stats = {"n_orphans": int(orphans.size), "max_fallback_candidates": 0,
             "max_fallback_bits_dropped": 0}
    if orphans.size == 0:
        return src, dst, stats
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    new_src, new_dst = [], []
    pending = orphans
    for level in range(n_bits - 1, -1, -1):
        if pending.size == 0:
            break
        shift = n_bits - level
        sorted_prefix = sorted_codes >> shift
        prefix = codes[pending] >> shift
        lo = np.searchsorted(sorted_prefix, prefix, side="left")
        hi = np.searchsorted(sorted_prefix, prefix, side="right")
        ok = (hi - lo - 1) >= need
        done = pending[ok]
        for p in np.unique(prefix[ok]).tolist():
            queries = done[prefix[ok] == p]
            l0 = int(np.searchsorted(sorted_prefix, p, side="left"))
            h0 = int(np.searchsorted(sorted_prefix, p, side="right"))
            cands = order[l0:h0]
            if cands.size > cap + queries.size:
                others = np.setdiff1d(cands, queries, assume_unique=True)
                picked = rng.choice(others, size=min(cap, others.size), replace=False)
                cands = np.sort(np.concatenate([picked, queries]))
            # Every query is among the candidates; find where, to mask its self match.
            sorter = np.argsort(cands)
            exclude = sorter[np.searchsorted(cands[sorter], queries)]
            kk = min(k, cands.size - 1)
            nbr_local = _block_knn(X[queries], X[cands], kk, block_rows, exclude=exclude)
            new_src.append(cands[nbr_local.reshape(-1)])
            new_dst.append(np.repeat(queries, kk))
            stats["max_fallback_candidates"] = max(stats["max_fallback_candidates"], int(cands.size))
            stats["max_fallback_bits_dropped"] = max(stats["max_fallback_bits_dropped"], shift)
        pending = pending[~ok]
    if new_src:
        src, dst = symmetrize(
            np.concatenate([src, *new_src]), np.concatenate([dst, *new_dst]), n
        )
    return src, dst, stats


# --------------------------------------------------------------------------------------------
# Hashing helpers


def _sign_codes(X: np.ndarray, n_bits: int, rng: np.random.Generator) -> np.ndarray:
    """int64 code whose bit b (most significant first) is sign((x - mean) . r_b)."""
    directions = rng.standard_normal((X.shape[1], n_bits)).astype(np.float32)
    offset = X.mean(axis=0, dtype=np.float64).astype(np.float32) @ directions
    codes = np.empty(X.shape[0], dtype=np.int64)
    for b0 in range(0, X.shape[0], 262144):
        codes[b0:b0 + 262144] = _pack_bits((X[b0:b0 + 262144] @ directions) > offset)
    return codes


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    code = np.zeros(bits.shape[0], dtype=np.int64)
    for j in range(bits.shape[1]):
        code = (code << 1) | bits[:, j].astype(np.int64)
    return code


def _split_large_groups(
    X: np.ndarray, labels: np.ndarray, cap: int, rng: np.random.Generator
) -> np.ndarray:
    """Relabel so no group exceeds ``cap``: big groups are cut into near-equal contiguous chunks
    along one random direction (members of a chunk stay close along that direction)."""
    direction = rng.standard_normal(X.shape[1]).astype(np.float32)
    order = np.argsort(labels, kind="stable")
    starts, sizes = _runs(labels[order])
    sub = np.zeros(X.shape[0], dtype=np.int64)
    for start, size in zip(starts[sizes > cap].tolist(), sizes[sizes > cap].tolist()):
        idx = order[start:start + size]
        along = np.argsort(X[idx] @ direction, kind="stable")
        n_chunks = math.ceil(size / cap)
        sub[idx[along]] = np.arange(size, dtype=np.int64) * n_chunks // size
    dense = _dense_labels(labels, order)
    if not np.any(sub):
        return dense
    combined = dense * (sub.max() + 1) + sub
    return _dense_labels(combined, np.argsort(combined, kind="stable"))


def _dense_labels(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Map labels to 0..n_distinct-1 in sorted order, given an argsort of them."""
    sorted_labels = labels[order]
    new_run = np.concatenate([[0], (sorted_labels[1:] != sorted_labels[:-1]).astype(np.int64)])
    dense = np.empty(labels.size, dtype=np.int64)
    dense[order] = np.cumsum(new_run)
    return dense


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths of runs of equal values in a sorted array."""
    if sorted_values.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    change = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    sizes = np.diff(np.concatenate([starts, [sorted_values.size]])).astype(np.int64)
    return starts, sizes


def _auto_bits(n: int, n_bits: int | None, target: int, *, minimum: int) -> int:
    if n_bits is None:
        if target < 1:
            raise ValueError(f"target bucket size must be at least 1, got {target}")
        n_bits = round(math.log2(max(n / target, 1.0)))
    n_bits = max(minimum, int(n_bits))
    if n_bits > _MAX_BITS:
        raise ValueError(f"n_bits must be at most {_MAX_BITS} (codes are int64), got {n_bits}")
    return n_bits


# --------------------------------------------------------------------------------------------
# Validation


def _as_features(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D (instances x features) array, got shape {X.shape}")
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 instances to build a graph, got {X.shape[0]}")
    if not np.issubdtype(X.dtype, np.number):
        raise TypeError(f"X must be numeric, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values; impute or drop them first")
    return X


def _check_variant(variant: str) -> None:
    if variant not in _CONFIG_TYPES:
        raise ValueError(f"unknown graph variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _check_cap(cap: int) -> None:
    if cap < 2:
        raise ValueError(f"max_bucket_size must be at least 2, got {cap}")
