"""containerd's filter syntax (``filters/parser.go``), for List.

A request carries filters ``f1, f2, …``; a snapshot is listed if *any* matches
(an empty list matches all).  One filter is selectors joined by commas, *all*
of which must match::

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)?
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "…" (Go escapes); "/…/" or "|…|" also after ~=

A selector without operator tests presence.  ``!=`` is true for an absent
field, as in containerd; a ``~=`` pattern that does not compile matches nothing
(containerd logs and returns false), but never fails the call.  The snapshot
fields are ``name``, ``parent``, ``kind`` (``active``/``view``/``committed``)
and ``labels.<key>`` (the key may be quoted: ``labels."containerd.io/gc.root"``).
A malformed filter is ``InvalidArgument``.  This module knows no gRPC.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plugin.errors import InvalidArgument

#: What a filter asks of an object: a field path -> (value, present).
FieldLookup = Callable[[Sequence[str]], tuple[str, bool]]

_EOF = ""
_QUOTES = '/|"'
_OPERATOR_CHARS = "=!~"
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str = ""  # "" = present
    value: str = ""

    def match(self, lookup: FieldLookup) -> bool:
        value, present = lookup(self.fieldpath)
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        if self.operator == "~=":
            try:
                return re.search(self.value, value) is not None
            except re.error:
                return False
        return present


@dataclass(frozen=True)
class Filter:
    """Any of ``alternatives`` matches; each is a list of selectors that all must."""

    alternatives: tuple[tuple[Selector, ...], ...]

    @property
    def uses_regex(self) -> bool:
        return any(s.operator == "~=" for selectors in self.alternatives for s in selectors)

    def match(self, lookup: FieldLookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(lookup) for s in selectors) for selectors in self.alternatives)


def parse_all(filters: Sequence[str]) -> Filter:
    """containerd ``filters.ParseAll``: each string one alternative; "" matches all."""
    alternatives = []
    for text in filters:
        if text == "":
            return Filter(())
        alternatives.append(_Parser(text).selectors())
    return Filter(tuple(alternatives))


class _Token:
    EOF, QUOTED, VALUE, FIELD, SEPARATOR, OPERATOR, ILLEGAL, OTHER = range(8)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.value_mode = False  # set by an operator: the next bare token is a value

    # ---- scanner (filters/scanner.go) -----------------------------------------
    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else _EOF

    def scan(self) -> tuple[int, int, str]:
        while self.peek().isspace():
            self.pos += 1
        start, ch = self.pos, self.peek()
        if ch == _EOF:
            return start, _Token.EOF, ""
        self.pos += 1
        if ch == "\0":
            return start, _Token.ILLEGAL, "unexpected null"
        if ch in _QUOTES:
            return self._quoted(start, ch)
        if ch in ",.":
            self.value_mode = False
            return start, _Token.SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            while self.peek() != _EOF and self.peek() in _OPERATOR_CHARS:
                self.pos += 1
            self.value_mode = True
            return start, _Token.OPERATOR, self.text[start:self.pos]
        if self.value_mode:
            while self.peek() not in (_EOF, ",") and not self.peek().isspace() \
                    and self.peek().isprintable():
                self.pos += 1
            self.value_mode = False
            return start, _Token.VALUE, self.text[start:self.pos]
        if _is_field_char(ch):
            while _is_field_char(self.peek()):
                self.pos += 1
            return start, _Token.FIELD, self.text[start:self.pos]
        return start, _Token.OTHER, ch

    def _quoted(self, start: int, quote: str) -> tuple[int, int, str]:
        while True:
            ch = self.peek()
            if ch in (_EOF, "\n"):
                return start, _Token.ILLEGAL, "quoted literal not terminated"
            self.pos += 1
            if ch == quote:
                return start, _Token.QUOTED, self.text[start:self.pos]
            if ch == "\\":
                self.pos += 1  # the escape is checked when unquoted

    # ---- parser (filters/parser.go) -------------------------------------------
    def error(self, pos: int, message: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error: [{self.text[:pos]} >|"
                               f"{self.text[pos:pos + 1]}|< {self.text[pos + 1:]}]: {message}")

    def selectors(self) -> tuple[Selector, ...]:
        found = [self.selector()]
        while True:
            pos, token, text = self.scan()
            if token == _Token.EOF:
                return tuple(found)
            if token != _Token.SEPARATOR or text != ",":
                raise self.error(pos, f"unexpected input: {text}")
            found.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        save = self.pos
        while self.peek().isspace():
            self.pos += 1
        if self.peek() in (_EOF, ","):
            return Selector(fieldpath)
        self.pos = save
        pos, token, operator = self.scan()
        if token != _Token.OPERATOR:
            raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')
        if operator not in ("==", "!=", "~="):
            raise self.error(pos, f"unsupported operator {operator!r}")
        pos, token, text = self.scan()
        if token in (_Token.VALUE, _Token.FIELD):
            return Selector(fieldpath, operator, text)
        if token == _Token.QUOTED:
            return Selector(fieldpath, operator, self.unquote(pos, text, operator == "~="))
        raise self.error(pos, text if token == _Token.ILLEGAL else "expected value or quoted")

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while True:
            save = self.pos
            while self.peek().isspace():
                self.pos += 1
            if self.peek() != ".":
                self.pos = save
                return tuple(fields)
            self.scan()
            fields.append(self.field())

    def field(self) -> str:
        pos, token, text = self.scan()
        if token == _Token.FIELD:
            return text
        if token == _Token.QUOTED:
            return self.unquote(pos, text, False)
        raise self.error(pos, text if token == _Token.ILLEGAL else "expected field or quoted")

    def unquote(self, pos: int, text: str, alternative_quotes: bool) -> str:
        if not alternative_quotes and text[0] != '"':
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(text[1:-1], text[0])
        except ValueError as e:
            raise self.error(pos, f"unquoting failed: {e}") from None


def _is_field_char(ch: str) -> bool:
    return ch != _EOF and (ch == "_" or ("a" <= ch.lower() <= "z") or "0" <= ch <= "9")


def _unquote(body: str, quote: str) -> str:
    """Go's string-literal escapes (containerd ``filters/quote.go``)."""
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("invalid syntax")
        code = body[i + 1]
        if code in _SIMPLE_ESCAPES or code == quote:
            out.append(_SIMPLE_ESCAPES.get(code, quote))
            i += 2
            continue
        width, base = {"x": (2, 16), "u": (4, 16), "U": (8, 16)}.get(code, (3, 8))
        start = i + 1 if base == 8 else i + 2
        digits = body[start:start + width]
        if len(digits) != width or code not in "xuU01234567":
            raise ValueError("invalid syntax")
        try:
            out.append(chr(int(digits, base)))
        except ValueError:
            raise ValueError("invalid syntax") from None
        i = start + width
    return "".join(out)
