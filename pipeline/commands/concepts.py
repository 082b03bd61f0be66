"""thresher concepts vocab|annotate|match: concept vocabularies and concept annotation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.commands import add_catalog_argument

NAME = "concepts"
HELP = "concept vocabularies (clean, merge, filter) and image-text concept annotation (captions, open_clip)"
PASSES_EXTRA_ARGS = True  # `annotate` is a Beam job: Beam pipeline options pass through


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="concepts_command", required=True)

    v = sub.add_parser("vocab", help="normalise, merge near-duplicates, drop unsafe and rare terms; write a vocabulary")
    v.set_defaults(passes_extra_args=False)  # only `annotate` is a Beam job
    v.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="vocabulary file(s): concept<TAB>synonyms|...<TAB>category[<TAB>count], or one term per "
                        "line; repeat to combine (earlier files win merges)")
    v.add_argument("--add-package-classes", nargs="?", const="coco,imagenet,kinetics400", default=None,
                   metavar="SOURCES", help="append class names shipped in installed packages "
                                           "(default coco,imagenet,kinetics400)")
    v.add_argument("--unsafe", metavar="FILE", default=None,
                   help="terms to drop, one per line (default: the shipped unsafe_terms.txt; 'none' for none)")
    v.add_argument("--embed-merge", action="store_true",
                   help="also merge names whose MiniLM embedding cosine exceeds --embed-threshold")
    v.add_argument("--fuzzy-threshold", type=float, default=0.92, help="string ratio above which names merge (0..1)")
    v.add_argument("--no-fuzzy", action="store_true", help="skip string-ratio merging")
    v.add_argument("--embed-threshold", type=float, default=0.95)
    v.add_argument("--counts", metavar="FILE", help="term<TAB>count lines added to the entries' counts")
    v.add_argument("--min-count", type=int, default=None, help="drop entries whose count is below this")
    v.add_argument("--out", required=True, help="the clean vocabulary (TSV)")
    v.add_argument("--report", nargs="?", const="-", default=None, metavar="FILE",
                   help="print a summary of what was merged and dropped; with FILE also write it as JSON")

    a = sub.add_parser("annotate", help="write caption_concepts or clip_concepts annotations for a dataset (Beam)")
    add_catalog_argument(a)
    a.add_argument("--dataset", required=True)
    a.add_argument("--annotator", choices=["caption", "clip"], default="caption")
    a.add_argument("--vocabulary", default=None, help="vocabulary file (default: the shipped one)")
    a.add_argument("--model", default="ViT-B-32", help="clip: open_clip architecture")
    a.add_argument("--pretrained", default=None,
                   help="clip: a pretrained tag already in the local cache or a checkpoint file; "
                        "omitted = random weights (plumbing tests only)")
    a.add_argument("--top-k", type=int, default=10)
    a.add_argument("--threshold", type=float, default=0.01)
    a.add_argument("--score", choices=["softmax", "cosine"], default="softmax")
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


def _vocab(args: argparse.Namespace) -> int:
    from pipeline.annotate import vocabulary as vb

    if not args.input and not args.add_package_classes:
        raise ValueError("give at least one --input FILE or --add-package-classes")
    entries = []
    for path in args.input:
        entries += vb.read_vocabulary_entries(path)
    sources = {Path(p).name: f"{len(vb.read_vocabulary_entries(p))} entries" for p in args.input}
    if args.add_package_classes:
        extra, notes = vb.package_class_names([s.strip() for s in args.add_package_classes.split(",") if s.strip()])
        entries += extra
        sources.update(notes)
    unsafe_path = None if args.unsafe == "none" else (args.unsafe or vb.DEFAULT_UNSAFE_TERMS)
    unsafe = vb.read_terms(unsafe_path) if unsafe_path else []
    counts = vb.read_counts(args.counts) if args.counts else None
    vocab, report = vb.build_vocabulary(
        entries, unsafe, min_count=args.min_count, counts=counts,
        fuzzy_threshold=None if args.no_fuzzy else args.fuzzy_threshold,
        embed_merge=args.embed_merge, embed_threshold=args.embed_threshold, sources=sources)
    how = [f"--input {Path(p).name}" for p in args.input]
    how += [f"--add-package-classes {args.add_package_classes}"] if args.add_package_classes else []
    how += [f"--unsafe {Path(unsafe_path).name}" if unsafe_path else "--unsafe none"]
    how += ["--no-fuzzy"] if args.no_fuzzy else [f"--fuzzy-threshold {args.fuzzy_threshold}"]
    how += [f"--embed-merge --embed-threshold {args.embed_threshold}"] if args.embed_merge else []
    how += [f"--min-count {args.min_count}"] if args.min_count is not None else []
    header = ["built by: thresher concepts vocab " + " ".join(how),
              f"{len(vocab)} entries; format: concept<TAB>synonyms|...<TAB>category[<TAB>count]"]
    header += [f"source {k}: {v}" for k, v in sources.items()]
    vocab.write(args.out, header)
    print(f"wrote {len(vocab)} entries to {args.out}")
    if args.report is not None:
        print("\n".join(report.summary_lines()))
        if args.report != "-":
            Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
            print(f"report: {args.report}")
    return 0


def _annotate(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.stages.concepts import run_caption_concepts, run_clip_concepts

    if args.annotator == "caption":
        result = run_caption_concepts(args.catalog, args.dataset, args.vocabulary, workers=args.workers,
                                      force=args.force, beam_args=beam_args)
    else:
        result = run_clip_concepts(args.catalog, args.dataset, args.model, args.pretrained, args.top_k,
                                   args.threshold, args.vocabulary, score=args.score, template=args.template,
                                   batch_size=args.batch_size, device=args.device, workers=args.workers,
                                   force=args.force, beam_args=beam_args)
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
        return _vocab(args)
    if args.concepts_command == "annotate":
        return _annotate(args, extra)
    return _match(args)
