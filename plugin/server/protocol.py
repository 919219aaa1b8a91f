"""Wire types of the graphdriver plugin protocol, as dockerd 20.10 speaks it.

Field names are the wire names.  Requests decode leniently like Go's
``encoding/json`` (unknown keys ignored); the quirks that matter are recorded
in docs/protocol.md §1.1 and §10:

* ``Opts``/``UIDMaps``/``GIDMaps`` arrive as ``null`` when unset;
* ``Parent``, ``MountLabel``, ``StorageOpt`` are *omitted* when empty;
* IDMap keys are snake_case (the published docs are wrong);
* ``Capabilities`` is nested, not flat (again the docs are wrong).

Responses omit empty fields so that success is ``{}``; an empty 200 body would
make dockerd fail with ``EOF``, so every JSON reply encodes at least ``{}``.

Replies are encoded by :func:`encode_reply`, which also carries the strings that
are not Unicode: a file name is bytes, held here as a ``surrogateescape`` str
(``os.fsdecode``); see :func:`go_string`.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec


class _Wire(msgspec.Struct, omit_defaults=True):
    pass


# ---- requests -------------------------------------------------------------


class IDMapWire(_Wire):
    container_id: int
    host_id: int
    size: int


class InitRequest(_Wire):
    Home: str
    Opts: list[str] | None = None
    UIDMaps: list[IDMapWire] | None = None
    GIDMaps: list[IDMapWire] | None = None


class CreateRequest(_Wire):
    ID: str
    Parent: str = ""
    MountLabel: str = ""
    StorageOpt: dict[str, str] | None = None


class IDRequest(_Wire):
    ID: str


class GetRequest(_Wire):
    ID: str
    MountLabel: str = ""


class ParentRequest(_Wire):
    """Diff, Changes and DiffSize: ``Parent`` is omitted for a base layer."""

    ID: str
    Parent: str = ""


# ---- responses ------------------------------------------------------------


class ErrResponse(_Wire):
    Err: str = ""


class ActivateResponse(_Wire):
    Implements: list[str]


class GetResponse(_Wire):
    Dir: str


class ExistsResponse(_Wire):
    Exists: bool


class StatusResponse(_Wire):
    Status: list[tuple[str, str]]


class MetadataResponse(_Wire):
    Metadata: dict[str, str]


class CapabilitiesBody(msgspec.Struct):
    ReproducesExactDiffs: bool = False


class CapabilitiesResponse(_Wire):
    Capabilities: CapabilitiesBody


class ChangeWire(msgspec.Struct):
    Path: str
    Kind: int


class ChangesResponse(msgspec.Struct):
    Changes: list[ChangeWire]


class SizeResponse(msgspec.Struct):
    Size: int


# ---- encoding -------------------------------------------------------------

#: Any lone surrogate: what ``surrogateescape`` makes of a byte that is not UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: The surrogates ``surrogateescape`` never makes (it makes U+DC80..U+DCFF).
_NOT_A_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def go_string(text: str) -> str:
    r"""``text`` as dockerd holds it after reading what Go would have sent for its bytes.

    An in-tree driver hands Go strings of raw file-name bytes to ``encoding/json``,
    whose ``encodeState.string`` writes ``\ufffd`` for every byte that does not
    start a valid UTF-8 sequence (``utf8.DecodeRuneInString`` yields ``RuneError``
    of size 1) and resumes at the next byte: ``b"\xe9\xff"`` becomes two U+FFFD,
    the truncated ``b"\xe2\x82"`` two as well.  Python's UTF-8 decoder rejects the
    same sequences (surrogates, overlongs, past U+10FFFF), and ``surrogateescape``
    turns each byte it rejects into one surrogate, so one U+FFFD per surrogate of
    the re-decoded bytes is Go's result.  Nothing else changes: NFC and NFD stay
    distinct, control characters are JSON-escaped by the encoder as Go does.
    """
    # A surrogate that no byte decodes to (built by hand, never read from a
    # disk) stands for its three UTF-8 bytes, which Go rejects one by one.
    text = _NOT_A_BYTE.sub("\ufffd" * 3, text)
    # Through bytes and back, not surrogate by surrogate: escaped bytes that
    # together are valid UTF-8 (a str joined from pieces) are one rune to Go.
    raw = text.encode("utf-8", "surrogateescape")
    return _SURROGATE.sub("\ufffd", raw.decode("utf-8", "surrogateescape"))


def _go_strings(value: Any) -> Any:
    if isinstance(value, str):
        return go_string(value)
    if isinstance(value, dict):
        return {go_string(k): _go_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_go_strings(v) for v in value]
    return value


def encode_reply(body: msgspec.Struct) -> bytes:
    """``body`` as JSON; strings that are not Unicode as Go would send their bytes.

    msgspec refuses to encode a surrogate (``UnicodeEncodeError``): the rare reply
    that holds one (a non-UTF-8 name in Changes, a path in Metadata or Status) is
    encoded again through :func:`go_string`, so the common one costs nothing.
    """
    try:
        return msgspec.json.encode(body)
    except UnicodeEncodeError:
        return msgspec.json.encode(_go_strings(msgspec.to_builtins(body)))
