"""thresher vocab tags|concepts: the one vocabulary tool (clean, merge, prune; report what was done).

``tags`` consolidates an intention-tag list (InsTag-style: normalise, merge near-duplicates by
string ratio and MiniLM cosine, drop rare tags) into a raw -> canonical mapping; ``concepts``
builds a concept vocabulary (concept, synonyms, category, count) for the caption and CLIP
concept annotators. ``thresher annotate tag-vocab`` and ``thresher concepts vocab`` are the old,
deprecated spellings of the same two tools.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "vocab"
HELP = "vocabularies: consolidate a tag list (tags) or build a concept vocabulary (concepts)"


def add_tag_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="text file: one tag per line, or tag<TAB>count")
    p.add_argument("--report", action="store_true", help="print every merge and drop, not only the totals")
    p.add_argument("--min-frequency", type=int, default=1, help="drop merged tags seen fewer times")
    p.add_argument("--fuzzy-threshold", type=float, default=0.92, help="merge when string ratio exceeds this")
    p.add_argument("--embed-threshold", type=float, default=0.95, help="merge when MiniLM cosine exceeds this")
    p.add_argument("--no-embed", action="store_true", help="merge on string similarity only")
    p.add_argument("--output", default=None, help="write the mapping raw<TAB>canonical (empty: dropped)")
    p.add_argument("--json", default=None, help="write the full report as JSON")


def add_concept_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="vocabulary file(s): concept<TAB>synonyms|...<TAB>category[<TAB>count], or one term per "
                        "line; repeat to combine (earlier files win merges)")
    p.add_argument("--add-package-classes", nargs="?", const="coco,imagenet,kinetics400", default=None,
                   metavar="SOURCES", help="append class names shipped in installed packages "
                                           "(default coco,imagenet,kinetics400)")
    p.add_argument("--unsafe", metavar="FILE", default=None,
                   help="terms to drop, one per line (default: the shipped unsafe_terms.txt; 'none' for none)")
    p.add_argument("--embed-merge", action="store_true",
                   help="also merge names whose MiniLM embedding cosine exceeds --embed-threshold")
    p.add_argument("--fuzzy-threshold", type=float, default=0.92, help="string ratio above which names merge (0..1)")
    p.add_argument("--no-fuzzy", action="store_true", help="skip string-ratio merging")
    p.add_argument("--embed-threshold", type=float, default=0.95)
    p.add_argument("--counts", metavar="FILE", help="term<TAB>count lines added to the entries' counts")
    p.add_argument("--min-count", type=int, default=None, help="drop entries whose count is below this")
    p.add_argument("--out", required=True, help="the clean vocabulary (TSV)")
    p.add_argument("--report", nargs="?", const="-", default=None, metavar="FILE",
                   help="print a summary of what was merged and dropped; with FILE also write it as JSON")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vocabulary", required=True)
    add_tag_arguments(sub.add_parser("tags", help="normalise, merge and prune a tag list into a raw -> canonical "
                                                  "mapping; report what was done"))
    add_concept_arguments(sub.add_parser("concepts", help="normalise, merge near-duplicates, drop unsafe and rare "
                                                          "terms; write a concept vocabulary"))


def run_tags(args: argparse.Namespace) -> int:
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


def run_concepts(args: argparse.Namespace, command: str = "thresher vocab concepts") -> int:
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
    header = [f"built by: {command} " + " ".join(how),
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


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.vocabulary == "tags":
        return run_tags(args)
    return run_concepts(args)
