"""The vocabulary tool (normalise, merge, drop, report), the file format and the shipped vocabulary."""

from __future__ import annotations

import json

import pytest

from pipeline.annotate import vocabulary as vb
from pipeline.annotate.vocabulary import ConceptEntry, Vocabulary, build_vocabulary
from pipeline.cli import main as cli_main


def E(concept: str, synonyms: str = "", category: str = "object", count: int | None = None) -> ConceptEntry:
    return ConceptEntry(concept, tuple(s for s in synonyms.split("|") if s), category, count)


# ---------------------------------------------------------------- words


@pytest.mark.parametrize("term,category,expected", [
    ("Teddy-Bears", "object", "teddy bear"),
    ("  Fire Hydrants!! ", "object", "fire hydrant"),
    ("Living Rooms", "room", "living room"),  # only the head becomes singular, "living" stays
    ("building", "building", "building"),  # a noun in -ing is not turned into its verb
    ("knives", "kitchenware", "knife"),
    ("mice", "animal", "mouse"),
    ("glasses", "accessory", "glasses"),  # no singular: not the material "glass"
    ("shorts", "clothing", "shorts"),
    ("coat of arms", "art", "coat of arms"),  # the head is not the last word
    ("Blowing Out Candles", "activity", "blowing out candles"),  # actions keep their words
    ("Rubik's Cube", "toy", "rubik cube"),
])
def test_normalise_term(term, category, expected):
    assert vb.normalise_term(term, category) == expected


def test_lemma_and_plural_rules():
    assert vb.lemma("dogs") == "dog" and vb.lemma("leaves") == "leaf" and vb.lemma("people") == "person"
    assert vb.lemma("scissors") == "scissors" and vb.lemma("2019") == "2019"
    assert vb.is_plural_of("puppies", "puppy") and vb.is_plural_of("teeth", "tooth")
    assert not vb.is_plural_of("glasses", "glass") and not vb.is_plural_of("dog", "dog")
    assert vb.tokenize("Don't stop: the dog's ball, 2 x-rays") == ["dont", "stop", "the", "dog", "ball", "2", "x", "rays"]


# ---------------------------------------------------------------- file format


def test_parse_tsv_plain_terms_header_comments_and_counts():
    text = ("# a comment\nconcept\tsynonyms\tcategory\tcount\n"
            "dog\tpuppy|doggy\tanimal\t12\n"
            "cat\t\t\t\n"
            "just a term\n")
    entries = vb.parse_vocabulary(text, "v.tsv")
    assert entries == [E("dog", "puppy|doggy", "animal", 12), E("cat", "", "concept"), E("just a term", "", "concept")]


@pytest.mark.parametrize("line,message", [
    ("dog\t\tanimal\tmany", "count 'many' is not an integer"),
    ("dog\t\tanimal\t-3", "negative"),
    ("dog\ta\tb\t1\textra", "5 tab-separated fields"),
    ("\tpuppy\tanimal", "empty concept"),
])
def test_parse_errors_name_the_line(line, message):
    with pytest.raises(ValueError, match=message):
        vb.parse_vocabulary("ok\t\tx\n" + line, "v.tsv")


def test_write_read_round_trip(tmp_path):
    vocab = Vocabulary((E("dog", "puppy|mice", "animal", 3), E("red", "", "colour")))
    path = vocab.write(tmp_path / "v.tsv", ["hello"])
    assert path.read_text().startswith("# hello\nconcept\tsynonyms\tcategory\tcount\n")
    assert vb.read_vocabulary(path) == vocab
    assert vocab.digest() == vb.read_vocabulary(path).digest()
    with pytest.raises(ValueError, match="appears twice"):
        Vocabulary((E("dog"), E("dog")))


# ---------------------------------------------------------------- the tool


