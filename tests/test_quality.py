"""Offline DEITA-style quality x complexity heuristics: features, round arithmetic, real data."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict

import numpy as np
import pytest

from pipeline.annotate import quality as Q


def _conv(user: str, assistant: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def test_rounds_pair_each_user_turn_with_the_replies_that_follow():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b1"}, {"role": "assistant", "content": "b2"},
            {"role": "user", "content": "c"}]
    assert Q.conversation_rounds(msgs) == [Q.Round("a", "b1\nb2"), Q.Round("c", None)]


def test_degeneracy_features_fire_on_broken_answers_and_stay_quiet_on_clean_ones():
    loop = "I like the books because they are about a group of people. " * 12
    assert Q.ngram_repetition(Q.words(loop)) > 0.8
    assert Q.ngram_repetition(Q.words("Jeans are versatile, comfortable and easy to pack for any trip.")) == 0.0
    instruction = "Indicate the genre of the book to which it belongs.\n\nLove in the Time of Cholera"
    assert Q.leaked_scaffolding(instruction, "Fiction\n\nIndicate the author.\n\nInput: x\nOutput: y") == 2
    assert Q.leaked_scaffolding("Question: why?\nAnswer:", "Answer: because") == 0  # the prompt used the marker
    assert Q.echo_ratio("Write a social media post about a crowdsourcing project in a persuasive way.",
                        "Write a social media post about a crowdsourcing project in a persuasive way.") == 1.0
    assert Q.looks_truncated("This sentence keeps going on and on " * 10 + "and then it stops in the mid")
    assert not Q.looks_truncated("1. Programming Languages\n2. Algorithms\n3. Operating Systems")
    assert Q.refusal("I'm sorry, but I cannot help with that.")


def test_quality_is_on_the_deita_scale_and_penalises_degenerate_answers():
    instruction = "Write an email to my friends inviting them to dinner on Friday."
    good = ("Dear friends,\n\nI would love to have you over for dinner this Friday at 7 pm. "
            "Let me know if you can make it so I can plan the menu.\n\nBest,\nSam")
    scorer = Q.OfflineQualityScorer(embedder=False)
    results = scorer.score_many([_conv(instruction, good), _conv(instruction, (instruction + "\n") * 8),
                                 _conv(instruction, ""), _conv(instruction)])
    q = [r.quality for r in results]
    assert all(Q.MIN_SCORE <= x <= Q.MAX_SCORE for x in q)
    assert q[0] > q[1] + 1.5  # the echoing loop
    assert q[2] == q[3] == Q.MIN_SCORE  # empty answer, and no answer at all
    assert results[3].score == pytest.approx(results[3].complexity)  # quality 1 x complexity


def test_complexity_grows_with_constraints_steps_and_embedded_input():
    simple = Q.complexity_score("Tell me a joke.")
    rich = Q.complexity_score(
        "Plan a 7-day trip to Seattle. First list the neighbourhoods to stay in, then give a day-by-day "
        "itinerary. You must include at least two museums, keep each day under 100 words, and explain why "
        "each stop is worth it. Do not use bullet points.\n\nBudget: $2000, travelling in May.")
    assert Q.MIN_SCORE <= simple < rich <= Q.MAX_SCORE
    assert rich - simple > 1.5


def test_score_is_the_mean_over_rounds_of_quality_times_complexity():
    msgs = _conv("What is 2 + 2?", "4") + _conv("Now explain why, step by step, for a child.",
                                                 "If you have two apples and get two more, you count four apples.")
    r = Q.OfflineQualityScorer(embedder=False).score(msgs)
    assert len(r.quality_per_round) == len(r.complexity_per_round) == 2
    expected = np.mean([q * c for q, c in zip(r.quality_per_round, r.complexity_per_round)])
    assert r.score == pytest.approx(expected)
    assert r.quality == pytest.approx(np.mean(r.quality_per_round))
    row = r.row("s1", "offline_quality")
    assert set(row) == {"sample_id", "quality", "complexity", "score", "quality_per_round",
                        "complexity_per_round", "annotator"}


def test_combine_rounds_uses_the_rounds_both_lists_rate(caplog):
    # the one DEITA rule (pipeline/annotate/deita.py): round 1 has no quality rating, so it is left
    # out of the score, and said so; the means are each list's own
    with caplog.at_level("WARNING", logger="pipeline.annotate.quality"):
        q, c, s = Q.combine_rounds([3.0], [2.0, 4.0])
    assert (q, c, s) == (pytest.approx(3.0), pytest.approx(3.0), pytest.approx(6.0))
    assert "over 1 of 2 rounds" in caplog.text
    with pytest.raises(ValueError, match="no round has both"):
        Q.combine_rounds([], [])


def _predictions(path) -> dict[tuple[str, str], dict[str, list[dict]]]:
    by: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(dict)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            instruction, extra = r["instruction"].strip(), (r["input"] or "").strip()
            user = f"{instruction}\n\n{extra}" if extra else instruction
            by[(r["instruction"], r["input"])][r["model"]] = _conv(user, r["response"] or "")
    return by


def test_scorer_prefers_text_davinci_003_over_davinci_on_the_demo_predictions(demo_data):
    # 40 self-instruct user-oriented instructions x 8 models; human raters put text-davinci-003 on top
    # and plain davinci at the bottom. Measured: 40/40 with the heuristics alone (no embeddings);
    # the bound leaves room for tuning.
    by = _predictions(demo_data / "instructions" / "self_instruct_user_oriented_predictions.jsonl.gz")
    models = sorted(next(iter(by.values())))
    assert len(by) == 40 and len(models) == 8
    keys = sorted(by)
    convs = [by[k][m] for k in keys for m in models]
    scores = np.array([r.score for r in Q.OfflineQualityScorer(embedder=False).score_many(convs)])
    table = scores.reshape(len(keys), len(models))
    best, worst = models.index("text-davinci-003_predictions"), models.index("davinci_predictions")
    wins = float(np.mean(table[:, best] > table[:, worst]))
    assert wins >= 0.85, f"text-davinci-003 preferred over davinci on only {wins:.0%} of instructions"
    means = table.mean(axis=0)
    assert means.argmax() == best and means.argmin() == worst


@pytest.fixture(scope="module")
def minilm():
    from pipeline.embed.sentence import embed_texts, load_sentence_embedder

    model = load_sentence_embedder(device="cpu")
    return lambda texts: embed_texts(model, texts)


def test_on_topic_similarity_from_minilm_raises_quality_of_a_relevant_answer(minilm):
    instruction = "Give me a cooking recipe for pancakes."
    relevant = "Mix flour, milk, eggs and a pinch of salt into a smooth batter, then fry ladlefuls in a hot buttered pan."
    unrelated = "The Treaty of Westphalia ended the Thirty Years' War and reshaped the map of central Europe."
    with_topic = Q.OfflineQualityScorer(embedder=minilm).score_many([_conv(instruction, relevant), _conv(instruction, unrelated)])
    assert with_topic[0].features[0].on_topic > with_topic[1].features[0].on_topic + 0.2
    assert with_topic[0].quality > with_topic[1].quality
