"""Header blocks of the layer tars strata writes, byte for byte what ``tarfile`` makes.

A header is ``TarInfo.tobuf(PAX_FORMAT)`` of docker's ``DockerTarInfo``: a plain
ustar block when the entry fits, else a PAX extended header first for what the
block cannot hold (non-ASCII or long strings, big numbers) and for xattrs.  The
one difference from ``tarfile`` is that the mode keeps its file type bits, as
Go's ``archive/tar`` does.

Building the blocks is the export's per-entry cost, so the checksum (the sum of
the block's 512 bytes, a Python int per byte) is added up from the short fields
instead: every field is NUL-padded, and the part after the name and numbers
repeats across a layer's entries, so its bytes and their sum are cached.
"""

from __future__ import annotations

import struct
import tarfile
from dataclasses import dataclass, field

from plugin.archive.tar import header as th

BLOCKSIZE = tarfile.BLOCKSIZE
_MAX_ID, _MAX_NUM = 8 ** 7, 8 ** 11
# name, then mode uid gid size mtime (8 8 8 12 12, octal + NUL), then chksum.
_HEAD = struct.Struct("100s48s8s")
# typeflag linkname magic uname gname devmajor devminor; prefix (always empty) and padding.
_TAIL = struct.Struct("c100s8s32s32s8s8s167x")
_MAGIC_SUM = sum(tarfile.POSIX_MAGIC)
# The checksum is computed with its own field as eight spaces.
_BLANK_SUM = 8 * ord(" ")
_TAIL_CACHE_MAX = 4096
_tails: dict[tuple[bytes, str, str], tuple[bytes, int]] = {}
_PAX_STRINGS = (("name", "path", 100), ("linkname", "linkpath", 100), ("uname", "uname", 32),
                ("gname", "gname", 32))


@dataclass(slots=True)
class Header:
    name: str
    type: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def _field(text: str, length: int) -> bytes:
    """tarfile's ``stn``: ASCII with ``?`` for the rest, cut to the field."""
    return text.encode("ascii", "replace")[:length]


def _tail(typeflag: bytes, linkname: str, uname: str, gname: str, devmajor: int,
          devminor: int) -> tuple[bytes, int]:
    """The block from the type flag on, and the sum of its bytes."""
    link_b, uname_b, gname_b = _field(linkname, 100), _field(uname, 32), _field(gname, 32)
    if typeflag == tarfile.CHRTYPE or typeflag == tarfile.BLKTYPE:
        major_b, minor_b = b"%07o" % devmajor, b"%07o" % devminor
    else:
        major_b = minor_b = b""
    tail = _TAIL.pack(typeflag, link_b, tarfile.POSIX_MAGIC, uname_b, gname_b, major_b, minor_b)
    total = (typeflag[0] + sum(link_b) + _MAGIC_SUM + sum(uname_b) + sum(gname_b)
             + sum(major_b) + sum(minor_b))
    return tail, total


def ustar_block(h: Header, name: str, linkname: str, uname: str, gname: str,
                size: int, mode: int) -> bytes:
    """tarfile's ``_create_header(info, USTAR_FORMAT, "ascii", "replace")``.  The numbers
    must fit their fields (``encode_header`` moves the others to PAX records)."""
    name_b = name.encode("ascii", "replace")[:100]
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, h.uid, h.gid, size, h.mtime)
    assert len(numbers) == 48, "a number overflows its ustar field"
    typeflag = h.type
    if linkname or typeflag == tarfile.CHRTYPE or typeflag == tarfile.BLKTYPE:
        tail, tail_sum = _tail(typeflag, linkname, uname, gname, h.devmajor, h.devminor)
    else:
        tail, tail_sum = _plain_tail(typeflag, uname, gname)
    checksum = sum(name_b) + sum(numbers) + _BLANK_SUM + tail_sum
    return _HEAD.pack(name_b, numbers, b"%06o\0 " % checksum) + tail


def _plain_tail(typeflag: bytes, uname: str, gname: str) -> tuple[bytes, int]:
    """The cached tail of a block with no link name or device numbers."""
    key = (typeflag, uname, gname)
    hit = _tails.get(key)
    if hit is None:
        if len(_tails) >= _TAIL_CACHE_MAX:
            _tails.clear()
        hit = _tails[key] = _tail(typeflag, "", uname, gname, 0, 0)
    return hit