def test_merges_same_names_synonyms_and_close_spellings_earlier_entries_win():
    entries = [
        E("airplane", "aeroplane|airliner", "vehicle"),
        E("Dogs", "puppy", "animal"),
        E("coffee maker", "", "kitchenware"),
        E("dog", "doggy", "pet"),  # same name after normalisation -> folded into "dog"
        E("airliner", "jetliner", "object"),  # a later entry named like an earlier synonym
        E("coffeemaker", "", "object"),  # one edit, not a dictionary word: a spelling variant
        E("surgeon", "", "person"),
        E("sturgeon", "", "animal"),  # ratio 0.93, but two dictionary words: kept apart
    ]
    vocab, report = build_vocabulary(entries)
    by = {e.concept: e for e in vocab}
    assert list(by) == ["airplane", "dog", "coffee maker", "surgeon", "sturgeon"]
    assert by["dog"].category == "animal" and set(by["dog"].synonyms) == {"puppy", "doggy"}
    assert set(by["airplane"].synonyms) == {"aeroplane", "airliner", "jetliner"}
    reasons = {(m["kept"], m["merged"]): m["reason"] for m in report.merged}
    assert reasons == {("dog", "dog"): "same name", ("airplane", "airliner"): "name is a synonym",
                       ("coffee maker", "coffeemaker"): "string ratio"}
    assert [(k["a"], k["b"]) for k in report.kept_apart] == [("surgeon", "sturgeon")]
    assert ("Dogs", "dog") in report.renamed
    assert (report.entries_in, report.entries_out) == (8, 5)
    assert report.forms_out == sum(len(e.forms) for e in vocab)


def test_an_earlier_entry_keeps_its_name_a_later_one_loses_the_shared_synonym():
    vocab, report = build_vocabulary([E("drink", "beverage", "drink"), E("drinking", "drink|drinks|sipping", "action")])
    by = {e.concept: e for e in vocab}
    assert set(by) == {"drink", "drinking"}  # not merged: the action does not fold into the noun
    assert by["drinking"].synonyms == ("sipping",)
    assert {a["form"] for a in report.ambiguous_synonyms} == {"drink", "drinks"}


def test_fuzzy_never_merges_an_action_with_a_thing():
    vocab, report = build_vocabulary([E("climbing rope", "", "sports equipment"), E("climbing a rope", "", "activity")])
    assert len(vocab) == 2 and report.kept_apart[0]["why"] == "an action and a thing"


def test_unsafe_terms_drop_entries_and_synonyms():
    entries = [E("naked mole rat", "", "animal"), E("cat", "kitty|nude cat", "animal"), E("dog")]
    vocab, report = build_vocabulary(entries, ["nude", "naked"])
    assert [e.concept for e in vocab] == ["cat", "dog"]
    assert vocab.entries[0].synonyms == ("kitty",)
    assert sorted((d["term"], d["unsafe"]) for d in report.dropped_unsafe) == [("naked mole rat", "naked"), ("nude cat", "nude")]


def test_shipped_unsafe_list_is_short_and_read_as_terms():
    terms = vb.read_terms(vb.DEFAULT_UNSAFE_TERMS)
    assert 10 <= len(terms) <= 100 and "porn" in terms and all(not t.startswith("#") for t in terms)


def test_min_count_uses_counts_summed_over_merged_entries():
    entries = [E("dog", "", "animal", 3), E("dogs", "", "animal", 4), E("cat", "", "animal", 5), E("axolotl", "", "animal")]
    vocab, report = build_vocabulary(entries, min_count=6, counts={"Cats": 2})
    by = {e.concept: e.count for e in vocab}
    assert by == {"dog": 7, "cat": 7, "axolotl": None}  # no count at all: kept
    vocab, report = build_vocabulary(entries, min_count=8)
    assert [e.concept for e in vocab] == ["axolotl"]
    assert sorted((d["concept"], d["count"]) for d in report.dropped_rare) == [("cat", 5), ("dog", 7)]


def test_embedding_merge_with_the_offline_minilm():
    entries = [E("hard drive", "", "electronics"), E("banana", "", "food"), E("hard disk drive", "", "object"),
               E("snorkel", "", "sports equipment"), E("snorkeling", "", "action")]
    vocab, report = build_vocabulary(entries, fuzzy_threshold=None, embed_merge=True)
    assert [e.concept for e in vocab] == ["hard drive", "banana", "snorkel", "snorkeling"]
    merged = [m for m in report.merged if m["reason"] == "embedding cosine"]
    assert [(m["kept"], m["merged"]) for m in merged] == [("hard drive", "hard disk drive")]
    assert merged[0]["score"] > 0.95
    assert {(k["a"], k["b"]) for k in report.kept_apart} == {("snorkel", "snorkeling")}


def test_building_is_idempotent_on_its_own_output():
    entries, _ = vb.package_class_names(["coco"])
    once, _ = build_vocabulary(entries)
    twice, report = build_vocabulary(list(once.entries))
    assert twice == once and not report.merged


