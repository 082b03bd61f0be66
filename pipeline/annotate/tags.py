"""Offline InsTag-style instruction tagging, and the tool that cleans a tag vocabulary.

The vocabulary (``tag_vocab.tsv`` beside this module) holds several hundred fine-grained intention
tags (tasks, skills, domains, formats) written for the kinds of data Thresher ingests: P3/T0
prompts, self-instruct tasks, code generation, maths word problems, role-play, tool use, chat.
Each line is ``tag<TAB>description<TAB>[rule<TAB>...]``.

:class:`OfflineTagger` combines two kinds of evidence:

- **embedding similarity**: the user turns of a conversation (head and tail, because P3-style
  prompts put the passage first and the question last) and every tag's ``"tag: description"``
  are embedded with the offline MiniLM; the top-k tags whose cosine clears a threshold are
  proposed, with a confidence that rises linearly with the cosine between two set points;
- **deterministic rules**: regular expressions on the user turns, the assistant turns or both.
  An ``add`` rule emits its tag whatever the embedding says (a ```python fence means Python);
  its confidence combines the rule's with the embedding's by noisy-OR. A ``boost`` rule only
  raises the tag's cosine, for cues that make a tag likelier without settling it. Two
  structural rules live in code: several user turns -> ``multi-turn dialogue``; a long user
  message -> ``long input text``.

:func:`consolidate_tags` is the InsTag-style clean-up for tag sets produced elsewhere (an LLM
tagger, or tags carried by the input): normalise (lower-case, lemmatise with ``simplemma``),
merge near-duplicates (string ratio > 0.92 or embedding cosine > 0.95), drop rare tags, and
report every merge and drop.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from pipeline.annotate.tag_rules import CompiledRules
from pipeline.components import UnionFind

DEFAULT_TAG_VOCABULARY = Path(__file__).resolve().with_name("tag_vocab.tsv")
TAGGER_VERSION = "1"

Embedder = Callable[[Sequence[str]], np.ndarray]

_RULE_PREFIX = re.compile(r"^(?:(add|boost)(?:/(user|response|any))?|(user|response|any)):")

MULTI_TURN_TAG = "multi-turn dialogue"
LONG_INPUT_TAG = "long input text"


# ---------------------------------------------------------------- vocabulary file


@dataclass(frozen=True)
class TagRule:
    mode: str  # "add" | "boost"
    scope: str  # "user" | "response" | "any"
    pattern: re.Pattern

    @classmethod
    def parse(cls, cell: str, where: str) -> "TagRule":
        m = _RULE_PREFIX.match(cell)
        mode, scope, body = "add", "user", cell
        if m:
            mode = m.group(1) or "add"
            scope = m.group(2) or m.group(3) or "user"
            body = cell[m.end():]
        if not body:
            raise ValueError(f"{where}: empty rule {cell!r}")
        try:
            pattern = re.compile(body)
        except re.error as exc:
            raise ValueError(f"{where}: rule {body!r} is not a valid regular expression ({exc})") from exc
        return cls(mode, scope, pattern)


@dataclass(frozen=True)
class TagEntry:
    tag: str
    description: str
    rules: tuple[TagRule, ...] = ()

    @property
    def embedding_text(self) -> str:
        return f"{self.tag}: {self.description}"


@dataclass(frozen=True)
class TagVocabulary:
    entries: tuple[TagEntry, ...]
    digest: str  # sha256 of the file text: part of a stage's parameters

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def tags(self) -> list[str]:
        return [e.tag for e in self.entries]

    def index(self, tag: str) -> int:
        for i, e in enumerate(self.entries):
            if e.tag == tag:
                return i
        raise KeyError(f"tag {tag!r} is not in the vocabulary")


def parse_tag_vocabulary(text: str, origin: str = "<text>") -> TagVocabulary:
    entries: list[TagEntry] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = line.split("\t")
        where = f"{origin}:{lineno}"
        tag, description = cells[0].strip(), (cells[1].strip() if len(cells) > 1 else "")
        if not tag or not description:
            raise ValueError(f"{where}: expected 'tag<TAB>description[<TAB>rule...]', got {line[:80]!r}")
        if tag in seen:
            raise ValueError(f"{where}: tag {tag!r} is already defined on line {seen[tag]}")
        seen[tag] = lineno
        rules = tuple(TagRule.parse(c.strip(), where) for c in cells[2:] if c.strip())
        entries.append(TagEntry(tag, description, rules))
    if not entries:
        raise ValueError(f"{origin} defines no tags")
    return TagVocabulary(tuple(entries), hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_tag_vocabulary(path: str | Path | None = None) -> TagVocabulary:
    """The shipped vocabulary, or a TSV file in the same format."""
    p = Path(path) if path is not None else DEFAULT_TAG_VOCABULARY
    if not p.is_file():
        raise FileNotFoundError(f"tag vocabulary {p} does not exist; pass a TSV of tag<TAB>description[<TAB>rule]")
    return parse_tag_vocabulary(p.read_text(encoding="utf-8"), str(p))


# ---------------------------------------------------------------- the tagger


@dataclass(frozen=True)
class TaggerConfig:
    top_k: int = 5  # embedding proposals per sample
    threshold: float = 0.32  # cosine an embedding proposal must reach
    max_tags: int = 10
    min_tags: int = 1  # keep the best embedding tag even below threshold when nothing else fired
    rule_confidence: float = 0.9
    boost: float = 0.08  # added to the cosine of a tag whose boost rule matched
    sim_floor: float = 0.15  # cosine at which embedding confidence is 0
    sim_ceiling: float = 0.65  # cosine at which it is 1
    head_chars: int = 250
    tail_chars: int = 300
    long_input_chars: int = 1500
    rule_text_chars: int = 6000  # regexes read at most this much of each side (head and tail)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TagPrediction:
    tag: str
    confidence: float
    source: str  # "embedding" | "rule" | "embedding+rule" | "structure"

    def as_row(self) -> dict:
        return {"tag": self.tag, "confidence": float(self.confidence)}


def user_text(messages: Sequence[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")


def assistant_text(messages: Sequence[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages if m.get("role") == "assistant")


def head_and_tail(text: str, head: int, tail: int) -> str:
    text = text.strip()
    if len(text) <= head + tail:
        return text
    return text[:head].rstrip() + " … " + text[-tail:].lstrip()


def _clip_for_rules(text: str, limit: int) -> str:
    return text if len(text) <= 2 * limit else text[:limit] + "\n" + text[-limit:]


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))


class OfflineTagger:
    """Tags conversations with the vocabulary; one embedding batch per :meth:`tag_many` call."""

    def __init__(self, vocabulary: TagVocabulary | None = None, embedder: Embedder | None = None,
                 config: TaggerConfig = TaggerConfig(), batch_size: int = 64):
        self.vocabulary = vocabulary or load_tag_vocabulary()
        self.config = config
        self.batch_size = batch_size
        self._embedder = embedder
        self._tag_vectors: np.ndarray | None = None
        self._rules = CompiledRules((i, r) for i, e in enumerate(self.vocabulary.entries) for r in e.rules)
        self._multi_turn = self._optional_index(MULTI_TURN_TAG)
        self._long_input = self._optional_index(LONG_INPUT_TAG)

    def _optional_index(self, tag: str) -> int | None:
        try:
            return self.vocabulary.index(tag)
        except KeyError:
            return None

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from pipeline.embed.sentence import default_text_embedder

            self._embedder = default_text_embedder(batch_size=self.batch_size)
        unique = list(dict.fromkeys(texts))  # templated data repeats prompts: embed each text once
        out = np.asarray(self._embedder(unique), dtype=np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        row = {t: k for k, t in enumerate(unique)}
        return out[[row[t] for t in texts]]

    @property
    def tag_vectors(self) -> np.ndarray:
        if self._tag_vectors is None:
            self._tag_vectors = self._embed([e.embedding_text for e in self.vocabulary.entries])
        return self._tag_vectors

    def similarities(self, conversations: Sequence[Sequence[dict]],
                     user_vectors: np.ndarray | None = None) -> np.ndarray:
        """Cosine of every conversation's user text with every tag: shape (n, n_tags).

        ``user_vectors``: the stored unit-norm user-side vectors of the conversations (from the
        text embedding stage, same model), so nothing is encoded again; a NaN row (no user
        token) scores 0 against every tag and leaves the rules to decide.
        """
        c = self.config
        if user_vectors is None:
            texts = [head_and_tail(user_text(m), c.head_chars, c.tail_chars) or " " for m in conversations]
            if not texts:
                return np.zeros((0, len(self.vocabulary)), dtype=np.float32)
            user_vectors = self._embed(texts)
        elif len(user_vectors) != len(conversations):
            raise ValueError(f"{len(user_vectors)} user vectors for {len(conversations)} conversations")
        return np.nan_to_num(np.asarray(user_vectors, dtype=np.float32) @ self.tag_vectors.T, nan=0.0)

    def rule_matches(self, messages: Sequence[dict]) -> tuple[set[int], set[int]]:
        """(indices of tags added by rules, indices boosted) for one conversation.

        The same sets as running every rule's regex in vocabulary order; a literal pre-filter
        (:mod:`pipeline.annotate.tag_rules`) skips the regexes that cannot match.
        """
        limit = self.config.rule_text_chars
        user = _clip_for_rules(user_text(messages), limit)
        added, boosted = self._rules.matches(user, _clip_for_rules(assistant_text(messages), limit))
        n_user = sum(1 for m in messages if m.get("role") == "user")
        if self._multi_turn is not None and n_user >= 2:
            added.add(self._multi_turn)
        if self._long_input is not None and len(user) >= self.config.long_input_chars:
            added.add(self._long_input)
        return added, boosted

    def _confidence(self, cosine: float) -> float:
        c = self.config
        return _unit((cosine - c.sim_floor) / (c.sim_ceiling - c.sim_floor))

    def _predict(self, messages: Sequence[dict], sims: np.ndarray) -> list[TagPrediction]:
        c = self.config
        added, boosted = self.rule_matches(messages)
        sims = sims.astype(np.float64, copy=True)
        if boosted:
            sims[list(boosted)] += c.boost
        structural = {self._multi_turn, self._long_input} - {None}
        order = np.argsort(-sims, kind="stable")[: c.top_k]
        proposed = [int(i) for i in order if sims[i] >= c.threshold]
        if not proposed and not added and c.min_tags > 0 and len(order):
            proposed = [int(order[0])]
        out: dict[int, TagPrediction] = {}
        for i in proposed:
            out[i] = TagPrediction(self.vocabulary.entries[i].tag, self._confidence(sims[i]), "embedding")
        for i in added:
            emb = self._confidence(sims[i]) if sims[i] >= c.threshold else 0.0
            conf = 1.0 if i in structural else 1.0 - (1.0 - c.rule_confidence) * (1.0 - emb)
            source = "structure" if i in structural else ("embedding+rule" if i in out else "rule")
            out[i] = TagPrediction(self.vocabulary.entries[i].tag, conf, source)
        ranked = sorted(out.values(), key=lambda p: (-p.confidence, p.tag))
        return ranked[: c.max_tags]

    def tag_many(self, conversations: Sequence[Sequence[dict]],
                 user_vectors: np.ndarray | None = None) -> list[list[TagPrediction]]:
        sims = self.similarities(conversations, user_vectors)
        return [self._predict(m, sims[k]) for k, m in enumerate(conversations)]

    def tag(self, messages: Sequence[dict]) -> list[TagPrediction]:
        return self.tag_many([messages])[0]


# ---------------------------------------------------------------- vocabulary clean-up


def clean_tag(tag: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: the readable form a merged group is named by."""
    text = unicodedata.normalize("NFKC", tag).lower().replace("_", " ")
    # Keep the symbols that name things (c++, c#, .net); everything else separates words.
    text = re.sub(r"[^\w+#.]+", " ", text)
    return " ".join(w.strip(".") for w in text.split() if w.strip("."))


