"""Concept annotation of image-text pairs: from captions (offline) and from images (open_clip).

Caption annotator (the MetaCLIP way: match caption n-grams to a vocabulary)
--------------------------------------------------------------------------
* Captions are tokenised like vocabulary terms (:func:`vocabulary.tokenize`). An n-gram matches
  an entry when its words equal one of the entry's surface forms (concept name, synonyms,
  generated plurals) or, failing that, when its lemmas equal a form's lemmas. Words ending in
  "-ing"/"-ed" are compared as written, never lemmatised: "boxing" is not "box", "parked" is
  not "park".
* Multi-word concepts first: among all candidate matches the longest wins, then the leftmost,
  and no two chosen matches overlap ("teddy bear" hides "bear", "red panda" hides "red").
  Actions and activities form a second layer matched the same way, so "a man playing guitar"
  yields both the activity and the guitar; an action inside a longer thing-match is dropped
  ("swimming" inside "swimming pool").
* Counts, for concepts of countable categories, come from the words before the match, read
  backwards over colours, sizes, other attributes, determiners and "of": a number word
  (zero..twenty, "a"/"an"/"one" = 1, "pair"/"couple"/"both" = 2, "dozen" = 12) or digits (up
  to 1000) give the count; a plural noun without a number, or with "several"/"many"/"some",
  counts 2, read as "at least two"; a singular noun counts 1. "no"/"zero"/"without"/"none"
  and "not a/any" negate the mention: it is dropped together with the attributes in its phrase.
  Repeated mentions add up, except a definite one ("the dogs") of a concept already seen.
  Attribute-like categories (colour, size, material, pattern, action, ...) count 1: present.
* Confidence is 1.0 for every match: both kinds of match are exact string equality, there is
  no score to report.

Image tagger (open_clip zero-shot)
----------------------------------
Image embeddings against the text embeddings of ``"a photo of a {concept}."`` for every
vocabulary entry; the top-k concepts whose score (softmax over the vocabulary with the model's
logit scale, or raw cosine) reaches the threshold. A tagger sees no instances: each concept
counts 1 and is also written to ``tags``, where DataConcept keeps tagger output.

Both produce ``schemas.CONCEPT_ANNOTATIONS`` rows, the same shape ingest writes from DataConcept
boxes (``pipeline.io.image_records.concept_row``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

import schemas
from pipeline.annotate.vocabulary import (
    ACTION_CATEGORIES,
    IRREGULAR_PLURALS,
    Vocabulary,
    lemma,
    load_vocabulary,
    regular_plurals,
    singular,
    tokenize,
)

CAPTION_ANNOTATOR = "caption"
MATCH_CONFIDENCE = 1.0

# Categories whose mentions are properties or events, not countable objects.
UNCOUNTABLE_CATEGORIES = frozenset({
    "colour", "color", "material", "attribute", "size", "pattern", "texture", "action", "activity",
    "weather", "time", "sport", "style", "emotion",
})

NUMBER_WORDS: dict[str, int] = {
    "a": 1, "an": 1, "one": 1, "single": 1, "lone": 1, "another": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "pair": 2, "couple": 2, "both": 2, "twin": 2, "dozen": 12,
}
MAX_DIGIT_COUNT = 1000  # larger digit strings are years, prices or ids, not instance counts
PLURAL_QUANTIFIERS = frozenset({
    "several", "many", "multiple", "numerous", "various", "some", "few", "lots", "lot", "plenty",
    "dozens", "hundreds", "thousands", "countless", "any", "most", "all", "group", "bunch",
})
NEGATORS = frozenset({"no", "zero", "without", "none", "neither", "nor", "never"})
NOT_WORDS = frozenset({"not", "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt", "hasnt",
                       "havent", "hadnt", "cannot", "cant", "wont", "nt"})
DEFINITE = frozenset({"the", "this", "that", "these", "those", "its", "their", "his", "her", "my",
                      "our", "your", "each", "every"})
# Words that may stand between a number and its noun without being vocabulary attributes.
FILLERS = frozenset({
    "of", "very", "other", "same", "different", "identical", "similar", "separate", "whole", "entire",
    "extra", "additional", "individual", "matching", "more", "exactly", "only", "just", "about",
    "around", "approximately", "nearly", "almost", "least", "at", "total", "such", "really", "quite",
})
MAX_LOOKBACK = 6
MAX_NGRAM = 8


def match_lemma(word: str) -> str:
    """The lemma used for matching: -ing/-ed forms stay as written (see the module docstring)."""
    if len(word) > 4 and (word.endswith("ing") or word.endswith("ed")):
        return word
    return lemma(word)


@dataclass(frozen=True)
class Mention:
    concept: str
    category: str
    start: int  # token span [start, end)
    end: int
    text: str
    count: int  # 0 when negated
    plural: bool
    definite: bool
    negated: bool
    how: str  # "surface" | "lemma"


class _Index:
    """Surface-form and lemma lookups for one layer of the vocabulary."""

    def __init__(self, entries: Sequence[Any], generate_plurals: bool):
        self.surface: dict[tuple[str, ...], tuple[int, bool]] = {}
        self.lemmas: dict[tuple[str, ...], int] = {}
        self.max_len: dict[str, int] = {}  # first token (surface or lemma) -> longest form length
        generated: list[tuple[tuple[str, ...], int]] = []
        for idx, e in entries:
            for form in e.forms:
                words = tuple(tokenize(form))[:MAX_NGRAM]
                if not words:
                    continue
                plural = singular(words[-1]) != words[-1] and not ({"of", "and"} & set(words))
                self.surface.setdefault(words, (idx, plural))
                self.lemmas.setdefault(tuple(match_lemma(w) for w in words), idx)
                if generate_plurals and not plural and not ({"of", "and"} & set(words)):
                    for p in regular_plurals(words[-1]):
                        generated.append(((*words[:-1], p), idx))
        for words, idx in generated:
            self.surface.setdefault(words, (idx, True))  # explicit forms of any entry win
        for key in list(self.surface) + list(self.lemmas):
            self.max_len[key[0]] = max(self.max_len.get(key[0], 0), len(key))

    def candidates(self, tokens: list[str], lemmas: list[str]) -> list[tuple[int, int, int, bool, str]]:
        """Every (start, end, entry, plural, how) whose n-gram is a form."""
        out = []
        n_tok = len(tokens)
        for i in range(n_tok):
            longest = max(self.max_len.get(tokens[i], 0), self.max_len.get(lemmas[i], 0))
            for n in range(min(longest, n_tok - i), 0, -1):
                hit = self.surface.get(tuple(tokens[i:i + n]))
                if hit is not None:
                    out.append((i, i + n, hit[0], hit[1], "surface"))
                    continue
                idx = self.lemmas.get(tuple(lemmas[i:i + n]))
                if idx is not None:
                    head = tokens[i + n - 1]
                    plural = head != singular(head) or (head in IRREGULAR_PLURALS and IRREGULAR_PLURALS[head] != head)
                    out.append((i, i + n, idx, plural, "lemma"))
        return out


def _select(cands: list[tuple[int, int, int, bool, str]]) -> list[tuple[int, int, int, bool, str]]:
    """Longest first, then leftmost; no overlaps."""
    taken: set[int] = set()
    chosen = []
    for c in sorted(cands, key=lambda c: (-(c[1] - c[0]), c[0])):
        span = range(c[0], c[1])
        if not any(t in taken for t in span):
            taken.update(span)
            chosen.append(c)
    return sorted(chosen)


class CaptionConceptMatcher:
    """Match captions against a vocabulary (default: the shipped one). Thread-safe, picklable."""

    def __init__(self, vocabulary: Vocabulary | None = None):
        self.vocabulary = vocabulary if vocabulary is not None else load_vocabulary()
        self._entries = list(self.vocabulary.entries)
        things = [(i, e) for i, e in enumerate(self._entries) if e.category not in ACTION_CATEGORIES]
        actions = [(i, e) for i, e in enumerate(self._entries) if e.category in ACTION_CATEGORIES]
        self._things = _Index(things, generate_plurals=True)
        self._actions = _Index(actions, generate_plurals=False)
        self._countable = [e.category not in UNCOUNTABLE_CATEGORIES for e in self._entries]

    # ------------------------------------------------------------ matching

    def mentions(self, caption: str | None) -> list[Mention]:
        """Every concept mention in ``caption``, in order, with its count (0 when negated)."""
        if not caption:
            return []
        tokens = tokenize(caption)
        if not tokens:
            return []
        lemmas = [match_lemma(t) for t in tokens]
        things = _select(self._things.candidates(tokens, lemmas))
        multi = [(s, e) for s, e, *_ in things if e - s > 1]
        actions = [c for c in _select(self._actions.candidates(tokens, lemmas))
                   if not any(s <= c[0] and c[1] <= e for s, e in multi)]
        # token -> start of the uncountable thing-match covering it (attributes between number and noun)
        attr_start: dict[int, int] = {}
        for s, e, idx, _, _ in things:
            if not self._countable[idx]:
                for t in range(s, e):
                    attr_start[t] = s
        for s, e, idx, _, _ in actions:
            for t in range(s, e):
                attr_start.setdefault(t, s)

        mentions: list[Mention] = []
        negated_attrs: set[int] = set()  # starts of attribute matches inside a negated phrase
        for s, e, idx, plural, how in things:
            entry = self._entries[idx]
            text = " ".join(tokens[s:e])
            if not self._countable[idx]:
                mentions.append(Mention(entry.concept, entry.category, s, e, text, 1, plural, False, False, how))
                continue
            count, definite, negated, attrs = self._quantity(tokens, s, plural, attr_start)
            if negated:
                negated_attrs.update(attrs)
            mentions.append(Mention(entry.concept, entry.category, s, e, text, count, plural, definite, negated, how))
        for s, e, idx, plural, how in actions:
            entry = self._entries[idx]
            mentions.append(Mention(entry.concept, entry.category, s, e, " ".join(tokens[s:e]), 1, plural,
                                    False, False, how))
        out = []
        for m in sorted(mentions, key=lambda m: (m.start, m.end)):
            # An attribute read on the way back from a negated noun belongs to that noun's phrase.
            if m.category in UNCOUNTABLE_CATEGORIES and m.start in negated_attrs:
                m = Mention(m.concept, m.category, m.start, m.end, m.text, 0, m.plural, False, True, m.how)
            out.append(m)
        return out

    def _quantity(self, tokens: list[str], start: int, plural: bool,
                  attr_start: dict[int, int]) -> tuple[int, bool, bool, list[int]]:
        """(count, definite, negated, attribute starts passed) for a countable match at ``start``."""
        j, steps = start - 1, 0
        definite = False
        attrs: list[int] = []
        number: int | None = None
        quant_at: int | None = None
        negated = False
        while j >= 0 and steps < MAX_LOOKBACK:
            tok = tokens[j]
            steps += 1
            if j in attr_start:
                attrs.append(attr_start[j])
                j = attr_start[j] - 1
                continue
            if tok in NEGATORS:
                negated = True
                break
            if tok in NUMBER_WORDS:
                number, quant_at = NUMBER_WORDS[tok], j
                break
            if tok.isdigit():
                value = int(tok)
                if value <= MAX_DIGIT_COUNT:
                    number, quant_at = value, j
                break
            if tok in PLURAL_QUANTIFIERS:
                quant_at = j
                break
            if tok in DEFINITE:
                definite = True
                j -= 1
                continue
            if tok in FILLERS:
                j -= 1
                continue
            if tok == "and" and (j - 1) in attr_start:  # "a red and blue ball"
                j -= 1
                continue
            break
        if quant_at is not None and not negated:
            before = tokens[quant_at - 1] if quant_at >= 1 else ""
            before2 = tokens[quant_at - 2] if quant_at >= 2 else ""
            # "not a dog", "without any hats", "isn't a single ..."
            if before in NOT_WORDS or before in NEGATORS or (before == "a" and before2 in NOT_WORDS):
                negated = True
        if negated or number == 0:
            return 0, definite, True, attrs
        if number is not None:
            return number, definite, False, attrs
        return (2 if plural else 1), definite, False, attrs

    def concepts(self, caption: str | None) -> list[dict[str, Any]]:
        """``[{concept, count, confidence}]`` for one caption, most instances first."""
        totals: dict[str, int] = {}
        for m in self.mentions(caption):
            if m.negated or m.count <= 0:
                continue
            if m.category in UNCOUNTABLE_CATEGORIES:
                totals[m.concept] = 1
            elif m.definite and m.concept in totals:
                totals[m.concept] = max(totals[m.concept], m.count)
            else:
                totals[m.concept] = totals.get(m.concept, 0) + m.count
        return [{"concept": c, "count": n, "confidence": MATCH_CONFIDENCE}
                for c, n in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]

    # ------------------------------------------------------------ tables

    def annotate_table(self, table: pa.Table, annotator: str = CAPTION_ANNOTATOR) -> pa.Table:
        """``sample_id`` + ``caption`` columns in, ``CONCEPT_ANNOTATIONS`` out (one row per sample,
        an empty concept list when nothing matched)."""
        for col in ("sample_id", "caption"):
            if col not in table.column_names:
                raise ValueError(f"the caption annotator needs a {col!r} column; got {table.column_names}")
        ids = table.column("sample_id").to_pylist()
        captions = table.column("caption").to_pylist()
        return pa.table({
            "sample_id": ids,
            "concepts": [self.concepts(c) for c in captions],
            "boxes": [None] * len(ids),
            "tags": [None] * len(ids),
            "annotator": [annotator] * len(ids),
        }, schema=schemas.CONCEPT_ANNOTATIONS)


def annotate_captions(captions: Iterable[str], vocabulary: Vocabulary | None = None) -> list[list[dict[str, Any]]]:
    matcher = CaptionConceptMatcher(vocabulary)
    return [matcher.concepts(c) for c in captions]


# ---------------------------------------------------------------- image tagger

DEFAULT_TEMPLATE = "a photo of a {}."
SCORES = ("softmax", "cosine")


def tag_from_similarities(
    similarities: np.ndarray,
    names: Sequence[str],
    top_k: int = 10,
    threshold: float = 0.01,
    score: str = "softmax",
    logit_scale: float = 100.0,
) -> list[list[dict[str, Any]]]:
    """Per image (row of cosine ``similarities``, shape (n_images, len(names))): the top-k
    concepts whose score reaches ``threshold``, best first, as ``[{concept, count, confidence}]``.

    ``score="softmax"``: probabilities over the vocabulary at ``logit_scale`` (CLIP's
    zero-shot classifier); ``"cosine"``: the raw cosine similarity.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 2 or sims.shape[1] != len(names):
        raise ValueError(f"similarities must have shape (n_images, {len(names)}), got {sims.shape}")
    if score == "softmax":
        logits = sims * logit_scale
        logits -= logits.max(axis=1, keepdims=True)
        values = np.exp(logits)
        values /= values.sum(axis=1, keepdims=True)
    else:
        values = sims
    k = min(top_k, values.shape[1])
    out: list[list[dict[str, Any]]] = []
    for row in values:
        top = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
        top = top[np.lexsort((top, -row[top]))]  # best first; ties to the earlier entry
        out.append([{"concept": names[i], "count": 1, "confidence": float(row[i])}
                    for i in top.tolist() if row[i] >= threshold])
    return out


