"""A compiled matcher for the tag vocabulary's regular-expression rules.

:meth:`pipeline.annotate.tags.OfflineTagger.rule_matches` used to run every rule's regex
(several hundred) on every conversation. :class:`CompiledRules` gives exactly the same
``(added, boosted)`` sets, much faster, with a **literal pre-filter**:

- from each rule's parsed regex we derive a set of *required literals*: lower-case strings such
  that any text the regex can match (anywhere in the text, lookarounds included) contains at
  least one of them. Alternations give a union, a sequence the most selective run of
  consecutive fixed pieces, an optional piece nothing; whatever the analysis does not understand
  (back-references, conditionals, negated or large classes, an unknown opcode) gives "no
  requirement", and such a rule simply always runs;
- every required literal of every rule goes into one trie-shaped regex, scanned once over the
  *folded* user text, once over the folded assistant text and once over the few characters
  around their junction (the ``any`` scope is ``user + "\\n" + response``, so a match may cross
  it);
- only the rules whose literals occurred in their scope's text, plus the rules without a
  pre-filter, run their real regex, in vocabulary order, with the old loop's skip logic (a tag
  already added, or already boosted, is not tested again).

The pre-filter only ever skips a regex that cannot match, so the result is the old loop's.

Folding. A rule may be case-insensitive, and then its ASCII letters also match a few non-ASCII
characters (``İ``, ``ı`` -> ``i``, ``ſ`` -> ``s``, the Kelvin sign -> ``k``): the text is
folded with :func:`fold_text` (``str.lower`` after mapping those, so length-preserving, and every
character that can match an ASCII literal in either case mode becomes that literal's lower-case
form). Literals keep only ASCII characters and non-ASCII symbols without case (``★``, ``×``); a
cased non-ASCII character ends a literal.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

try:  # Python 3.11+
    from re import _constants as _sre_c
    from re import _parser as _sre_p
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_p  # type: ignore[no-redef]

SCOPES = ("user", "response", "any")

# Non-ASCII characters that a case-insensitive ASCII letter matches in Python's ``re`` besides its
# own two cases, mapped to that letter. ``str.lower`` handles the Kelvin sign (U+212A -> k)
# already; U+0130 would become two characters, so it is mapped first. Checked against a brute
# force over all code points in tests/test_tag_rules.py.
_PRE_FOLD = {"\u0130": "i", "\u0131": "i", "\u017f": "s"}
_PRE_FOLD_TABLE = str.maketrans(_PRE_FOLD)

_MAX_EXACT = 64  # the most alternatives one fixed piece may expand to
_MAX_CLASS = 16  # the most characters a class may expand to
_MAX_REPEAT_COPIES = 8


def fold_text(text: str) -> str:
    """Length-preserving fold: every character that can match an ASCII character of a rule
    (case-sensitive or not) becomes that character in lower case."""
    if text.isascii():
        return text.lower()
    if "\u0130" in text or "\u0131" in text or "\u017f" in text:
        text = text.translate(_PRE_FOLD_TABLE)
    return text.lower()


@cache
def _caseless_symbol(ch: str) -> bool:
    """A non-ASCII character a text can only match by being itself, and that folding keeps."""
    return (unicodedata.category(ch)[0] in "SP" and ch.lower() == ch and ch.upper() == ch
            and ch.casefold() == ch and ch not in _PRE_FOLD)


def _fold_char(code: int) -> str | None:
    ch = chr(code)
    if ch.isascii():
        return ch.lower()
    return ch if _caseless_symbol(ch) else None


# ---------------------------------------------------------------- regex analysis


@dataclass(frozen=True)
class _Info:
    exact: frozenset[str] | None  # the node matches exactly one of these strings (None: unknown)
    req: frozenset[str] | None  # any match of the node contains one of these (None: no requirement)


_UNKNOWN = _Info(None, None)
_EMPTY = _Info(frozenset({""}), None)


def _req_of(strings: frozenset[str] | None) -> frozenset[str] | None:
    if not strings or "" in strings:
        return None
    return strings


def _score(req: frozenset[str] | None) -> tuple[int, int]:
    if not req:
        return (-1, 0)
    return (min(len(s) for s in req), -len(req))


def _better(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    return b if _score(b) > _score(a) else a


def _exact_info(exact: frozenset[str]) -> _Info:
    return _Info(exact, _req_of(exact))


def _product(a: frozenset[str], b: frozenset[str]) -> frozenset[str] | None:
    if len(a) * len(b) > _MAX_EXACT:
        return None
    return frozenset(x + y for x in a for y in b)


def _analyze_seq(items: Iterable) -> _Info:
    cur: frozenset[str] = frozenset({""})
    best: frozenset[str] | None = None
    all_exact = True
    for op, av in items:
        info = _analyze_item(op, av)
        if info.exact is not None:
            nxt = _product(cur, info.exact)
            if nxt is None:  # too many alternatives: the run so far is one requirement, start afresh
                all_exact = False
                best = _better(best, _req_of(cur))
                cur = info.exact
            else:
                cur = nxt
        else:
            all_exact = False
            best = _better(best, _req_of(cur))
            best = _better(best, info.req)
            cur = frozenset({""})
    if all_exact:
        return _exact_info(cur)
    return _Info(None, _better(best, _req_of(cur)))


def _analyze_class(items: list) -> _Info:
    chars: set[str] = set()
    for op, av in items:
        if op is _sre_c.LITERAL:
            codes: Iterable[int] = (av,)
        elif op is _sre_c.RANGE:
            lo, hi = av
            if hi - lo + 1 > _MAX_CLASS:
                return _UNKNOWN
            codes = range(lo, hi + 1)
        else:  # NEGATE, CATEGORY, anything else
            return _UNKNOWN
        for code in codes:
            ch = _fold_char(code)
            if ch is None:
                return _UNKNOWN
            chars.add(ch)
    if not chars or len(chars) > _MAX_CLASS:
        return _UNKNOWN
    return _exact_info(frozenset(chars))


def _analyze_item(op, av) -> _Info:
    c = _sre_c
    if op is c.LITERAL:
        ch = _fold_char(av)
        return _UNKNOWN if ch is None else _exact_info(frozenset({ch}))
    if op is c.IN:
        return _analyze_class(av)
    if op is c.AT:
        return _EMPTY
    if op is c.SUBPATTERN:
        return _analyze_seq(av[-1])
    if op is getattr(c, "ATOMIC_GROUP", None):
        return _analyze_seq(av)
    if op is c.BRANCH:
        infos = [_analyze_seq(b) for b in av[1]]
        exact: frozenset[str] | None = None
        if all(i.exact is not None for i in infos):
            union = frozenset().union(*(i.exact for i in infos))  # type: ignore[misc]
            exact = union if len(union) <= _MAX_EXACT else None
        req = None
        if all(i.req is not None for i in infos):
            req = frozenset().union(*(i.req for i in infos))  # type: ignore[misc]
        return _Info(exact, req)
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT}
    if hasattr(c, "POSSESSIVE_REPEAT"):
        repeats.add(c.POSSESSIVE_REPEAT)
    if op in repeats:
        lo, hi, body = av
        child = _analyze_seq(body)
        if hi == 0:
            return _EMPTY
        if lo == 0:
            if hi == 1 and child.exact is not None:
                return _Info(child.exact | {""}, None)
            return _UNKNOWN
        if child.exact is not None and lo <= _MAX_REPEAT_COPIES:
            base: frozenset[str] | None = frozenset({""})
            for _ in range(lo):
                base = _product(base, child.exact) if base is not None else None
            if base is not None:
                return _Info(base if hi == lo else None, _req_of(base))
        return _Info(None, child.req)
    if op is c.ASSERT:  # a positive lookaround: its text is in the string, though not consumed
        return _Info(None, _analyze_seq(av[1]).req)
    if op is c.ASSERT_NOT:
        return _EMPTY
    # NOT_LITERAL, ANY, GROUPREF, GROUPREF_EXISTS, CATEGORY, anything unknown
    return _UNKNOWN


def _usable(req: frozenset[str] | None) -> bool:
    """A requirement worth checking: no single letter, digit or blank (nearly every text has one)."""
    if not req:
        return False
    for s in req:
        if len(s) == 1 and (s.isalnum() or s.isspace()):
            return False
        if s.isspace():
            return False
    return True


def required_literals(pattern: re.Pattern) -> frozenset[str] | None:
    """Folded strings one of which any match of ``pattern`` contains; None when the regex is
    not understood well enough (or the requirement would be useless): then it must always run."""
    if not isinstance(pattern.pattern, str):
        return None
    try:
        parsed = _sre_p.parse(pattern.pattern, pattern.flags)
        req = _analyze_seq(parsed).req
    except Exception:  # noqa: BLE001 - anything unexpected: no pre-filter, the regex always runs
        return None
    return req if _usable(req) else None


# ---------------------------------------------------------------- the literal scanner


def _trie_regex(words: Iterable[str]) -> str:
    """A regex matching, at a position, the longest of ``words`` that starts there."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}
    escaped: dict[str, str] = {}

    def esc(ch: str) -> str:
        e = escaped.get(ch)
        if e is None:
            e = escaped[ch] = re.escape(ch)
        return e

    def emit(node: dict) -> str:
        # Branches start with distinct characters, so at most one can proceed; a greedy optional
        # tail makes the match the longest word.
        kids = sorted(k for k in node if k != "")
        if not kids:
            return ""
        alts = []
        for k in kids:
            run, child = [esc(k)], node[k]
            while "" not in child and len(child) == 1:  # a chain: plain characters
                (k2, child), = child.items()
                run.append(esc(k2))
            alts.append("".join(run) + emit(child))
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if "" in node:
            return ("(?:" + body + ")?") if len(alts) == 1 else body + "?"
        return body

    return emit(trie)


