"""Text-embedding variants (fp32 and bf16 torch, int8 ONNX Runtime, static model2vec): speed, cost, agreement.

The input is ``--n`` real conversations from ../shared/data/instructions, a mix of maths, code,
role-play, tool use, NLP tasks and multi-turn chats, each turned into the text the embed stage
encodes (``pipeline.embed.spans.conversation_spans``: user turns, then the answer; 1,024 chars at
most). Every variant encodes all of them with ``encode_spans`` (one pass, pooled over the whole
text, the user side and the answer). A variant is a tier of ``pipeline.embed.tiers.load_token_encoder``
and, for the fp32 (torch) tier, a compute precision (:data:`VARIANTS`): ``fp32`` is the reference
and pins ``precision="fp32"`` (the library default, ``auto``, picks bf16 on CPUs that have it);
``bf16`` is the same weights under bf16 autocast.

Each timed pass runs in a fresh process (``--worker``), so that peak RSS (``ru_maxrss``: exact,
not sampled) is the variant's own: model load plus encoding, nothing left over from another one.
Passes alternate between variants (fp32, bf16, int8, static, fp32, ...) so that noise from other
work on the machine hits them alike; the report gives the median of ``--repeats`` passes. Derived tiers
are built into the cache (``$THRESHER_CACHE``) before any timing, and the timed processes load
them by the fp32 digest, as a Beam worker would, without loading the fp32 model.

Reported per variant: texts/s, CPU-ms per text (user + system time of all threads), peak RSS,
effective GFLOP/s and its share of this machine's fp32 GEMM rate (numpy, measured in the same run;
MiniLM FLOPs per text from its real token count: 2 x non-embedding parameters x tokens, plus
attention 4 x layers x tokens^2 x hidden), and agreement with fp32: mean and min cosine of the
whole / user / answer vectors (same-space variants only: the static tier is 256-d after PCA), kNN
recall@10 of each pool against fp32's neighbours on the sample, the Spearman correlation of
pairwise similarities of the whole vectors, and (same space) how far pairwise cosines move: the
largest |change| over all pairs and over pairs near the near-duplicate threshold (0.95 +- 0.05),
and how many pairs change side of 0.95.

    python benchmarks/embed_text.py                      # 1,000 conversations, 3 repeats
    python benchmarks/embed_text.py --n 300 --repeats 1 --variants fp32,bf16 --json /tmp/embed_tiers.json

OPENBLAS_CORETYPE (if set) is left as it is: it picks numpy's GEMM kernel, so it can move the
measured matmul limit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = REPO.parent / "shared" / "data" / "instructions"
# (file, share of the mix)
MIX = [
    ("gsm8k_train.jsonl.gz", 0.2),
    ("gpteacher_codegen.json.gz", 0.2),
    ("gpteacher_roleplay.json.gz", 0.15),
    ("gpteacher_toolformer.json.gz", 0.15),
    ("self_instruct_t0_train.jsonl.gz", 0.2),
    ("sharegpt_dummy_conversations.json.gz", 0.1),
]
POOLS = ("whole", "user", "answer")
# name -> (tier, compute precision of the torch tier; the derived tiers have their own)
VARIANTS = {"fp32": ("fp32", "fp32"), "bf16": ("fp32", "bf16"), "int8": ("int8", None), "static": ("static", None)}
NEAR_DUP_THRESHOLD = 0.95  # the flow's default


def load_conversations(n: int) -> list[dict]:
    """``n`` conversations (about; the mix is rounded) as ``{"text", "spans"}``, in file order."""
    from pipeline.embed.spans import conversation_spans
    from pipeline.io.instruction_formats import normalise
    from pipeline.io.rejects import RecordRejected

    out = []
    for name, share in MIX:
        src = SHARED / name
        if not src.is_file():
            raise SystemExit(f"{src} is missing; this benchmark needs ../shared/data (see its README)")
        want = max(1, round(n * share))
        got = 0
        with gzip.open(src, "rt", encoding="utf-8") as fh:
            records = (json.loads(line) for line in fh) if name.endswith(".jsonl.gz") else iter(json.load(fh))
            for record in records:
                try:
                    conv = normalise(record)
                except RecordRejected:
                    continue
                item = conversation_spans(conv.messages)
                if not item.text:
                    continue
                out.append({"text": item.text, "spans": item.spans})
                got += 1
                if got >= want:
                    break
    return out


# --------------------------------------------------------------------------------------------
# Worker: one variant, one timed pass, in its own process
# --------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    from pipeline.embed.spans import SpanText, encode_spans
    from pipeline.embed.tiers import load_token_encoder

    tier, precision = VARIANTS[args.worker]
    rows = json.loads(Path(args.texts).read_text())
    items = [SpanText(r["text"], {k: tuple(v) for k, v in r["spans"].items()}) for r in rows]
    t0 = time.perf_counter()
    encoder = load_token_encoder(tier, threads=args.threads, fp32_digest=args.fp32_digest, precision=precision)
    load_s = time.perf_counter() - t0
    encode_spans(encoder, items[: args.batch_size], batch_size=args.batch_size)  # warm-up
    wall0, cpu0 = time.perf_counter(), os.times()
    vectors = encode_spans(encoder, items, batch_size=args.batch_size)
    wall, cpu1 = time.perf_counter() - wall0, os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    if args.out:
        np.savez(args.out, **vectors)
    threads = getattr(encoder, "threads", None)
    if threads is None and tier == "fp32":
        import torch

        threads = torch.get_num_threads()
    print(json.dumps({
        "variant": args.worker, "tier": tier, "precision": encoder.precision, "digest": encoder.digest,
        "dim": encoder.dim, "load_s": load_s, "wall_s": wall,
        "cpu_s": cpu, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": threads, "torch_loaded": "torch" in sys.modules,
    }))


def prepare(tier: str) -> None:
    """Build (or find) the tier in the cache; print the fp32 digest."""
    from pipeline.embed.sentence import sentence_weights_digest, shared_sentence_model
    from pipeline.embed.tiers import load_token_encoder

    encoder = load_token_encoder(tier)
    print(json.dumps({"tier": tier, "fp32_digest": sentence_weights_digest(shared_sentence_model(None, "cpu")),
                      "digest": encoder.digest}))


def run_child(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {' '.join(argv[:2])} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Machine limit and model cost
# --------------------------------------------------------------------------------------------


def gemm_gflops(repeats: int = 5) -> dict[str, float]:
    """Best fp32 GEMM rate of numpy here: a square 2048 product and MiniLM's FFN shape."""
    rng = np.random.default_rng(0)
    shapes = {"square_2048": (2048, 2048, 2048), "minilm_ffn_8192x384x1536": (8192, 384, 1536)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        product = lambda a=a, b=b: a @ b
        product()  # warm-up
        best = min(_timed(product) for _ in range(repeats))
        out[name] = 2.0 * m * k * n / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def minilm_flops(texts: list[str]) -> tuple[float, dict]:
    """MiniLM forward FLOPs over ``texts`` from their real token counts (no padding), and the model shape."""
    from tokenizers import Tokenizer

    from pipeline.embed.sentence import default_model_path

    folder = default_model_path()
    cfg = json.loads((folder / "config.json").read_text())
    h, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    # per layer: Q, K, V, output projections (4 h^2 + 4 h) and the FFN (2 h ffn + ffn + h); layer norms left out
    params = layers * (4 * h * h + 4 * h + 2 * h * ffn + ffn + h)
    limit = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(max_length=limit)
    tokens = np.array([len(e.ids) for e in tok.encode_batch(texts)], dtype=np.float64)
    flops = float((2 * params * tokens + 4 * layers * tokens**2 * h).sum())
    return flops, {"params_non_embedding": params, "tokens_mean": float(tokens.mean()),
                   "tokens_max": int(tokens.max()), "truncated_share": float((tokens >= limit).mean())}


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1)[:, :k]


def agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], k: int = 10) -> dict:
    from scipy.stats import spearmanr

    out: dict = {}
    for name in POOLS:
        a, b = ref[name], got[name]
        ok = ~np.isnan(a[:, 0]) & ~np.isnan(b[:, 0])
        row: dict = {"rows": int(ok.sum()), "absent_mismatch": int((np.isnan(a[:, 0]) != np.isnan(b[:, 0])).sum())}
        if a.shape[1] == b.shape[1]:
            cos = (a[ok] * b[ok]).sum(1)
            row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()), cos_p01=float(np.quantile(cos, 0.01)))
        ra, rb = _knn(a[ok], k), _knn(b[ok], k)
        row["recall_at_10"] = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ra, rb)]))
        if name == "whole":
            iu = np.triu_indices(int(ok.sum()), 1)
            sa_all = (a[ok] @ a[ok].T)[iu]
            sb_all = (b[ok] @ b[ok].T)[iu]
            step = max(1, len(iu[0]) // 200_000)
            row["pairwise_spearman"] = float(spearmanr(sa_all[::step], sb_all[::step]).statistic)
            if a.shape[1] == b.shape[1]:
                row.update(pair_cos_moves(sa_all, sb_all))
        out[name] = row
    return out


def pair_cos_moves(ref: np.ndarray, got: np.ndarray, threshold: float = NEAR_DUP_THRESHOLD) -> dict:
    """How far pairwise cosines move (same vector space): what a near-duplicate cut at ``threshold`` sees."""
    move = np.abs(got - ref)
    near = np.abs(ref - threshold) <= 0.05
    return {"pair_dcos_max": float(move.max()), "pairs_near_threshold": int(near.sum()),
            "pair_dcos_max_near_threshold": float(move[near].max()) if near.any() else float("nan"),
            "pairs_crossing_threshold": int(((ref >= threshold) != (got >= threshold)).sum())}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="conversations in the mix")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per variant (median reported)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--variants", default="fp32,bf16,int8,static",
                    help=f"comma-separated, from {', '.join(VARIANTS)} (bf16: the fp32 tier computing in bf16)")
    ap.add_argument("--threads", type=int, default=None, help="int8 intra-op threads and torch threads (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--texts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fp32-digest", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.prepare:
        return prepare(args.prepare)
    from pipeline.embed.sentence import native_bf16_cpu

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in variants:
        variants.insert(0, "fp32")  # the reference for every ratio and agreement figure
    scratch = Path(tempfile.mkdtemp(prefix="thresher-bench-embed-tiers-"))
    rows = load_conversations(args.n)
    texts = [r["text"] for r in rows]
    (scratch / "texts.json").write_text(json.dumps(rows))
    n = len(rows)
    flops, shape = minilm_flops(texts)
    gemm = gemm_gflops()
    limit = max(gemm.values())  # measured again after the passes; the higher figure is kept
    print(f"{n:,} conversations, mean {np.mean([len(t) for t in texts]):.0f} chars, "
          f"{shape['tokens_mean']:.0f} MiniLM tokens/text (max {shape['tokens_max']}, "
          f"{shape['truncated_share']:.1%} at the 256 limit), batch {args.batch_size}, cpus {os.cpu_count()}, "
          f"native bf16 {'yes' if native_bf16_cpu() else 'no'}")
    print("fp32 GEMM (numpy): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm.items())
          + f"; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"MiniLM cost: {flops / n / 1e9:.3f} GFLOP/text ({shape['params_non_embedding'] / 1e6:.1f} M "
          "non-embedding parameters)")

    fp32_digest = None
    for tier in dict.fromkeys(VARIANTS[v][0] for v in variants):  # builds happen here, outside any timing
        t0 = time.perf_counter()
        info = run_child("--prepare", tier)
        fp32_digest = info["fp32_digest"]
        print(f"  {tier:<6} ready in {time.perf_counter() - t0:5.1f}s  digest {info['digest'][:16]}")

    common = ["--texts", str(scratch / "texts.json"), "--batch-size", str(args.batch_size), "--fp32-digest", fp32_digest]
    if args.threads:
        common += ["--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for variant in variants:
            extra = ["--out", str(scratch / f"{variant}.npz")] if rep == 0 else []
            res = run_child("--worker", variant, *common, *extra)
            runs[variant].append(res)
            print(f"  pass {rep + 1}: {variant:<6} {res['wall_s']:7.2f}s  {n / res['wall_s']:8.1f} texts/s  "
                  f"cpu {res['cpu_s']:7.2f}s  peak RSS {res['peak_rss'] / 2**20:6.0f} MiB  load {res['load_s']:.2f}s",
                  flush=True)

    gemm_after = gemm_gflops()
    print("fp32 GEMM again after the passes: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm_after.items()))
    gemm = {k: max(v, gemm_after[k]) for k, v in gemm.items()}
    limit = max(gemm.values())
    ref = dict(np.load(scratch / "fp32.npz"))
    report: dict = {"n": n, "batch_size": args.batch_size, "repeats": args.repeats, "gemm_gflops": gemm,
                    "minilm": shape, "minilm_gflop_per_text": flops / n / 1e9, "cpus": os.cpu_count(),
                    "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                    "native_bf16_cpu": native_bf16_cpu(), "variants": {}}
    for variant in variants:
        wall = statistics.median(r["wall_s"] for r in runs[variant])
        cpu = statistics.median(r["cpu_s"] for r in runs[variant])
        entry = {
            "tier": runs[variant][0]["tier"], "precision": runs[variant][0]["precision"],
            "texts_per_s": n / wall, "wall_s": [r["wall_s"] for r in runs[variant]], "cpu_ms_per_text": 1e3 * cpu / n,
            "peak_rss_mib": max(r["peak_rss"] for r in runs[variant]) / 2**20,
            "load_s": statistics.median(r["load_s"] for r in runs[variant]),
            "threads": runs[variant][0]["threads"], "dim": runs[variant][0]["dim"], "digest": runs[variant][0]["digest"],
            "torch_loaded": runs[variant][0]["torch_loaded"],
            # speed-up against the fp32 pass run just before it: pairs share the machine's load of the moment
            "paired_speedup": statistics.median(f["wall_s"] / r["wall_s"] for f, r in zip(runs["fp32"], runs[variant])),
            "paired_cpu_ratio": statistics.median(r["cpu_s"] / f["cpu_s"] for f, r in zip(runs["fp32"], runs[variant])),
        }
        if variant != "static":
            entry["gflops"] = flops / wall / 1e9
            entry["pct_of_gemm"] = 100 * entry["gflops"] / limit
        entry["agreement"] = agreement(ref, dict(np.load(scratch / f"{variant}.npz")))
        report["variants"][variant] = entry

    print(f"\nmedian of {args.repeats} passes, {n:,} conversations (this machine: {os.cpu_count()} cpus; "
          f"fp32 GEMM limit {limit:.1f} GFLOP/s)")
    print(f"{'variant':<8}{'texts/s':>9}{'x fp32':>8}{'CPU ms/text':>13}{'x fp32':>8}{'peak RSS':>10}"
          f"{'GFLOP/s':>9}{'% GEMM':>8}   {'whole cos mean/min':>20}{'user':>16}{'answer':>16}   R@10 whole/user/answer   rho")
    for variant, e in report["variants"].items():
        ag = e["agreement"]
        cos = [f"{ag[p]['cos_mean']:.5f}/{ag[p]['cos_min']:.4f}" if "cos_mean" in ag[p] else "n/a*"
               for p in POOLS]
        gf = f"{e['gflops']:9.1f}{e['pct_of_gemm']:7.0f}%" if "gflops" in e else f"{'-':>9}{'-':>8}"
        print(f"{variant:<8}{e['texts_per_s']:9.1f}{e['paired_speedup']:7.2f}x"
              f"{e['cpu_ms_per_text']:13.2f}{e['paired_cpu_ratio']:7.3f}x"
              f"{e['peak_rss_mib']:7.0f} MiB{gf}   {cos[0]:>20}{cos[1]:>16}{cos[2]:>16}   "
              f"{ag['whole']['recall_at_10']:.3f}/{ag['user']['recall_at_10']:.3f}/{ag['answer']['recall_at_10']:.3f}"
              f"     {ag['whole']['pairwise_spearman']:.4f}")
    print("(x fp32: median over passes of the ratio to the fp32 pass of the same round (texts/s: higher is "
          "faster; CPU: lower is cheaper). % GEMM: MiniLM FLOPs "
          "per second over numpy's fp32 GEMM rate; bf16 and int8 kernels are not bound by it. n/a*: a different vector "
          "space (static: 256-d after PCA), compared by neighbours (R@10) and pairwise-similarity rank "
          "correlation (rho) only.)")
    print(f"\npairwise cosines of the whole vectors against fp32's ({n * (n - 1) // 2:,} pairs; near: fp32 cosine "
          f"within {NEAR_DUP_THRESHOLD} +- 0.05)")
    print(f"{'variant':<8}{'precision':>10}{'max |dcos|':>12}{'pairs near':>12}{'max |dcos| near':>17}"
          f"{'pairs crossing ' + str(NEAR_DUP_THRESHOLD):>21}")
    for variant, e in report["variants"].items():
        w = e["agreement"]["whole"]
        if "pair_dcos_max" in w:
            print(f"{variant:<8}{e['precision']:>10}{w['pair_dcos_max']:12.2e}{w['pairs_near_threshold']:12,}"
                  f"{w['pair_dcos_max_near_threshold']:17.2e}{w['pairs_crossing_threshold']:21,}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