_TEXT_CACHE: dict[tuple, np.ndarray] = {}
_TEXT_LOCK = threading.Lock()


class ClipConceptTagger:
    """Zero-shot concept tags from an open_clip model (``pipeline.embed.clip``).

    ``pretrained=None`` builds random weights: only for testing the plumbing. Text embeddings of
    the vocabulary are computed once per process and model.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        vocabulary: Vocabulary | None = None,
        *,
        top_k: int = 10,
        threshold: float = 0.01,
        score: str = "softmax",
        template: str = DEFAULT_TEMPLATE,
        device: str | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ):
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the concept goes, got {template!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.model_name, self.pretrained = model_name, pretrained
        self.vocabulary = vocabulary if vocabulary is not None else load_vocabulary()
        self.top_k, self.threshold, self.score, self.template = top_k, threshold, score, template
        self.device, self.batch_size, self.seed = device, batch_size, seed
        self._clip = None
        self._text: np.ndarray | None = None

    def load(self) -> "ClipConceptTagger":
        from pipeline.embed.clip import embed_captions, shared_clip

        if self._clip is None:
            self._clip = shared_clip(self.model_name, self.pretrained, self.device, seed=self.seed)
        key = (self.model_name, self._clip.source, self.seed, self.vocabulary.digest(), self.template)
        with _TEXT_LOCK:
            if key not in _TEXT_CACHE:
                prompts = [self.template.format(n) for n in self.vocabulary.names]
                _TEXT_CACHE[key] = embed_captions(self._clip, prompts, batch_size=256, normalize=True)
            self._text = _TEXT_CACHE[key]
        return self

    @property
    def annotator(self) -> str:
        from pipeline.embed.clip import clip_key

        clip = self.load()._clip
        digest = clip.weights_digest if self.pretrained is not None else None
        return "clip:" + clip_key(self.model_name, self.pretrained, self.seed, digest)

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.load()._clip.model, "logit_scale", None)
        return float(scale.exp().item()) if scale is not None else 100.0

    def tag_images(self, images: Sequence[bytes]) -> list[list[dict[str, Any]]]:
        from pipeline.embed.clip import embed_images

        self.load()
        if not len(images):
            return []
        vectors = embed_images(self._clip, list(images), batch_size=self.batch_size, normalize=True)
        return tag_from_similarities(vectors @ self._text.T, self.vocabulary.names, self.top_k,
                                     self.threshold, self.score, self.logit_scale)

    def annotate_table(self, table: pa.Table) -> pa.Table:
        """``sample_id`` + ``image`` (bytes) in, ``CONCEPT_ANNOTATIONS`` out."""
        for col in ("sample_id", "image"):
            if col not in table.column_names:
                raise ValueError(f"the image tagger needs a {col!r} column; got {table.column_names}")
        ids = table.column("sample_id").to_pylist()
        concepts = self.tag_images(table.column("image").to_pylist())
        tags = [[{"tag": c["concept"], "confidence": c["confidence"]} for c in row] for row in concepts]
        name = self.annotator
        return pa.table({"sample_id": ids, "concepts": concepts, "boxes": [None] * len(ids), "tags": tags,
                         "annotator": [name] * len(ids)}, schema=schemas.CONCEPT_ANNOTATIONS)