class _Compiled:
    """Everything :class:`CompiledRules` derives from its rules (shared between equal rule lists)."""

    def __init__(self, rules: list[tuple[int, str, str, re.Pattern]]):
        self.rules = rules
        self.literals: list[frozenset[str] | None] = [required_literals(p) for _, _, _, p in rules]
        self.always = frozenset(k for k, lit in enumerate(self.literals) if lit is None)
        words = sorted({w for lit in self.literals if lit for w in lit})
        self.max_literal = max((len(w) for w in words), default=0)
        # For each word the scanner can report (the longest literal starting at a position), the
        # rules, by scope, that it or one of its prefixes (also there) triggers.
        by_word: dict[str, list[int]] = {}
        for k, lit in enumerate(self.literals):
            for w in lit or ():
                by_word.setdefault(w, []).append(k)
        self.triggers: dict[str, tuple[frozenset[int], ...]] = {}
        for w in words:
            hit = [k for n in range(1, len(w) + 1) for k in by_word.get(w[:n], ())]
            self.triggers[w] = tuple(frozenset(k for k in hit if rules[k][2] == s) for s in SCOPES)
        self.scanner = re.compile("(?=(" + _trie_regex(words) + "))") if words else None


_COMPILED: dict[tuple, _Compiled] = {}


