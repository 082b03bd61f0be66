"""Offline DEITA-style quality x complexity scores from transparent heuristics.

DEITA (Liu et al., 2024) scores every round of a conversation with two fine-tuned LLaMA scorers:
*complexity* of the user instruction and *quality* of the assistant response, each on 1..6, and
ranks samples by the mean over rounds of quality x complexity. Those scorers cannot ship here, so
this module computes scores on the same 1..6 scale from features one can read and argue about:

complexity (instruction only)
    length (log characters), explicit constraints and requirements ("must", "at least",
    "in 3 sentences", "without", "format"), questions asked, multi-step cues ("first ... then",
    "step by step", "explain why"), and embedded material (a separate input paragraph, code, a
    list of items).

quality (response given its instruction)
    adequate length for what was asked (open-ended requests want more text than label-style
    questions), on-topic similarity of instruction and response (MiniLM cosine), the structure
    asked for (a list, code, steps) being present; multiplied by penalties for degenerate
    output: empty, repeated lines or n-grams, leaked prompt scaffolding ("Input:", "Output:"
    lines the instruction never had: the completion ran on into invented examples), echoing the
    instruction, truncation mid-sentence, refusals and canned AI disclaimers.

The scores are heuristics, not DEITA's trained judgements: they rank obviously broken or
off-topic answers below complete, relevant ones, and longer, constrained instructions above
one-liners; they know nothing about factual correctness. ``benchmarks/quality_eval.py`` measures
how often they prefer text-davinci-003's answers to plain davinci's on the self-instruct human
evaluation set. Nothing here reads a model name.

A round is one user message and the assistant messages that follow it. A round with no assistant
reply (e.g. MT-bench questions) has nothing to learn from; it is scored as an empty response
(quality 1), so its score is its complexity.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from pipeline.annotate.deita import deita_score

log = logging.getLogger(__name__)

SCORER_VERSION = "1"
MIN_SCORE, MAX_SCORE = 1.0, 6.0

Embedder = Callable[[Sequence[str]], np.ndarray]


# ---------------------------------------------------------------- conversation rounds


@dataclass(frozen=True)
class Round:
    instruction: str
    response: str | None  # None: the user turn got no assistant reply


def conversation_rounds(messages: Sequence[dict]) -> list[Round]:
    """Split a conversation into user/assistant rounds; system messages are context, not rounds."""
    rounds: list[Round] = []
    instruction: str | None = None
    replies: list[str] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "user":
            if instruction is not None:
                rounds.append(Round(instruction, "\n".join(replies) if replies else None))
            instruction, replies = content, []
        elif role == "assistant" and instruction is not None:
            replies.append(content)
    if instruction is not None:
        rounds.append(Round(instruction, "\n".join(replies) if replies else None))
    return rounds


# ---------------------------------------------------------------- text features

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_repetition(tokens: Sequence[str], n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    if len(tokens) < n + 8:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def duplicate_line_ratio(text: str) -> float:
    lines = [ln.strip().lower() for ln in text.splitlines() if len(ln.strip()) >= 8]
    if len(lines) < 3:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


# Lines that open a prompt's scaffolding. A response that writes them although the instruction
# did not is a completion that ran on into invented examples.
_SCAFFOLD = re.compile(
    r"^[ \t#*]*(input|output|instruction|instructions|question|answer|example|task|context|response|"
    r"q|a|user|assistant|human|ai)(\s*\d+)?\s*:", re.IGNORECASE | re.MULTILINE)


def leaked_scaffolding(instruction: str, response: str) -> int:
    """Scaffolding lines in ``response`` whose marker word the instruction itself never uses."""
    allowed = {m.group(1).lower() for m in _SCAFFOLD.finditer(instruction)}
    return sum(1 for m in _SCAFFOLD.finditer(response) if m.group(1).lower() not in allowed)


def _ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def instruction_head(instruction: str) -> str:
    """The task statement: the first paragraph when the user message also carries an input."""
    parts = [p for p in re.split(r"\n\s*\n", instruction.strip()) if p.strip()]
    return parts[0] if parts else instruction


def echo_ratio(instruction: str, response: str, n: int = 5) -> float:
    """How much of the task statement the response copies (share of its word 5-grams)."""
    head = _ngrams(words(instruction_head(instruction)), n)
    if len(head) < 2:
        return 0.0
    return len(head & _ngrams(words(response), n)) / len(head)


_TERMINAL = tuple('.!?"\'”’)]}>*`:;|…')


def looks_truncated(response: str) -> bool:
    """Cut off mid-sentence: a long last line without closing punctuation, or an open code fence."""
    text = response.rstrip()
    if text.count("```") % 2 == 1:
        return True
    if len(text) < 200:
        return False
    last = text.splitlines()[-1].strip()
    return len(last) > 60 and not last.endswith(_TERMINAL)


_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i am unable|i'?m unable|i am not able|"
    r"as an ai|as a language model|i do not have (access|the ability)|i don'?t have (access|the ability))\b",
    re.IGNORECASE)


def refusal(response: str) -> bool:
    return bool(_REFUSAL.search(response[:300]))


_LIST_LINE = re.compile(r"^\s*([-*•]|\d+[.)]|[a-z][.)])\s+\S", re.MULTILINE)
_CODE_HINT = re.compile(r"```|^\s{2,}\S|[{};]\s*$|\bdef |\bfunction\b|\breturn\b|<\w+>|=", re.MULTILINE)

_WANTS_LIST = re.compile(
    r"\b(list|steps?|bullet|enumerate|outline|checklist|ideas|tips|suggestions|examples|options|ways|"
    r"reasons|names|items|things)\b", re.IGNORECASE)
_WANTS_CODE = re.compile(
    r"\b(code|function|script|program|implement|sql|query|regex|regular expression|class|method|"
    r"python|javascript|java|c\+\+|html|css|bash|latex)\b", re.IGNORECASE)
# Requests whose good answer is a passage rather than a label or a short value.
_OPEN_ENDED = re.compile(
    r"\b(write|compose|draft|explain|describe|create|generate|list|suggest|plan|brainstorm|design|"
    r"give me|tell me about|elaborate|discuss|summari[sz]e|outline|story|essay|email|letter|post|poem|"
    r"article|blog|review|recipe|guide|ideas|tips|steps|how (do|can|should|to)|why)\b", re.IGNORECASE)


def wants_structure(instruction: str) -> tuple[bool, bool]:
    head = instruction_head(instruction)
    return bool(_WANTS_LIST.search(head)), bool(_WANTS_CODE.search(head))


def has_list(response: str) -> bool:
    return len(_LIST_LINE.findall(response)) >= 2 or response.count(",") >= 3


def has_code(response: str) -> bool:
    return len(_CODE_HINT.findall(response)) >= 2


# ---------------------------------------------------------------- complexity

_CONSTRAINT = re.compile(
    r"\b(must|should|make sure|ensure|at least|at most|no more than|fewer than|less than|exactly|"
    r"without|only|do not|don'?t|never|avoid|include|including|each|every|format|in the form|"
    r"using|use|based on|according to|given|consider|within|limit|keep|concise|detailed|"
    r"in \d+|\d+ (words|sentences|paragraphs|lines|items|characters|bullet))\b", re.IGNORECASE)
_MULTI_STEP = re.compile(
    r"\b(first|then|next|finally|after that|afterwards|step by step|steps|also|additionally|"
    r"and then|as well as|explain (why|how|your)|justify|show your|reasoning|compare|contrast|"
    r"evaluate|analy[sz]e|pros and cons|both)\b", re.IGNORECASE)


@dataclass
class ComplexityFeatures:
    chars: int
    constraints: int
    questions: int
    multi_step: int
    embedded_input: bool
    list_items: int


def complexity_features(instruction: str) -> ComplexityFeatures:
    text = instruction.strip()
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return ComplexityFeatures(
        chars=len(text),
        constraints=len(_CONSTRAINT.findall(text)),
        questions=text.count("?"),
        multi_step=len(_MULTI_STEP.findall(text)),
        embedded_input=len(paragraphs) > 1 or "```" in text,
        list_items=len(_LIST_LINE.findall(text)),
    )


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))


def complexity_from_features(f: ComplexityFeatures) -> float:
    length = _unit(math.log1p(f.chars) / math.log1p(1500))
    parts = (
        0.35 * length
        + 0.25 * _unit(f.constraints / 5)
        + 0.10 * _unit(f.questions / 3)
        + 0.15 * _unit(f.multi_step / 3)
        + 0.10 * float(f.embedded_input)
        + 0.05 * _unit(f.list_items / 4)
    )
    return MIN_SCORE + (MAX_SCORE - MIN_SCORE) * _unit(parts)


def complexity_score(instruction: str) -> float:
    """DEITA-scale (1..6) complexity of one instruction."""
    return complexity_from_features(complexity_features(instruction))


# ---------------------------------------------------------------- quality


@dataclass
class QualityFeatures:
    chars: int
    target_chars: int
    on_topic: float  # cosine of instruction and response embeddings (nan when not embedded)
    repetition: float
    duplicate_lines: float
    leaked: int
    echo: float
    truncated: bool
    refusal: bool
    wants_list: bool
    wants_code: bool
    has_list: bool
    has_code: bool


def quality_features(instruction: str, response: str, on_topic: float = float("nan")) -> QualityFeatures:
    text = response.strip()
    wl, wc = wants_structure(instruction)
    return QualityFeatures(
        chars=len(text),
        target_chars=500 if _OPEN_ENDED.search(instruction_head(instruction)) else 60,
        on_topic=float(on_topic),
        repetition=ngram_repetition(words(text)),
        duplicate_lines=duplicate_line_ratio(text),
        leaked=leaked_scaffolding(instruction, text),
        echo=echo_ratio(instruction, text),
        truncated=looks_truncated(text),
        refusal=refusal(text),
        wants_list=wl,
        wants_code=wc,
        has_list=has_list(text),
        has_code=has_code(text),
    )


def quality_from_features(f: QualityFeatures) -> float:
    if f.chars == 0:
        return MIN_SCORE
    length = _unit(math.log1p(f.chars) / math.log1p(f.target_chars))
    topic = 0.5 if math.isnan(f.on_topic) else _unit((f.on_topic - 0.05) / 0.55)
    wanted = [w for w in (f.wants_list, f.wants_code) if w]
    if wanted:
        structure = (float(f.has_list) * f.wants_list + float(f.has_code) * f.wants_code) / len(wanted)
    else:
        structure = 1.0
    base = 0.40 * length + 0.40 * topic + 0.20 * structure
    penalty = (
        (1.0 - 0.9 * _unit(max(f.repetition, f.duplicate_lines) * 1.5))
        * (1.0 - min(0.6, 0.3 * f.leaked))
        * (1.0 - 0.7 * _unit((f.echo - 0.2) / 0.6))
        * (1.0 - 0.3 * float(f.truncated))
        * (1.0 - 0.4 * float(f.refusal))
    )
    return MIN_SCORE + (MAX_SCORE - MIN_SCORE) * _unit(base * penalty)


# ---------------------------------------------------------------- conversations


@dataclass
class QualityResult:
    quality: float
    complexity: float
    score: float
    quality_per_round: list[float]
    complexity_per_round: list[float]
    features: list[QualityFeatures | None] = field(default_factory=list)

    def row(self, sample_id: str, annotator: str) -> dict:
        return {"sample_id": sample_id, "quality": self.quality, "complexity": self.complexity,
                "score": self.score, "quality_per_round": self.quality_per_round,
                "complexity_per_round": self.complexity_per_round, "annotator": annotator}

    def to_dict(self) -> dict:
        return asdict(self)


def combine_rounds(quality: Sequence[float], complexity: Sequence[float]) -> tuple[float, float, float]:
    """(mean quality, mean complexity, DEITA score) of one conversation's per-round ratings.

    The score is :func:`pipeline.annotate.deita.deita_score`: the mean over rounds of quality x
    complexity, rounds rated by one list only left out (logged; the annotators here rate every
    round, so it would be a bug). Raises ValueError when no round has both ratings.
    """
    d = deita_score(quality, complexity)
    if d.score is None:
        raise ValueError(f"no round has both a quality and a complexity rating "
                         f"(got {len(quality)} and {len(complexity)})")
    if d.left_out:
        log.warning("DEITA score over %d of %d rounds: %d quality and %d complexity ratings",
                    d.rounds, d.rounds + d.left_out, len(quality), len(complexity))
    q = np.asarray([v for v in quality if v is not None], dtype=np.float64)
    c = np.asarray([v for v in complexity if v is not None], dtype=np.float64)
    return float(np.nanmean(q)), float(np.nanmean(c)), d.score


# The on-topic weights below were tuned on cosines of instruction and response encoded apart.
# Cosines of the user and answer spans of one shared pass run higher and flatter (each side's
# tokens attended to the other): mean 0.79 / sd 0.12 vs 0.53 / 0.24, correlation 0.79, on 600
# conversations of the shared pool (benchmarks/one_pass.py, seed 1). This least-squares line
# maps a span cosine onto the scale the weights expect.
SPAN_COSINE_SLOPE, SPAN_COSINE_INTERCEPT = 1.614, -0.747


def on_topic_from_spans(cosine: np.ndarray) -> np.ndarray:
    """Span cosines (one shared encoder pass) on the scale of separately encoded ones."""
    return np.clip(SPAN_COSINE_SLOPE * np.asarray(cosine, dtype=np.float64) + SPAN_COSINE_INTERCEPT, -1.0, 1.0)


def _clip_for_embedding(text: str, limit: int) -> str:
    return text.strip()[:limit]


class OfflineQualityScorer:
    """Scores conversations; one embedding batch per call covers every round of every conversation.

    ``embedder`` maps texts to unit-norm row vectors (the offline MiniLM by default, loaded on
    first use); pass ``embedder=False`` to score without the on-topic feature.
    """

    def __init__(self, embedder: Embedder | None | bool = None, embed_chars: int = 400, batch_size: int = 64):
        self._embedder = embedder
        self.embed_chars = embed_chars
        self.batch_size = batch_size

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        if self._embedder is False or not texts:
            return None
        if self._embedder is None or self._embedder is True:
            from pipeline.embed.sentence import default_text_embedder

            self._embedder = default_text_embedder(batch_size=self.batch_size)
        # Instructions repeat (one prompt, several answers; templated datasets): embed each text once.
        unique = list(dict.fromkeys(texts))
        vectors = np.asarray(self._embedder(unique), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        row = {t: k for k, t in enumerate(unique)}
        return vectors[[row[t] for t in texts]]

    def score_many(self, conversations: Sequence[Sequence[dict]],
                   on_topic: Sequence[float] | None = None) -> list[QualityResult]:
        """Score conversations. ``on_topic``: one value per conversation, used for every answered
        round instead of encoding each round's instruction and response: the cosine of its stored
        user-side and answer-side vectors mapped by :func:`on_topic_from_spans`; NaN where a side
        is absent."""
        all_rounds = [conversation_rounds(msgs) for msgs in conversations]
        pairs = [(ci, ri) for ci, rounds in enumerate(all_rounds) for ri, r in enumerate(rounds)
                 if r.response is not None and r.response.strip()]
        cosine: dict[tuple[int, int], float] = {}
        if on_topic is not None:
            if len(on_topic) != len(conversations):
                raise ValueError(f"{len(on_topic)} on-topic values for {len(conversations)} conversations")
            cosine = {(ci, ri): float(on_topic[ci]) for ci, ri in pairs}
        else:
            texts = []
            for ci, ri in pairs:
                r = all_rounds[ci][ri]
                texts.append(_clip_for_embedding(r.instruction, self.embed_chars))
                texts.append(_clip_for_embedding(r.response or "", self.embed_chars))
            vectors = self._embed(texts)
            if vectors is not None:
                sims = np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])
                cosine = {p: float(s) for p, s in zip(pairs, sims)}
        results = []
        for ci, rounds in enumerate(all_rounds):
            if not rounds:
                raise ValueError(f"conversation {ci} has no user message; nothing to score")
            qs, cs, feats = [], [], []
            for ri, r in enumerate(rounds):
                cs.append(complexity_score(r.instruction))
                if r.response is None:
                    qs.append(MIN_SCORE)
                    feats.append(None)
                    continue
                f = quality_features(r.instruction, r.response, cosine.get((ci, ri), float("nan")))
                qs.append(quality_from_features(f))
                feats.append(f)
            q, c, s = combine_rounds(qs, cs)
            results.append(QualityResult(q, c, s, qs, cs, feats))
        return results

    def score(self, messages: Sequence[dict]) -> QualityResult:
        return self.score_many([messages])[0]
