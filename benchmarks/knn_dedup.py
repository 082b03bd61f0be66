"""kNN graph (IVF vs exact) and semantic dedup (SemDeDup-style vs all-pairs) on synthetic vectors.

    python benchmarks/knn_dedup.py                 # 1M x 384 (needs ~6 GiB free)
    python benchmarks/knn_dedup.py --n 200000      # when memory or time is short
    python benchmarks/knn_dedup.py --quick         # 50k rows, a smoke run

Data: ``--n`` rows in ``--d`` dims drawn from 100 overlapping Gaussian topics with a shared
32-dimensional latent factor (so that neighbours are meaningful, as in real embeddings) plus
isotropic noise; ``--dup-frac`` of the rows are replaced by noisy copies of other rows (planted
near-duplicates, cosine ~0.999).

Baselines measured in the same run:
* exact kNN: FAISS flat (brute force, BLAS) on a subsample of ``--queries`` rows, repeated
  ``--repeats`` times; the full-graph time is EXTRAPOLATED linearly (time per query x n).
* exact dedup: all-pairs blocked matrix products for a subsample of rows against all n;
  the full time is EXTRAPOLATED (time per row x n / 2, since each pair is needed once).
Recall of the IVF graph and of semdedup is measured against those exact answers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.index.device import describe_device  # noqa: E402
from pipeline.index.faiss_index import (  # noqa: E402
    IndexSpec,
    build_index,
    choose_spec,
    l2_normalize,
    recall_at_k,
)
from pipeline.index.knn_graph import knn_graph, symmetrize_graph  # noqa: E402
from pipeline.index.semdedup import semdedup  # noqa: E402

GIB = 1024**3


# ------------------------------------------------------------------ measurement helpers


class RssSampler:
    """Peak resident set size over a block, sampled every 50 ms (psutil)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user+sys of this process: less sensitive to other load than wall time
    load_avg: float = 0.0  # 1-minute load average at the end: how shared the machine was
    peak_rss_gib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


STAGES: list[Stage] = []


@contextmanager
def stage(name: str) -> Iterator[Stage]:
    record = Stage(name)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        c0 = time.process_time()
        yield record
        record.seconds = time.perf_counter() - t0
        record.cpu_seconds = time.process_time() - c0
    record.peak_rss_gib = rss.peak / GIB
    record.load_avg = os.getloadavg()[0]
    STAGES.append(record)
    extra = ", ".join(f"{k}={v}" for k, v in record.extra.items())
    print(f"    {record.seconds:9.2f} s wall  {record.cpu_seconds:9.2f} s cpu  load {record.load_avg:4.1f}  "
          f"peak RSS {record.peak_rss_gib:5.2f} GiB   {extra}", flush=True)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


# ------------------------------------------------------------------ data


