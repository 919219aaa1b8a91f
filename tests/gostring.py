"""What dockerd holds for a Go string of raw bytes after a JSON round trip.

A port of Go's ``encoding/json`` ``encodeState.string`` loop over
``unicode/utf8.DecodeRuneInString`` (its ``first`` and ``acceptRanges``
tables), kept independent of ``plugin.server.protocol.go_string`` so that the
tests compare two derivations: a byte that does not start a valid sequence
becomes U+FFFD and decoding resumes at the next byte; everything else is the
rune it encodes (JSON escapes of control characters decode back to them).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def _sequence(lead: int) -> tuple[int, int, int]:
    """(length, lowest, highest second byte) of a sequence starting with ``lead``; 0 if none."""
    if 0xC2 <= lead <= 0xDF:
        return 2, 0x80, 0xBF
    if lead == 0xE0:
        return 3, 0xA0, 0xBF
    if lead == 0xED:
        return 3, 0x80, 0x9F  # U+D800..U+DFFF are not runes
    if 0xE1 <= lead <= 0xEF:
        return 3, 0x80, 0xBF
    if lead == 0xF0:
        return 4, 0x90, 0xBF
    if 0xF1 <= lead <= 0xF3:
        return 4, 0x80, 0xBF
    if lead == 0xF4:
        return 4, 0x80, 0x8F  # nothing past U+10FFFF
    return 0, 0, 0  # 0x80..0xC1 (continuation or overlong lead), 0xF5..0xFF


def _rune_size(raw: bytes, i: int) -> int:
    """Bytes of the valid rune at ``raw[i]`` (a byte >= 0x80), or 0 (RuneError, size 1)."""
    size, low, high = _sequence(raw[i])
    if size == 0 or i + size > len(raw) or not low <= raw[i + 1] <= high:
        return 0
    if any(not 0x80 <= b <= 0xBF for b in raw[i + 2:i + size]):
        return 0
    return size


def go_json_string(raw: bytes) -> str:
    out: list[str] = []
    i = 0
    while i < len(raw):
        if raw[i] < 0x80:
            out.append(chr(raw[i]))
            i += 1
            continue
        size = _rune_size(raw, i)
        if size == 0:
            out.append(REPLACEMENT)
            i += 1
        else:
            out.append(raw[i:i + size].decode("utf-8"))
            i += size
    return "".join(out)
