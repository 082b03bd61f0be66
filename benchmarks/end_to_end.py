"""The whole instruction chain, stage by stage, against one plain sentence-transformers pass.

The chain is what the ``curate_instructions`` flow runs (flows/curate_instructions.py), called
here as library functions, in the same order, so that the stages are measured and not Prefect:

    imports -> ingest -> embed (one encoder pass, pooled whole / user / answer) -> tags -> quality
            -> index -> near-duplicates -> MIG (pool, label graph, selection) -> curate + export (4 formats)

Input: the real pool in ../shared/data/instructions (every file; 79,812 rows, a mix of maths,
code, role-play, tool use, T0 NLP tasks and chats). ``--rows N`` takes the first N rows of a
deterministic shuffle (``--seed``) of all files' rows and writes them, as they are, to a temporary
JSONL.gz that ingest reads (layouts detected per record); ``--rows 0`` takes the whole pool.

Each variant (``--tier`` / ``--tiers fp32,bf16,int8,static``: a tier of
``pipeline.embed.tiers``, and for the torch tier a compute precision, :data:`VARIANTS`; ``fp32``
pins ``precision="fp32"``, ``bf16`` is the same weights under bf16 autocast) runs the whole chain
into its own fresh catalog, in its own fresh process (so that no variant inherits another's
loaded models, caches or peak memory), with ``--workers`` Beam workers (default 1: in-process). For each stage: wall s,
CPU s (user + system of the process and its children: getrusage(RUSAGE_SELF) + RUSAGE_CHILDREN
deltas), CPU ms per sample, and peak RSS during the stage (VmHWM, reset before the stage through
/proc/self/clear_refs; falls back to the process peak so far where that is not allowed).

In the same run, one plain pass, also in a fresh process: ``embed_texts(shared_sentence_model(),
texts, batch_size=64)`` over the same conversations (read back from the first chain's catalog, so
after ingest's exact-duplicate removal), ``texts`` = ``conversation_text(messages)`` sorted by
length (the fastest plain loop). Its encode time is the reference of the project's target, fp32
chain <= 1.25 x one plain pass; the ratio is also given against the plain pass with its imports
and model load. The faster tiers are projected to the whole pool by rows/s, linearly (fixed costs
are spread, super-linear stages are not modelled), against the target of <= 10 min here.

Agreement of each other variant with fp32 (when fp32 ran): share of MIG picks in common, MIG's
E(D) of each selection, Jaccard of the sets of sample ids removed as near-duplicates, mean
per-sample Jaccard of the tag sets, the Spearman correlation of the quality scores, and, from the
stored whole-text vectors, kNN recall@10 against fp32's neighbours and (same vector space) the
largest move of a pairwise cosine near the near-duplicate threshold and the pairs that change side.

    python benchmarks/end_to_end.py --rows 3000 --tiers fp32,bf16,int8,static --json /tmp/e2e.json
    python benchmarks/end_to_end.py --rows 0 --tier static --no-plain          # the whole pool

Derived tiers are built into $THRESHER_CACHE before any timing (as benchmarks/embed_text.py does).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SHARED = REPO.parent / "shared" / "data" / "instructions"
DATASET = "pool"
STAGES = ("imports", "ingest", "embed", "tags", "quality", "index", "near_dups", "mig", "curate_export")
EXPORT_FORMATS = ("sharegpt", "alpaca", "openai", "parquet")
NEAR_DUP_THRESHOLD = 0.95  # the flow's default
# name -> (tier, compute precision of the torch tier; the derived tiers ignore it)
VARIANTS = {"fp32": ("fp32", "fp32"), "bf16": ("fp32", "bf16"), "int8": ("int8", "auto"), "static": ("static", "auto")}
TARGET_RATIO = 1.25  # fp32 chain / one plain pass
TARGET_POOL_S = 600.0  # the whole pool, faster tiers, on this machine


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------


def pool_files() -> list[Path]:
    files = sorted(p for p in SHARED.glob("*") if p.name.endswith((".json.gz", ".jsonl.gz")))
    if not files:
        raise SystemExit(f"no input under {SHARED}; this benchmark needs ../shared/data (see its README)")
    return files


def read_records(path: Path) -> list[Any]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        if path.name.endswith(".jsonl.gz"):
            return [json.loads(line) for line in fh if line.strip()]
        return list(json.load(fh))


def write_input(rows: int, seed: int, out: Path) -> dict[str, Any]:
    """The first ``rows`` (0: all) of a seeded shuffle of every file's rows, as one JSONL.gz."""
    records: list[tuple[str, Any]] = []
    for path in pool_files():
        records += [(path.name, r) for r in read_records(path)]
    total = len(records)
    random.Random(seed).shuffle(records)
    chosen = records if rows <= 0 else records[:rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=1) as fh:
        for _, record in chosen:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    per_file: dict[str, int] = {}
    for name, _ in chosen:
        per_file[name] = per_file.get(name, 0) + 1
    return {"pool_rows": total, "rows": len(chosen), "seed": seed, "per_file": dict(sorted(per_file.items()))}


