"""Tar header details shared by the reader (apply) and the writer (export).

Python's ``tarfile`` parses and writes the header blocks; this module bends it
to the layer format docker uses (protocol.md §6.2-§6.3):

* ``DockerTarInfo`` writes the S_IF* type bits into the mode field (``040755``,
  ``0100644``) the way Go's ``archive/tar`` does; ``tarfile`` masks them off.
* ``LayerTarFile`` remembers *why* a header could not be read.  ``tarfile``
  silently treats a garbage or half header after the first one as the end of
  the archive; Go's reader reports ``ErrHeader``/``ErrUnexpectedEOF`` there, and
  so must we, or a truncated layer is accepted as a shorter valid one.
* xattr values travel in PAX records as ``str``; ``tarfile`` decodes bytes that
  are not UTF-8 with ``surrogateescape``, so the helpers here map them back to
  the exact bytes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Mapping
from typing import IO, cast

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

_CHKSUM_START, _CHKSUM_END = 148, 156
_MODE_START, _MODE_END = 100, 108

_HeaderFn = Callable[[dict[str, object], int, str, str], bytes]
_base_create_header = cast(_HeaderFn, vars(tarfile.TarInfo)["_create_header"])


class DockerTarInfo(tarfile.TarInfo):
    """A TarInfo whose header mode field keeps the file type bits."""

    def get_info(self) -> Mapping[str, str | int | bytes | Mapping[str, str]]:
        # tarfile masks the mode to 0o7777 here and again in _create_header.
        info = dict(super().get_info())
        info["mode"] = self.mode
        return info

    @staticmethod
    def _create_header(info: dict[str, object], fmt: int, encoding: str, errors: str) -> bytes:
        block = _base_create_header(info, fmt, encoding, errors)
        mode = info.get("mode", 0)
        if not isinstance(mode, int) or mode <= 0o7777:
            return block
        # Same field layout tarfile.itn() writes for small values: 7 octal digits + NUL.
        head = bytearray(block[-tarfile.BLOCKSIZE:])
        head[_MODE_START:_MODE_END] = b"%07o\0" % mode
        head[_CHKSUM_START:_CHKSUM_END] = b" " * 8
        chksum = sum(head)
        head[_CHKSUM_START:_CHKSUM_END] = b"%06o\0 " % chksum
        return block[: -tarfile.BLOCKSIZE] + bytes(head)


class LayerTarFile(tarfile.TarFile):
    """A stream-mode TarFile that records the header error that ended it."""

    header_error: Exception | None = None
    members: list[tarfile.TarInfo]


class StrictTarInfo(tarfile.TarInfo):
    """Reports unreadable headers to the owning LayerTarFile."""

    @classmethod
    def fromtarfile(cls, tarfile_obj: tarfile.TarFile) -> StrictTarInfo:
        try:
            return super().fromtarfile(tarfile_obj)
        except tarfile.HeaderError as exc:
            # EOFHeaderError (a zero block) and EmptyHeaderError (no bytes at a block
            # boundary) are legitimate ends, as in Go's reader; anything else is not.
            if (type(exc).__name__ in ("TruncatedHeaderError", "InvalidHeaderError")
                    and isinstance(tarfile_obj, LayerTarFile)
                    and tarfile_obj.header_error is None):
                tarfile_obj.header_error = exc
            raise


def open_reader(fileobj: IO[bytes]) -> LayerTarFile:
    return LayerTarFile.open(
        fileobj=fileobj, mode="r|", tarinfo=StrictTarInfo, encoding=ENCODING, errors=ERRORS
    )


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


def entry_mtime_ns(info: tarfile.TarInfo) -> int:
    record = info.pax_headers.get("mtime")
    if record is not None:
        parsed = parse_pax_time_ns(record)
        if parsed is not None:
            return parsed
    return int(info.mtime) * NS


def entry_atime_ns(info: tarfile.TarInfo, mtime_ns: int) -> int:
    """Docker never lets atime precede mtime (createTarFile)."""
    record = info.pax_headers.get("atime")
    atime = parse_pax_time_ns(record) if record is not None else None
    return mtime_ns if atime is None or atime < mtime_ns else atime