def normalize_tag(tag: str) -> str:
    """:func:`clean_tag`, then every word lemmatised (English): the key near-duplicates are found by."""
    import simplemma

    return " ".join(simplemma.lemmatize(w, lang="en") if w.isalpha() else w for w in clean_tag(tag).split())


@dataclass
class TagMerge:
    kept: str
    merged: str
    reason: str  # "fuzzy" | "embedding"
    score: float


@dataclass
class TagVocabReport:
    n_raw_tags: int  # distinct input spellings
    n_occurrences: int
    n_normalised: int  # distinct after normalisation
    n_kept: int
    normalised: dict[str, str]  # raw -> lemma key, only where they differ
    merges: list[TagMerge]
    dropped: dict[str, int]  # canonical tag -> its total count, below min_frequency
    mapping: dict[str, str | None]  # raw -> canonical tag (None: dropped)
    counts: dict[str, int]  # kept canonical tag -> total count
    parameters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self, examples: int = 15) -> list[str]:
        lines = [
            f"{self.n_raw_tags:,} distinct input tags ({self.n_occurrences:,} occurrences)",
            f"normalisation (lower-case, lemmatise): {self.n_raw_tags:,} -> {self.n_normalised:,} "
            f"({len(self.normalised):,} spellings changed)",
            f"near-duplicate merges: {len(self.merges):,} "
            f"(fuzzy {sum(m.reason == 'fuzzy' for m in self.merges):,}, "
            f"embedding {sum(m.reason == 'embedding' for m in self.merges):,})",
            f"dropped below frequency {self.parameters.get('min_frequency')}: {len(self.dropped):,}",
            f"kept: {self.n_kept:,} tags",
        ]
        for m in self.merges[:examples]:
            lines.append(f"  merge  {m.merged!r} -> {m.kept!r}  ({m.reason} {m.score:.3f})")
        if len(self.merges) > examples:
            lines.append(f"  ... {len(self.merges) - examples:,} more merges")
        for tag, n in sorted(self.dropped.items(), key=lambda kv: (kv[1], kv[0]))[:examples]:
            lines.append(f"  drop   {tag!r} (count {n})")
        if len(self.dropped) > examples:
            lines.append(f"  ... {len(self.dropped) - examples:,} more drops")
        return lines


