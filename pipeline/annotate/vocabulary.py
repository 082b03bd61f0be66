"""Concept (or tag) vocabularies: the file format, normalisation, and the clean-up tool.

A vocabulary is a list of entries ``concept<TAB>synonym|synonym|...<TAB>category[<TAB>count]``;
the concept name comes first and is what annotators emit, synonyms are other surface forms that
mean the same thing (irregular plurals such as ``mouse|mice`` included), the category groups
entries (animal, colour, action, ...) and decides how captions count them, and the optional
count is a corpus frequency used to drop rare entries. ``#`` starts a comment line. A file with
no tabs is read as one term per line.

The clean-up follows the recipe of the DataConcept vocabulary (CABS paper): lower-case, strip
punctuation, lemmatise (``simplemma``, which ships its own data), merge near-duplicates (string
ratio > 0.92, optionally MiniLM embedding cosine > 0.95), drop unsafe terms, drop rare entries,
and say what was done (:class:`VocabularyReport`). Nothing here is specific to images: the same
tool cleans instruction tag vocabularies.

Words are handled in two forms. A concept *name* keeps its words and only its head (last word)
becomes singular ("living room", not "live room"). A *lemma key* lemmatises every word and is
used for matching and for finding duplicates, so "Teddy Bears" and "teddy bear" are one entry.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.components import UnionFind

HERE = Path(__file__).resolve().parent
DEFAULT_VOCABULARY = HERE / "concept_vocab.tsv"
DEFAULT_UNSAFE_TERMS = HERE / "unsafe_terms.txt"
DEFAULT_CATEGORY = "concept"

FUZZY_THRESHOLD = 0.92  # DataConcept: merge names whose string ratio exceeds this
EMBED_THRESHOLD = 0.95  # DataConcept: merge names whose embedding cosine exceeds this

# Categories whose entries are verb phrases: their names are not singularised ("blowing out
# candles" stays), and caption matching treats them as a separate layer (see concepts.py).
ACTION_CATEGORIES = frozenset({"action", "activity"})

# Nouns with no singular, or whose -s form is its own word: lemmatisers map "glasses" to
# "glass" and "shorts" to "short", which would merge eyewear with a material and a size.
INVARIANT_WORDS = frozenset("""
glasses eyeglasses sunglasses goggles spectacles binoculars scissors shears pliers tongs tweezers
trousers pants jeans shorts leggings tights pajamas pyjamas overalls briefs sweatpants clothes
stairs dice species series news mathematics physics billiards darts checkers remains outskirts
headquarters barracks gallows means crossroads premises surroundings belongings woods lens
earmuffs mittens suds measles chess bus gas glass grass dress moss cross iris canvas scrubs braces
handcuffs suspenders blinds
""".split())

# Plurals a dictionary lemmatiser gets wrong or maps to a verb ("leaves" -> "leave").
IRREGULAR_PLURALS: dict[str, str] = {
    "people": "person", "persons": "person", "men": "man", "women": "woman", "children": "child",
    "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox", "lice": "louse",
    "cacti": "cactus", "fungi": "fungus", "leaves": "leaf", "shelves": "shelf", "knives": "knife",
    "wolves": "wolf", "halves": "half", "calves": "calf", "loaves": "loaf", "thieves": "thief",
    "wives": "wife", "elves": "elf", "scarves": "scarf", "hooves": "hoof", "larvae": "larva",
    "antennae": "antenna", "bacteria": "bacterium", "octopi": "octopus", "policemen": "policeman",
    "firemen": "fireman", "fishermen": "fisherman", "businessmen": "businessman",
    "businesswomen": "businesswoman", "snowmen": "snowman", "gentlemen": "gentleman",
    "policewomen": "policewoman", "salesmen": "salesman", "sheep": "sheep", "deer": "deer",
    "fish": "fish", "moose": "moose", "bison": "bison", "aircraft": "aircraft",
    "spacecraft": "spacecraft", "salmon": "salmon", "trout": "trout", "cattle": "cattle",
}
_SINGULAR_TO_IRREGULAR: dict[str, str] = {}
for _plural, _singular in IRREGULAR_PLURALS.items():
    if _plural != _singular:
        _SINGULAR_TO_IRREGULAR.setdefault(_singular, _plural)

_VOWELS = frozenset("aeiou")
_APOSTROPHE_S = re.compile(r"['’]s\b")
_APOSTROPHES = re.compile(r"['’`´]")
_WORD = re.compile(r"[^\W_]+")
_PARENS = re.compile(r"\(([^)]*)\)")


# ---------------------------------------------------------------- words


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens: NFKC, possessive 's and apostrophes removed, punctuation splits.

    "Teddy-Bear's" -> ["teddy", "bear"]; "don't" -> ["dont"]; digits stay tokens.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHE_S.sub("", text)
    text = _APOSTROPHES.sub("", text)
    return _WORD.findall(text)


@lru_cache(maxsize=262_144)
def lemma(word: str) -> str:
    """The dictionary form of one lower-case word (simplemma, English, plus the tables above)."""
    if word in INVARIANT_WORDS or word.isdigit():
        return word
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    import simplemma

    return simplemma.lemmatize(word, lang="en").lower()


def regular_plurals(word: str) -> set[str]:
    """Plural spellings English grammar allows for ``word`` (over-generating is harmless here:
    the forms are only looked up, never invented in output)."""
    out = {word + "s", word + "es"}
    if word in _SINGULAR_TO_IRREGULAR:
        out.add(_SINGULAR_TO_IRREGULAR[word])
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        out.add(word[:-1] + "ies")
    if word.endswith("f"):
        out.add(word[:-1] + "ves")
    if word.endswith("fe"):
        out.add(word[:-2] + "ves")
    if word.endswith("man"):
        out.add(word[:-3] + "men")
    if word.endswith("is"):
        out.add(word[:-2] + "es")
    return out


def is_plural_of(token: str, singular: str) -> bool:
    if token == singular or token in INVARIANT_WORDS:
        return False
    if IRREGULAR_PLURALS.get(token) == singular:
        return True
    return token in regular_plurals(singular)


def singular(word: str) -> str:
    """``word`` made singular when it is a plural noun form; otherwise unchanged.

    Only a true plural of its lemma changes ("dogs" -> "dog", "knives" -> "knife"), so
    "building" or "clothing" keep their -ing although their lemma is a verb.
    """
    if word in INVARIANT_WORDS:
        return word
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    base = lemma(word)
    return base if is_plural_of(word, base) else word


def _singular_head(words: list[str]) -> list[str]:
    # In "coat of arms" or "fish and chips" the last word is not the head: leave such names be.
    if words and not ({"of", "and", "or", "with"} & set(words)):
        words = [*words[:-1], singular(words[-1])]
    return words


def normalise_term(term: str, category: str = DEFAULT_CATEGORY) -> str:
    """The canonical name of a concept: words lower-cased and de-punctuated, head noun singular."""
    words = tokenize(term)
    if category not in ACTION_CATEGORIES:
        words = _singular_head(words)
    return " ".join(words)


def surface_key(term: str) -> tuple[str, ...]:
    return tuple(tokenize(term))


def lemma_key(term: str) -> tuple[str, ...]:
    return tuple(lemma(w) for w in tokenize(term))


def dedup_key(term: str) -> tuple[str, ...]:
    """What makes two names the same entry: their words, head made singular ("Teddy Bears" ==
    "teddy bear", "mice" == "mouse"), other words untouched ("drinking" != "drink")."""
    return tuple(_singular_head(tokenize(term)))


# ---------------------------------------------------------------- entries and files


@dataclass(frozen=True)
class ConceptEntry:
    concept: str
    synonyms: tuple[str, ...] = ()
    category: str = DEFAULT_CATEGORY
    count: int | None = None

    @property
    def forms(self) -> tuple[str, ...]:
        return (self.concept, *self.synonyms)


@dataclass(frozen=True)
class Vocabulary:
    entries: tuple[ConceptEntry, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for e in self.entries:
            if not e.concept:
                raise ValueError("a vocabulary entry has an empty concept name")
            if e.concept in seen:
                raise ValueError(f"concept {e.concept!r} appears twice; merge the entries (thresher concepts vocab)")
            seen.add(e.concept)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.concept for e in self.entries]

    def category_of(self) -> dict[str, str]:
        return {e.concept: e.category for e in self.entries}

    def subset(self, names: Iterable[str]) -> "Vocabulary":
        wanted = set(names)
        return Vocabulary(tuple(e for e in self.entries if e.concept in wanted))

    def to_tsv(self, header_comments: Sequence[str] = ()) -> str:
        buf = io.StringIO()
        for line in header_comments:
            buf.write(f"# {line}\n")
        with_counts = any(e.count is not None for e in self.entries)
        buf.write("concept\tsynonyms\tcategory" + ("\tcount" if with_counts else "") + "\n")
        for e in self.entries:
            row = [e.concept, "|".join(e.synonyms), e.category]
            if with_counts:
                row.append("" if e.count is None else str(e.count))
            buf.write("\t".join(row) + "\n")
        return buf.getvalue()

    def digest(self) -> str:
        """sha256 of the entries (not of comments): what a stage records to detect a changed vocabulary."""
        return hashlib.sha256(self.to_tsv().encode("utf-8")).hexdigest()

    def write(self, path: str | Path, header_comments: Sequence[str] = ()) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_tsv(header_comments), encoding="utf-8")
        return path

    @classmethod
    def from_terms(cls, terms: Iterable[str], category: str = DEFAULT_CATEGORY) -> "Vocabulary":
        """A vocabulary of plain terms (e.g. instruction tags), each its own entry, duplicates merged."""
        vocab, _ = build_vocabulary([ConceptEntry(t, (), category) for t in terms], fuzzy_threshold=None)
        return vocab


def parse_vocabulary(text: str, origin: str = "<text>") -> list[ConceptEntry]:
    """Entries of a vocabulary file's text, as written (not yet normalised)."""
    entries: list[ConceptEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            entries.append(ConceptEntry(line.strip()))
            continue
        fields = line.split("\t")
        if len(fields) > 4:
            raise ValueError(f"{origin}:{lineno}: {len(fields)} tab-separated fields; expected "
                             "concept<TAB>synonyms<TAB>category[<TAB>count]")
        fields += [""] * (4 - len(fields))
        concept, synonyms, category, count = (f.strip() for f in fields)
        if concept.lower() == "concept" and synonyms.lower() == "synonyms":
            continue  # header row
        if not concept:
            raise ValueError(f"{origin}:{lineno}: empty concept name")
        if count:
            try:
                n = int(count)
            except ValueError:
                raise ValueError(f"{origin}:{lineno}: count {count!r} is not an integer") from None
            if n < 0:
                raise ValueError(f"{origin}:{lineno}: count {n} is negative")
        else:
            n = None
        syns = tuple(s.strip() for s in synonyms.split("|") if s.strip())
        entries.append(ConceptEntry(concept, syns, category or DEFAULT_CATEGORY, n))
    return entries


def read_vocabulary_entries(path: str | Path) -> list[ConceptEntry]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    return parse_vocabulary(path.read_text(encoding="utf-8"), str(path))


def read_vocabulary(path: str | Path) -> Vocabulary:
    """A vocabulary file as is; run :func:`build_vocabulary` first when it is not clean yet."""
    entries = read_vocabulary_entries(path)
    try:
        return Vocabulary(tuple(entries))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


@lru_cache(maxsize=4)
def _cached_vocabulary(path: str, mtime_ns: int) -> Vocabulary:
    return read_vocabulary(path)


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """The shipped concept vocabulary (``path=None``) or a user's file; cached per process."""
    p = Path(path) if path is not None else DEFAULT_VOCABULARY
    if not p.is_file():
        raise FileNotFoundError(f"vocabulary file {p} does not exist")
    return _cached_vocabulary(str(p.resolve()), p.stat().st_mtime_ns)


def read_terms(path: str | Path) -> list[str]:
    """One term per line (``#`` comments), e.g. an unsafe-term list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"term list {path} does not exist")
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines()
            if t.strip() and not t.lstrip().startswith("#")]


def read_counts(path: str | Path) -> dict[str, int]:
    """``term<TAB>count`` lines; terms are matched to entries by lemma key."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        term, _, value = line.rpartition("\t")
        try:
            out[term.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected term<TAB>count, got {line!r}") from None
    return out


# ---------------------------------------------------------------- class names shipped in packages


def _or_alternatives(words: list[str]) -> list[list[str]]:
    """"catching or throwing baseball" -> [catching baseball, throwing baseball]."""
    if "or" not in words[1:-1]:
        return [words]
    k = words.index("or", 1)
    prefix, left, right, suffix = words[: k - 1], words[k - 1], words[k + 1], words[k + 2:]
    return [prefix + [left] + suffix, *_or_alternatives(prefix + [right] + suffix)]


def _class_entry(name: str, category: str, keep_parenthetical: bool) -> ConceptEntry:
    extra = [m.strip() for m in _PARENS.findall(name)] if keep_parenthetical else []
    base = _PARENS.sub(" ", name)
    alternatives = [" ".join(a) for a in _or_alternatives(tokenize(base))]
    forms = alternatives + [x for x in extra if x]
    return ConceptEntry(forms[0], tuple(forms[1:]), category)


# COCO supercategories, by position in the 80-class list (a published fact of the dataset).
_COCO_GROUPS = ((0, 1, "person"), (1, 9, "vehicle"), (9, 14, "street object"), (14, 24, "animal"),
                (24, 29, "accessory"), (29, 39, "sports equipment"), (39, 46, "kitchenware"),
                (46, 56, "food"), (56, 62, "furniture"), (62, 68, "electronics"), (68, 73, "appliance"),
                (73, 80, "household object"))
# ImageNet-1k class index ranges (WordNet order): animals, artefacts, food, landscape, people, plants.
_IMAGENET_GROUPS = ((0, 398, "animal"), (398, 924, "object"), (924, 970, "food"), (970, 981, "landscape"),
                    (981, 984, "person"), (984, 999, "plant"), (999, 1000, "household object"))


def package_class_names(sources: Sequence[str] = ("coco", "imagenet", "kinetics400")) -> tuple[list[ConceptEntry], dict[str, str]]:
    """Class names that installed packages ship (no download), as entries, and per-source notes.

    coco: torchvision's detection weights metadata (80 classes); imagenet: open_clip's cleaned
    ImageNet-1k class names; kinetics400: torchvision's video weights metadata (400 actions).
    """
    entries: list[ConceptEntry] = []
    notes: dict[str, str] = {}
    for source in sources:
        try:
            if source == "coco":
                from torchvision.models.detection import FCOS_ResNet50_FPN_Weights

                names = [c for c in FCOS_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
                         if c not in ("__background__", "N/A")]
                for i, name in enumerate(names):
                    cat = next(c for lo, hi, c in _COCO_GROUPS if lo <= i < hi)
                    entries.append(_class_entry(name, cat, keep_parenthetical=True))
                notes[source] = f"{len(names)} names from torchvision FCOS_ResNet50_FPN_Weights meta (COCO)"
            elif source == "imagenet":
                from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

                for i, name in enumerate(IMAGENET_CLASSNAMES):
                    cat = next(c for lo, hi, c in _IMAGENET_GROUPS if lo <= i < hi)
                    entries.append(_class_entry(name, cat, keep_parenthetical=True))
                notes[source] = f"{len(IMAGENET_CLASSNAMES)} names from open_clip.zero_shot_metadata (ImageNet-1k)"
            elif source == "kinetics400":
                from torchvision.models.video import MC3_18_Weights

                names = MC3_18_Weights.DEFAULT.meta["categories"]
                for name in names:
                    # Parentheses here qualify the action ("(not in game)"), they are not synonyms.
                    entries.append(_class_entry(name, "activity", keep_parenthetical=False))
                notes[source] = f"{len(names)} names from torchvision MC3_18_Weights meta (Kinetics-400)"
            else:
                raise ValueError(f"unknown class-name source {source!r}; known: coco, imagenet, kinetics400")
        except ImportError as exc:
            notes[source] = f"skipped: {exc}"
    return entries, notes


# ---------------------------------------------------------------- the clean-up tool


@dataclass
class VocabularyReport:
    entries_in: int = 0
    entries_out: int = 0
    forms_in: int = 0
    forms_out: int = 0
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (as given, normalised)
    merged: list[dict] = field(default_factory=list)  # {kept, merged, reason, score}
    dropped_unsafe: list[dict] = field(default_factory=list)  # {term, concept, unsafe}
    dropped_rare: list[dict] = field(default_factory=list)  # {concept, count}
    dropped_empty: list[str] = field(default_factory=list)
    ambiguous_synonyms: list[dict] = field(default_factory=list)  # {form, kept_on, removed_from}
    kept_apart: list[dict] = field(default_factory=list)  # fuzzy pairs not merged: {a, b, score, why}
    categories: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self, examples: int = 10) -> list[str]:
        reasons = Counter(m["reason"] for m in self.merged)
        out = [
            f"entries: {self.entries_in} in -> {self.entries_out} out; surface forms: {self.forms_in} -> {self.forms_out}",
            f"renamed by normalisation: {len(self.renamed)}",
            f"merged: {len(self.merged)} ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'})",
            f"dropped: {len(self.dropped_unsafe)} unsafe, {len(self.dropped_rare)} below the minimum count, "
            f"{len(self.dropped_empty)} empty after normalisation",
            f"synonyms shared by two entries (kept on the first): {len(self.ambiguous_synonyms)}",
            f"close spellings kept apart as different words: {len(self.kept_apart)}",
        ]
        for label, rows in (("merged", self.merged), ("unsafe", self.dropped_unsafe), ("rare", self.dropped_rare)):
            for r in rows[:examples]:
                out.append(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in r.items()))
        for name, note in self.sources.items():
            out.append(f"source {name}: {note}")
        out.append("categories: " + ", ".join(f"{k} {v}" for k, v in sorted(self.categories.items(), key=lambda kv: -kv[1])))
        return out


