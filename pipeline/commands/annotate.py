"""thresher annotate: tag and score instruction samples, and clean tag vocabularies."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import add_catalog_argument
from pipeline.embed.tiers import TIERS
from pipeline.registry import ANNOTATORS

NAME = "annotate"
HELP = "tag instructions (InsTag-style) or score them (DEITA-style), offline or via an LLM endpoint"
PASSES_EXTRA_ARGS = True  # Beam pipeline options of tags/quality pass through


def _stage_arguments(p: argparse.ArgumentParser, group: str) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True, help="instruction dataset partition to annotate")
    options = ANNOTATORS.options(group)
    p.add_argument("--annotator", choices=options, default=options[0],
                   help="; ".join(f"{e.option}: {e.help}" for e in ANNOTATORS.values() if e.group == group))
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
    _stage_arguments(tags, "tags")
    tags.add_argument("--vocabulary", default=None, help="tag TSV for the offline tagger (default: the shipped one)")
    tags.add_argument("--top-k", type=int, default=None, help="offline: embedding proposals per sample")
    tags.add_argument("--threshold", type=float, default=None, help="offline: cosine a proposal must reach")
    quality = sub.add_parser("quality", help="DEITA-style quality x complexity -> annotations/<offline|llm>_quality/")
    _stage_arguments(quality, "quality")
    quality.add_argument("--no-embed", action="store_true",
                         help="offline: score without the on-topic feature (needs no text embeddings)")
    from pipeline.commands import vocab

    old = sub.add_parser("tag-vocab", help="deprecated spelling of `thresher vocab tags`")
    old.set_defaults(passes_extra_args=False)  # not a Beam job: no pass-through flags
    vocab.add_tag_arguments(old)


def _run_stage(args: argparse.Namespace, beam_args: list[str]) -> int:
    """The registered annotator ``<--annotator>_<tags|quality>``, called with its parameters."""
    from pipeline.stages.instruction_annotations import stage_summary

    entry = ANNOTATORS.find(args.what, args.annotator)
    params = {p.name: getattr(args, p.name) for p in entry.params if hasattr(args, p.name)}
    if any(p.name == "use_embeddings" for p in entry.params):
        params["use_embeddings"] = not args.no_embed
    if entry.option == "llm" and not (args.endpoint and args.model):
        raise ValueError("--annotator llm needs --endpoint URL and --model NAME")
    params = entry.validate(params)
    result = entry.load()(args.catalog, args.dataset, workers=args.workers, force=args.force,
                          beam_args=beam_args, **params)
    print(stage_summary(result))
    return 0


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.what == "tag-vocab":
        from pipeline.commands import vocab

        print("thresher annotate tag-vocab is deprecated; use `thresher vocab tags` (same options)", file=sys.stderr)
        if beam_args:
            raise ValueError(f"unrecognised arguments: {' '.join(beam_args)}")
        return vocab.run_tags(args)
    return _run_stage(args, beam_args)