# --------------------------------------------------------------------------------------------
# Measuring a stage
# --------------------------------------------------------------------------------------------


def _cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Meter:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        reset = _reset_peak()
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        yield
        wall, cpu = time.perf_counter() - wall0, _cpu_s() - cpu0
        hwm = _status_kib("VmHWM")
        peak = hwm if (reset and hwm) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        self.stages[name] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 1024,
                             "peak_is_stage_own": bool(reset and hwm), "children_max_rss_mib": children / 1024}


# --------------------------------------------------------------------------------------------
# Workers (fresh processes)
# --------------------------------------------------------------------------------------------


def chain_worker(args: argparse.Namespace) -> None:
    """The whole chain for one variant into a fresh catalog; figures to ``--out``."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    variant, workers, catalog = args.tier, args.workers, args.catalog
    tier, precision = VARIANTS[variant]
    meter = Meter()
    info: dict[str, Any] = {"variant": variant, "tier": tier, "workers": workers, "catalog": catalog}

    def line(name: str) -> None:
        s = meter.stages[name]
        print(f"    [{variant}] {name:<14}{s['wall_s']:8.1f} s wall {s['cpu_s']:8.1f} s CPU "
              f"{s['peak_rss_mib']:7.0f} MiB", flush=True)

    with meter("imports"):  # what the flow's tasks import (torch comes later, with the fp32 model)
        from pipeline.curate import mig_pool
        from pipeline.curate.materialise import export, materialise_instructions
        from pipeline.select.mig import MIGConfig
        from pipeline.stages.embeddings import run_text_embedding
        from pipeline.stages.index import run_index_build, run_near_duplicates
        from pipeline.stages.ingest import run_ingest
        from pipeline.stages.instruction_annotations import (
            run_quality_annotation,
            run_tag_annotation,
        )
    line("imports")

    with meter("ingest"):
        res = run_ingest([args.input], catalog, DATASET, workers=workers)
    info["ingest"] = {"counts": res.counts, "timings_s": res.timings_s}
    line("ingest")

    with meter("embed"):
        emb = run_text_embedding(catalog, DATASET, workers=workers, tier=tier, precision=precision)
    model = emb.model
    info["embed"] = {"model": model, "rows": emb.rows, "dim": emb.dim, "seconds": emb.seconds,
                     "precision": emb.extra["precision"], "output": emb.output}
    line("embed")

    with meter("tags"):
        tags = run_tag_annotation(catalog, DATASET, workers=workers, tier=tier)
    info["tags"] = {"rows": tags.rows_out, "seconds": tags.seconds}
    line("tags")

    with meter("quality"):
        quality = run_quality_annotation(catalog, DATASET, workers=workers, tier=tier)
    info["quality"] = {"rows": quality.rows_out, "seconds": quality.seconds}
    line("quality")

    with meter("index"):
        index = run_index_build(catalog, DATASET, model)
    info["index"] = {"n": index.n, "d": index.d, "kind": index.kind, "seconds": index.seconds}
    line("index")

    with meter("near_dups"):
        near = run_near_duplicates(catalog, DATASET, model, NEAR_DUP_THRESHOLD)
    info["near_dups"] = {"n": near.n, "removed": near.n_removed, "groups": near.n_groups, "seconds": near.seconds}
    line("near_dups")

    n_samples = int(res.counts["samples"])
    budget = args.budget if args.budget > 0 else max(1, n_samples // 10)
    name = f"{DATASET}_mig{budget}"
    picks = str(Path(catalog) / "selections" / f"{name}.picks.parquet")
    with meter("mig"):
        pool = mig_pool.pool_from_catalog(catalog, DATASET, near_duplicates=f"near_dup_{model}")
        table, report = mig_pool.select(pool, min(budget, len(pool.sample_ids)), MIGConfig())
        mig_pool.write_selection(table, report, picks, {"dataset": DATASET, "budget": budget, **MIGConfig().__dict__})
    info["mig"] = {"budget": budget, "pool": report.n_pool, "picked": report.budget, "labels": report.n_labels,
                   "information": report.information, "random_information_mean": report.random_information_mean,
                   "seconds": report.seconds, "notes": report.notes, "picks": picks}
    line("mig")

    with meter("curate_export"):
        curated = materialise_instructions(catalog, DATASET, picks, name, "mig")
        exports = {fmt: export(catalog, name, fmt, Path(catalog) / "exports" / name / fmt, overwrite=True)["rows"]
                   for fmt in EXPORT_FORMATS}
    info["curate_export"] = {"curated_rows": curated.rows, "missing": curated.missing, "exports": exports}
    line("curate_export")

    from pipeline.embed import tiers as tiers_module

    info["samples"] = n_samples
    info["stages"] = meter.stages
    # A derived tier built inside the timing (the cache lacked this build) makes the embed stage slow.
    info["tier_builds_during_chain"] = dict(tiers_module.build_counts)
    info["tier_build"] = {"int8": tiers_module.INT8_BUILD, "static": tiers_module.STATIC_BUILD}.get(tier, "fp32")
    # The stages' own peaks: resetting VmHWM also lowers what ru_maxrss reports afterwards.
    info["process_peak_rss_mib"] = max(max(s["peak_rss_mib"] for s in meter.stages.values()),
                                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.out).write_text(json.dumps(info, indent=2, default=str))


def plain_worker(args: argparse.Namespace) -> None:
    """One plain sentence-transformers pass over the catalog's conversations; figures to ``--out``."""
    meter = Meter()
    with meter("imports_load"):
        from pipeline.embed.sentence import embed_texts, shared_sentence_model

        model = shared_sentence_model()
    with meter("texts"):
        import pyarrow.parquet as pq

        # conversation_text (pipeline.stages.embeddings) is conversation_spans(m).text; taken from spans so
        # that this process does not import Beam.
        from pipeline.embed.spans import conversation_spans
        from pipeline.io.catalog import Catalog

        part = Catalog.at(args.catalog).samples_partition("instruction", DATASET)
        messages = pq.read_table(part, columns=["messages"]).column("messages").to_pylist()
        texts = sorted((conversation_spans(m or []).text for m in messages), key=len)
    with meter("encode"):
        vectors = embed_texts(model, texts, batch_size=64)
    import torch

    out = {"rows": len(texts), "dim": int(vectors.shape[1]), "mean_chars": sum(map(len, texts)) / max(len(texts), 1),
           "torch_threads": torch.get_num_threads(), "stages": meter.stages,
           "process_peak_rss_mib": max(max(s["peak_rss_mib"] for s in meter.stages.values()),
                                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    Path(args.out).write_text(json.dumps(out, indent=2))


def prepare_worker(args: argparse.Namespace) -> None:
    """Build (or find) a derived tier in the cache, outside any timing."""
    from pipeline.embed.tiers import load_token_encoder

    load_token_encoder(VARIANTS[args.tier][0])


def git_head() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False)
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--name-only"],
                               capture_output=True, text=True, check=False).stdout.split()
        return out.stdout.strip() + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else "")
    except OSError:
        return None