def test_package_class_names_read_installed_metadata():
    entries, notes = vb.package_class_names()
    assert set(notes) == {"coco", "imagenet", "kinetics400"}
    assert sum(e.category == "activity" for e in entries) == 400
    by = {e.concept: e for e in entries}
    # "or" alternatives become synonyms; Kinetics qualifiers in parentheses are dropped
    assert by["catching baseball"].synonyms == ("throwing baseball",)
    assert "passing american football" in by
    assert "teddy bear" in by and by["giant panda"].category == "animal"


def test_from_terms_makes_a_tag_vocabulary():
    vocab = Vocabulary.from_terms(["Math", "math", "Coding Questions", "coding question"], category="tag")
    assert vocab.names == ["math", "coding question"]


# ---------------------------------------------------------------- the shipped vocabulary


def test_shipped_vocabulary_is_large_clean_and_has_the_expected_forms():
    vocab = vb.load_vocabulary()
    assert len(vocab) >= 3000
    by = {e.concept: e for e in vocab}
    for name, forms in {"mouse": {"mice"}, "person": {"people", "persons"}, "television": {"tv"},
                        "cellphone": {"cell phone", "mobile phone"}}.items():
        assert forms <= set(by[name].synonyms), name
    for multi in ("teddy bear", "fire hydrant", "traffic light", "ice cream", "red panda"):
        assert multi in by
    categories = {e.category for e in vocab}
    assert {"animal", "food", "vehicle", "clothing", "furniture", "tool", "body part", "scene", "material",
            "colour", "shape", "size", "attribute", "action", "activity", "plant"} <= categories
    unsafe = [vb.lemma_key(t) for t in vb.read_terms(vb.DEFAULT_UNSAFE_TERMS)]
    assert not [f for e in vocab for f in e.forms if vb.lemma_key(f) in unsafe]
    assert all(vb.normalise_term(e.concept, e.category) == e.concept for e in vocab)
    # every surface form belongs to one entry only, so matching is unambiguous
    keys = [vb.dedup_key(f) for e in vocab for f in e.forms]
    owners: dict = {}
    for e in vocab:
        for f in e.forms:
            owners.setdefault(vb.dedup_key(f), set()).add(e.concept)
    assert not {k: v for k, v in owners.items() if len(v) > 1}
    assert len(keys) >= len(vocab)


# ---------------------------------------------------------------- CLI


def test_cli_vocab_writes_the_vocabulary_and_a_report(tmp_path, capsys):
    src = tmp_path / "in.tsv"
    src.write_text("concept\tsynonyms\tcategory\tcount\nDogs\tpuppy\tanimal\t5\ndog\t\tanimal\t1\n"
                   "porn star\t\tperson\t9\ncoffeemaker\t\tobject\t2\ncoffee maker\t\tkitchen\t2\nrare thing\t\tobject\t1\n")
    plain = tmp_path / "more.txt"
    plain.write_text("Red Pandas\n")
    out, report = tmp_path / "out.tsv", tmp_path / "report.json"
    rc = cli_main(["vocab", "concepts", "--input", str(src), "--input", str(plain), "--min-count", "2",
                   "--out", str(out), "--report", str(report)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "entries: 7 in -> 3 out" in printed and "1 unsafe, 1 below the minimum count" in printed
    vocab = vb.read_vocabulary(out)
    assert [(e.concept, e.count) for e in vocab] == [("dog", 6), ("coffeemaker", 4), ("red panda", None)]
    data = json.loads(report.read_text())
    assert data["dropped_unsafe"][0]["unsafe"] == "porn" and data["dropped_rare"] == [{"concept": "rare thing", "count": 1}]
    assert out.read_text().startswith("# built by: thresher vocab concepts --input in.tsv --input more.txt")
    # the old spelling still works, says it is deprecated, and writes the same vocabulary
    old = tmp_path / "old.tsv"
    assert cli_main(["concepts", "vocab", "--input", str(src), "--input", str(plain), "--min-count", "2",
                     "--out", str(old)]) == 0
    assert "deprecated; use `thresher vocab concepts`" in capsys.readouterr().err
    assert [(e.concept, e.count) for e in vb.read_vocabulary(old)] == [(e.concept, e.count) for e in vocab]


def test_cli_vocab_needs_an_input(tmp_path, capsys):
    assert cli_main(["vocab", "concepts", "--out", str(tmp_path / "x.tsv")]) == 2
    assert "--input" in capsys.readouterr().err
