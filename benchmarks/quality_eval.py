"""Does the offline quality scorer agree with human raters? Self-instruct's 252 user-oriented
instructions, each answered by 8 models; the paper's human evaluation puts text-davinci-003 on top
and plain GPT-3 davinci at the bottom.

Prints, for the 252 instructions, how often the scorer prefers the text-davinci-003 answer over
the davinci answer (wins / ties / losses), the same for text-davinci-003 against every other
model, and the mean DEITA-style score per model, sorted. Baselines measured in the same run: the
scorer without the MiniLM on-topic feature, and "the longer answer is better". The scorer never
sees the ``model`` field; only this script reads it, to group the answers.

    .venv/bin/python benchmarks/quality_eval.py [--data PATH] [--no-embed] [--json OUT]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.annotate.quality import OfflineQualityScorer  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "instructions" / "self_instruct_user_oriented_predictions.jsonl.gz"
TOP, BOTTOM = "text-davinci-003_predictions", "davinci_predictions"


def load(path: Path) -> tuple[list[tuple[str, str]], list[str], dict[tuple[str, str], dict[str, list[dict]]]]:
    """Conversations grouped by (instruction, input) and model, built as ingest builds them."""
    by: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(dict)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            instruction, extra = r["instruction"].strip(), (r.get("input") or "").strip()
            user = f"{instruction}\n\n{extra}" if extra else instruction
            by[(r["instruction"], r.get("input") or "")][r["model"]] = [
                {"role": "user", "content": user}, {"role": "assistant", "content": r.get("response") or ""}]
    keys = sorted(k for k, v in by.items() if TOP in v and BOTTOM in v)
    models = sorted({m for v in by.values() for m in v})
    return keys, models, by


def preference(table: np.ndarray, a: int, b: int) -> dict[str, float]:
    x, y = table[:, a], table[:, b]
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    ties = np.isclose(x, y, rtol=0, atol=1e-9)
    n = len(x)
    return {"n": int(n), "wins": float(np.mean((x > y) & ~ties)), "ties": float(np.mean(ties)),
            "losses": float(np.mean((x < y) & ~ties))}


def score_table(keys, models, by, scores_of) -> np.ndarray:
    convs, where = [], []
    for i, k in enumerate(keys):
        for j, m in enumerate(models):
            if m in by[k]:
                convs.append(by[k][m])
                where.append((i, j))
    values = scores_of(convs)
    table = np.full((len(keys), len(models)), np.nan)
    for (i, j), v in zip(where, values):
        table[i, j] = v
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--no-embed", action="store_true", help="skip the MiniLM run (heuristics only)")
    ap.add_argument("--embed-chars", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"data file {args.data} not found; pass --data", file=sys.stderr)
        return 2
    keys, models, by = load(args.data)
    n_answers = sum(len(by[k]) for k in keys)
    print(f"{len(keys)} instructions x {len(models)} models = {n_answers} answers  ({args.data.name})")
    top, bottom = models.index(TOP), models.index(BOTTOM)

    runs: dict[str, dict] = {}
    variants = [("heuristics (no embeddings)", OfflineQualityScorer(embedder=False)),
                ("response length baseline", None)]
    if not args.no_embed:
        t0 = time.perf_counter()
        scorer = OfflineQualityScorer(embed_chars=args.embed_chars)
        scorer._embed(["warm-up"])  # load the model outside the timed part
        load_s = time.perf_counter() - t0
        variants.insert(0, ("offline scorer (heuristics + MiniLM)", scorer))
        print(f"MiniLM loaded in {load_s:.1f} s")
    for name, scorer in variants:
        t0 = time.perf_counter()
        if scorer is None:
            table = score_table(keys, models, by, lambda cs: [len(c[-1]["content"].strip()) for c in cs])
        else:
            table = score_table(keys, models, by, lambda cs, s=scorer: [r.score for r in s.score_many(cs)])
        seconds = time.perf_counter() - t0
        runs[name] = {"seconds": seconds, "answers_per_s": n_answers / seconds if seconds else float("inf"),
                      "top_vs_bottom": preference(table, top, bottom),
                      "top_vs_each": {m: preference(table, top, j) for j, m in enumerate(models) if j != top},
                      "mean_score": {m: float(np.nanmean(table[:, j])) for j, m in enumerate(models)}}

    print()
    print(f"{'scorer':40s} {'003 > davinci':>13s} {'ties':>6s} {'003 < davinci':>13s} {'answers/s':>10s}")
    for name, r in runs.items():
        p = r["top_vs_bottom"]
        print(f"{name:40s} {p['wins']:>13.1%} {p['ties']:>6.1%} {p['losses']:>13.1%} {r['answers_per_s']:>10.0f}")
    main_run = next(iter(runs))
    r = runs[main_run]
    print(f"\n{main_run}: text-davinci-003 against every other model (wins / ties / losses)")
    for m, p in sorted(r["top_vs_each"].items(), key=lambda kv: -kv[1]["wins"]):
        print(f"  vs {m:50s} {p['wins']:6.1%} {p['ties']:6.1%} {p['losses']:6.1%}")
    print(f"\n{main_run}: mean score per model (DEITA scale: quality x complexity, 1..36)")
    for m, v in sorted(r["mean_score"].items(), key=lambda kv: -kv[1]):
        print(f"  {m:50s} {v:6.2f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_mib = psutil.Process().memory_info().rss / 2**20
    print(f"\npeak RSS {peak_mib:,.0f} MiB (now {rss_mib:,.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "peak_rss_mib": peak_mib, "n_instructions": len(keys)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
