"""GAIS at scale: graph build, GAT training and scoring time, peak RSS and growth with N.

Data: a synthetic Gaussian mixture (``--classes`` classes x ``--clusters`` clusters each,
``--dim`` dimensions, unit-variance clusters around centres drawn with scale ``--spread``),
generated with a fixed seed, float32.

Each (variant, N) runs in its own subprocess so its peak RSS (ru_maxrss, which includes the
data: N x dim x 4 bytes) is its own. Exact kNN (the quadratic baseline) runs in full only up to
``--knn-max-full``; above that its graph time is EXTRAPOLATED from a timed subsample of queries
against the full index (time x N / n_queries), and GAT/scoring are not run for it.

The log-log slope of time against N (least squares over the sizes) says how cost grows: ~1 is
linear, ~2 is quadratic.

    python benchmarks/gais.py --quick
    python benchmarks/gais.py --sizes 100000,300000,1000000

``--baselines`` instead runs the small-data baseline table (issue 12): scikit-learn's bundled
iris, wine, breast_cancer and digits, stratified 5-fold CV repeated for ``--cv-seeds``, GAIS
(``--variants``, default multilevel; the paper's same_class rule and the same_class_coverage
extension) against random stratified, k-means nearest-to-centre, k-medoids, herding (all with
GAIS's per-class counts), condensed and edited nearest neighbour (their own reduction), with
1-NN and logistic-regression accuracy, reduction and time, then the like-for-like 1-NN table
and the verdict. It prints the machine and the time taken.

    python benchmarks/gais.py --baselines
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCALABLE = ("minibatch", "hash", "multilevel", "multiview")


def make_mixture(
    n: int, dim: int, n_classes: int, clusters: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture in float32, written chunk by chunk so memory stays at N x dim x 4."""
    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((n_classes * clusters, dim)) * spread).astype(np.float32)
    cluster = rng.integers(0, n_classes * clusters, size=n)
    X = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 262144):
        e = min(n, s + 262144)
        X[s:e] = centres[cluster[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32)
    return X, (cluster % n_classes).astype(np.int64)


def one_nn_accuracy(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray,
                    test_y: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(train_X.shape[1])
    index.add(np.ascontiguousarray(train_X))
    _, nn = index.search(np.ascontiguousarray(test_X), 1)
    return float(np.mean(train_y[nn[:, 0]] == test_y))


def worker(args: argparse.Namespace) -> dict:
    """Run one (variant, N) measurement in this process and return its figures."""
    import torch

    from pipeline.evaluate.instance_selection import random_stratified_mask
    from pipeline.select.gais import GATConfig, gais_select
    from pipeline.select.gais.graphs import single_torch_thread

    n = args.n
    # Generate train + test from one mixture so they share the cluster centres.
    X_all, y_all = make_mixture(n + args.test_size, args.dim, args.classes, args.clusters,
                                args.spread, args.seed)
    X, y = X_all[:n], y_all[:n]
    X_test, y_test = X_all[n:], y_all[n:]
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out: dict = {"variant": args.variant, "n": n, "rss_after_data_gib": rss_data,
                 "torch_threads": args.threads}

    if args.variant == "knn" and n > args.knn_max_full:
        import faiss

        with single_torch_thread():
            faiss.omp_set_num_threads(args.threads)
            t0 = time.perf_counter()
            index = faiss.IndexFlatL2(X.shape[1])
            index.add(X)
            add_s = time.perf_counter() - t0
            queries = np.random.default_rng(0).choice(n, size=args.knn_queries, replace=False)
            t0 = time.perf_counter()
            index.search(X[queries], 11)
            search_s = time.perf_counter() - t0
        out.update({
            "extrapolated": True, "knn_queries": args.knn_queries,
            "graph_s": add_s + search_s * n / args.knn_queries,
            "measured_search_s": search_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        })
        return out

    import faiss

    faiss.omp_set_num_threads(args.threads)
    gat_config = GATConfig(epochs=args.epochs, num_threads=args.threads,
                           train_mode=args.train_mode, batch_nodes=args.batch_nodes)
    res = gais_select(X, y, variant=args.variant, reduction=args.reduction,
                      scoring=args.scoring, seed=args.seed, gat_config=gat_config)
    out.update({"extrapolated": False, **res.timings,
                "gat_mode": res.gat_train_mode, "gat_train_accuracy": res.gat_train_accuracy,
                "n_selected": int(res.selected_mask.sum()),
                "n_edges": res.graph_stats.get("n_edges"),
                "max_group_size": res.graph_stats.get("max_group_size"),
                "mean_degree": res.graph_stats.get("mean_degree")})
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.test_size:
        mask = res.selected_mask
        counts = {c: int(np.sum(mask & (y == c))) for c in np.unique(y)}
        rand = random_stratified_mask(y, counts, np.random.default_rng(args.seed))
        with single_torch_thread():
            out["acc_1nn_gais"] = one_nn_accuracy(X[mask], y[mask], X_test, y_test)
            out["acc_1nn_random"] = one_nn_accuracy(X[rand], y[rand], X_test, y_test)
    del torch
    return out


def run_in_subprocess(args: argparse.Namespace, variant: str, n: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant,
           "--n", str(n), "--dim", str(args.dim), "--classes", str(args.classes),
           "--clusters", str(args.clusters), "--spread", str(args.spread),
           "--seed", str(args.seed), "--epochs", str(args.epochs),
           "--reduction", str(args.reduction), "--threads", str(args.threads),
           "--knn-max-full", str(args.knn_max_full), "--knn-queries", str(args.knn_queries),
           "--test-size", str(args.test_size), "--train-mode", args.train_mode,
           "--batch-nodes", str(args.batch_nodes), "--scoring", args.scoring]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        return {"variant": variant, "n": n, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def loglog_slope(ns: list[int], ts: list[float]) -> float:
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def report(results: list[dict], sizes: list[int]) -> str:
    lines = [("| variant | N | graph s | GAT train s | attention s | score+select s | total s | "
              "peak RSS GiB | edges | GAT mode | 1-NN GAIS | 1-NN random |"),
             "|" + "---|" * 12]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['n']:,} | error: {r['error']} |" + " |" * 9)
            continue
        if r.get("extrapolated"):
            lines.append(
                f"| {r['variant']} | {r['n']:,} | {r['graph_s']:.1f} (extrapolated from "
                f"{r['knn_queries']:,} queries) | - | - | - | - | {r['peak_rss_gib']:.2f} | - |"
                " - | - | - |")
            continue
        lines.append(
            f"| {r['variant']} | {r['n']:,} | {r['graph_s']:.1f} | {r['train_s']:.1f} | "
            f"{r['attention_s']:.1f} | {r['score_s'] + r['select_s']:.2f} | "
            f"{r['total_s']:.1f} | {r['peak_rss_gib']:.2f} | {int(r['n_edges']):,} | "
            f"{r['gat_mode']} | {r.get('acc_1nn_gais', float('nan')):.3f} | "
            f"{r.get('acc_1nn_random', float('nan')):.3f} |")
    lines.append("")
    lines.append("| variant | slope graph (log-log) | slope total (log-log) | "
                 "graph time vs exact kNN at largest N |")
    lines.append("|---|---|---|---|")
    ok = [r for r in results if "error" not in r]
    knn_at = {r["n"]: r["graph_s"] for r in ok if r["variant"] == "knn"}
    for variant in dict.fromkeys(r["variant"] for r in ok):
        rows = sorted((r for r in ok if r["variant"] == variant), key=lambda r: r["n"])
        ns = [r["n"] for r in rows]
        g_slope = loglog_slope(ns, [r["graph_s"] for r in rows])
        full = [r for r in rows if not r.get("extrapolated")]
        t_slope = loglog_slope([r["n"] for r in full], [r["total_s"] for r in full])
        big = rows[-1]
        ratio = (f"{knn_at[big['n']] / big['graph_s']:.1f}x faster"
                 if big["n"] in knn_at and variant != "knn" else "-")
        lines.append(f"| {variant} | {g_slope:.2f} | {t_slope:.2f} | {ratio} |")
    return "\n".join(lines)


def baseline_table(args: argparse.Namespace) -> int:
    """The issue-12 table through the evaluation harness's CLI, with the machine named."""
    import platform

    from pipeline.evaluate.instance_selection import main as harness

    variants = args.variants if args.variants_given else "multilevel"
    print(f"# GAIS vs instance-selection baselines: host {platform.node()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at start; variants {variants}; "
          f"reduction {args.reduction}; CV seeds {args.cv_seeds}; GAT epochs "
          f"{args.baseline_epochs}", flush=True)
    t0 = time.perf_counter()
    code = harness(["--datasets", "iris,wine,breast_cancer,digits", "--variants", variants,
                    "--scorings", "same_class,same_class_coverage", "--baselines", "all",
                    "--reductions", str(args.reduction), "--seeds", args.cv_seeds,
                    "--epochs", str(args.baseline_epochs), "--folds", "5"]
                   + (["--json", args.json] if args.json else []))
    print(f"\n# took {time.perf_counter() - t0:.0f} s; load average at end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baselines", action="store_true",
                   help="run the small-data baseline table (issue 12) instead of the scale run")
    p.add_argument("--cv-seeds", default="0,1,2",
                   help="--baselines: seeds of the repeated 5-fold cross-validation")
    p.add_argument("--baseline-epochs", type=int, default=100,
                   help="--baselines: GAT epochs (the library default)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (20k, 60k) and 1 epoch: a smoke run in about a minute")
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--variants", default="minibatch,hash,multilevel,multiview,knn")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--clusters", type=int, default=5, help="Gaussian clusters per class")
    p.add_argument("--spread", type=float, default=0.5,
                   help="scale of the cluster centres (clusters have unit variance); at 0.5 "
                        "1-NN on 100k points scores ~0.68, so subset quality shows")
    p.add_argument("--epochs", type=int, default=3,
                   help="GAT epochs (passes over all node groups in cluster mode)")
    p.add_argument("--train-mode", default="auto", choices=["auto", "full", "cluster"])
    p.add_argument("--batch-nodes", type=int, default=8192,
                   help="nodes per cluster-training step")
    p.add_argument("--reduction", type=float, default=0.96)
    p.add_argument("--scoring", default="same_class",
                   choices=("same_class", "other_class", "all", "same_class_coverage"),
                   help="GAIS scoring rule of the scale run (same_class_coverage: the extension)")
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads per run")
    p.add_argument("--knn-max-full", type=int, default=100000,
                   help="largest N for which the exact-kNN baseline runs in full")
    p.add_argument("--knn-queries", type=int, default=10000,
                   help="queries timed for the extrapolated exact-kNN graph")
    p.add_argument("--test-size", type=int, default=5000,
                   help="held-out points for the 1-NN quality check (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-free-gib", type=float, default=10.0,
                   help="skip sizes >= 500k when less memory than this is available")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants_given = any(a == "--variants" or a.startswith("--variants=")
                              for a in (sys.argv[1:] if argv is None else argv))

    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.baselines:
        return baseline_table(args)

    import psutil

    if args.quick:
        args.sizes, args.epochs, args.knn_max_full = "20000,60000", 1, 20000
    sizes = [int(s) for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    print(f"# GAIS benchmark: dim={args.dim} classes={args.classes} clusters/class="
          f"{args.clusters} spread={args.spread} epochs={args.epochs} "
          f"batch_nodes={args.batch_nodes} reduction={args.reduction} scoring={args.scoring} "
          f"threads={args.threads} cpus={os.cpu_count()}", flush=True)
    results: list[dict] = []
    for n in sizes:
        avail = psutil.virtual_memory().available / 2**30
        print(f"## N={n:,}: {avail:.1f} GiB available", flush=True)
        if n >= 500_000 and avail < args.min_free_gib:
            print(f"   skipping N={n:,}: under {args.min_free_gib} GiB free", flush=True)
            continue
        for variant in variants:
            r = run_in_subprocess(args, variant, n)
            results.append(r)
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            print(f"   {brief}", flush=True)
    print()
    print(report(results, sizes))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
