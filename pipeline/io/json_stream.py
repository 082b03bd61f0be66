"""Safe JSON reading: depth-checked parsing of one record, and streaming a JSON array file
element by element so that one broken element is one reject and the rest are still read.

Used by the instruction readers (JSONL lines, JSON array files), the image-text readers (JSON
sidecars, NLVR files) and the parsers.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Iterator

from pipeline.io.rejects import RecordRejected
from pipeline.io.units import UTF8_BOM

# Deepest JSON nesting a record may have. Real records stay far below it; deeper ones would
# exhaust Python's recursion limit somewhere (parsing, json.dumps of the metadata, pickling
# between Beam workers) and are rejected as ``too_deep`` before any of that runs.
MAX_JSON_DEPTH = 100



def decode_json_line(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse one JSONL line; raises RecordRejected (invalid_utf8 / malformed_json / blank_line / too_deep).

    A UTF-8 byte-order mark in front of the line is ignored (editors put one at the start of a
    file, and concatenated files carry it into the middle).
    """
    raw = raw.removeprefix(UTF8_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("invalid_utf8", f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise RecordRejected("blank_line", "the line is empty")
    try:
        return loads_json(text, max_depth)
    except json.JSONDecodeError as exc:
        raise RecordRejected("malformed_json", f"{exc.msg} at column {exc.colno}") from None


# ---------------------------------------------------------------- safe JSON

# A JSON string literal (the unrolled form: no backtracking blow-up on long strings).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings not counted (no parsing)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def check_json_depth(text: str, max_depth: int = MAX_JSON_DEPTH, start: int = 0, end: int | None = None) -> None:
    """Raise RecordRejected("too_deep") when ``text[start:end]`` nests deeper than ``max_depth``.

    Counting brackets is done in C; the exact scan runs only when there are more opening brackets
    than the limit, so ordinary records pay almost nothing.
    """
    end = len(text) if end is None else end
    if text.count("[", start, end) + text.count("{", start, end) <= max_depth:
        return
    depth = json_depth(text[start:end])
    if depth > max_depth:
        raise RecordRejected("too_deep", f"JSON nested {depth} levels deep, over the {max_depth}-level limit")


def loads_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses deep nesting as RecordRejected("too_deep") instead of crashing.

    json.JSONDecodeError still propagates, for the caller to word. A RecursionError (the nesting
    check is an estimate on malformed text) becomes ``too_deep`` too.
    """
    check_json_depth(text, max_depth)
    try:
        return json.loads(text)
    except RecursionError:
        raise RecordRejected("too_deep", f"JSON nested too deep to parse (limit {max_depth} levels)") from None


@dataclass
class JsonElement:
    """One element of a JSON array file: its value, or why it was rejected.

    ``index`` is the element's position in the array (every element counts, broken or not), or -1
    for a problem of the whole file (not an array, not closed, text after the closing bracket).
    """

    index: int
    value: Any = None
    reject: RecordRejected | None = None
    raw: str | None = None  # the start of the element's text, for a reject's excerpt
    size: int = 0  # characters of the element's text


_WS = re.compile(r"[ \t\n\r]*")
_STRUCTURE = re.compile(r'[\[\]{}",]')
_STRING_STOP = re.compile(r'["\\\n]')
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, as errors="surrogateescape" keeps them
_DECODER = json.JSONDecoder()
_READ_CHARS = 1 << 20


def _element_end(buf: str, p: int) -> int | None:
    """Index of the ',' or ']' that ends the element starting at ``p`` (at nesting depth 0, outside
    strings), or None when ``buf`` ends first. Used to step over a broken element: it tracks string,
    escape and bracket state only, so it finds the boundary wherever the element's content is bad
    (see :func:`_resync` for what checks its answer).
    """
    depth, i = 0, p
    while True:
        m = _STRUCTURE.search(buf, i)
        if m is None:
            return None
        c, i = m.group(), m.end()
        if c == '"':
            while True:
                m = _STRING_STOP.search(buf, i)
                if m is None:
                    return None
                if m.group() == "\\":
                    i = m.end() + 1  # skip the escaped character
                    continue
                # the closing quote, or a raw newline: a JSON string cannot hold one, so the string
                # was never closed; ending it there keeps the scan in step on the next line
                i = m.end()
                break
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth:
                depth -= 1
            elif c == "]":
                return m.start()
            # a stray '}' at depth 0 is part of the broken element
        elif depth == 0:  # ','
            return m.start()


class _TextStream:
    """UTF-8 text of a binary stream, read on demand into one buffer; the consumed prefix is dropped.

    Undecodable bytes are kept as lone surrogates (errors="surrogateescape") so that only the
    elements holding them are rejected; a leading byte-order mark is dropped; a read error (a
    truncated gzip) ends the stream and is remembered in ``error``.
    """

    def __init__(self, f):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.eof = False
        self.error: Exception | None = None
        self.invalid = False  # some bytes were not UTF-8
        self.started = False

    def more(self, at_least: int = _READ_CHARS) -> bool:
        """Append at least ``at_least`` characters (or up to the end); False at the end."""
        if self.eof:
            return False
        got = 0
        while got < at_least and not self.eof:
            try:
                raw = self.f.read(max(at_least - got, _READ_CHARS))
            except (OSError, EOFError, zlib.error) as exc:
                self.error, raw = exc, b""
            text = self.decoder.decode(raw, final=not raw)
            if not raw:
                self.eof = True
            if not self.started and text:
                self.started = True
                text = text.removeprefix("\ufeff")
            if _SURROGATE.search(text):
                self.invalid = True
            self.buf += text
            got += len(text)
        return True

    def drop(self, pos: int) -> int:
        """Forget the text before ``pos``; returns the new position of that character (0)."""
        if pos > _READ_CHARS:
            self.buf = self.buf[pos:]
            return 0
        return pos

    def skip_ws(self, pos: int) -> int:
        """Position of the next non-whitespace character at or after ``pos`` (== len(buf) at the end)."""
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or not self.more():
                return pos


def iter_json_elements(f, max_element_chars: int, max_depth: int = MAX_JSON_DEPTH) -> Iterator[JsonElement]:
    """Stream the elements of the JSON array in binary file ``f``, each parsed on its own.

    Every element is decoded with ``JSONDecoder.raw_decode`` where it starts; an element that does
    not decode is stepped over to the next top-level ``,`` or ``]`` (see :func:`_element_end`) and
    reported as a reject with its index, and reading goes on. Only the element being read is held
    in memory besides the read buffer. A file holding one object (not an array) yields it as
    element 0. Never raises for bad content.
    """
    ts = _TextStream(f)
    pos = ts.skip_ws(0)
    if pos >= len(ts.buf):
        yield JsonElement(-1, reject=RecordRejected("empty_file", "the file holds only whitespace"))
        yield from _read_error(ts)
        return
    if ts.buf[pos] != "[":
        yield from _single_document(ts, pos, max_element_chars, max_depth)
        return
    pos, index = pos + 1, 0
    pos = ts.skip_ws(pos)
    if pos < len(ts.buf) and ts.buf[pos] == "]":
        yield from _after_array(ts, pos + 1)
        return
    while True:
        pos = ts.skip_ws(ts.drop(pos))
        if pos >= len(ts.buf):
            # "[" or "[ ..., " and then nothing: the file was cut.
            yield JsonElement(-1, reject=RecordRejected(
                "malformed_json", f"the array is not closed: the file ends after {index} element(s) (truncated?)"))
            break
        if ts.buf[pos] == "]" and index:
            yield from _after_array(ts, pos + 1)  # a trailing comma before "]": tolerated
            return
        el, pos, closed = _next_element(ts, pos, index, max_element_chars, max_depth)
        yield el
        index += 1
        if closed is None:  # the file ended inside or right after this element
            if el.reject is None:
                yield JsonElement(-1, reject=RecordRejected(
                    "malformed_json", f"the array is not closed: the file ends after {index} element(s) (truncated?)"))
            break
        if closed == "]":
            yield from _after_array(ts, pos)
            return
    yield from _read_error(ts)


def _next_element(ts: _TextStream, p: int, index: int, max_chars: int,
                  max_depth: int) -> tuple[JsonElement, int, str | None]:
    """Decode the element starting at ``p``: (element, position after its ',' or ']', which of the
    two ended it, or None when the file ended first)."""
    if ts.buf[p] == ",":
        return (JsonElement(index, reject=RecordRejected("malformed_json", "empty array element (two commas in a row)"),
                            raw=","), p + 1, ",")
    while True:
        error: Exception | None = None
        try:
            value, end = _DECODER.raw_decode(ts.buf, p)
        except json.JSONDecodeError as exc:
            error, end = exc, -1
        except RecursionError as exc:
            error, end = exc, -1
        if error is None:
            if end >= len(ts.buf) and ts.more():
                continue  # a number may go on in the next block
            after = ts.skip_ws(end)
            if after < len(ts.buf) and ts.buf[after] in ",]":
                return _checked(ts, index, value, p, end, max_chars, max_depth), after + 1, ts.buf[after]
            if after >= len(ts.buf):
                # the last element, and then the file ends: the caller reports the array not closed
                return _checked(ts, index, value, p, end, max_chars, max_depth), after, None
            error = ValueError(f"expected ',' or ']' after the element, found {ts.buf[after]!r}")
        # A broken element: find where it ends (reading on if need be), reject it, go on.
        q = _element_end(ts.buf, p)
        if q is None and ts.more(len(ts.buf)):
            continue  # the element may simply go on past the buffer: decode it again, whole
        q = _resync(ts, p, q)
        text = ts.buf[p:q] if q is not None else ts.buf[p:]
        if isinstance(error, RecursionError):
            rej = RecordRejected("too_deep", f"JSON nested too deep to parse (limit {max_depth} levels)")
        elif ts.invalid and _SURROGATE.search(text):
            rej = RecordRejected("invalid_utf8", "the element holds bytes that are not UTF-8")
        elif q is None:
            rej = RecordRejected("malformed_json", f"the file ends inside this element (truncated?): {_json_error(error, p)}")
        else:
            rej = RecordRejected("malformed_json", _json_error(error, p))
        el = JsonElement(index, reject=rej, raw=text[:600], size=len(text))
        if q is None:
            return el, len(ts.buf), None
        return el, q + 1, ts.buf[q]


def _resync(ts: _TextStream, p: int, q: int | None) -> int | None:
    """Where the broken element at ``p`` ends: the ',' or ']' before the next element, or None.

    The bracket/string scan (``q``) is right unless the element's own damage misleads it: an
    unterminated string flips every later quote, and the scan then runs on to the end of the
    file. So its answer is checked (a ',' must be followed by what starts an element like this
    one; a ']' only by whitespace) and, when implausible, the next element is found instead
    from the layout: in a file with one element per line (or pretty-printed), the next line that
    opens at the broken element's indentation, after a ','; in a one-line file, the next ','
    after which an element decodes cleanly.
    """
    if q is not None and _plausible_end(ts, p, q):
        return q
    while True:
        r = _layout_boundary(ts, p)
        if r is not None:
            return r
        if not ts.more(len(ts.buf)):
            return q  # nothing better: what the scan found (None: the element runs to the end)


def _plausible_end(ts: _TextStream, p: int, q: int) -> bool:
    if ts.buf[q] == "]":
        return ts.skip_ws(q + 1) >= len(ts.buf)  # only whitespace may follow the array
    nxt = ts.skip_ws(q + 1)
    if nxt >= len(ts.buf) or ts.buf[nxt] == "]":
        return True
    first = ts.buf[p]
    return ts.buf[nxt] == first if first in "[{" else ts.buf[nxt] in '[{"-0123456789tfn'


def _layout_boundary(ts: _TextStream, p: int) -> int | None:
    buf, first = ts.buf, ts.buf[p]
    nl = buf.rfind("\n", 0, p)
    indent = buf[nl + 1:p]
    if nl >= 0 and not indent.strip():
        # JSON strings cannot hold a raw newline, so ",<newline><same indentation><same opener>"
        # only occurs between values: no need to decode the candidate (two broken elements in a
        # row stay two rejects).
        m = re.compile(r",[ \t\r\n]*\n" + re.escape(indent) + re.escape(first)).search(buf, p + 1)
        return m.start() if m is not None else None
    for m in re.compile(r",[ \t\r\n]*" + re.escape(first)).finditer(buf, p + 1):
        start = m.end() - 1
        try:
            _, end = _DECODER.raw_decode(buf, start)
        except (json.JSONDecodeError, RecursionError):
            continue
        after = _WS.match(buf, end).end()
        if after < len(buf) and (buf[after] == "," or (buf[after] == "]" and not buf[after + 1:].strip())):
            return m.start()
    return None


def _checked(ts: _TextStream, index: int, value: Any, p: int, end: int, max_chars: int, max_depth: int) -> JsonElement:
    """A decoded element, or its reject when it holds undecodable bytes, is too long or too deep."""
    rej = None
    if ts.invalid and _SURROGATE.search(ts.buf, p, end):
        rej = RecordRejected("invalid_utf8", "the element holds bytes that are not UTF-8")
    elif end - p > max_chars:
        rej = RecordRejected("oversized_record", f"element is {end - p} characters, over the {max_chars} limit")
    else:
        try:
            check_json_depth(ts.buf, max_depth, p, end)
        except RecordRejected as exc:
            rej = exc
    if rej is not None:
        return JsonElement(index, reject=rej, raw=ts.buf[p:min(end, p + 600)])
    return JsonElement(index, value, size=end - p)


def _json_error(exc: Exception, start: int = 0) -> str:
    if isinstance(exc, json.JSONDecodeError):
        if start:
            return f"{exc.msg} (at character {exc.pos - start} of the element)"
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)


def _single_document(ts: _TextStream, pos: int, max_chars: int, max_depth: int) -> Iterator[JsonElement]:
    """The whole file is one JSON value (not an array): one object is a one-record file."""
    while ts.more():
        pass
    text = ts.buf[pos:]
    if ts.invalid and _SURROGATE.search(text):
        yield JsonElement(-1, reject=RecordRejected("invalid_utf8", "the file holds bytes that are not UTF-8"), raw=text[:600])
    else:
        try:
            value = loads_json(text, max_depth)
        except json.JSONDecodeError as exc:
            yield JsonElement(-1, reject=RecordRejected("malformed_json", f"the file is not valid JSON: {_json_error(exc)}"),
                              raw=text[:600])
        except RecordRejected as rej:
            yield JsonElement(-1, reject=rej, raw=text[:600])
        else:
            if isinstance(value, dict):
                if len(text) > max_chars:
                    yield JsonElement(0, reject=RecordRejected(
                        "oversized_record", f"record is {len(text)} characters, over the {max_chars} limit"), raw=text[:600])
                else:
                    yield JsonElement(0, value, size=len(text))
            else:
                yield JsonElement(-1, reject=RecordRejected("unknown_layout", f"top-level JSON is a {type(value).__name__}"),
                                  raw=text[:600])
    yield from _read_error(ts)


def _after_array(ts: _TextStream, pos: int) -> Iterator[JsonElement]:
    pos = ts.skip_ws(ts.drop(pos))
    if pos < len(ts.buf):
        yield JsonElement(-1, reject=RecordRejected("malformed_json", "text follows the array's closing ']'"),
                          raw=ts.buf[pos:pos + 600])
    yield from _read_error(ts)


def _read_error(ts: _TextStream) -> Iterator[JsonElement]:
    if ts.error is not None:
        yield JsonElement(-1, reject=RecordRejected(
            "unreadable_file", f"reading stopped: {type(ts.error).__name__}: {ts.error}"))
