"""NLVR ground-truth check of the caption concept annotator (shapes and colours).

NLVR sentences describe synthetic scenes whose objects are known exactly (``structured_rep``:
per box a list of objects with type circle/square/triangle and colour Yellow/Black/#0099ff). For
each of the dev rows this script compares the shape and colour concepts the caption annotator
extracts from the sentence with

(a) the shapes and colours the sentence literally mentions (a hand-written reference lexicon over
    the raw words, including the misspellings found in the dev sentences): does the annotator
    read the caption correctly?
(b) the shapes and colours of the objects present in the image (any of the 3 boxes): how far do
    caption concepts reflect image content? Reported for all rows and separately for rows whose
    sentence is true / false for the image (``label``).

Per row the compared things are sets; precision = sum |extracted & reference| / sum |extracted|,
recall = sum |extracted & reference| / sum |reference| (micro-averaged over rows).

Mapping to NLVR's three shapes: circle -> circle, square -> square, triangle -> triangle,
block -> square and tower -> square (NLVR towers are stacks of square blocks), cube -> square.
Colours: yellow, black, blue (#0099ff). Everything else the annotator finds ("box", "object",
"grey", "edge") is outside this universe and not counted. "box" in NLVR is the grey panel, not an
object, so it is deliberately not mapped.

Baseline, measured in the same run: a naive matcher that looks for every vocabulary form as a
word-bounded substring of the lower-cased sentence (no lemmas, no counts, no negation), the
simplest MetaCLIP-like substring match.

    python benchmarks/nlvr_concepts.py [--data ../shared/data/image_text/nlvr_dev/dev.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.annotate.concepts import CaptionConceptMatcher  # noqa: E402
from pipeline.annotate.vocabulary import Vocabulary, load_vocabulary, tokenize  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "image_text" / "nlvr_dev" / "dev.json"

SHAPE_OF_CONCEPT = {"circle": "circle", "square": "square", "triangle": "triangle", "block": "square",
                    "tower": "square", "cube": "square"}
COLOUR_OF_CONCEPT = {"yellow": "yellow", "black": "black", "blue": "blue"}
COLOUR_OF_RENDER = {"Yellow": "yellow", "Black": "black", "#0099ff": "blue"}

# Reference lexicon for (a): the words of the dev sentences that name a shape or colour, written
# out by hand, including the misspellings an edit-distance scan of the 989 sentences turned up.
REFERENCE_SHAPE_WORDS = {
    "circle": "circle", "circles": "circle", "cirlce": "circle",
    "square": "square", "squares": "square", "squere": "square",
    "triangle": "triangle", "triangles": "triangle",
    "block": "square", "blocks": "square", "blccks": "square",
    "tower": "square", "towers": "square", "cube": "square", "cubes": "square",
}
REFERENCE_COLOUR_WORDS = {"yellow": "yellow", "black": "black", "blue": "blue", "ablue": "blue"}
_WORDS = re.compile(r"[a-z]+")


def load_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NLVR file {path} does not exist; pass --data PATH/dev.json")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference_mentions(sentence: str) -> tuple[set[str], set[str]]:
    words = _WORDS.findall(sentence.lower())
    return ({REFERENCE_SHAPE_WORDS[w] for w in words if w in REFERENCE_SHAPE_WORDS},
            {REFERENCE_COLOUR_WORDS[w] for w in words if w in REFERENCE_COLOUR_WORDS})


def present_objects(structured_rep: list[list[dict]]) -> tuple[set[str], set[str]]:
    objects = [o for box in structured_rep for o in box]
    return {o["type"] for o in objects}, {COLOUR_OF_RENDER[o["color"]] for o in objects}


def to_nlvr(concepts: Iterable[str]) -> tuple[set[str], set[str]]:
    names = list(concepts)
    return ({SHAPE_OF_CONCEPT[c] for c in names if c in SHAPE_OF_CONCEPT},
            {COLOUR_OF_CONCEPT[c] for c in names if c in COLOUR_OF_CONCEPT})


@dataclass
class PR:
    tp: int = 0
    predicted: int = 0
    reference: int = 0

    def add(self, pred: set[str], ref: set[str]) -> None:
        self.tp += len(pred & ref)
        self.predicted += len(pred)
        self.reference += len(ref)

    @property
    def precision(self) -> float:
        return self.tp / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / self.reference if self.reference else float("nan")


def evaluate(rows: list[dict], extract: Callable[[str], Iterable[str]]) -> dict[tuple[str, str], PR]:
    """(comparison, kind) -> PR; comparison in mentions | image_all | image_true | image_false."""
    out: dict[tuple[str, str], PR] = {}
    for row in rows:
        shapes, colours = to_nlvr(extract(row["sentence"]))
        ref_shapes, ref_colours = reference_mentions(row["sentence"])
        img_shapes, img_colours = present_objects(row["structured_rep"])
        label = "image_true" if str(row["label"]).lower() == "true" else "image_false"
        for comparison, (s_ref, c_ref) in (("mentions", (ref_shapes, ref_colours)),
                                           ("image_all", (img_shapes, img_colours)),
                                           (label, (img_shapes, img_colours))):
            out.setdefault((comparison, "shape"), PR()).add(shapes, s_ref)
            out.setdefault((comparison, "colour"), PR()).add(colours, c_ref)
    return out


def naive_extractor(vocabulary: Vocabulary) -> Callable[[str], list[str]]:
    forms = [(" " + " ".join(tokenize(f)) + " ", e.concept) for e in vocabulary for f in e.forms if tokenize(f)]

    def extract(sentence: str) -> list[str]:
        text = " " + " ".join(tokenize(sentence)) + " "
        return sorted({concept for form, concept in forms if form in text})

    return extract


def annotator_extractor(matcher: CaptionConceptMatcher) -> Callable[[str], list[str]]:
    return lambda sentence: [c["concept"] for c in matcher.concepts(sentence)]


def reference_extractor(sentence: str) -> list[str]:
    shapes, colours = reference_mentions(sentence)
    return sorted(shapes | colours)


def negated_mentions(rows: list[dict], matcher: CaptionConceptMatcher) -> int:
    """Shape/colour mentions the annotator read as negated ("no black block") and so dropped."""
    n = 0
    for row in rows:
        for m in matcher.mentions(row["sentence"]):
            if m.negated and (m.concept in SHAPE_OF_CONCEPT or m.concept in COLOUR_OF_CONCEPT):
                n += 1
    return n


def _time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def format_table(results: dict[str, dict[tuple[str, str], PR]]) -> list[str]:
    lines = [f"{'extractor':<12}{'compared with':<28}{'kind':<8}{'precision':>10}{'recall':>8}{'tp/pred/ref':>16}"]
    names = {"mentions": "(a) sentence mentions", "image_all": "(b) image, all rows",
             "image_true": "(b) image, label=true", "image_false": "(b) image, label=false"}
    for extractor, res in results.items():
        for comparison in ("mentions", "image_all", "image_true", "image_false"):
            for kind in ("shape", "colour"):
                pr = res[(comparison, kind)]
                lines.append(f"{extractor:<12}{names[comparison]:<28}{kind:<8}{pr.precision:>10.3f}{pr.recall:>8.3f}"
                             f"{f'{pr.tp}/{pr.predicted}/{pr.reference}':>16}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median reported)")
    args = ap.parse_args(argv)

    import psutil

    rows = load_rows(args.data)
    vocab = load_vocabulary()
    t0 = time.perf_counter()
    matcher = CaptionConceptMatcher(vocab)
    build_s = time.perf_counter() - t0
    annot = annotator_extractor(matcher)
    naive = naive_extractor(vocab)
    sentences = [r["sentence"] for r in rows]

    results = {"annotator": evaluate(rows, annot), "naive": evaluate(rows, naive),
               "reference": evaluate(rows, reference_extractor)}
    print(f"NLVR dev: {len(rows)} rows ({sum(str(r['label']).lower() == 'true' for r in rows)} label=true); "
          f"vocabulary: {len(vocab)} entries")
    print("\n".join(format_table(results)))
    print("('reference' extracts with the hand lexicon itself: its (a) row is 1.0 by definition, its (b) rows show "
          "how far the sentences' words reflect the image)")
    print(f"shape/colour mentions the annotator dropped as negated: {negated_mentions(rows, matcher)}")

    t_annot = _time(lambda: [annot(s) for s in sentences], args.repeats)
    t_naive = _time(lambda: [naive(s) for s in sentences], args.repeats)
    tracemalloc.start()
    [annot(s) for s in sentences]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"matcher build: {build_s * 1000:.0f} ms for {len(vocab)} entries")
    print(f"annotate {len(sentences)} sentences (median of {args.repeats}): annotator {t_annot * 1000:.1f} ms "
          f"({len(sentences) / t_annot:,.0f}/s), naive substring {t_naive * 1000:.1f} ms "
          f"({len(sentences) / t_naive:,.0f}/s); naive/annotator time ratio {t_naive / t_annot:.1f}x")
    print(f"peak traced allocation while annotating: {peak / 2**20:.2f} MiB; "
          f"process RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
