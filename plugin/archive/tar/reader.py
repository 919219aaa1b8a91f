"""A streaming tar reader for layer tars, built for the apply worker's hot path.

``tarfile`` in stream mode runs a lot of Python per entry and copies every
body through several intermediate buffers; on a layer of small files that left
it far behind GNU tar.  This reader parses the header block itself (ustar, GNU and PAX, as
``tarfile`` does: same name/prefix rules, same base-256 numbers, PAX records,
GNU long names and links, global PAX headers applied to every later entry,
all three GNU sparse encodings) and hands file bodies to the caller as file
descriptor copies: bytes already buffered are written from the buffer, the
rest moves pipe → file with ``splice`` (no copy through user space).

Errors follow ``tarfile``'s stream-mode rules, which mirror Go's reader: an
all-zero block or a clean end at a block boundary ends the archive; a bad
checksum or a short header after the first entry is an error
(``TarFormatError``), never a silent end.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import IO

BLOCK = 512
#: PAX or GNU long-name payloads larger than this are refused (Go allows 1 MiB).
MAX_SPECIAL = 16 << 20
_BUFFER = 1 << 20
_ENCODING, _ERRORS = "utf-8", "surrogateescape"

REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"L", b"K", b"S"
XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE = b"x", b"g", b"X"
REGULAR_TYPES = frozenset((REGTYPE, AREGTYPE, CONTTYPE, GNU_SPARSE))
_SUPPORTED = frozenset((REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE,
                        FIFOTYPE, CONTTYPE, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE,
                        XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE))
_GNU_TYPES = (GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE)
_PAX_NAME_FIELDS = frozenset(("path", "linkpath", "uname", "gname"))
_PAX_INT_FIELDS = ("uid", "gid", "size")
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_SIGNED = struct.Struct("148b8x356b")
# name mode uid gid size mtime (chksum) type linkname (magic version uname gname)
# devmajor devminor prefix
_FIELDS = struct.Struct("100s8s8s8s12s12s8xc100s8x32x32x8s8s155s")
_ZERO_BLOCK = bytes(BLOCK)


class TarFormatError(Exception):
    """The stream is not a well-formed tar (bad header, cut short)."""


@dataclass(slots=True)
class Entry:
    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int          # logical size (a sparse file's real size)
    mtime: int         # whole seconds; PAX "mtime" in pax_headers carries the fraction
    linkname: str
    devmajor: int
    devminor: int
    pax_headers: dict[str, str] = field(default_factory=dict)
    data_size: int = 0  # bytes of body in the stream (before padding)
    sparse: list[tuple[int, int]] | None = None

    def isreg(self) -> bool:
        return self.type in REGULAR_TYPES

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def issym(self) -> bool:
        return self.type == SYMTYPE

    def islnk(self) -> bool:
        return self.type == LNKTYPE

    def isfifo(self) -> bool:
        return self.type == FIFOTYPE


def _nts(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(_ENCODING, _ERRORS)


def _nti(raw: bytes) -> int:
    if raw[0] in (0o200, 0o377):
        n = int.from_bytes(raw[1:], "big")
        return n - (256 ** (len(raw) - 1)) if raw[0] == 0o377 else n
    try:
        return int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarFormatError("invalid header") from None


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` of a 512-byte header, exactly, with no Python int per byte: Adler-32's
    low half is 1 + the byte sum mod 65521, which *is* the sum while it stays below
    65521 — certain when at most 256 bytes are non-zero (most headers)."""
    if (BLOCK - block.count(0)) * 255 < 65521:
        return ((zlib.adler32(block) & 0xFFFF) - 1) % 65521
    return sum(block)


def _checksum_ok(block: bytes) -> bool:
    stored = _nti(block[148:156])
    # The checksum field itself counts as eight spaces.
    unsigned = _byte_sum(block) - sum(block[148:156]) + 256
    if stored == unsigned:
        return True
    signed: int = 256 + sum(_SIGNED.unpack_from(block))
    return stored == signed


