"""The compiled tag-rule matcher (pipeline/annotate/tag_rules.py) gives exactly the old loop's sets."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import re

import numpy as np
import pytest

from pipeline.annotate.tag_rules import (
    CompiledRules,
    _caseless_symbol,
    fold_text,
    required_literals,
)
from pipeline.annotate.tags import (
    OfflineTagger,
    TaggerConfig,
    _clip_for_rules,
    assistant_text,
    load_tag_vocabulary,
    parse_tag_vocabulary,
    user_text,
)
from pipeline.io.instruction_formats import normalise
from pipeline.io.rejects import RecordRejected


def old_rule_matches(tagger: OfflineTagger, messages: list[dict]) -> tuple[set[int], set[int]]:
    """The loop OfflineTagger.rule_matches ran before the pre-filter, kept verbatim as the oracle."""
    limit = tagger.config.rule_text_chars
    texts = {"user": _clip_for_rules(user_text(messages), limit),
             "response": _clip_for_rules(assistant_text(messages), limit)}
    texts["any"] = texts["user"] + "\n" + texts["response"]
    rules = [(i, r) for i, e in enumerate(tagger.vocabulary.entries) for r in e.rules]
    added: set[int] = set()
    boosted: set[int] = set()
    for i, rule in rules:
        target = added if rule.mode == "add" else boosted
        if i in target:
            continue
        if rule.pattern.search(texts[rule.scope]):
            target.add(i)
    n_user = sum(1 for m in messages if m.get("role") == "user")
    if tagger._multi_turn is not None and n_user >= 2:
        added.add(tagger._multi_turn)
    if tagger._long_input is not None and len(texts["user"]) >= tagger.config.long_input_chars:
        added.add(tagger._long_input)
    return added, boosted


def _tagger(vocabulary=None) -> OfflineTagger:
    return OfflineTagger(vocabulary, embedder=lambda texts: np.ones((len(texts), 4), dtype=np.float32),
                         config=TaggerConfig(threshold=2.0, min_tags=0))


def _conv(*turns: str) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


@pytest.fixture(scope="module")
def shipped() -> OfflineTagger:
    return _tagger()


def _assert_same(tagger: OfflineTagger, messages: list[dict]) -> tuple[set[int], set[int]]:
    got = tagger.rule_matches(messages)
    assert got == old_rule_matches(tagger, messages), messages
    return got


# ---------------------------------------------------------------- real conversations

_FILES = {  # file -> conversations taken (a seeded random choice among its first records)
    "self_instruct_t0_train.jsonl.gz": 120,
    "gpteacher_codegen.json.gz": 40,
    "gpteacher_roleplay.json.gz": 40,
    "gpteacher_toolformer.json.gz": 40,
    "gsm8k_train.jsonl.gz": 40,
    "sharegpt_dummy_conversations.json.gz": 20,
    "self_instruct_user_oriented_predictions.jsonl.gz": 20,
}


def _read(path, n: int, seed: int = 1, max_records: int = 5000) -> list[list[dict]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        if path.name.endswith(".jsonl.gz"):
            records = []
            for line in f:
                if line.strip():
                    records.append(json.loads(line))
                if len(records) >= max_records:
                    break
        else:
            records = json.load(f)[:max_records]
    random.Random(seed).shuffle(records)
    out = []
    for r in records:
        try:
            out.append(normalise(r).messages)
        except RecordRejected:
            pass
        if len(out) >= n:
            break
    return out


def test_identical_to_the_old_loop_on_real_conversations(shared_data, shipped):
    folder = shared_data / "instructions"
    convs = [m for name, n in _FILES.items() if (folder / name).exists() for m in _read(folder / name, n)]
    if len(convs) < 100:
        pytest.skip(f"too few real conversations under {folder}")
    fired = 0
    for messages in convs:
        added, boosted = _assert_same(shipped, messages)
        fired += bool(added or boosted)
    assert fired > len(convs) // 2  # the comparison is not vacuous


# ---------------------------------------------------------------- crafted cases on the shipped vocabulary


@pytest.mark.parametrize("messages", [
    _conv("WRITE A PYTHON FUNCTION THAT SORTS A LIST.", "```PYTHON\nDEF F(X):\n    RETURN SORTED(X)\n```"),
    _conv("Translate The Following Sentence Into FRENCH: I love cheese."),
    # non-ASCII characters that case-insensitive ASCII letters match: Kelvin sign, long s, dotless
    # i, dotted capital I
    _conv("Write a \u212aotlin function", "fun main() {}"),
    _conv("Is this \u017fpam?"),
    _conv("Look it up on w\u0131k\u0131ped\u0131a"),
    _conv("Tell me about the H\u0130STORY of Rome \u2014 and the Ancient Egyptians."),
    _conv("Rate this 5 \u2605 restaurant review", "\u2605\u2605\u2605"),
    _conv("What is 12 \u00d7 7 and 81 \u00f7 9?"),
    # the any scope crosses the user/assistant junction
    _conv("toolformer: enabled\ntoolformer access: wikipedia\nWho painted the Mona Lisa?",
          "It was wikipedia('Mona Lisa')."),
    _conv("Please reply in json", "{}"),
    _conv("", "Here is json: {}"),
    _conv("", ""),
    _conv("hi"),
    _conv("Hello!", "Hi! How can I help?", "thanks", "You're welcome.", "bye"),
    _conv("M: Where are you going?\nW: To the station.\nWhat does the man ask?"),
    _conv("x" * 20_000 + " summarize this", "y" * 20_000),  # clipped head and tail
])
def test_identical_on_crafted_conversations(shipped, messages):
    _assert_same(shipped, messages)


def test_case_insensitive_rule_matches_odd_casings(shipped):
    vocab = shipped.vocabulary
    kotlin = vocab.index("kotlin programming")
    assert kotlin in _assert_same(shipped, _conv("Write a \u212aOTLIN function"))[0]
    assert kotlin in _assert_same(shipped, _conv("write a KoTlIn function"))[0]


# ---------------------------------------------------------------- crafted vocabularies

_VOCAB = "\n".join([
    "alpha\tfirst\tadd:(?i)\\bfoo\\b\tboost/user:(?i)\\bbar\\b\tadd/response:(?i)baz",
    "beta\tsecond\tany:foo\\nbar\tboost/any:(?i)end\\s+start",
    "gamma\tthird\tadd:(?i)\\bfoo\\b\tadd:qux",  # two add rules for one tag: the second is skipped
    "delta\tfourth\t(a)b\\1\t(a)?(?(1)x|y)zz\t\\Bing\\b\t(?<=pre)fix",  # back-reference, conditional, \\B, lookbehind
    "eps\tfifth\tresponse:(?i)\u2605{3}\tboost/response:(?i)(?:\u00e9t\u00e9|summer)",
    "zeta\tsixth\t(?-i:AI)\\b\tboost:[A-D][).:]\\s",
])


@pytest.fixture(scope="module")
def crafted() -> OfflineTagger:
    return _tagger(parse_tag_vocabulary(_VOCAB))


def _names(tagger, ids):
    return {tagger.vocabulary.entries[i].tag for i in ids}


@pytest.mark.parametrize("turns, added, boosted", [
    (("FOO here",), {"alpha", "gamma"}, set()),
    (("bar", "BAZ"), {"alpha"}, {"alpha"}),
    (("bar and foo",), {"alpha", "gamma"}, {"alpha"}),
    (("qux",), {"gamma"}, set()),
    # any scope: "foo\nbar" exists only across the junction of user and response
    (("this ends with foo", "bar starts the response"), {"alpha", "beta", "gamma"}, set()),
    (("foo", "no"), {"alpha", "gamma"}, set()),
    (("at the END", "START of the answer"), set(), {"beta"}),
    (("the END", "\n\nstart"), set(), {"beta"}),
    (("ab", "x"), set(), set()),
    (("aba is a backref", ""), {"delta"}, set()),
    (("yzz",), {"delta"}, set()),
    (("singing",), {"delta"}, set()),
    (("ing",), set(), set()),
    (("prefix",), {"delta"}, set()),
    (("fix",), set(), set()),
    (("", "\u2605\u2605\u2605 \u00c9T\u00c9"), {"eps"}, {"eps"}),
    (("AI rocks",), {"zeta"}, set()),
    (("ai rocks",), set(), set()),
    (("Pick one:\nB) yes\n",), set(), {"zeta"}),
])
def test_crafted_vocabulary(crafted, turns, added, boosted):
    got_added, got_boosted = _assert_same(crafted, _conv(*turns))
    assert _names(crafted, got_added) == added
    assert _names(crafted, got_boosted) == boosted


def test_unknown_constructs_always_run(crafted):
    delta = list(crafted.vocabulary.entries[3].rules)
    lits = [required_literals(r.pattern) for r in delta]
    assert lits[1] is None or "zz" in lits[1]  # (?(1)x|y)zz: the zz after the conditional is still required
    assert required_literals(re.compile(r"(.)\1")) is None
    assert required_literals(re.compile(r"[^a]bc?")) is None  # one letter is no pre-filter
    assert required_literals(re.compile(r"(?i)\bsummar(y|ies)\b|\btl;?dr\b")) == {"summary", "summaries", "tldr", "tl;dr"}


# ---------------------------------------------------------------- the invariant, fuzzed

_FUZZ = [  # (pattern, texts it matches, to mutate)
    (r"(?i)\b(write|compose) (a |an )?(short )?(story|poem)\b", ["write a short story", "Compose an poem"]),
    (r"(?i)abc(de)?f{2,3}g", ["abcdeffg", "ABCFFFG"]),
    (r"(?i)x[yz]{2}w", ["xyzw", "XZZW"]),
    (r"(?im)^\s*(?-i:[MW]):\s", ["M: hi", "text\n  W: yes"]),
    (r"(?i)(?<!part of )\bspeech\b(?! recognition)", ["a speech here", "SPEECH"]),
    (r"(?i)\A(?=[\s\S]*\d)(?=[\s\S]*\b(how many|how much)\b)", ["How many apples for 3 kids?"]),
    (r"(?s)\bfoo\b.*\bbar\b", ["foo\n and bar"]),
    (r"(?i)k[ae]y|s[ei]t", ["key", "SIT", "kay"]),
    (r"(?i)(?:ab|ac)+d", ["abacd", "ACd"]),
    (r"a*(bc)+x?de", ["abcbcxde", "bcde"]),
    (r"(?i)[\u2605x]{2}", ["\u2605\u2605", "x\u2605"]),
    (r"(?i)(?>ab|cd)e", ["abe", "CDE"]),
    (r"(?i)xab++cd", ["xabbbcd"]),
    (r"(?i)\bsummar(y|ies)\b|\btl;?\s?dr\b", ["a summary", "TL; DR", "tldr"]),
    (r"(?i)\b(in|as) a table\b|\|\s*-{3,}", ["| ---", "As A Table"]),
]
_ODD = {"k": "\u212a", "K": "\u212a", "s": "\u017f", "S": "\u017f", "i": "\u0131", "I": "\u0130"}
_NOISE = ["a", " ", "\n", "the ", "x", "3", "-", "|", ";", "\u2605", "\u00e9"]


def _mutate(text: str, rng: random.Random) -> str:
    out = []
    for ch in text:
        r = rng.random()
        if r < 0.03:
            continue  # drop
        if r < 0.06:
            out.append(rng.choice(_NOISE))
        if ch in _ODD and rng.random() < 0.15:
            ch = _ODD[ch]
        elif rng.random() < 0.3:
            ch = ch.swapcase()
        out.append(ch)
    return "".join(out)


@pytest.mark.parametrize("source, seeds", _FUZZ)
def test_a_match_always_contains_a_required_literal(source, seeds):
    pattern = re.compile(source)
    req = required_literals(pattern)
    assert req is not None, source
    rng = random.Random(source)
    matched = 0
    for _ in range(1500):
        text = "".join(rng.choice(_NOISE) for _ in range(rng.randint(0, 4)))
        text += _mutate(rng.choice(seeds), rng) + "".join(rng.choice(_NOISE) for _ in range(rng.randint(0, 4)))
        if pattern.search(text):
            matched += 1
            assert any(w in fold_text(text) for w in req), (source, text, req)
    assert matched > 30


def test_fuzzed_conversations_on_the_shipped_vocabulary(shipped):
    """Texts stitched from the rules' own literals, in random case, split between user and assistant."""
    words = sorted({w for lit in shipped._rules.compiled.literals if lit for w in lit})
    rng = random.Random(7)
    odd = {"k": "\u212a", "s": "\u017f", "i": "\u0131", "I": "\u0130"}
    for _ in range(150):
        parts = []
        for _ in range(rng.randint(1, 10)):
            w = rng.choice(words)
            w = "".join(ch.upper() if rng.random() < 0.3 else ch for ch in w)
            w = "".join(odd[ch] if ch in odd and rng.random() < 0.1 else ch for ch in w)
            parts.append(w + rng.choice([" ", "", "\n", ". ", "1 "]))
        text = "".join(parts)
        cut = rng.randint(0, len(text))
        _assert_same(shipped, _conv(text[:cut], text[cut:]))