def _fuzzy_pairs(names: list[str], threshold: float, block: int = 1024) -> Iterable[tuple[int, int, float]]:
    from rapidfuzz import fuzz
    from rapidfuzz.process import cdist

    cutoff = threshold * 100.0
    for start in range(0, len(names), block):
        scores = cdist(names[start:start + block], names, scorer=fuzz.ratio, dtype=np.float32,
                       score_cutoff=cutoff)
        rows, cols = np.nonzero(scores > cutoff)
        for r, col in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if i < col:
                yield i, col, float(scores[r, col]) / 100.0


def _embedding_pairs(names: list[str], threshold: float, embedder: Embedder,
                     block: int = 2048) -> Iterable[tuple[int, int, float]]:
    vectors = np.asarray(embedder(names), dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    for start in range(0, len(names), block):
        sims = vectors[start:start + block] @ vectors.T
        rows, cols = np.nonzero(sims > threshold)
        for r, col in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if i < col:
                yield i, col, float(sims[r, col])


def consolidate_tags(
    tags: Mapping[str, int] | Iterable[str],
    min_frequency: int = 1,
    fuzzy_threshold: float = 0.92,
    embed_threshold: float = 0.95,
    embedder: Embedder | None | bool = None,
) -> TagVocabReport:
    """Normalise, merge near-duplicates and drop rare tags; say what was done.

    ``tags``: tag -> count, or an iterable of tag occurrences. ``embedder``: texts -> vectors
    (the offline MiniLM when None; ``False`` skips the embedding merge). A merged group is named
    by its most frequent spelling (lower-cased; then the shortest, then alphabetical); near-duplicates
    are found among lemma keys (:func:`normalize_tag`).
    """
    raw_counts: Counter[str] = Counter()
    if isinstance(tags, Mapping):
        for t, n in tags.items():
            if int(n) < 0:
                raise ValueError(f"tag {t!r} has a negative count {n}")
            raw_counts[str(t)] += int(n)
    else:
        raw_counts.update(str(t) for t in tags)
    raw_counts = Counter({t: n for t, n in raw_counts.items() if t.strip()})
    normalised = {t: normalize_tag(t) for t in raw_counts}
    norm_counts: Counter[str] = Counter()
    for t, n in raw_counts.items():
        if normalised[t]:
            norm_counts[normalised[t]] += n
    names = sorted(norm_counts)
    uf = UnionFind(len(names))
    merges_raw: list[tuple[int, int, str, float]] = []
    for i, j, s in _fuzzy_pairs(names, fuzzy_threshold):
        if uf.union(i, j):
            merges_raw.append((i, j, "fuzzy", s))
    if embedder is not False and len(names) > 1:
        if embedder is None or embedder is True:
            from pipeline.embed.sentence import default_text_embedder

            embedder = default_text_embedder()
        for i, j, s in _embedding_pairs(names, embed_threshold, embedder):
            if uf.union(i, j):
                merges_raw.append((i, j, "embedding", s))
    groups: dict[int, list[int]] = {}
    for i in range(len(names)):
        groups.setdefault(uf.find(i), []).append(i)
    # A group is named by its most frequent readable spelling, not by its lemma key
    # ("step by step reasoning", not "step by step reason").
    surface: dict[str, Counter[str]] = {}
    for t, n in raw_counts.items():
        if normalised[t]:
            surface.setdefault(normalised[t], Counter())[clean_tag(t)] += n
    canonical_of: dict[str, str] = {}  # lemma key -> group name
    group_count: dict[str, int] = {}
    for members in groups.values():
        forms: Counter[str] = Counter()
        for k in members:
            forms.update(surface[names[k]])
        best = min(forms, key=lambda f: (-forms[f], len(f), f))
        for k in members:
            canonical_of[names[k]] = best
        group_count[best] = sum(norm_counts[names[k]] for k in members)
    merges = []
    for i, j, reason, score in merges_raw:
        kept = canonical_of[names[i]]
        a, b = surface[names[i]].most_common(1)[0][0], surface[names[j]].most_common(1)[0][0]
        merges.append(TagMerge(kept, b if b != kept else a, reason, round(score, 4)))
    dropped = {t: n for t, n in group_count.items() if n < min_frequency}
    counts = {t: n for t, n in sorted(group_count.items(), key=lambda kv: (-kv[1], kv[0])) if t not in dropped}
    mapping: dict[str, str | None] = {}
    for t in raw_counts:
        canon = canonical_of.get(normalised[t])
        mapping[t] = canon if canon is not None and canon not in dropped else None
    return TagVocabReport(
        n_raw_tags=len(raw_counts), n_occurrences=sum(raw_counts.values()), n_normalised=len(names),
        n_kept=len(counts), normalised={t: n for t, n in normalised.items() if t != n}, merges=merges,
        dropped=dropped, mapping=mapping, counts=counts,
        parameters={"min_frequency": min_frequency, "fuzzy_threshold": fuzzy_threshold,
                    "embed_threshold": embed_threshold if embedder is not False else None},
    )


def read_tag_list(path: str | Path) -> Counter[str]:
    """Tags from a text file: one occurrence per line, or ``tag<TAB>count`` lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tag list {p} does not exist")
    counts: Counter[str] = Counter()
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" in line:
            tag, _, n = line.partition("\t")
            try:
                counts[tag.strip()] += int(n.strip())
            except ValueError:
                raise ValueError(f"{p}:{lineno}: expected 'tag<TAB>count', the count {n!r} is not an integer") from None
        else:
            counts[line.strip()] += 1
    return counts