def run_child(argv: list[str], log: Path) -> None:
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, *argv], stderr=err, check=False)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"{' '.join(argv[:3])} failed (exit {proc.returncode}); log {log}")


# --------------------------------------------------------------------------------------------
# Agreement between variants
# --------------------------------------------------------------------------------------------


def chain_outputs(info: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipeline.io.catalog import Catalog

    cat = Catalog.at(info["catalog"])
    model = info["embed"]["model"]
    tags = pq.read_table(cat.annotation_partition("offline_tags", DATASET), columns=["sample_id", "tags"]).to_pylist()
    q = pq.read_table(cat.annotation_partition("offline_quality", DATASET), columns=["sample_id", "score"]).to_pylist()
    nd = pq.read_table(cat.annotation_partition(f"near_dup_{model}", DATASET), columns=["sample_id", "keep"]).to_pylist()
    picks = pq.read_table(info["mig"]["picks"], columns=["sample_id"]).column("sample_id").to_pylist()
    return {"tags": {r["sample_id"]: {t["tag"] for t in r["tags"] or []} for r in tags},
            "score": {r["sample_id"]: r["score"] for r in q},
            "removed": {r["sample_id"] for r in nd if not r["keep"]},
            "picks": picks}


def agreement(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from scipy.stats import spearmanr

    ids = sorted(set(ref["tags"]) & set(got["tags"]))
    jacc = [len(ref["tags"][s] & got["tags"][s]) / max(len(ref["tags"][s] | got["tags"][s]), 1) for s in ids]
    qs = sorted(set(ref["score"]) & set(got["score"]))
    a = np.array([ref["score"][s] or 0.0 for s in qs])
    b = np.array([got["score"][s] or 0.0 for s in qs])
    union = ref["removed"] | got["removed"]
    common_picks = len(set(ref["picks"]) & set(got["picks"]))
    return {
        "mig_picks_common_share": common_picks / max(len(ref["picks"]), 1),
        "mig_picks_common": common_picks, "mig_picks": len(ref["picks"]),
        "near_dup_removed_jaccard": (len(ref["removed"] & got["removed"]) / len(union)) if union else 1.0,
        "near_dup_removed": [len(ref["removed"]), len(got["removed"])],
        "tags_mean_jaccard": float(np.mean(jacc)) if jacc else float("nan"),
        "tags_identical_share": float(np.mean([j == 1.0 for j in jacc])) if jacc else float("nan"),
        "quality_spearman": float(spearmanr(a, b).statistic) if len(qs) > 2 else float("nan"),
        "quality_identical_share": float(np.mean(np.abs(a - b) < 1e-6)) if len(qs) else float("nan"),
    }


def vector_agreement(ref: dict[str, Any], got: dict[str, Any], k: int = 10) -> dict[str, Any]:
    """kNN recall@``k`` of the stored whole-text vectors against fp32's, on the samples both hold,
    and (same vector space only) how far pairwise cosines move around the near-duplicate threshold."""
    import numpy as np

    from pipeline.stages.embeddings import read_embeddings

    ids_a, va = read_embeddings(Path(ref["embed"]["output"]))
    ids_b, vb = read_embeddings(Path(got["embed"]["output"]))
    where_b = {s: i for i, s in enumerate(ids_b)}
    both = [(i, where_b[s]) for i, s in enumerate(ids_a) if s in where_b]
    va, vb = va[[i for i, _ in both]], vb[[j for _, j in both]]
    sa, sb = va @ va.T, vb @ vb.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    na, nb = np.argsort(-sa, axis=1)[:, :k], np.argsort(-sb, axis=1)[:, :k]
    out: dict[str, Any] = {"knn_recall_at_10": float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)]))}
    if va.shape[1] == vb.shape[1]:
        iu = np.triu_indices(len(both), 1)
        pa, pb = sa[iu], sb[iu]
        move, near = np.abs(pb - pa), np.abs(pa - NEAR_DUP_THRESHOLD) <= 0.05
        out.update(pair_dcos_max=float(move.max()), pairs_near_threshold=int(near.sum()),
                   pair_dcos_max_near_threshold=float(move[near].max()) if near.any() else float("nan"),
                   pairs_crossing_threshold=int(((pa >= NEAR_DUP_THRESHOLD) != (pb >= NEAR_DUP_THRESHOLD)).sum()))
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000, help="rows of the shuffled pool (0: the whole pool)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed")
    ap.add_argument("--tier", default=None, help=f"one variant: {' | '.join(VARIANTS)} (default fp32)")
    ap.add_argument("--tiers", default=None, help="several variants, comma-separated, each into its own catalog")
    ap.add_argument("--workers", type=int, default=1, help="Beam workers per stage (1: in-process)")
    ap.add_argument("--budget", type=int, default=0, help="MIG budget (default: 10%% of the samples)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain sentence-transformers pass")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the input and catalogs in this folder")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--catalog", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "chain":
        return chain_worker(args)
    if args.worker == "plain":
        return plain_worker(args)
    if args.worker == "prepare":
        return prepare_worker(args)

    tiers = [t.strip() for t in (args.tiers or args.tier or "fp32").split(",") if t.strip()]
    bad = [t for t in tiers if t not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="thresher-bench-e2e-"))
    if args.keep and scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    load0 = os.getloadavg()
    head = git_head()

    src = write_input(args.rows, args.seed, scratch / "input" / "pool.jsonl.gz")
    print(f"input: {src['rows']:,} of {src['pool_rows']:,} pool rows (seed {args.seed}; "
          + ", ".join(f"{k.split('.')[0]} {v:,}" for k, v in src["per_file"].items()) + ")")
    print(f"machine: {os.cpu_count()} cpus, load average {load0[0]:.1f} at start; Beam workers {args.workers}; "
          f"tiers {', '.join(tiers)}; code {head}", flush=True)
    for tier in tiers:
        if VARIANTS[tier][0] != "fp32":
            t0 = time.perf_counter()
            run_child(["--worker", "prepare", "--tier", tier], scratch / f"prepare-{tier}.log")
            print(f"  {tier} tier ready in the cache ({time.perf_counter() - t0:.1f} s, not timed)", flush=True)

    chains: dict[str, dict[str, Any]] = {}
    plain: dict[str, Any] | None = None
    for k, tier in enumerate(tiers):
        print(f"  chain {tier} ...", flush=True)
        out = scratch / f"chain-{tier}.json"
        run_child(["--worker", "chain", "--tier", tier, "--workers", str(args.workers), "--budget", str(args.budget),
                   "--input", str(scratch / "input" / "pool.jsonl.gz"), "--catalog", str(scratch / f"catalog-{tier}"),
                   "--out", str(out)], scratch / f"chain-{tier}.log")
        chains[tier] = json.loads(out.read_text())
        if k == 0 and not args.no_plain:  # right after the first chain: it reads that catalog's samples
            print("  plain sentence-transformers pass ...", flush=True)
            run_child(["--worker", "plain", "--catalog", str(scratch / f"catalog-{tier}"),
                       "--out", str(scratch / "plain.json")], scratch / "plain.log")
            plain = json.loads((scratch / "plain.json").read_text())

    # ---------------------------------------------------------------- per-tier tables
    report: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                              "git_head_start": head, "git_head_end": git_head(),
                              "load_average_start": load0, "load_average_end": os.getloadavg(),
                              "workers": args.workers, "input": src, "chains": chains, "plain": plain,
                              "summary": {}, "agreement": {}}
    for tier, info in chains.items():
        n = info["samples"]
        c = info["ingest"]["counts"]
        print(f"\nchain {tier} ({info['embed']['precision']} compute): {n:,} samples ({c['rows_in']:,} rows in, "
              f"{c['duplicates']:,} exact duplicates, "
              f"{c['rejects']:,} rejects); embeddings {info['embed']['model']} ({info['embed']['dim']}-d); "
              f"near-dups removed {info['near_dups']['removed']:,}; MIG {info['mig']['picked']:,} of "
              f"{info['mig']['pool']:,} ({info['mig']['labels']:,} labels); build {info.get('tier_build')}")
        if any(info.get("tier_builds_during_chain", {}).values()):
            print(f"  WARNING: the {tier} tier was built inside the timed chain ({info['tier_builds_during_chain']}): "
                  "the cache lacked this build (the code changed after the untimed preparation?); rerun")
        print(f"  {'stage':<15}{'wall s':>9}{'CPU s':>9}{'CPU ms/row':>12}{'peak RSS MiB':>14}{'share of CPU':>14}")
        total_wall = sum(s["wall_s"] for s in info["stages"].values())
        total_cpu = sum(s["cpu_s"] for s in info["stages"].values())
        for name in STAGES:
            s = info["stages"][name]
            print(f"  {name:<15}{s['wall_s']:9.1f}{s['cpu_s']:9.1f}{1e3 * s['cpu_s'] / n:12.2f}"
                  f"{s['peak_rss_mib']:14,.0f}{100 * s['cpu_s'] / total_cpu:13.1f}%")
        print(f"  {'chain total':<15}{total_wall:9.1f}{total_cpu:9.1f}{1e3 * total_cpu / n:12.2f}"
              f"{info['process_peak_rss_mib']:14,.0f}{100.0:13.1f}%")
        report["summary"][tier] = {"samples": n, "rows_in": c["rows_in"], "wall_s": total_wall, "cpu_s": total_cpu,
                                   "cpu_ms_per_row": 1e3 * total_cpu / n, "peak_rss_mib": info["process_peak_rss_mib"]}

    if plain:
        e, li = plain["stages"]["encode"], plain["stages"]["imports_load"]
        print(f"\nplain pass: {plain['rows']:,} conversations (mean {plain['mean_chars']:.0f} chars), "
              f"embed_texts batch 64, length-sorted, torch threads {plain['torch_threads']}")
        print(f"  encode {e['wall_s']:.1f} s wall, {e['cpu_s']:.1f} s CPU ({1e3 * e['cpu_s'] / plain['rows']:.2f} "
              f"CPU ms/row); imports + model load {li['wall_s']:.1f} s wall, {li['cpu_s']:.1f} s CPU; "
              f"peak RSS {plain['process_peak_rss_mib']:,.0f} MiB")

    whole = src["rows"] == src["pool_rows"]
    how = "measured" if whole else "linear projection"
    print(f"\n{'tier':<8}{'chain wall':>11}{'chain CPU':>11}{'x plain':>9}{'x plain':>9}{'x plain+load':>14}"
          f"{'rows/s':>8}   whole pool ({src['pool_rows']:,} rows), {how}: wall / CPU   target")
    print(f"{'':<8}{'s':>11}{'s':>11}{'wall':>9}{'CPU':>9}{'wall':>14}")
    for tier, s in report["summary"].items():
        rate = s["rows_in"] / s["wall_s"]
        proj_wall = src["pool_rows"] / rate
        proj_cpu = s["cpu_s"] * src["pool_rows"] / s["rows_in"]
        s.update(rows_per_s=rate, projected_pool_wall_s=proj_wall, projected_pool_cpu_s=proj_cpu,
                 pool_figure="measured" if whole else "linear projection")
        ratios = ""
        if plain:
            e, li = plain["stages"]["encode"], plain["stages"]["imports_load"]
            s.update(ratio_wall=s["wall_s"] / e["wall_s"], ratio_cpu=s["cpu_s"] / e["cpu_s"],
                     ratio_wall_with_load=s["wall_s"] / (e["wall_s"] + li["wall_s"]))
            ratios = f"{s['ratio_wall']:8.2f}x{s['ratio_cpu']:8.2f}x{s['ratio_wall_with_load']:13.2f}x"
        else:
            ratios = f"{'-':>9}{'-':>9}{'-':>14}"
        if tier == "fp32":
            verdict = (f"<= {TARGET_RATIO}x plain: " + ("met" if s.get("ratio_wall", 1e9) <= TARGET_RATIO else "NOT met")
                       if plain else "(no plain pass)")
        else:
            verdict = f"<= {TARGET_POOL_S / 60:.0f} min: " + ("met" if proj_wall <= TARGET_POOL_S else "NOT met")
        print(f"{tier:<8}{s['wall_s']:11.1f}{s['cpu_s']:11.1f}{ratios}{rate:8.1f}   "
              f"{_fmt_s(proj_wall):>10} / {_fmt_s(proj_cpu):<10}   {verdict}")
    print("(x plain: chain over the plain pass's encode alone; x plain+load: over its imports + model load + "
          "encode. " + ("Whole-pool figures are this run's own." if whole else
                        "Whole-pool figures extrapolate this run's rows/s linearly: fixed costs (imports, model "
                        "loads, tag descriptions) are spread over more rows, while stages that grow faster than "
                        "the rows (near-duplicates, MIG) are not modelled.") + ")")

    # ---------------------------------------------------------------- agreement
    if "fp32" in chains and len(chains) > 1:
        ref = chain_outputs(chains["fp32"])
        print(f"\nagreement with fp32   {'MIG picks common':>17}{'E(D) fp32 / this':>22}{'near-dup removed J':>20}"
              f"{'tags mean J':>13}{'tags same':>11}{'quality rho':>13}{'kNN R@10':>10}")
        for tier, info in chains.items():
            if tier == "fp32":
                continue
            ag = agreement(ref, chain_outputs(info))
            ag.update(mig_information=[chains["fp32"]["mig"]["information"], info["mig"]["information"]],
                      **vector_agreement(chains["fp32"], info))
            report["agreement"][tier] = ag
            ed = f"{ag['mig_information'][0]:,.1f} / {ag['mig_information'][1]:,.1f}"
            print(f"{tier:<21}{ag['mig_picks_common_share']:17.3f}{ed:>22}{ag['near_dup_removed_jaccard']:20.3f}"
                  f"{ag['tags_mean_jaccard']:13.3f}{ag['tags_identical_share']:11.3f}{ag['quality_spearman']:13.3f}"
                  f"{ag['knn_recall_at_10']:10.3f}"
                  f"   (removed fp32 {ag['near_dup_removed'][0]:,} / {tier} {ag['near_dup_removed'][1]:,})")
        moved = {t: a for t, a in report["agreement"].items() if "pair_dcos_max" in a}
        if moved:
            print(f"\npairwise cosines of the stored whole vectors against fp32's (near: fp32 cosine within "
                  f"{NEAR_DUP_THRESHOLD} +- 0.05)")
            print(f"{'variant':<8}{'max |dcos|':>12}{'pairs near':>12}{'max |dcos| near':>17}"
                  f"{'pairs crossing ' + str(NEAR_DUP_THRESHOLD):>21}")
            for tier, a in moved.items():
                print(f"{tier:<8}{a['pair_dcos_max']:12.2e}{a['pairs_near_threshold']:12,}"
                      f"{a['pair_dcos_max_near_threshold']:17.2e}{a['pairs_crossing_threshold']:21,}")

    report["load_average_end"] = os.getloadavg()
    if report["git_head_end"] != head:
        print(f"\nWARNING: the code changed during the run ({head} -> {report['git_head_end']})")
    print(f"\nload average at the end {report['load_average_end'][0]:.1f}; started {report['date']}; "
          f"scratch {scratch}{' (kept)' if args.keep else ' (removed)'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