def synthetic(n: int, d: int, *, dup_frac: float, seed: int, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, originals, copies): clustered vectors with planted near-duplicate pairs."""
    rng = np.random.default_rng(seed)
    # 100 overlapping topics (centre scale 0.6 against a unit-variance latent part): calibrated
    # so that IVF at choose_spec's nprobe reaches ~0.97 recall@10 at 100k rows, not a trivial 1.0
    n_centers = 100
    latent = 32
    centers = 0.6 * rng.normal(size=(n_centers, d)).astype(np.float32)
    mixing = (rng.normal(size=(latent, d)) / np.sqrt(latent)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = rng.normal(size=(m, latent)).astype(np.float32)
        x[lo : lo + m] = centers[rng.integers(0, n_centers, m)] + z @ mixing
        x[lo : lo + m] += 0.3 * rng.normal(size=(m, d)).astype(np.float32)
    n_dups = int(n * dup_frac)
    pool = rng.choice(n, 2 * n_dups, replace=False)
    originals, copies = pool[:n_dups], pool[n_dups:]
    x[copies] = x[originals] + 0.05 * rng.normal(size=(n_dups, d)).astype(np.float32)
    return x, originals, copies


def drop_self_rows(positions: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    is_self = positions == rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False
    return positions[keep].reshape(len(rows), -1)[:, :k]


def neighbour_rows(graph: Any, rows: np.ndarray, k: int) -> np.ndarray:
    """(len(rows), k) destinations of the given rows, padded with -1 where a row has fewer."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        dst, _ = graph.neighbors(int(r))
        out[i, : len(dst[:k])] = dst[:k]
    return out


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="rows (default 1M)")
    parser.add_argument("--d", type=int, default=384, help="dimension (default 384)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="50k rows, 500 queries, 2 repeats")
    parser.add_argument("--queries", type=int, default=1000, help="rows in the exact-baseline subsample")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of subsample timings (median)")
    parser.add_argument("--threshold", type=float, default=0.95, help="semdedup cosine threshold")
    parser.add_argument("--dup-frac", type=float, default=0.01, help="fraction of rows that are planted copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16_384, help="query batch of the kNN graph")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the nprobe sweep")
    parser.add_argument("--force", action="store_true", help="run even if free memory looks short")
    parser.add_argument("--json", type=Path, help="also write all figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.repeats = 50_000, 500, 2

    n, d, k = args.n, args.d, args.k
    data_gib = n * d * 4 / GIB
    need_gib = 3.3 * data_gib + 0.5  # data + IVF copy + flat copy + batches and edges
    avail_gib = psutil.virtual_memory().available / GIB
    dev = describe_device()
    print(f"faiss {faiss.__version__} on {dev.name}, {faiss.omp_get_max_threads()} OpenMP threads, "
          f"{psutil.cpu_count()} CPUs")
    print(f"n={n:,} d={d} k={k}: data {data_gib:.2f} GiB, estimated peak {need_gib:.1f} GiB, available {avail_gib:.1f} GiB")
    if need_gib > 0.8 * avail_gib and not args.force:
        print("not enough free memory for this --n; rerun with a smaller --n (e.g. 200000) or --force")
        return 2

    with stage("generate synthetic data") as st:
        x, originals, copies = synthetic(n, d, dup_frac=args.dup_frac, seed=args.seed)
        st.extra["planted_pairs"] = len(copies)

    rng = np.random.default_rng(args.seed + 1)
    sub = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
    xq = x[sub]

    # ---------------------------------------------------------------- indexes
    spec = choose_spec(n, d)
    if spec.kind == "flat":  # tiny --n: still compare an IVF against exact
        spec = IndexSpec(kind="ivf_flat", nlist=max(1, round(4 * np.sqrt(n))), nprobe=8, train_sample=n)
    with stage(f"build {spec.kind} (nlist={spec.nlist}, nprobe={spec.nprobe})") as st:
        ivf = build_index(x, spec=spec, recall_queries=1000)
        st.extra.update(train_s=ivf.info.train_seconds, add_s=ivf.info.add_seconds,
                        recorded_recall_at_10=ivf.info.recall_at_10)
    with stage("build exact flat index") as st:
        flat = build_index(x, spec=IndexSpec(kind="flat"), recall_queries=0)

    # ---------------------------------------------------------------- exact vs IVF on the subsample
    with stage(f"exact kNN on {len(sub)} query rows x{args.repeats}") as st:
        exact_med, exact_times, exact_pos = median_time(
            lambda: drop_self_rows(flat.search_positions(xq, k + 1)[1], sub, k), args.repeats)
        st.extra["median_s"] = round(exact_med, 3)
    with stage(f"IVF kNN on {len(sub)} query rows x{args.repeats}") as st:
        ivf_med, ivf_times, ivf_pos = median_time(
            lambda: drop_self_rows(ivf.search_positions(xq, k + 1)[1], sub, k), args.repeats)
        ivf_sub_recall = recall_at_k(ivf_pos, exact_pos)
        st.extra.update(median_s=round(ivf_med, 3), recall_at_10=round(ivf_sub_recall, 4))

    sweep: list[dict[str, float]] = []
    if not args.skip_sweep and spec.kind != "flat":
        with stage("nprobe sweep on the subsample"):
            base = spec.nprobe
            for nprobe in sorted({max(1, base // 4), max(1, base // 2), base, min(spec.nlist, base * 2)}):
                ivf.tune(nprobe=nprobe)
                med, _, pos = median_time(lambda: drop_self_rows(ivf.search_positions(xq, k + 1)[1], sub, k), args.repeats)
                sweep.append({"nprobe": nprobe, "median_s": round(med, 4), "recall_at_10": round(recall_at_k(pos, exact_pos), 4),
                              "speedup_vs_exact": round(exact_med / med, 2)})
                print(f"    nprobe={nprobe:4d}  {med:7.3f} s  recall@10={sweep[-1]['recall_at_10']:.4f}  "
                      f"speedup vs exact {exact_med / med:6.1f}x", flush=True)
            ivf.tune(nprobe=base)
    del flat

    # ---------------------------------------------------------------- full IVF graph
    with stage(f"IVF kNN graph (method=ivf_lists), all {n:,} rows, k={k}") as st:
        graph = knn_graph(ivf, k=k, method="ivf_lists", batch_size=args.batch_size)
        st.extra["edges"] = graph.num_edges
    ivf_graph_s = STAGES[-1].seconds
    graph_recall = recall_at_k(neighbour_rows(graph, sub, k), exact_pos)
    recorded_recall = ivf.info.recall_at_10
    with stage("symmetrize graph") as st:
        sym = symmetrize_graph(graph)
        st.extra["edges"] = sym.num_edges
    del sym, graph, ivf
    exact_graph_extrapolated = exact_med / len(sub) * n
    search_graph_extrapolated = ivf_med / len(sub) * n

    # ---------------------------------------------------------------- dedup
    with stage(f"semdedup (threshold={args.threshold})") as st:
        result = semdedup(x, threshold=args.threshold, seed=args.seed)
        rep = result.report
        st.extra.update(clusters=rep.n_clusters, groups=rep.n_groups, removed=rep.n_removed,
                        kmeans_s=rep.kmeans_seconds, pairs_s=rep.pairs_seconds)
    dedup_s = STAGES[-1].seconds
    planted_found = float(np.mean(result.group[originals] == result.group[copies])) if len(copies) else 1.0

    def all_pairs_for_subsample() -> tuple[np.ndarray, np.ndarray]:
        """Exact: every pair (sub row, any row) with cosine >= threshold, blocked over all rows."""
        qn = l2_normalize(xq)
        hits_r, hits_c = [], []
        for lo in range(0, n, 65_536):
            sims = qn @ l2_normalize(x[lo : lo + 65_536]).T
            r, c = np.nonzero(sims >= args.threshold)
            hits_r.append(sub[r])
            hits_c.append(c + lo)
        r, c = np.concatenate(hits_r), np.concatenate(hits_c)
        return r[r != c], c[r != c]

    with stage(f"exact all-pairs dedup for {len(sub)} rows x{args.repeats}") as st:
        naive_med, _, (pr, pc) = median_time(all_pairs_for_subsample, args.repeats)
        st.extra["median_s"] = round(naive_med, 3)
    naive_extrapolated = naive_med / len(sub) * n / 2
    pair_recall = float(np.mean(result.group[pr] == result.group[pc])) if len(pr) else 1.0

    # ---------------------------------------------------------------- summary
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    summary = {
        "n": n, "d": d, "k": k, "device": dev.name, "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(), "queries": len(sub), "repeats": args.repeats,
        "index": {"kind": spec.kind, "nlist": spec.nlist, "nprobe": spec.nprobe,
                  "train_sample": spec.train_sample, "recorded_recall_at_10": recorded_recall},
        "knn": {
            "exact_subsample_median_s": round(exact_med, 4), "exact_subsample_times_s": [round(t, 4) for t in exact_times],
            "ivf_subsample_median_s": round(ivf_med, 4), "ivf_subsample_times_s": [round(t, 4) for t in ivf_times],
            "subsample_speedup": round(exact_med / ivf_med, 2),
            "ivf_subsample_recall_at_10": round(ivf_sub_recall, 4),
            "ivf_lists_full_graph_s": round(ivf_graph_s, 2),
            "ivf_lists_full_graph_recall_at_10_on_subsample": round(graph_recall, 4),
            "ivf_search_full_graph_s_EXTRAPOLATED": round(search_graph_extrapolated, 1),
            "exact_full_graph_s_EXTRAPOLATED": round(exact_graph_extrapolated, 1),
            "full_graph_speedup_vs_extrapolated_exact": round(exact_graph_extrapolated / ivf_graph_s, 2),
            "full_graph_speedup_vs_extrapolated_ivf_search": round(search_graph_extrapolated / ivf_graph_s, 2),
            "nprobe_sweep": sweep,
        },
        "dedup": {
            "seconds": round(dedup_s, 2), "report": rep.to_dict(),
            "planted_pairs": int(len(copies)), "planted_pairs_grouped": round(planted_found, 4),
            "exact_pairs_in_subsample": int(len(pr)), "exact_pair_recall": round(pair_recall, 4),
            "all_pairs_subsample_median_s": round(naive_med, 4),
            "all_pairs_full_s_EXTRAPOLATED": round(naive_extrapolated, 1),
            "speedup_vs_extrapolated_all_pairs": round(naive_extrapolated / dedup_s, 2),
        },
        "stages": [{"name": s.name, "seconds": round(s.seconds, 2), "cpu_seconds": round(s.cpu_seconds, 2),
                    "load_avg": round(s.load_avg, 2), "peak_rss_gib": round(s.peak_rss_gib, 2), **s.extra}
                   for s in STAGES],
        "peak_rss_gib": round(peak_gib, 2),
    }

    kn, dd = summary["knn"], summary["dedup"]
    print("\n=== kNN graph ===")
    print(f"index {spec.kind}: nlist={spec.nlist} nprobe={spec.nprobe} train_sample={spec.train_sample}; "
          f"recall@10 recorded at build = {recorded_recall}")
    print(f"{len(sub)} query rows, median of {args.repeats}: exact {exact_med:.3f} s, IVF search {ivf_med:.3f} s "
          f"-> {kn['subsample_speedup']}x; IVF search recall@10 {ivf_sub_recall:.4f}")
    print(f"full graph: IVF ivf_lists {ivf_graph_s:.1f} s (measured once), recall@10 on the subsample "
          f"{graph_recall:.4f}")
    print(f"            IVF per-row search {search_graph_extrapolated:.1f} s (EXTRAPOLATED) -> speedup of "
          f"ivf_lists {kn['full_graph_speedup_vs_extrapolated_ivf_search']}x")
    print(f"            exact (flat) {exact_graph_extrapolated:.1f} s (EXTRAPOLATED) -> speedup of "
          f"ivf_lists {kn['full_graph_speedup_vs_extrapolated_exact']}x")
    print("\n=== semantic dedup ===")
    print(f"semdedup {dedup_s:.1f} s (k-means {rep.kmeans_seconds:.1f} s into {rep.n_clusters} clusters, "
          f"pairs {rep.pairs_seconds:.1f} s): {rep.n_groups} groups, {rep.n_removed} removed, histogram {rep.group_size_histogram}")
    print(f"planted pairs grouped: {planted_found:.4f} of {len(copies)}; exact pairs >= {args.threshold} touching "
          f"the subsample: {len(pr)}, recovered {pair_recall:.4f}")
    print(f"all-pairs baseline: {naive_med:.3f} s for {len(sub)} rows -> {naive_extrapolated:.1f} s for all "
          f"(EXTRAPOLATED) -> speedup of semdedup {dd['speedup_vs_extrapolated_all_pairs']}x")
    print(f"\npeak RSS (ru_maxrss) {peak_gib:.2f} GiB; per stage above")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
