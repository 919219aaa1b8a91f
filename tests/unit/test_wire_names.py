"""File names that are not text, at the wire and in the log.

A name is bytes; strata holds it as a ``surrogateescape`` str.  On the wire it
must read as dockerd reads an in-tree driver's name (Go's ``encoding/json``,
``tests/gostring.py``); in a log line or an Err it must stay one printable line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import unicodedata

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin.printable import PrintableFormatter, printable, printable_lines
from plugin.server import protocol as wire
from tests.gostring import go_json_string

# (bytes on disk, what dockerd must end up holding)
NAMES = [
    (b"\xe9\xff", "\ufffd\ufffd"),  # Latin-1
    (b"caf\xe9", "caf\ufffd"),
    (b"\xe2\x82A", "\ufffd\ufffdA"),  # a 3-byte sequence cut short: one per byte
    (b"\xc0\xaf", "\ufffd\ufffd"),  # overlong "/"
    (b"\xed\xa0\x80", "\ufffd" * 3),  # UTF-16 surrogate, encoded
    (b"\xf4\x90\x80\x80", "\ufffd" * 4),  # past U+10FFFF
    (b"\xef\xbf\xbd", "\ufffd"),  # a real U+FFFD stays one
    ("é".encode(), "é"),  # NFC
    (unicodedata.normalize("NFD", "é").encode(), "e\u0301"),  # NFD: not normalised
    ("😀".encode(), "😀"),
    ("👩\u200d💻".encode(), "👩\u200d💻"),
    (b"a\nb\tc\x01d\x7fe\x1bf", "a\nb\tc\x01d\x7fe\x1bf"),
]


@pytest.mark.parametrize(("raw", "expected"), NAMES)
def test_go_string_of_a_name(raw: bytes, expected: str) -> None:
    assert go_json_string(raw) == expected  # the reference port agrees with Go's rule
    assert wire.go_string(os.fsdecode(raw)) == expected


@given(st.binary(max_size=64))
def test_go_string_matches_go_for_any_bytes(raw: bytes) -> None:
    assert wire.go_string(os.fsdecode(raw)) == go_json_string(raw)


@given(st.lists(st.binary(max_size=8), max_size=6))
def test_go_string_of_a_str_joined_from_pieces(pieces: list[bytes]) -> None:
    # Escaped bytes of two pieces may together be valid UTF-8: Go sees one rune.
    text = "".join(os.fsdecode(piece) for piece in pieces)
    assert wire.go_string(text) == go_json_string(b"".join(pieces))


def test_go_string_of_a_surrogate_no_byte_makes() -> None:
    assert wire.go_string("a\ud800b\udfff") == go_json_string(b"a\xed\xa0\x80b\xed\xbf\xbf")


def test_changes_reply_with_names_that_are_not_utf8() -> None:
    reply = wire.ChangesResponse(Changes=[
        wire.ChangeWire(Path="/" + os.fsdecode(raw), Kind=1) for raw, _ in NAMES])
    decoded = json.loads(wire.encode_reply(reply))
    assert [c["Path"] for c in decoded["Changes"]] == ["/" + expected for _, expected in NAMES]
    assert all(c["Kind"] == 1 for c in decoded["Changes"])


def test_metadata_and_status_replies_with_such_names() -> None:
    home = "/var/lib/" + os.fsdecode(b"d\xe9\xff")
    metadata = wire.MetadataResponse(Metadata={"UpperDir": home + "/diff",
                                               os.fsdecode(b"k\x80"): "v"})
    assert json.loads(wire.encode_reply(metadata)) == {"Metadata": {
        "UpperDir": "/var/lib/d\ufffd\ufffd/diff", "k\ufffd": "v"}}
    status = wire.StatusResponse(Status=[("Home", home), ("Backend", "vfs")])
    assert json.loads(wire.encode_reply(status)) == {
        "Status": [["Home", "/var/lib/d\ufffd\ufffd"], ["Backend", "vfs"]]}


def test_a_reply_without_surrogates_is_msgspecs_own_encoding() -> None:
    reply = wire.ChangesResponse(Changes=[
        wire.ChangeWire(Path="/a\n\x01\x7f\x1b😀e\u0301", Kind=0)])
    assert wire.encode_reply(reply) == msgspec.json.encode(reply)
    assert json.loads(wire.encode_reply(reply))["Changes"][0]["Path"] == "/a\n\x01\x7f\x1b😀e\u0301"


# ---- printable: logs and Err texts --------------------------------------------


@pytest.mark.parametrize(("text", "shown"), [
    ("/l/" + os.fsdecode(b"\xe9\xff"), "/l/\\xe9\\xff"),
    ("a\nb\tc\r\x01\x7f\x1b[2J", "a\\nb\\tc\\r\\x01\\x7f\\x1b[2J"),
    ("\u202eevil", "\\u202eevil"),  # right-to-left override
    ("e\u0301 é 😀", "e\u0301 é 😀"),  # printable: untouched
    ("plain text", "plain text"),
])
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert shown.isprintable()
    shown.encode("utf-8")  # no surrogate left


def test_printable_lines_keeps_line_breaks_only() -> None:
    assert printable_lines("one \x1b\ntwo " + os.fsdecode(b"\xff")) == "one \\x1b\ntwo \\xff"


class _Recording(logging.StreamHandler[io.TextIOWrapper]):
    """A handler that keeps the records it failed to write (instead of a stderr traceback)."""

    def __init__(self, stream: io.TextIOWrapper) -> None:
        super().__init__(stream)
        self.failed: list[logging.LogRecord] = []

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed.append(record)


def _log_to_strict_utf8(*args: object, exc: BaseException | None = None) -> str:
    out = io.BytesIO()
    stream = io.TextIOWrapper(out, encoding="utf-8", errors="strict", newline="\n")
    handler = _Recording(stream)
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("strata.test.printable")
    logger.propagate = False
    logger.addHandler(handler)
    errors = handler.failed
    try:
        if exc is None:
            logger.warning(*args)
        else:
            try:
                raise exc
            except type(exc):
                logger.exception(*args)
    finally:
        logger.removeHandler(handler)
    stream.flush()
    assert not errors, "the record could not be written"
    return out.getvalue().decode("utf-8")


def test_a_log_record_naming_a_hostile_path_is_one_line() -> None:
    path = "/home/" + os.fsdecode(b"\xe9\xff\nWARNING forged line\x1b[31m")
    written = _log_to_strict_utf8("Diff %s: %s", "layer1", path)
    assert written == ("WARNING strata.test.printable: Diff layer1: "
                       "/home/\\xe9\\xff\\nWARNING forged line\\x1b[31m\n")


def test_a_logged_traceback_with_a_hostile_path_is_written() -> None:
    path = "/x/" + os.fsdecode(b"\xff\x1b")
    written = _log_to_strict_utf8("Changes %s failed", path,
                                  exc=RuntimeError(f"cannot read {path}"))
    first, *rest = written.rstrip("\n").split("\n")
    assert first == "ERROR strata.test.printable: Changes /x/\\xff\\x1b failed"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: cannot read /x/\\xff\\x1b"
