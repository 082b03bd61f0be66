"""Offline InsTag-style tagger: the shipped vocabulary, its rules, MiniLM tagging, vocabulary clean-up."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.annotate.tags import (
    OfflineTagger,
    TaggerConfig,
    consolidate_tags,
    load_tag_vocabulary,
    normalize_tag,
    parse_tag_vocabulary,
    read_tag_list,
)


def _conv(*turns: str) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


def test_shipped_vocabulary_is_large_unique_and_described():
    vocab = load_tag_vocabulary()
    assert len(vocab) >= 300
    assert len(set(vocab.tags)) == len(vocab.tags)
    assert all(e.description and e.tag == e.tag.strip().lower() for e in vocab.entries)
    assert sum(1 for e in vocab.entries if e.rules) >= 200
    assert len(vocab.digest) == 64


def test_vocabulary_errors_name_the_line():
    with pytest.raises(ValueError, match=r"<text>:2: rule .* not a valid regular expression"):
        parse_tag_vocabulary("a\tfirst tag\n b\tsecond\t(unclosed\n")
    with pytest.raises(ValueError, match=r":3: tag 'a' is already defined on line 1"):
        parse_tag_vocabulary("a\tx\nb\ty\na\tz\n")
    with pytest.raises(ValueError, match="expected 'tag<TAB>description"):
        parse_tag_vocabulary("lonely tag without description\n")


@pytest.fixture(scope="module")
def rule_tagger():
    # Rules only: a constant embedder keeps every cosine at zero, so nothing is proposed by similarity.
    return OfflineTagger(embedder=lambda texts: np.ones((len(texts), 4), dtype=np.float32),
                         config=TaggerConfig(threshold=2.0, min_tags=0))


def _rule_tags(tagger: OfflineTagger, messages: list[dict]) -> tuple[set[str], set[str]]:
    added, boosted = tagger.rule_matches(messages)
    tags = tagger.vocabulary.entries
    return {tags[i].tag for i in added}, {tags[i].tag for i in boosted}


@pytest.mark.parametrize("messages, expected", [
    (_conv("Fix this function.", "```python\ndef add(a, b):\n    return a + b\n```"), {"python programming"}),
    (_conv("Write a function to reverse a list.", "#include <vector>\nstd::vector<int> r;"), {"c++ programming", "code generation"}),
    (_conv("toolformer: enabled\ntoolformer access: wikipedia, wolfram\nA wrapper around Wikipedia.\n"
           "wikipedia(query)\nWho painted the Mona Lisa?", "It was wikipedia('Mona Lisa')."),
     {"tool use", "toolformer prompt", "wikipedia lookup", "calculator use", "tool selection", "inline api call"}),
    (_conv("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?",
           "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),
     {"arithmetic", "math word problem", "step-by-step reasoning"}),
    (_conv("Translate the following sentence into French: I love cheese."), {"machine translation"}),
    (_conv("Who are you?", "I am an assistant.", "Have a nice day!", "You too!"),
     {"identity question", "farewell", "multi-turn dialogue"}),
    (_conv("Rewrite the given text and correct grammar, spelling, and punctuation errors."),
     {"grammar correction", "spelling correction", "proofreading", "sentence rewriting"}),
])
def test_rules_add_the_tags_their_cues_imply(rule_tagger, messages, expected):
    added, _ = _rule_tags(rule_tagger, messages)
    assert expected <= added, f"missing {expected - added}"


def test_rules_keep_quiet_on_unrelated_text(rule_tagger):
    added, boosted = _rule_tags(rule_tagger, _conv("Describe the smell of rain on a summer evening."))
    assert not added & {"python programming", "arithmetic", "tool use", "machine translation", "multi-turn dialogue"}
    # A date range or a score is not arithmetic; news numbers in a long passage are no word problem.
    added, _ = _rule_tags(rule_tagger, _conv("The war lasted 1939-1945 and the final ended 2-1. " * 40
                                             + "How many people lived there?"))
    assert "arithmetic" not in added and "math word problem" not in added


def test_rule_tags_get_rule_confidence_and_structure_tags_full_confidence(rule_tagger):
    preds = rule_tagger.tag(_conv("Translate 'hello' into German.", "Hallo", "And into Spanish?", "Hola"))
    by_tag = {p.tag: p for p in preds}
    assert by_tag["machine translation"].confidence == pytest.approx(0.9)
    assert by_tag["multi-turn dialogue"].confidence == 1.0 and by_tag["multi-turn dialogue"].source == "structure"
    assert [p.confidence for p in preds] == sorted((p.confidence for p in preds), reverse=True)


@pytest.fixture(scope="module")
def minilm():
    from pipeline.embed.sentence import embed_texts, load_sentence_embedder

    model = load_sentence_embedder(device="cpu")
    return lambda texts: embed_texts(model, texts)


def test_minilm_tagger_gives_several_plausible_tags_per_sample(minilm):
    samples = [
        (_conv("Is this movie review positive or negative? 'A tedious, joyless two hours.'"),
         {"sentiment analysis", "movie review sentiment"}),
        (_conv("Summarize the following dialogue.\n\nAnna: are we still on for lunch?\nTom: yes, 1pm at the cafe."),
         {"dialogue summarization", "summarization"}),
        (_conv("You are a pirate captain. Describe your plan to capture the enemy ship."),
         {"pirate role-play", "role-play"}),
        (_conv("Write a haiku about autumn leaves."), {"haiku", "poetry writing"}),
        (_conv("Write a SQL query that returns the ten most expensive products from the products table."),
         {"sql query writing", "text-to-sql"}),
        (_conv("Recommend some movies similar to Inception for this weekend."), {"movie recommendation"}),
    ]
    tagger = OfflineTagger(embedder=minilm)
    preds = tagger.tag_many([m for m, _ in samples])
    for (messages, expected), p in zip(samples, preds):
        tags = {x.tag for x in p}
        assert tags & expected, f"{messages[0]['content'][:40]!r} got {sorted(tags)}"
        assert all(0.0 <= x.confidence <= 1.0 for x in p)
    assert np.mean([len(p) for p in preds]) >= 2.0


def test_normalize_tag_lowercases_lemmatises_and_keeps_language_symbols():
    assert normalize_tag("  Grammar  Corrections ") == "grammar correction"
    assert normalize_tag("Emails") == "email"
    assert normalize_tag("C++ Programming") == "c++ programming"
    assert normalize_tag("role_play!") == "role play"
    assert normalize_tag("Step-by-step Reasoning") == "step by step reason"  # the key, not the name


def test_consolidate_merges_near_duplicates_drops_rare_tags_and_reports():
    counts = {"Grammar Correction": 5, "grammar corrections": 3, "grammer correction": 1, "Python Programming": 4,
              "maths": 2, "mathematics": 1, "knitting": 1}
    # Only "maths" and "mathematics" are synonyms to this stand-in embedder.
    vectors = {normalize_tag("maths"): [1, 0, 0], normalize_tag("mathematics"): [0.999, 0.04, 0]}

    def embed(texts):
        out = []
        for k, t in enumerate(texts):
            v = np.zeros(3 + len(texts))
            if t in vectors:
                v[:3] = vectors[t]
            else:
                v[3 + k] = 1.0
            out.append(v)
        return np.array(out)

    report = consolidate_tags(counts, min_frequency=2, embedder=embed)
    assert report.mapping["grammar corrections"] == "grammar correction"
    assert report.mapping["grammer correction"] == "grammar correction"  # fuzzy ratio > 0.92
    assert report.mapping["mathematics"] == "maths" and report.counts["maths"] == 3
    assert report.mapping["knitting"] is None and report.dropped == {"knitting": 1}
    assert report.counts["grammar correction"] == 9
    assert {(m.merged, m.reason) for m in report.merges} >= {("grammer correction", "fuzzy"), ("mathematics", "embedding")}
    text = "\n".join(report.summary_lines())
    assert "merge  'grammer correction' -> 'grammar correction'" in text and "drop   'knitting'" in text


def test_tag_vocab_command_writes_the_mapping(tmp_path, capsys):
    from pipeline.cli import main

    src = tmp_path / "tags.txt"
    src.write_text("Summarization\nsummarisation\nsummarization\nCode Generation\tx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not an integer"):
        read_tag_list(src)
    src.write_text("Summarization\nsummarization\nsummarizations\nCode Generation\t3\nhaiku\n", encoding="utf-8")
    out = tmp_path / "map.tsv"
    assert main(["vocab", "tags", "--input", str(src), "--report", "--no-embed", "--min-frequency", "2",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept: 2 tags" in printed and "drop   'haiku'" in printed
    mapping = dict(line.split("\t") for line in out.read_text(encoding="utf-8").splitlines())
    assert mapping == {"Code Generation": "code generation", "Summarization": "summarization",
                       "haiku": "", "summarization": "summarization", "summarizations": "summarization"}
    # the old spelling still works and says it is deprecated
    assert main(["annotate", "tag-vocab", "--input", str(src), "--no-embed", "--min-frequency", "2",
                 "--output", str(tmp_path / "old.tsv")]) == 0
    assert "deprecated; use `thresher vocab tags`" in capsys.readouterr().err
    assert (tmp_path / "old.tsv").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")
