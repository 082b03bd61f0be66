"""thresher index: build the FAISS index of an embeddings partition (and optionally mark near-duplicates)."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument

NAME = "index"
HELP = "build a FAISS index over a dataset's embeddings; --near-dup also writes near-duplicate groups"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="embeddings folder name, e.g. all-MiniLM-L6-v2")
    p.add_argument("--kind", choices=["flat", "ivf_flat", "ivf_pq", "hnsw"], default=None,
                   help="index layout (default: chosen from the number of vectors)")
    p.add_argument("--recall-queries", type=int, default=1000, help="queries used to measure recall@10")
    p.add_argument("--workers", type=int, default=None, help="FAISS threads (default: all cores)")
    p.add_argument("--near-dup", type=float, default=None, metavar="COSINE",
                   help="also group near-duplicates at this cosine threshold (e.g. 0.95) into "
                        "annotations/near_dup_<model>/")
    p.add_argument("--force", action="store_true", help="rebuild even if the embeddings are unchanged")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.stages.index import run_index_build, run_near_duplicates

    result = run_index_build(args.catalog, args.dataset, args.model, kind=args.kind, workers=args.workers,
                             force=args.force, recall_queries=args.recall_queries)
    print(result.summary())
    if args.near_dup is not None:
        nd = run_near_duplicates(args.catalog, args.dataset, args.model, args.near_dup, workers=args.workers,
                                 force=args.force)
        print(nd.summary())
    return 0
