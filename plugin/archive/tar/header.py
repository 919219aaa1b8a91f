"""Layer-format names and helpers shared by the reader (apply) and the writer (export).

The header blocks themselves are parsed by ``reader.py`` and built by
``writer.py`` (docs/protocol.md §6.2-§6.3).  xattr values travel in PAX records as
``str``, decoded with ``surrogateescape`` where they are not UTF-8 (as
``tarfile`` does), so the helpers here map them back to the exact bytes.
"""

from __future__ import annotations

from typing import Protocol

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
WHITEOUT_LINK_DIR = ".wh..wh.plnk"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
SCHILY_XATTR = "SCHILY.xattr."
LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."

ENCODING = "utf-8"
ERRORS = "surrogateescape"
NS = 1_000_000_000


class PaxTimes(Protocol):
    """What the time helpers read from an entry (``tarread.Entry``)."""

    mtime: int
    pax_headers: dict[str, str]


def pax_value_bytes(value: str) -> bytes:
    return value.encode(ENCODING, ERRORS)


def pax_value_str(value: bytes) -> str:
    return value.decode(ENCODING, ERRORS)


def parse_pax_time_ns(text: str) -> int | None:
    """Exact nanoseconds of a PAX time record such as ``1700000000.123456789``."""
    text = text.strip()
    negative = text.startswith("-")
    if negative:
        text = text[1:]
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return None
    ns = int(whole) * NS + int((frac[:9] or "0").ljust(9, "0"))
    return -ns if negative else ns


def entry_mtime_ns(info: PaxTimes) -> int:
    record = info.pax_headers.get("mtime")
    if record is not None:
        parsed = parse_pax_time_ns(record)
        if parsed is not None:
            return parsed
    return int(info.mtime) * NS


def entry_atime_ns(info: PaxTimes, mtime_ns: int) -> int:
    """Docker never lets atime precede mtime (createTarFile)."""
    record = info.pax_headers.get("atime")
    atime = parse_pax_time_ns(record) if record is not None else None
    return mtime_ns if atime is None or atime < mtime_ns else atime