# ---------------------------------------------------------------- folding and plumbing


def test_fold_is_length_preserving_and_maps_every_ascii_case_variant():
    everything = "".join(map(chr, range(0x110000)))
    folded = fold_text(everything)
    assert len(folded) == len(everything)
    # Every character that a case-insensitive ASCII literal or class can match folds to that
    # character in lower case (uncased ASCII characters match only themselves).
    odd = set(re.findall("(?i)[\x00-\x7f]", everything))
    for letter in "abcdefghijklmnopqrstuvwxyz":
        odd.update(re.findall("(?i)" + letter, everything))
    odd = {c for c in odd if not c.isascii()}
    assert odd == {"\u212a", "\u017f", "\u0131", "\u0130"}
    for hit in odd:
        targets = [chr(code) for code in range(128)
                   if re.fullmatch("(?i)" + re.escape(chr(code)), hit) or re.fullmatch("(?i)[" + re.escape(chr(code)) + "]", hit)]
        assert targets and all(fold_text(hit) == t.lower() for t in targets), (hit, targets)
    assert fold_text("A\u212a\u017f\u0131\u0130Z") == "aksiiz"
    assert fold_text("ABC") == "abc"


def test_caseless_symbols_match_only_themselves(shipped):
    import unicodedata

    everything = "".join(map(chr, range(0x110000)))
    symbols = [c for c in everything
               if not c.isascii() and unicodedata.category(c)[0] in "SP" and _caseless_symbol(c)]
    assert "\u2605" in symbols and "\u00d7" in symbols and "A" not in symbols
    # Only a character with some case mapping can match another one case-insensitively: none of
    # them matches any caseless symbol.
    cased = "".join(c for c in everything if c.lower() != c or c.upper() != c or c.casefold() != c or c.title() != c)
    cls = re.compile("(?i)[" + "".join(re.escape(c) for c in symbols) + "]")
    assert cls.findall(cased) == []
    # The non-ASCII characters in the shipped rules' literals, checked against every code point.
    used = {c for lit in shipped._rules.compiled.literals if lit for w in lit for c in w if not c.isascii()}
    assert "\u2605" in used
    for c in used | {"\u2605", "\u00d7", "\u00f7", "\u201c"}:
        assert re.findall("(?i)" + re.escape(c), everything) == [c]
        assert fold_text(c) == c


def test_pickles_and_iterates(shipped):
    rules = shipped._rules
    assert isinstance(rules, CompiledRules)
    assert [r for _, r in rules] == [r for e in shipped.vocabulary.entries for r in e.rules]
    back = pickle.loads(pickle.dumps(rules))
    assert back._compiled is None and len(back) == len(rules)
    messages = _conv("Write a haiku about the sea.", "Waves fold")
    assert back.matches("Write a haiku about the sea.", "Waves fold") == rules.matches(
        "Write a haiku about the sea.", "Waves fold")
    assert shipped.rule_matches(messages) == old_rule_matches(shipped, messages)
    assert rules.n_prefiltered >= len(rules) - 5  # nearly every shipped rule has a pre-filter


def test_shipped_vocabulary_loads_unchanged():
    vocab = load_tag_vocabulary()
    assert sum(len(e.rules) for e in vocab.entries) == len(_tagger()._rules)