def plain_block(name: str, typeflag: bytes, mode: int, uid: int, gid: int, size: int,
                mtime: int, uname: str, gname: str) -> bytes | None:
    """``encode_header`` of an entry with no link, device or PAX record, when the ustar
    block holds it as it is (else None): the per-entry fast path of the writer."""
    if not (len(name) <= 100 and name.isascii() and 0 <= uid < _MAX_ID and 0 <= gid < _MAX_ID
            and 0 <= size < _MAX_NUM and 0 <= mtime < _MAX_NUM and len(uname) <= 32
            and uname.isascii() and len(gname) <= 32 and gname.isascii()):
        return None
    tail, tail_sum = _plain_tail(typeflag, uname, gname)
    name_b = name.encode("ascii")
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode if mode > 0o7777 else mode & 0o7777,
                                                        uid, gid, size, mtime)
    checksum = sum(name_b) + sum(numbers) + _BLANK_SUM + tail_sum
    return _HEAD.pack(name_b, numbers, b"%06o\0 " % checksum) + tail


def _plain(h: Header) -> bool:
    """True when the ustar block holds the entry as it is: no PAX header needed."""
    return (not h.pax and h.name.isascii() and len(h.name) <= 100 and h.linkname.isascii()
            and len(h.linkname) <= 100 and h.uname.isascii() and len(h.uname) <= 32
            and h.gname.isascii() and len(h.gname) <= 32 and 0 <= h.uid < _MAX_ID
            and 0 <= h.gid < _MAX_ID and 0 <= h.size < _MAX_NUM and 0 <= h.mtime < _MAX_NUM)


def encode_header(h: Header) -> bytes:
    """``TarInfo.tobuf(PAX_FORMAT)`` of a DockerTarInfo: a PAX header only for what the
    ustar block cannot hold (non-ASCII or long strings, big numbers) and for xattrs."""
    mode = h.mode if h.mode > 0o7777 else h.mode & 0o7777
    if _plain(h):
        return ustar_block(h, h.name, h.linkname, h.uname, h.gname, h.size, mode)
    pax = dict(h.pax)
    values = {"name": h.name, "linkname": h.linkname, "uname": h.uname, "gname": h.gname}
    for attr, keyword, length in _PAX_STRINGS:
        if keyword in pax:
            continue
        text = values[attr]
        if not text.isascii() or len(text) > length:
            pax[keyword] = text
    numbers = {"uid": h.uid, "gid": h.gid, "size": h.size, "mtime": h.mtime}
    for key, digits in (("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12)):
        if not 0 <= numbers[key] < 8 ** (digits - 1):
            if key not in pax:
                pax[key] = str(numbers[key])
            numbers[key] = 0
    fixed = Header(h.name, h.type, h.mode, numbers["uid"], numbers["gid"], numbers["size"],
                   numbers["mtime"], h.linkname, h.uname, h.gname, h.devmajor, h.devminor)
    block = ustar_block(fixed, h.name, h.linkname, h.uname, h.gname, fixed.size, mode)
    return _pax_header(pax) + block if pax else block


def _pax_header(pax: dict[str, str]) -> bytes:
    """tarfile's ``_create_pax_generic_header`` (XHDTYPE, surrogateescape for binary)."""
    binary = False
    for value in pax.values():
        try:
            value.encode("utf-8", "strict")
        except UnicodeEncodeError:
            binary = True
            break
    records = [b"21 hdrcharset=BINARY\n"] if binary else []
    for keyword, value in pax.items():
        key = keyword.encode("utf-8")
        raw = value.encode(th.ENCODING, th.ERRORS) if binary else value.encode("utf-8")
        length = len(key) + len(raw) + 3
        n = p = 0
        while True:
            n = length + len(str(p))
            if n == p:
                break
            p = n
        records.append(str(p).encode("ascii") + b" " + key + b"=" + raw + b"\n")
    payload = b"".join(records)
    head = Header("././@PaxHeader", tarfile.XHDTYPE, size=len(payload))
    return (ustar_block(head, head.name, "", "", "", len(payload), 0) + payload
            + b"\0" * (-len(payload) % BLOCKSIZE))