def _contains(key: tuple[str, ...], part: tuple[str, ...]) -> bool:
    n = len(part)
    return any(key[i:i + n] == part for i in range(len(key) - n + 1))


def _fuzzy_pairs(names: list[str], threshold: float) -> Iterable[tuple[int, int, float]]:
    """Pairs (i < j) whose rapidfuzz ratio is above ``threshold`` (0..1), compared in row blocks
    so that memory stays at block x n scores even for tens of thousands of names."""
    import numpy as np
    from rapidfuzz import fuzz, process

    cutoff = threshold * 100.0
    block = 512
    for start in range(0, len(names), block):
        scores = process.cdist(names[start:start + block], names, scorer=fuzz.ratio,
                               score_cutoff=cutoff, dtype=np.uint8 if cutoff >= 1 else None, workers=-1)
        rows, cols = np.nonzero(scores)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            # cdist rounds to uint8: re-score exactly so "> threshold" means what it says.
            if c > i:
                s = fuzz.ratio(names[i], names[c])
                if s > cutoff:
                    yield i, c, s / 100.0


def _is_word(word: str) -> bool:
    import simplemma

    return simplemma.is_known(word, lang="en")


def _distinct_reason(a: ConceptEntry, b: ConceptEntry) -> str | None:
    """Why two names close in spelling are still different concepts, or None.

    A ratio above 0.92 is one edit in a seven-letter word: "surgeon"/"sturgeon",
    "dessert"/"desert". Spelling variants and typos ("coffeemaker", "chain mail") involve a
    word no dictionary knows or a different word split; two dictionary words are two words.
    """
    if (a.category in ACTION_CATEGORIES) != (b.category in ACTION_CATEGORIES):
        return "an action and a thing"
    wa, wb = a.concept.split(), b.concept.split()
    if len(wa) != len(wb):
        return None
    diff = [(x, y) for x, y in zip(wa, wb) if x != y]
    if diff and all(_is_word(x) and _is_word(y) for x, y in diff):
        return "different dictionary words: " + ", ".join(f"{x}/{y}" for x, y in diff)
    return None