class TarReader:
    """Entries of the tar read from file descriptor ``fd`` (blocking reads)."""

    def __init__(self, source: int | IO[bytes]) -> None:
        if isinstance(source, int):
            self._fd: int | None = source
            self._file: IO[bytes] | None = None
        else:
            self._fd, self._file = None, source
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._eof = False
        self._splice_ok = self._fd is not None and hasattr(os, "splice")
        self.entries_read = 0
        self._global_pax: dict[str, str] = {}
        self._pending = 0  # body bytes + padding of the last entry not yet consumed

    # -- buffer --------------------------------------------------------------
    def _fill(self, need: int) -> bool:
        """Make ``need`` (<= buffer size) bytes available; False at a premature end."""
        if self._end - self._pos >= need:
            return True
        if self._pos:
            left = self._end - self._pos
            self._buf[:left] = self._view[self._pos:self._end]
            self._pos, self._end = 0, left
        while self._end < need and not self._eof:
            got = self._read_into(self._view[self._end:])
            if not got:
                self._eof = True
            self._end += got
        return self._end >= need

    def _read_into(self, view: memoryview) -> int:
        if self._fd is not None:
            return os.readv(self._fd, [view])
        assert self._file is not None
        reader = getattr(self._file, "readinto", None)
        if reader is not None:
            return int(reader(view) or 0)
        data = self._file.read(len(view))
        view[:len(data)] = data
        return len(data)

    def _take(self, n: int) -> bytes:
        if n > len(self._buf):
            return self._take_large(n)
        if not self._fill(n):
            raise TarFormatError("unexpected end of data")
        data = bytes(self._view[self._pos:self._pos + n])
        self._pos += n
        return data

    def _take_large(self, n: int) -> bytes:
        parts = []
        while n:
            step = min(n, len(self._buf))
            parts.append(self._take(step))
            n -= step
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n:
            if self._pos == self._end and not self._fill(1):
                raise TarFormatError("unexpected end of data")
            step = min(n, self._end - self._pos)
            self._pos += step
            n -= step

    # -- bodies ----------------------------------------------------------------
    def copy_body(self, out_fd: int, entry: Entry) -> None:
        """Write the current entry's body to ``out_fd`` (a new, empty file)."""
        if entry.sparse is not None:
            self._copy_sparse(out_fd, entry)
        else:
            self._copy(out_fd, entry.data_size)
        self._pending -= entry.data_size
        self.finish_entry()

    def _copy(self, out_fd: int, n: int) -> None:
        while n:
            if self._pos == self._end and n >= BLOCK * 128 and self._splice_ok:
                n -= self._splice(out_fd, n)
                continue
            if not self._fill(1):
                raise TarFormatError("unexpected end of data")
            step = min(n, self._end - self._pos)
            written = 0
            while written < step:
                written += os.write(out_fd, self._view[self._pos + written:self._pos + step])
            self._pos += step
            n -= step

    def _splice(self, out_fd: int, n: int) -> int:
        """Move up to ``n`` bytes pipe → file in the kernel; 0 when splice can't be used."""
        assert self._fd is not None
        try:
            moved = os.splice(self._fd, out_fd, min(n, 1 << 30))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.ESPIPE):
                raise
            self._splice_ok = False  # not a pipe, or a filesystem without splice_write
            return 0
        if moved == 0:
            raise TarFormatError("unexpected end of data")
        return moved

    def _copy_sparse(self, out_fd: int, entry: Entry) -> None:
        assert entry.sparse is not None
        for offset, numbytes in entry.sparse:
            os.lseek(out_fd, offset, os.SEEK_SET)
            self._copy(out_fd, numbytes)
        os.ftruncate(out_fd, entry.size)

    def read_body(self, entry: Entry) -> bytes:
        data = self._take(entry.data_size)
        self._pending -= entry.data_size
        self.finish_entry()
        return data

    def finish_entry(self) -> None:
        """Skip whatever remains of the current entry's body and padding."""
        if self._pending:
            pending, self._pending = self._pending, 0
            self.skip(pending)

    # -- headers -------------------------------------------------------------
    def next(self) -> Entry | None:
        """The next entry, or None at the end of the archive."""
        self.finish_entry()
        block = self._header_block()
        if block is None:
            return None
        entry = self._member(block)
        self.entries_read += 1
        return entry

    def _header_block(self) -> bytes | None:
        if not self._fill(BLOCK):
            if self._end == self._pos:
                # A clean end at a block boundary.  An empty stream is an empty
                # layer, as for Go's tar reader (Next says io.EOF) in dockerd.
                return None
            raise TarFormatError("truncated header")
        block = bytes(self._view[self._pos:self._pos + BLOCK])
        self._pos += BLOCK
        if block == _ZERO_BLOCK:
            return None
        if not _checksum_ok(block):
            raise TarFormatError("bad checksum")
        return block

    def _subsequent_block(self) -> bytes:
        block = self._header_block()
        if block is None:
            raise TarFormatError("missing header after an extended header")
        return block

    def _member(self, block: bytes) -> Entry:
        entry = _frombuf(block)
        if entry.size < 0:  # base-256 can say so; Go's reader refuses it too
            raise TarFormatError(f"{entry.name!r}: negative size {entry.size}")
        kind = entry.type
        if kind in (GNU_LONGNAME, GNU_LONGLINK):
            payload = self._special(entry.size)
            nxt = self._member(self._subsequent_block())
            if kind == GNU_LONGNAME:
                nxt.name = _nts(payload)
                if nxt.type == DIRTYPE:
                    nxt.name = nxt.name.removesuffix("/")
            else:
                nxt.linkname = _nts(payload)
            return nxt
        if kind in (XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE):
            return self._pax(entry, block)
        if kind == GNU_SPARSE:
            self._old_gnu_sparse(entry, block)
        else:
            entry.data_size = entry.size if (entry.type in REGULAR_TYPES
                                             or entry.type not in _SUPPORTED) else 0
        if self._global_pax:
            _apply_pax(entry, dict(self._global_pax))
        self._pending = entry.data_size + (-entry.data_size % BLOCK)
        return entry

    def _special(self, size: int) -> bytes:
        if size > MAX_SPECIAL:
            raise TarFormatError(f"extended header of {size} bytes is too large")
        data = self._take(size)
        self.skip(-size % BLOCK)
        return data

    def _pax(self, header: Entry, block: bytes) -> Entry:
        buf = self._special(header.size)
        records = self._global_pax if header.type == XGLTYPE else dict(self._global_pax)
        decoded = _parse_pax(buf, records)
        nxt = self._member(self._subsequent_block())
        if header.type == XGLTYPE:
            return nxt
        sparse_map: list[tuple[int, int]] | None = None
        if "GNU.sparse.map" in records:
            numbers = [_pax_number("GNU.sparse.map", x)
                       for x in records["GNU.sparse.map"].split(",") if x]
            sparse_map = list(zip(numbers[::2], numbers[1::2], strict=False))
        elif "GNU.sparse.size" in records:
            offsets = [_pax_number(k, v) for k, v in decoded if k == "GNU.sparse.offset"]
            sizes = [_pax_number(k, v) for k, v in decoded if k == "GNU.sparse.numbytes"]
            sparse_map = list(zip(offsets, sizes, strict=False))
        elif records.get("GNU.sparse.major") == "1" and records.get("GNU.sparse.minor") == "0":
            sparse_map = self._sparse_10_map(nxt)
        _apply_pax(nxt, records)
        if "size" in records and nxt.sparse is None and sparse_map is None:
            nxt.data_size = nxt.size if (nxt.type in REGULAR_TYPES
                                         or nxt.type not in _SUPPORTED) else 0
            self._pending = nxt.data_size + (-nxt.data_size % BLOCK)
        if sparse_map is not None:
            nxt.sparse = sparse_map
        return nxt

    def _sparse_10_map(self, entry: Entry) -> list[tuple[int, int]]:
        """GNU sparse 1.0: a decimal map at the start of the body, block padded."""
        consumed = BLOCK
        buf = self._take(BLOCK)
        count_text, buf = buf.split(b"\n", 1)
        numbers: list[int] = []
        count = int(count_text)
        while len(numbers) < count * 2:
            if b"\n" not in buf:
                buf += self._take(BLOCK)
                consumed += BLOCK
            number, buf = buf.split(b"\n", 1)
            numbers.append(int(number))
        entry.data_size -= consumed
        self._pending -= consumed
        return list(zip(numbers[::2], numbers[1::2], strict=False))

    def _old_gnu_sparse(self, entry: Entry, block: bytes) -> None:
        structs = _sparse_structs(block, 386, 4)
        extended = block[482]
        while extended:
            ext = self._take(BLOCK)
            structs += _sparse_structs(ext, 0, 21)
            extended = ext[504]
        entry.data_size = entry.size
        entry.size = _nti(block[483:495])
        entry.sparse = structs


