"""Caption concept annotator (matching, counts, negation) and the open_clip zero-shot tagger."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pyarrow as pa
import pytest

import schemas
from pipeline.annotate.concepts import (
    CaptionConceptMatcher,
    ClipConceptTagger,
    annotate_captions,
    tag_from_similarities,
)
from pipeline.annotate.vocabulary import ConceptEntry, Vocabulary, load_vocabulary
from tests.conftest import REPO

SMALL = Vocabulary(tuple(ConceptEntry(c, tuple(s.split("|")) if s else (), cat) for c, s, cat in [
    ("teddy bear", "teddy", "toy"), ("bear", "", "animal"), ("red panda", "", "animal"), ("dog", "puppy", "animal"),
    ("cat", "kitten", "animal"), ("mouse", "mice", "animal"), ("person", "people|persons", "person"),
    ("cube", "", "shape"), ("ball", "", "toy"), ("red", "", "colour"), ("blue", "", "colour"),
    ("small", "little", "size"), ("wooden", "", "material"), ("egg", "", "food"), ("shoe", "", "clothing"),
    ("swimming pool", "pool", "scene"), ("swimming", "swim|swims", "action"), ("guitar", "", "instrument"),
    ("playing guitar", "", "activity"), ("box", "", "object"), ("boxing", "", "activity"), ("park", "", "scene"),
    ("leaf", "", "plant"), ("television", "tv", "electronics"), ("ice cream", "", "food"), ("hat", "", "clothing"),
]))


@pytest.fixture(scope="module")
def small() -> CaptionConceptMatcher:
    return CaptionConceptMatcher(SMALL)


@pytest.fixture(scope="module")
def shipped() -> CaptionConceptMatcher:
    return CaptionConceptMatcher()


def counts(matcher: CaptionConceptMatcher, caption: str) -> dict[str, int]:
    return {c["concept"]: c["count"] for c in matcher.concepts(caption)}


@pytest.mark.parametrize("caption,expected", [
    ("two dogs and a cat", {"dog": 2, "cat": 1}),
    ("three red cubes", {"cube": 3, "red": 1}),
    ("Dogs in the park", {"dog": 2, "park": 1}),  # plural, no numeral: "at least two"
    ("a dog", {"dog": 1}), ("an egg", {"egg": 1}), ("one cat", {"cat": 1}), ("cat", {"cat": 1}),
    ("twenty eggs", {"egg": 20}), ("12 eggs", {"egg": 12}), ("seventeen kittens", {"cat": 17}),
    ("2019 dogs", {"dog": 2}),  # a year, not a count: plural default
    ("the mice", {"mouse": 2}), ("three people", {"person": 3}), ("leaves", {"leaf": 2}),
    ("a pair of shoes", {"shoe": 2}), ("a dozen eggs", {"egg": 12}), ("several balls", {"ball": 2}),
    ("two small wooden red cubes", {"cube": 2, "small": 1, "wooden": 1, "red": 1}),
    ("a red and blue ball", {"ball": 1, "red": 1, "blue": 1}),
    ("two of the dogs", {"dog": 2}),
    ("a puppy and two kittens", {"dog": 1, "cat": 2}),  # synonyms count for their concept
    ("people watching TV", {"person": 2, "television": 1}),
])
def test_counts(small, caption, expected):
    assert counts(small, caption) == expected


@pytest.mark.parametrize("caption,expected", [
    ("a teddy bear", {"teddy bear": 1}),  # the multi-word concept hides "bear"
    ("a red panda and a red ball", {"red panda": 1, "ball": 1, "red": 1}),  # "red" of the panda is not the colour
    ("a bear hugging a teddy bear", {"bear": 1, "teddy bear": 1}),
    ("ice cream", {"ice cream": 1}),
    ("a man playing guitar", {"guitar": 1, "playing guitar": 1}),  # actions are a second layer
    ("a swimming pool", {"swimming pool": 1}),  # ... but not inside a longer thing
    ("kids swimming in the pool", {"swimming": 1, "swimming pool": 1}),
    ("a boxing match", {"boxing": 1}),  # -ing words are not lemmatised to a thing ("box")
    ("a dog swims", {"dog": 1, "swimming": 1}),
])
def test_longest_match_and_layers(small, caption, expected):
    assert counts(small, caption) == expected


@pytest.mark.parametrize("caption,expected", [
    ("no dogs", {}), ("zero cats", {}), ("a man without a hat", {}), ("there is not a single dog", {}),
    ("there are no red cubes but a blue ball", {"ball": 1, "blue": 1}),  # "red" goes with its noun
    ("a red ball and no red cubes", {"ball": 1, "red": 1}),
    ("None of the dogs are here, two cats are", {"cat": 2}),
])
def test_negation_drops_the_phrase(small, caption, expected):
    assert counts(small, caption) == expected


def test_repeated_mentions_add_up_unless_definite(small):
    assert counts(small, "a dog, another dog and a puppy") == {"dog": 3}
    assert counts(small, "two dogs. The dogs are playing with the cat") == {"dog": 2, "cat": 1}
    assert counts(small, "the dog and the dog") == {"dog": 1}


def test_mentions_report_spans_and_flags(small):
    ms = small.mentions("Three red cubes and no balls")
    assert [(m.text, m.concept, m.start, m.end, m.count, m.plural, m.negated) for m in ms] == [
        ("red", "red", 1, 2, 1, False, False), ("cubes", "cube", 2, 3, 3, True, False),
        ("balls", "ball", 5, 6, 0, True, True)]
    assert small.mentions("") == [] and small.concepts(None) == [] and small.concepts("!!!") == []


def test_confidence_is_one_and_order_is_most_instances_first(small):
    out = small.concepts("a cat and three dogs")
    assert out == [{"concept": "dog", "count": 3, "confidence": 1.0}, {"concept": "cat", "count": 1, "confidence": 1.0}]
    assert annotate_captions(["a cat"], SMALL) == [[{"concept": "cat", "count": 1, "confidence": 1.0}]]


def test_shipped_vocabulary_examples(shipped):
    assert counts(shipped, "A teddy bear next to a fire hydrant and two traffic lights") == {
        "teddy bear": 1, "fire hydrant": 1, "traffic light": 2}
    assert counts(shipped, "a cellphone, a cell phone and two mobile phones") == {"cellphone": 4}
    assert counts(shipped, "the mice ate the cheese") == {"mouse": 2, "cheese": 1, "eating": 1}
    assert counts(shipped, "There is a tower with four blocks.") == {"tower": 1, "block": 4}
    assert counts(shipped, "There is no black triangle") == {}
    caption = "a black and white photo of a woman with an umbrella walking down a narrow alley"
    assert {"black and white", "woman", "umbrella", "walking", "alley"} <= set(counts(shipped, caption))


def test_annotate_table_has_the_concept_schema(small):
    table = pa.table({"sample_id": ["a", "b", "c"], "caption": ["two dogs", "", None]})
    out = small.annotate_table(table)
    assert out.schema == schemas.CONCEPT_ANNOTATIONS
    rows = out.to_pylist()
    assert rows[0] == {"sample_id": "a", "concepts": [{"concept": "dog", "count": 2, "confidence": 1.0}],
                       "boxes": None, "tags": None, "annotator": "caption"}
    assert rows[1]["concepts"] == [] and rows[2]["concepts"] == []
    with pytest.raises(ValueError, match="'caption' column"):
        small.annotate_table(pa.table({"sample_id": ["a"]}))


# ---------------------------------------------------------------- zero-shot tagger


def test_tag_from_similarities_top_k_threshold_and_softmax():
    names = ["a", "b", "c", "d"]
    sims = np.array([[0.1, 0.3, 0.2, 0.3], [0.0, 0.0, 0.0, 0.9]])
    out = tag_from_similarities(sims, names, top_k=2, threshold=0.0, score="cosine")
    assert [[t["concept"] for t in row] for row in out] == [["b", "d"], ["d", "a"]]  # ties to the earlier entry
    assert out[1][0] == {"concept": "d", "count": 1, "confidence": pytest.approx(0.9)}
    soft = tag_from_similarities(sims, names, top_k=4, threshold=0.0, score="softmax", logit_scale=10.0)
    probs = np.exp(sims[0] * 10) / np.exp(sims[0] * 10).sum()
    assert [t["confidence"] for t in soft[0]] == pytest.approx(sorted(probs, reverse=True))
    assert sum(t["confidence"] for t in soft[0]) == pytest.approx(1.0)
    high = tag_from_similarities(sims, names, top_k=4, threshold=0.5, score="softmax", logit_scale=10.0)
    assert [[t["concept"] for t in row] for row in high] == [[], ["d"]]
    with pytest.raises(ValueError, match="shape"):
        tag_from_similarities(sims, names[:3])
    with pytest.raises(ValueError, match="score"):
        tag_from_similarities(sims, names, score="logits")


@pytest.fixture(scope="module")
def demo_images(demo_data) -> list[bytes]:
    folder = demo_data / "image_text" / "small_dupes"
    return [(folder / n).read_bytes() for n in ("img1.png", "img2.jpg", "img3.jpg")]


def test_clip_tagger_plumbing_with_a_tiny_random_model(demo_images):
    from pipeline.embed.clip import (
        TINY_MODEL,
        embed_captions,
        embed_images,
        shared_clip,
    )

    vocab = load_vocabulary().subset(["dog", "cat", "bed", "bus", "umbrella", "woman", "red", "alley", "tree", "car"])
    # cosine of random weights can be negative: a threshold of -1 keeps every top-k concept
    tagger = ClipConceptTagger(TINY_MODEL, None, vocab, top_k=3, threshold=-1.0, score="cosine")
    tags = tagger.tag_images(demo_images)
    # The same numbers computed by hand from the embedding functions: the tagger adds no noise.
    clip = shared_clip(TINY_MODEL, None)
    sims = embed_images(clip, demo_images) @ embed_captions(clip, [f"a photo of a {n}." for n in vocab.names]).T
    where = {name: i for i, name in enumerate(vocab.names)}
    for row, s in zip(tags, sims):
        assert len(row) == 3 and len({t["concept"] for t in row}) == 3
        # each confidence is its concept's cosine, and they are the best three in order; concepts
        # whose cosines tie within rounding (the two computations differ in the last bits) may swap
        assert [t["confidence"] for t in row] == pytest.approx([s[where[t["concept"]]] for t in row], abs=1e-5)
        assert [t["confidence"] for t in row] == pytest.approx(np.sort(s)[::-1][:3], abs=1e-5)
    assert tagger.annotator == f"clip:{TINY_MODEL}-random"
    table = tagger.annotate_table(pa.table({"sample_id": ["x", "y", "z"], "image": demo_images}))
    assert table.schema == schemas.CONCEPT_ANNOTATIONS
    row = table.to_pylist()[0]
    assert [t["tag"] for t in row["tags"]] == [c["concept"] for c in row["concepts"]]
    assert all(c["count"] == 1 for c in row["concepts"]) and row["boxes"] is None
    positive = ClipConceptTagger(TINY_MODEL, None, vocab, top_k=3, threshold=0.0, score="cosine").tag_images(demo_images)
    assert [[t["concept"] for t in p] for p in positive] == [[t["concept"] for t in row if t["confidence"] >= 0]
                                                             for row in tags]
    none = ClipConceptTagger(TINY_MODEL, None, vocab, top_k=3, threshold=1.01, score="softmax").tag_images(demo_images)
    assert none == [[], [], []]
    with pytest.raises(ValueError, match="template"):
        ClipConceptTagger(TINY_MODEL, None, vocab, template="a photo")


# ---------------------------------------------------------------- NLVR ground truth (demo rows)


def _nlvr_benchmark():
    spec = importlib.util.spec_from_file_location("nlvr_concepts", REPO / "benchmarks" / "nlvr_concepts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_nlvr_demo_rows_against_sentences_and_scenes(demo_data, shipped):
    bench = _nlvr_benchmark()
    rows = bench.load_rows(demo_data / "image_text" / "nlvr_dev" / "dev.json")
    assert len(rows) == 20
    res = bench.evaluate(rows, bench.annotator_extractor(shipped))
    for kind in ("shape", "colour"):
        mentions = res[("mentions", kind)]
        assert mentions.precision == 1.0, kind  # the annotator never invents a shape or colour
        assert mentions.recall >= 0.9, kind
        assert res[("image_true", kind)].precision >= 0.9, kind
        assert 0 < res[("image_all", kind)].recall < 1, kind  # sentences mention only part of a scene
    # the towers-of-blocks row: tower and block both map to NLVR's square
    row = next(r for r in rows if r["sentence"] == "There is a tower with four blocks.")
    assert bench.to_nlvr(bench.annotator_extractor(shipped)(row["sentence"])) == ({"square"}, set())
    assert bench.present_objects(row["structured_rep"]) == ({"square"}, {"yellow"})
    # a misspelling the reference lexicon knows and the annotator does not
    assert bench.reference_mentions("a blue cirlce") == ({"circle"}, {"blue"})
    assert bench.to_nlvr(bench.annotator_extractor(shipped)("a blue cirlce")) == (set(), {"blue"})


@pytest.mark.shared_data
def test_nlvr_full_dev_set_figures(shared_data, shipped):
    bench = _nlvr_benchmark()
    rows = bench.load_rows(shared_data / "image_text" / "nlvr_dev" / "dev.json")
    assert len(rows) == 989
    res = bench.evaluate(rows, bench.annotator_extractor(shipped))
    for kind in ("shape", "colour"):
        assert res[("mentions", kind)].precision == 1.0
        assert res[("mentions", kind)].recall > 0.95
    naive = bench.evaluate(rows, bench.naive_extractor(shipped.vocabulary))
    # the naive substring matcher has no negation, so it keeps the negated colour mentions
    assert naive[("mentions", "colour")].recall > res[("mentions", "colour")].recall
    assert json.dumps({f"{k[0]}/{k[1]}": round(v.precision, 3) for k, v in res.items()})
