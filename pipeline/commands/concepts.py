"""thresher concepts annotate|match: concept annotation of image-text samples (vocab: see `thresher vocab`)."""

from __future__ import annotations

import argparse

from pipeline.commands import add_catalog_argument, vocab
from pipeline.registry import ANNOTATORS

NAME = "concepts"
HELP = "image-text concept annotation (captions, open_clip) and matching (vocabularies: `thresher vocab concepts`)"
PASSES_EXTRA_ARGS = True  # `annotate` is a Beam job: Beam pipeline options pass through


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="concepts_command", required=True)

    v = sub.add_parser("vocab", help="deprecated spelling of `thresher vocab concepts`")
    v.set_defaults(passes_extra_args=False)  # only `annotate` is a Beam job
    vocab.add_concept_arguments(v)

    a = sub.add_parser("annotate", help="write caption_concepts or clip_concepts annotations for a dataset (Beam)")
    add_catalog_argument(a)
    a.add_argument("--dataset", required=True)
    options = ANNOTATORS.options("concepts")
    a.add_argument("--annotator", choices=options, default=options[0],
                   help="; ".join(f"{e.option}: {e.help}" for e in ANNOTATORS.values() if e.group == "concepts"))
    a.add_argument("--vocabulary", default=None, help="vocabulary file (default: the shipped one)")
    a.add_argument("--model", default="ViT-B-32", help="clip: open_clip architecture")
    a.add_argument("--pretrained", default=None,
                   help="clip: a pretrained tag already in the local cache or a checkpoint file; "
                        "omitted = random weights (plumbing tests only)")
    a.add_argument("--top-k", type=int, default=10)
    a.add_argument("--threshold", type=float, default=0.01)
    a.add_argument("--score", choices=ANNOTATORS["clip_concepts"].param("score").choice_values(), default="softmax")
    a.add_argument("--template", default="a photo of a {}.")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--device", default=None)
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--force", action="store_true")

    m = sub.add_parser("match", help="print the concepts the caption annotator finds in some text")
    m.set_defaults(passes_extra_args=False)
    m.add_argument("text", nargs="+")
    m.add_argument("--vocabulary", default=None)
    m.add_argument("--mentions", action="store_true", help="print every mention with its span and count")


def _annotate(args: argparse.Namespace, beam_args: list[str]) -> int:
    entry = ANNOTATORS.find("concepts", args.annotator)
    # the CLI's --model is the clip annotator's model_name
    given = {**vars(args), "model_name": args.model}
    params = entry.validate({p.name: given[p.name] for p in entry.params if p.name in given})
    result = entry.load()(args.catalog, args.dataset, workers=args.workers, force=args.force, beam_args=beam_args,
                          **params)
    state = "unchanged, skipped" if result.skipped else f"{result.seconds:.1f} s"
    print(f"{result.stage} {result.dataset}: {result.rows_in} samples -> {result.rows_out} rows ({state})")
    print(f"  output: {result.output}")
    return 0


def _match(args: argparse.Namespace) -> int:
    from pipeline.annotate.concepts import CaptionConceptMatcher
    from pipeline.annotate.vocabulary import load_vocabulary

    matcher = CaptionConceptMatcher(load_vocabulary(args.vocabulary))
    text = " ".join(args.text)
    if args.mentions:
        for m in matcher.mentions(text):
            flags = ",".join(f for f, on in (("plural", m.plural), ("definite", m.definite), ("negated", m.negated)) if on)
            print(f"[{m.start}:{m.end}] {m.text!r} -> {m.concept} ({m.category}) x{m.count} via {m.how}"
                  + (f" [{flags}]" if flags else ""))
    for c in matcher.concepts(text):
        print(f"{c['concept']}\t{c['count']}")
    return 0


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra and args.concepts_command != "annotate":
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    if args.concepts_command == "vocab":
        import sys

        print("thresher concepts vocab is deprecated; use `thresher vocab concepts` (same options)", file=sys.stderr)
        return vocab.run_concepts(args, "thresher concepts vocab")
    if args.concepts_command == "annotate":
        return _annotate(args, extra)
    return _match(args)
