"""CABS per-step latency on one CPU core, against a naive re-scan, plus batch concept metrics.

    python benchmarks/cabs.py            # ~20 steps per method at B=20,480->4,096 and 5,120->1,024
    python benchmarks/cabs.py --quick    # a smoke run (few steps, naive baseline at B=5,120 only)

Synthetic data: a pool of 4 x B samples, each with Poisson(3) concept instances drawn from a
12,000-concept vocabulary with Zipf(1) frequencies. Every timed step draws a fresh IID super-batch
of B samples from the pool (``ConceptTable.take``, timed separately) and selects b = 0.2 B.

The process pins itself to one core (sched_setaffinity) and limits BLAS/OpenMP to one thread.
Latencies are medians over steps; "cpu" is process CPU time (robust to other load on a shared
machine), "wall" is elapsed time. DM runs compiled (numba); its first call in the process compiles
it or loads numba's on-disk cache and is timed apart. Every step also runs the previous pure-Python
greedy (``cabs_dm_python``) on the same super-batch, checks that picks and gains are identical, and
the table prints previous / compiled as a ratio measured in the same run. The slow baseline is the naive DM algorithm (re-score every
remaining sample at every pick), vectorised with numpy so that it is not a Python-loop strawman
(tests/oracles/cabs_naive.py::rescan_dm_paper_numpy); the run also checks that its picks equal the
fast implementation's. Memory: tracemalloc peak of one DM-paper step, and the process's peak RSS.

Real data: the NLVR dev split's ``structured_rep`` (../shared/data/image_text/nlvr_dev/dev.json):
each object gives the concepts ``<type>`` and ``<colour> <type>``, one instance per object.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from oracles.cabs_naive import rescan_dm_paper_numpy  # noqa: E402

from pipeline.select.batch_metrics import (  # noqa: E402
    compare_to_iid,
    concept_frequencies,
    format_reports,
    long_tail_mask,
)
from pipeline.select.cabs import ConceptTable, batch_size_for, cabs_dm, cabs_dm_python, cabs_fm  # noqa: E402

TARGET_MS = 20.0  # issue 12 item 3: DM paper <= 20 ms per step at B = 20,480 -> b = 4,096 on one core

NLVR = REPO.parent / "shared" / "data" / "image_text" / "nlvr_dev" / "dev.json"
VOCAB = 12_000


def zipf_pool(n: int, rng: np.random.Generator, vocab: int = VOCAB, lam: float = 3.0) -> ConceptTable:
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    lengths = rng.poisson(lam, size=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return ConceptTable(indptr, rng.choice(vocab, size=int(indptr[-1]), p=p), vocab)


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def ms(x: float) -> str:
    return f"{x * 1e3:9.2f}"


def bench_size(pool: ConceptTable, big_b: int, steps: int, naive_steps: int, rng: np.random.Generator) -> dict:
    b = batch_size_for(big_b, 0.8)
    methods: dict[str, Callable[[ConceptTable], object]] = {
        "DM paper": lambda t: cabs_dm(t, b),
        "DM reference": lambda t: cabs_dm(t, b, "reference", seed=0),
        "FM": lambda t: cabs_fm(t, b),
        "DM paper prev": lambda t: cabs_dm_python(t, b),
        "DM ref prev": lambda t: cabs_dm_python(t, b, "reference", seed=0),
    }
    results: dict[str, object] = {}
    cpu: dict[str, list[float]] = {k: [] for k in ("take", *methods)}
    wall: dict[str, list[float]] = {k: [] for k in cpu}
    identical: list[bool] = []
    meta: dict[str, list[float]] = {"distinct": [], "target": [], "ref_fill": [], "ref_pad": []}
    warmup = pool.take(rng.choice(pool.n_rows, big_b, replace=False))
    for fn in methods.values():
        fn(warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            rows = rng.choice(pool.n_rows, big_b, replace=False)
            sb, c, w = timed(lambda: pool.take(rows))
            cpu["take"].append(c)
            wall["take"].append(w)
            for name, fn in methods.items():
                res, c, w = timed(lambda: fn(sb))  # noqa: B023
                cpu[name].append(c)
                wall[name].append(w)
                results[name] = res
                if name == "DM paper":
                    meta["distinct"].append(res.n_distinct_concepts)
                    meta["target"].append(res.target)
                if name == "DM reference":
                    meta["ref_fill"].append(res.random_fill_count)
                    meta["ref_pad"].append(res.padded_count)
            for new, prev in (("DM paper", "DM paper prev"), ("DM reference", "DM ref prev")):
                a, p = results[new], results[prev]
                identical.append(bool(np.array_equal(a.indices, p.indices)
                                      and np.array_equal(a.gains, p.gains, equal_nan=True)))
    naive_cpu, naive_wall, same = [], [], []
    for _ in range(naive_steps):
        rows = rng.choice(pool.n_rows, big_b, replace=False)
        sb = pool.take(rows)
        lists = [sb.row(i).tolist() for i in range(sb.n_rows)]
        picks, c, w = timed(lambda: rescan_dm_paper_numpy(lists, b))  # noqa: B023
        naive_cpu.append(c)
        naive_wall.append(w)
        same.append(picks == cabs_dm(sb, b).indices.tolist())
    # peak memory of one DM-paper step
    sb = pool.take(rng.choice(pool.n_rows, big_b, replace=False))
    tracemalloc.start()
    cabs_dm(sb, b)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"B": big_b, "b": b, "cpu": cpu, "wall": wall, "naive_cpu": naive_cpu, "naive_wall": naive_wall,
            "naive_same": same, "peak_bytes": peak, "meta": meta, "identical": identical}


def print_latency(r: dict) -> None:
    print(f"\n## B = {r['B']:,} -> b = {r['b']:,}   (median distinct concepts per super-batch "
          f"{statistics.median(r['meta']['distinct']):,.0f}, paper target t = {statistics.median(r['meta']['target']):.3f}; "
          f"reference mode random fill {statistics.median(r['meta']['ref_fill']):.0f}, padding "
          f"{statistics.median(r['meta']['ref_pad']):.0f})")
    print(f"{'step':<16}{'cpu med ms':>11}{'cpu min ms':>11}{'wall med ms':>12}{'steps':>7}{'naive/this':>12}")
    naive_med = statistics.median(r["naive_cpu"]) if r["naive_cpu"] else float("nan")
    for name in r["cpu"]:
        c, w = r["cpu"][name], r["wall"][name]
        ratio = naive_med / statistics.median(c) if name == "DM paper" and r["naive_cpu"] else None
        print(f"{name:<16}{ms(statistics.median(c))}  {ms(min(c))}  {ms(statistics.median(w))} {len(c):6d}"
              + (f"{ratio:11.1f}x" if ratio else ""))
    if r["naive_cpu"]:
        print(f"{'naive re-scan DM':<16}{ms(statistics.median(r['naive_cpu']))}  {ms(min(r['naive_cpu']))}  "
              f"{ms(statistics.median(r['naive_wall']))} {len(r['naive_cpu']):6d}       1.0x   "
              f"(identical picks to DM paper: {all(r['naive_same'])})")
    med = {name: statistics.median(c) for name, c in r["cpu"].items()}
    for new, prev in (("DM paper", "DM paper prev"), ("DM reference", "DM ref prev")):
        ratios = [p / n for n, p in zip(r["cpu"][new], r["cpu"][prev])]
        print(f"{new}: compiled / previous = {med[new] / med[prev]:.3f} (medians, CPU); per-step speed-up "
              f"median {statistics.median(ratios):.1f}x, range {min(ratios):.1f}-{max(ratios):.1f}x")
    print(f"picks and gains identical to the previous implementation on all {len(r['identical'])} "
          f"(step, mode) pairs: {all(r['identical'])}")
    if r["B"] == 20_480:
        print(f"target: DM paper <= {TARGET_MS:.0f} ms per step at B = 20,480 on one core -> "
              f"{med['DM paper'] * 1e3:.2f} ms CPU median ({'met' if med['DM paper'] * 1e3 <= TARGET_MS else 'NOT met'})")
    print(f"tracemalloc peak of one DM-paper step: {r['peak_bytes'] / 2**20:.1f} MiB")
    if not all(r["identical"]):
        raise SystemExit("MISMATCH: the compiled DM differs from the previous implementation")


def metrics_table(title: str, sb: ConceptTable, b: int, tail: np.ndarray, seed: int, draws: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        picks = {
            "CABS-DM paper": cabs_dm(sb, b).indices,
            "CABS-DM ref": cabs_dm(sb, b, "reference", seed=seed).indices,
            "CABS-FM": cabs_fm(sb, b).indices,
        }
    reports: dict = {}
    ratios = []
    iid_mean = iid_std = None
    for name, sel in picks.items():
        cmp = compare_to_iid(sb, sel, tail=tail, n_draws=draws, seed=seed)
        reports[name] = cmp.selected
        iid_mean, iid_std = cmp.iid_mean, cmp.iid_std
        ratios.append(f"{name}: distinct x{cmp.ratio('distinct_concepts'):.2f}, entropy x{cmp.ratio('entropy_bits'):.2f}, "
                      f"tail share x{cmp.ratio('tail_instance_share'):.2f}, instances/sample x{cmp.ratio('mean_instances'):.2f}")
    reports[f"IID (mean of {draws})"] = iid_mean
    reports["IID std"] = iid_std  # spread of the draws: how far a single IID batch strays
    print(f"\n## {title}: batch of {b} from a super-batch of {sb.n_rows}")
    print(format_reports(reports))
    for line in ratios:
        print("  vs IID  " + line)


def nlvr_table(path: Path, superbatch: int, seed: int, draws: int) -> None:
    if not path.is_file():
        print(f"\n## NLVR real data: skipped, {path} is absent")
        return
    rows = []
    with path.open() as fh:
        for line in fh:
            rec = json.loads(line)
            rows.append([name for box in rec["structured_rep"] for obj in box
                         for name in (obj["type"], f"{obj['color'].lower()} {obj['type']}")])
    table = ConceptTable.from_name_lists(rows)
    rng = np.random.default_rng(seed)
    big_b = min(superbatch, table.n_rows)
    sb = table.take(rng.choice(table.n_rows, big_b, replace=False))
    tail = long_tail_mask(concept_frequencies(table))  # tail from the whole dev split
    print(f"\nNLVR dev: {table.n_rows} rows, {table.n_concepts} concepts, "
          f"{table.concept_ids.size / table.n_rows:.1f} instances per row")
    metrics_table("NLVR dev (real concepts)", sb, batch_size_for(big_b, 0.8), tail, seed, draws)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, naive baseline at B=5,120 only")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method and size (default 20)")
    ap.add_argument("--naive-steps", type=int, default=2, help="steps of the slow naive baseline (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nlvr", type=Path, default=NLVR)
    ap.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the first allowed)")
    args = ap.parse_args()

    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0] if args.core is None else args.core
    os.sched_setaffinity(0, {core})
    steps = 3 if args.quick else args.steps
    print(f"CABS benchmark: pinned to core {core} of {len(allowed)}; load average {os.getloadavg()[0]:.2f}; "
          f"numpy {np.__version__}; python {sys.version.split()[0]}")
    from pipeline.select.cabs import _dm_kernel

    tiny = ConceptTable.from_id_lists([[0, 1], [1], [2]], n_concepts=3)
    t0 = time.perf_counter()
    cabs_dm(tiny, 2)
    first = time.perf_counter() - t0
    print(f"compiled DM, first call in this process (compile, or load numba's cache: "
          f"{sum(_dm_kernel.stats.cache_hits.values())} cache hit(s)): {first:.2f} s, not in the step times")
    rng = np.random.default_rng(args.seed)
    results = []
    for big_b in (20_480, 5_120):
        pool = zipf_pool(4 * big_b, rng)
        naive = 0 if args.quick and big_b == 20_480 else (1 if args.quick else args.naive_steps)
        results.append(bench_size(pool, big_b, steps, naive, rng))
        print_latency(results[-1])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\nprocess RSS: peak {peak_rss:.0f} MiB, current {psutil.Process().memory_info().rss / 2**20:.0f} MiB; "
          f"load average now {os.getloadavg()[0]:.2f}")

    draws = 3 if args.quick else 10
    pool = zipf_pool(4 * 20_480, np.random.default_rng(args.seed + 1))
    sb = pool.take(np.random.default_rng(args.seed + 2).choice(pool.n_rows, 20_480, replace=False))
    tail = long_tail_mask(concept_frequencies(pool))  # tail from the whole pool
    metrics_table("Synthetic Zipf", sb, 4096, tail, args.seed, draws)
    nlvr_table(args.nlvr, 500, args.seed, draws)


if __name__ == "__main__":
    main()