def _embedding_pairs(names: list[str], threshold: float, embedder) -> Iterable[tuple[int, int, float]]:
    import numpy as np

    from pipeline.embed.sentence import default_text_embedder, embed_texts

    if embedder is None:
        vectors = default_text_embedder(batch_size=256)(names)
    else:  # a sentence-transformers model given by the caller
        vectors = embed_texts(embedder, names, batch_size=256, normalize=True)
    block = 1024
    for start in range(0, len(names), block):
        sims = vectors[start:start + block] @ vectors.T
        rows, cols = np.nonzero(sims > threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if c > start + r:
                yield start + r, c, float(sims[r, c])


def build_vocabulary(
    entries: Sequence[ConceptEntry],
    unsafe_terms: Iterable[str] = (),
    *,
    min_count: int | None = None,
    counts: dict[str, int] | None = None,
    fuzzy_threshold: float | None = FUZZY_THRESHOLD,
    embed_merge: bool = False,
    embed_threshold: float = EMBED_THRESHOLD,
    embedder=None,
    sources: dict[str, str] | None = None,
) -> tuple[Vocabulary, VocabularyReport]:
    """Normalise, merge, filter ``entries`` (earlier entries win merges); return the clean
    vocabulary and a report of every change.

    ``counts`` (term -> frequency, matched by lemma key) adds to entries' own counts; with
    ``min_count`` an entry whose (merged) count is below it is dropped; entries with no count at
    all are kept. ``embedder``: a loaded sentence-transformers model (default: offline MiniLM).
    """
    report = VocabularyReport(entries_in=len(entries), forms_in=sum(len(e.forms) for e in entries),
                              sources=dict(sources or {}))
    # 1. normalise
    norm: list[ConceptEntry] = []
    for e in entries:
        name = normalise_term(e.concept, e.category)
        if not name:
            report.dropped_empty.append(e.concept)
            continue
        if name != e.concept:
            report.renamed.append((e.concept, name))
        syns: list[str] = []
        for s in e.synonyms:
            # Synonyms keep their number: "mice" is how a caption says "mouse", twice or more.
            form = " ".join(tokenize(s))
            if form and form != name and form not in syns:
                syns.append(form)
        category = " ".join(tokenize(e.category)) or DEFAULT_CATEGORY
        norm.append(ConceptEntry(name, tuple(syns), category, e.count))

    # 2. unsafe terms: an entry whose name contains one goes; a synonym that contains one goes.
    unsafe = [(t, lemma_key(t)) for t in unsafe_terms if tokenize(t)]
    if unsafe:
        kept: list[ConceptEntry] = []
        for e in norm:
            hit = next((t for t, k in unsafe if _contains(lemma_key(e.concept), k)
                        or _contains(surface_key(e.concept), tuple(tokenize(t)))), None)
            if hit is not None:
                report.dropped_unsafe.append({"term": e.concept, "concept": e.concept, "unsafe": hit})
                continue
            syns = []
            for s in e.synonyms:
                hit = next((t for t, k in unsafe if _contains(lemma_key(s), k)
                            or _contains(surface_key(s), tuple(tokenize(t)))), None)
                if hit is None:
                    syns.append(s)
                else:
                    report.dropped_unsafe.append({"term": s, "concept": e.concept, "unsafe": hit})
            kept.append(ConceptEntry(e.concept, tuple(syns), e.category, e.count))
        norm = kept

    # 3. merges: same name; a later entry named like an earlier entry's synonym; fuzzy; embedding.
    # Keys are names with the head singular (``dedup_key``), not full lemma keys: lemmatising
    # every word would merge "drinking" into "drink" and "boxing" into "box".
    n = len(norm)
    uf = UnionFind(n)  # union(keep, other): the smaller index (earlier entry) stays the group's name
    name_keys = [dedup_key(e.concept) for e in norm]
    first_by_name: dict[tuple[str, ...], int] = {}
    for i, k in enumerate(name_keys):
        j = first_by_name.setdefault(k, i)
        if j != i and uf.union(j, i):
            report.merged.append({"kept": norm[j].concept, "merged": norm[i].concept, "reason": "same name", "score": 1.0})
    for i, e in enumerate(norm):
        for s in e.synonyms:
            j = first_by_name.get(dedup_key(s))
            # Only a later entry folds into an earlier one that lists its name ("airliner" into
            # airplane); an earlier entry keeps its name and the later one loses the synonym (step 4).
            if j is not None and j > i and uf.union(i, j):
                report.merged.append({"kept": norm[uf.find(i)].concept, "merged": norm[j].concept,
                                      "reason": "name is a synonym", "score": 1.0})
    names = [e.concept for e in norm]
    if fuzzy_threshold is not None and n > 1:
        for i, j, s in _fuzzy_pairs(names, fuzzy_threshold):
            if uf.find(i) == uf.find(j):
                continue
            why = _distinct_reason(norm[i], norm[j])
            if why:
                report.kept_apart.append({"a": names[i], "b": names[j], "score": round(s, 4), "why": why})
            elif uf.union(i, j):
                report.merged.append({"kept": names[uf.find(i)], "merged": names[j], "reason": "string ratio",
                                      "score": round(s, 4)})
    if embed_merge and n > 1:
        for i, j, s in _embedding_pairs(names, embed_threshold, embedder):
            if uf.find(i) == uf.find(j):
                continue
            if (norm[i].category in ACTION_CATEGORIES) != (norm[j].category in ACTION_CATEGORIES):
                # "snorkel" and "snorkeling" sit close in embedding space but are a thing and an action.
                report.kept_apart.append({"a": names[i], "b": names[j], "score": round(s, 4),
                                          "why": "an action and a thing"})
            elif uf.union(i, j):
                report.merged.append({"kept": names[uf.find(i)], "merged": names[j], "reason": "embedding cosine",
                                      "score": round(s, 4)})

    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    count_by_key = {dedup_key(t): c for t, c in (counts or {}).items()}
    merged_entries: list[ConceptEntry] = []
    for root in sorted(groups):
        members = groups[root]
        rep = norm[root]
        forms: list[str] = []
        for m in members:
            for f in norm[m].forms:
                if f != rep.concept and f not in forms:
                    forms.append(f)
        total: int | None = None
        for m in members:
            for c in (norm[m].count, count_by_key.get(name_keys[m])):
                if c is not None:
                    total = (total or 0) + c
        merged_entries.append(ConceptEntry(rep.concept, tuple(forms), rep.category, total))

    # 4. a form claimed by two entries stays with the first, so matching is unambiguous.
    owner: dict[tuple[str, ...], str] = {}
    for e in merged_entries:
        owner.setdefault(dedup_key(e.concept), e.concept)
    cleaned: list[ConceptEntry] = []
    for e in merged_entries:
        syns = []
        for s in e.synonyms:
            first = owner.setdefault(dedup_key(s), e.concept)
            if first == e.concept:
                syns.append(s)
            else:
                report.ambiguous_synonyms.append({"form": s, "kept_on": first, "removed_from": e.concept})
        cleaned.append(ConceptEntry(e.concept, tuple(syns), e.category, e.count))

    # 5. frequency
    if min_count is not None:
        out = []
        for e in cleaned:
            if e.count is not None and e.count < min_count:
                report.dropped_rare.append({"concept": e.concept, "count": e.count})
            else:
                out.append(e)
        cleaned = out

    vocab = Vocabulary(tuple(cleaned))
    report.entries_out = len(vocab)
    report.forms_out = sum(len(e.forms) for e in vocab)
    report.categories = dict(Counter(e.category for e in vocab))
    return vocab, report