def _sparse_structs(block: bytes, start: int, count: int) -> list[tuple[int, int]]:
    out = []
    for i in range(count):
        pos = start + i * 24
        try:
            offset, numbytes = _nti(block[pos:pos + 12]), _nti(block[pos + 12:pos + 24])
        except (TarFormatError, IndexError):
            break
        if numbytes:  # unused slots are zero; a first segment may start at offset 0
            out.append((offset, numbytes))
    return out


def _num(raw: bytes) -> int:
    """``_nti`` for the common case (octal digits, NUL/space padded) in one C call."""
    if raw[0] & 0x80:
        return _nti(raw)
    try:
        return int(raw.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return _nti(raw)  # e.g. garbage after the NUL: tarfile ignores it


def _frombuf(block: bytes) -> Entry:
    (raw_name, mode, uid, gid, size, mtime, kind, raw_link, devmajor, devminor,
     prefix) = _FIELDS.unpack_from(block)
    name = _nts(raw_name)
    if kind == AREGTYPE and name.endswith("/"):
        kind = DIRTYPE
    if kind == DIRTYPE:
        name = name.rstrip("/")
    if prefix[0] and kind not in _GNU_TYPES:
        name = _nts(prefix) + "/" + name
    is_device = kind in (CHRTYPE, BLKTYPE)
    return Entry(
        name, kind, _num(mode), _num(uid), _num(gid), _num(size), _num(mtime),
        _nts(raw_link) if raw_link[0] else "",
        _num(devmajor) if is_device else 0, _num(devminor) if is_device else 0,
    )


def _pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PAX body into its ``LEN KEY=VALUE\n`` records, in one linear pass.

    Every lookup below works on this list: a regex searched over the whole
    body (as CPython 3.11's tarfile does for hdrcharset) is quadratic on a body
    of digits, which let one crafted header stall an ApplyDiff for hours
    (CVE-2024-6232)."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(buf):
        match = _PAX_RECORD.match(buf, pos)
        if not match:
            break
        length = int(match.group(1))
        if length < match.end() - pos + 1 or pos + length > len(buf):
            raise TarFormatError("invalid PAX record length")
        out.append((match.group(2), buf[match.end():pos + length - 1]))
        pos += length
    return out


def _parse_pax(buf: bytes, records: dict[str, str]) -> list[tuple[str, str]]:
    raw = _pax_records(buf)
    binary_names = (b"hdrcharset", b"BINARY") in raw
    decoded = []
    for raw_key, raw_value in raw:
        keyword = _decode(raw_key)
        value = (raw_value.decode(_ENCODING, _ERRORS)
                 if binary_names and keyword in _PAX_NAME_FIELDS else _decode(raw_value))
        records[keyword] = value
        decoded.append((keyword, value))
    return decoded


def _pax_number(keyword: str, value: str) -> int:
    """A PAX integer as Go's archive/tar accepts it: decimal, not negative."""
    try:
        number = int(value)
    except ValueError:
        raise TarFormatError(f"PAX record {keyword}={value[:40]!r} is not a number") from None
    if number < 0 or (keyword in ("uid", "gid") and number >= 1 << 32):
        raise TarFormatError(f"PAX record {keyword}={number} is out of range")
    return number


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return raw.decode(_ENCODING, _ERRORS)


def _apply_pax(entry: Entry, records: dict[str, str]) -> None:
    """``tarfile.TarInfo._apply_pax_info``: PAX values replace the header's."""
    for keyword, value in records.items():
        if keyword == "path":
            entry.name = value.rstrip("/")
        elif keyword == "linkpath":
            entry.linkname = value
        elif keyword in _PAX_INT_FIELDS or keyword in ("GNU.sparse.size",
                                                       "GNU.sparse.realsize"):
            attr = "size" if keyword.startswith("GNU.") else keyword
            setattr(entry, attr, _pax_number(keyword, value))
        elif keyword == "mtime":
            try:
                entry.mtime = int(float(value))
            except (ValueError, OverflowError):
                raise TarFormatError(f"PAX record mtime={value[:40]!r} is not a time") from None
        elif keyword == "GNU.sparse.name":
            entry.name = value
    entry.pax_headers = records
