"""thresher annotate: tag and score instruction samples, and clean tag vocabularies."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.commands import add_catalog_argument
from pipeline.embed.tiers import TIERS

NAME = "annotate"
HELP = "tag instructions (InsTag-style) or score them (DEITA-style), offline or via an LLM endpoint"
PASSES_EXTRA_ARGS = True  # Beam pipeline options of tags/quality pass through


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True, help="instruction dataset partition to annotate")
    p.add_argument("--annotator", choices=["offline", "llm"], default="offline",
                   help="offline: MiniLM + rules / heuristics (default); llm: an OpenAI-compatible endpoint")
    p.add_argument("--name", default=None,
                   help="output folder under annotations/ (default offline_<kind> or llm_<kind>; must end with _<kind>)")
    p.add_argument("--workers", type=int, default=1, help="in-process Beam workers (processes)")
    p.add_argument("--force", action="store_true", help="recompute even if inputs and parameters are unchanged")
    p.add_argument("--device", default=None, help="offline embedder device (default: cuda when available, else cpu)")
    p.add_argument("--tier", choices=TIERS, default="fp32",
                   help="offline: which stored text embeddings to read (made first when missing): fp32 MiniLM, "
                        "or a cheaper tier of it (see docs/embedding_tiers.md)")
    llm = p.add_argument_group("LLM annotator (--annotator llm)")
    llm.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
    llm.add_argument("--model", help="model name the endpoint serves")
    llm.add_argument("--concurrency", type=int, default=8, help="requests in flight per worker")
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    llm.add_argument("--retries", type=int, default=3, help="retries after a timeout, connection error, 429 or 5xx")
    llm.add_argument("--max-tokens", type=int, default=512)
    llm.add_argument("--api-key-env", default="THRESHER_LLM_API_KEY",
                     help="environment variable holding the API key, if the endpoint needs one")
    llm.add_argument("--cache", default=None, help="SQLite reply cache (default <catalog>/cache/llm_annotations.sqlite)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    tags = sub.add_parser("tags", help="InsTag-style intention tags -> annotations/<offline|llm>_tags/")
    _stage_arguments(tags)
    tags.add_argument("--vocabulary", default=None, help="tag TSV for the offline tagger (default: the shipped one)")
    tags.add_argument("--top-k", type=int, default=None, help="offline: embedding proposals per sample")
    tags.add_argument("--threshold", type=float, default=None, help="offline: cosine a proposal must reach")
    quality = sub.add_parser("quality", help="DEITA-style quality x complexity -> annotations/<offline|llm>_quality/")
    _stage_arguments(quality)
    quality.add_argument("--no-embed", action="store_true",
                         help="offline: score without the on-topic feature (needs no text embeddings)")
    vocab = sub.add_parser("tag-vocab", help="normalise, merge and prune a tag list; report what was done")
    vocab.set_defaults(passes_extra_args=False)  # not a Beam job: no pass-through flags
    vocab.add_argument("--input", required=True, help="text file: one tag per line, or tag<TAB>count")
    vocab.add_argument("--report", action="store_true", help="print every merge and drop, not only the totals")
    vocab.add_argument("--min-frequency", type=int, default=1, help="drop merged tags seen fewer times")
    vocab.add_argument("--fuzzy-threshold", type=float, default=0.92, help="merge when string ratio exceeds this")
    vocab.add_argument("--embed-threshold", type=float, default=0.95, help="merge when MiniLM cosine exceeds this")
    vocab.add_argument("--no-embed", action="store_true", help="merge on string similarity only")
    vocab.add_argument("--output", default=None, help="write the mapping raw<TAB>canonical (empty: dropped)")
    vocab.add_argument("--json", default=None, help="write the full report as JSON")


def _llm_config(args: argparse.Namespace):
    from pipeline.annotate.llm import LLMConfig

    if not args.endpoint or not args.model:
        raise ValueError("--annotator llm needs --endpoint URL and --model NAME")
    return LLMConfig(endpoint=args.endpoint, model=args.model, api_key=os.environ.get(args.api_key_env) or None,
                     concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.retries,
                     max_tokens=args.max_tokens)


def _run_tags(args: argparse.Namespace, beam_args: list[str]) -> int:
    from dataclasses import replace

    from pipeline.annotate.tags import TaggerConfig
    from pipeline.stages import instruction_annotations as stage

    if args.annotator == "llm":
        result = stage.run_tag_annotation(args.catalog, args.dataset, stage.LLM_TAGS, llm=_llm_config(args),
                                          cache_path=args.cache, name=args.name, workers=args.workers,
                                          beam_args=beam_args, force=args.force)
    else:
        config = TaggerConfig()
        if args.top_k is not None:
            config = replace(config, top_k=args.top_k)
        if args.threshold is not None:
            config = replace(config, threshold=args.threshold)
        result = stage.run_tag_annotation(args.catalog, args.dataset, stage.OFFLINE_TAGS, vocabulary=args.vocabulary,
                                          tagger_config=config, device=args.device, tier=args.tier, name=args.name,
                                          workers=args.workers, beam_args=beam_args, force=args.force)
    print(stage.stage_summary(result))
    return 0


def _run_quality(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.stages import instruction_annotations as stage

    if args.annotator == "llm":
        result = stage.run_quality_annotation(args.catalog, args.dataset, stage.LLM_QUALITY, llm=_llm_config(args),
                                              cache_path=args.cache, name=args.name, workers=args.workers,
                                              beam_args=beam_args, force=args.force)
    else:
        result = stage.run_quality_annotation(args.catalog, args.dataset, stage.OFFLINE_QUALITY,
                                              use_embeddings=not args.no_embed, tier=args.tier, name=args.name,
                                              workers=args.workers, beam_args=beam_args, force=args.force)
    print(stage.stage_summary(result))
    return 0


def _run_tag_vocab(args: argparse.Namespace) -> int:
    from pipeline.annotate.tags import consolidate_tags, read_tag_list

    counts = read_tag_list(args.input)
    report = consolidate_tags(counts, min_frequency=args.min_frequency, fuzzy_threshold=args.fuzzy_threshold,
                              embed_threshold=args.embed_threshold, embedder=False if args.no_embed else None)
    lines = report.summary_lines(examples=10**9 if args.report else 0)
    print("\n".join(lines))
    if args.output:
        out = Path(args.output)
        out.write_text("".join(f"{raw}\t{canon or ''}\n" for raw, canon in sorted(report.mapping.items())),
                       encoding="utf-8")
        print(f"mapping written to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"report written to {args.json}")
    return 0


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.what == "tag-vocab":
        if beam_args:
            print(f"thresher annotate tag-vocab: unrecognised arguments: {' '.join(beam_args)}", file=sys.stderr)
            return 2
        return _run_tag_vocab(args)
    if args.what == "tags":
        return _run_tags(args, beam_args)
    return _run_quality(args, beam_args)
