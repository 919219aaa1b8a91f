"""File names that are not text: what the fidelity tests create in layers (bytes,
as the disk holds them) and expect back from Changes, Diff and ``docker diff``."""

from __future__ import annotations

import unicodedata

#: Not UTF-8, NFC beside NFD (never normalised), emoji, and control characters.
HOSTILE_NAMES = [
    b"latin1-\xe9\xff",
    b"caf\xe9",
    b"cut-\xe2\x82-short",
    b"overlong-\xc0\xaf",
    b"surrogate-\xed\xa0\x80",
    b"replacement-\xef\xbf\xbd",
    "nfc-é".encode(),
    unicodedata.normalize("NFD", "nfc-é").encode(),
    "emoji-😀".encode(),
    "zwj-👩\u200d💻".encode(),
    b"newline-\n-x",
    b"tab-\t-x",
    b"ctrl-\x01-x",
    b"del-\x7f-x",
    b"esc-\x1b[31m-x",
]