def _compiled_for(rules: list[tuple[int, str, str, re.Pattern]]) -> _Compiled:
    key = tuple((i, mode, scope, p.pattern, p.flags) for i, mode, scope, p in rules)
    got = _COMPILED.get(key)
    if got is None:
        if len(_COMPILED) >= 8:
            _COMPILED.clear()
        got = _COMPILED[key] = _Compiled(rules)
    return got


class CompiledRules:
    """The vocabulary's rules, compiled (on first use) for :meth:`matches`.

    ``rules``: ``(tag index, rule)`` pairs in vocabulary order; a rule has ``mode`` ("add" or
    "boost"), ``scope`` ("user", "response" or "any") and a compiled ``pattern`` (a
    :class:`pipeline.annotate.tags.TagRule`). Iterating gives the pairs back. Pickles small:
    the compiled state is rebuilt (or found in this process's cache) on first use.
    """

    def __init__(self, rules: Iterable[tuple[int, object]]):
        self.pairs = tuple((int(i), r) for i, r in rules)
        for _, r in self.pairs:
            if r.scope not in SCOPES:  # type: ignore[attr-defined]
                raise ValueError(f"unknown rule scope {r.scope!r}")  # type: ignore[attr-defined]
            if r.mode not in ("add", "boost"):  # type: ignore[attr-defined]
                raise ValueError(f"unknown rule mode {r.mode!r}")  # type: ignore[attr-defined]
        self._compiled: _Compiled | None = None

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self):
        return {"pairs": self.pairs}

    def __setstate__(self, state):
        self.pairs = state["pairs"]
        self._compiled = None

    @property
    def compiled(self) -> _Compiled:
        if self._compiled is None:
            self._compiled = _compiled_for([(i, r.mode, r.scope, r.pattern)  # type: ignore[attr-defined]
                                            for i, r in self.pairs])
        return self._compiled

    @property
    def n_prefiltered(self) -> int:
        """Rules that run only when one of their required literals occurs."""
        return len(self.pairs) - len(self.compiled.always)

    def candidates(self, user: str, response: str) -> list[int]:
        """Positions (in the rule list) of the rules that may match; the others cannot."""
        c = self.compiled
        if c.scanner is None:
            return sorted(c.always)
        fu, fr = fold_text(user), fold_text(response)
        findall = c.scanner.findall
        triggers = c.triggers
        u_words = set(findall(fu)) if fu else set()
        r_words = set(findall(fr)) if fr else set()
        # The any scope is user + "\n" + response: what occurs in either part, and what crosses
        # the junction (so lies within max_literal characters of it).
        m = c.max_literal
        a_words = u_words | r_words
        a_words.update(findall(fu[max(0, len(fu) - m):] + "\n" + fr[:m]))
        run = set(c.always)
        for w in u_words:
            run |= triggers[w][0]
        for w in r_words:
            run |= triggers[w][1]
        for w in a_words:
            run |= triggers[w][2]
        return sorted(run)

    def matches(self, user: str, response: str) -> tuple[set[int], set[int]]:
        """(tag indices added by rules, tag indices boosted), exactly as :func:`reference_matches`."""
        texts = {"user": user, "response": response, "any": user + "\n" + response}
        added: set[int] = set()
        boosted: set[int] = set()
        rules = self.compiled.rules
        for k in self.candidates(user, response):
            i, mode, scope, pattern = rules[k]
            target = added if mode == "add" else boosted
            if i in target:
                continue
            if pattern.search(texts[scope]):
                target.add(i)
        return added, boosted


def reference_matches(rules: Sequence[tuple[int, object]], user: str, response: str) -> tuple[set[int], set[int]]:
    """The plain loop :class:`CompiledRules` must agree with (every regex, in order)."""
    texts = {"user": user, "response": response, "any": user + "\n" + response}
    added: set[int] = set()
    boosted: set[int] = set()
    for i, rule in rules:
        target = added if rule.mode == "add" else boosted  # type: ignore[attr-defined]
        if i in target:
            continue
        if rule.pattern.search(texts[rule.scope]):  # type: ignore[attr-defined]
            target.add(i)
    return added, boosted
