"""The hostile layer corpus: tars that try to escape, crash or exhaust the extractor.

Each :class:`Case` builds its tar from a :class:`Ctx` (the per-test decoy paths
and a unique token used in every payload name, so a write that lands anywhere
on the host can be found by name) and says what a correct plugin answers:

* ``err``    -- a clear ``Err`` (non-empty, HTTP 4xx);
* ``ok``     -- success, and ``check`` proves the layer holds what docker's
  unpacker would have made of the tar;
* ``either`` -- either of the above (docker itself is not consistent here, or
  refusing and accepting are both safe); ``check`` still runs on success.

Whatever the answer, nothing may change outside the layer (see
``test_hostile_layers.py``).  Names and targets come in three flavours: ``../``
lexical escapes, absolute paths (legal: they are joined to the layer root) and
symlinks or hardlinks that point at the decoys.  ``UP`` climbs far enough from
any layer root to reach ``/``, so ``UP + decoy`` names the real decoy directory
whatever the backend's layout.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

UP = "../" * 40
REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
CHR, BLK, FIFO = tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE
PWN = b"pwned\n"
TIB = 1 << 40


@dataclass(frozen=True)
class Ctx:
    """Where the decoys are, for one test."""

    token: str        # unique per test; every payload name contains it
    decoy: str        # /tmp/strata-decoy-*: absolute, outside every layer
    sentinel: str     # <tmp>/sentinel, next to Home
    sentinel_rel: str  # the sentinel seen from the new layer's root (relative)

    @property
    def up_decoy(self) -> str:
        return UP + self.decoy.lstrip("/")

    @property
    def up_sentinel(self) -> str:
        return UP + self.sentinel.lstrip("/")


Check = Callable[[Ctx, str], None]
Expect = Literal["err", "ok", "either"]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Ctx], bytes]
    expect: Expect
    check: Check | None = None
    #: A fragment the Err should contain (the culprit entry), for the statistics.
    culprit: Callable[[Ctx], str] | None = None
    #: Seconds before the case counts as a hang (the extractor child is then killed).
    deadline: float = 30.0


# ---- tar building -------------------------------------------------------------


@dataclass(frozen=True)
class E:
    """One entry for tarfile's PAX writer (well-formed headers)."""

    name: str | bytes
    type: bytes = REG
    data: bytes = PWN
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str | bytes = ""
    pax: dict[str, str] = field(default_factory=dict)
    major: int = 0
    minor: int = 0
    mtime: int = 1_600_000_000


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def tar(*entries: E, end: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as out:
        for e in entries:
            info = tarfile.TarInfo(_text(e.name))
            info.type, info.mode, info.uid, info.gid = e.type, e.mode, e.uid, e.gid
            info.linkname, info.mtime = _text(e.linkname), e.mtime
            info.devmajor, info.devminor = e.major, e.minor
            info.pax_headers = dict(e.pax)
            if e.type == REG:
                info.size = len(e.data)
                out.addfile(info, io.BytesIO(e.data))
            else:
                out.addfile(info)
    data = buf.getvalue()
    return data if end else data[: _last_entry_end(data)]


def _last_entry_end(data: bytes) -> int:
    """Offset just after the last entry's data (before the zero blocks and padding)."""
    end = len(data)
    while end >= 512 and data[end - 512:end] == bytes(512):
        end -= 512
    return end


def f(name: str | bytes, data: bytes = PWN, **kw: object) -> E:
    return E(name, REG, data, **kw)  # type: ignore[arg-type]


def d(name: str | bytes, mode: int = 0o755, **kw: object) -> E:
    return E(name, DIR, b"", mode, **kw)  # type: ignore[arg-type]


def sym(name: str | bytes, target: str | bytes) -> E:
    return E(name, SYM, b"", 0o777, linkname=target)


def hl(name: str | bytes, target: str | bytes) -> E:
    return E(name, LNK, b"", linkname=target)


def octal(value: int, width: int) -> bytes:
    """A numeric header field: octal when it fits, GNU base-256 otherwise."""
    if value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    return b"\x80" + value.to_bytes(width - 1, "big")


def header(name: bytes, *, size: int = 0, typeflag: bytes = b"0", linkname: bytes = b"",
           mode: int = 0o644, size_field: bytes | None = None, gnu: bool = False,
           checksum_delta: int = 0, patch: dict[int, bytes] | None = None) -> bytes:
    """One raw 512-byte header block, for the malformed cases tarfile refuses to write."""
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = size_field if size_field is not None else octal(size, 12)
    h[136:148] = octal(1_600_000_000, 12)
    h[156:157] = typeflag
    h[157:257] = linkname[:100].ljust(100, b"\0")
    h[257:265] = b"ustar  \0" if gnu else b"ustar\x0000"
    for offset, value in (patch or {}).items():
        h[offset:offset + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % (sum(h) + checksum_delta)
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def record(key: bytes, value: bytes) -> bytes:
    """A well-formed PAX record: its length field counts itself."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_block(records: bytes, typeflag: bytes = b"x", size: int | None = None) -> bytes:
    return header(b"PaxHeaders/x", size=len(records) if size is None else size,
                  typeflag=typeflag) + pad(records)


def regular(name: bytes, data: bytes = PWN, **kw: object) -> bytes:
    return header(name, size=len(data), **kw) + pad(data)  # type: ignore[arg-type]


EOA = bytes(1024)


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    zstd = shutil.which("zstd")
    if zstd is None:
        # The frame magic and a raw block are enough to look like zstd to any sniffer.
        return b"\x28\xb5\x2f\xfd" + bytes(64)
    return subprocess.run([zstd, "-q", "-c"], input=data, capture_output=True,
                          check=True).stdout


def compressed_file(kind: str) -> Callable[[Ctx], bytes]:
    """A case builder: one file's layer tar, compressed with ``kind``."""
    return lambda c: compress(kind, tar(f(c.token)))


# ---- the parent layer ---------------------------------------------------------

PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
PARENT_FILES: dict[str, bytes] = {
    "etc/passwd": PASSWD,
    "etc/shadow": b"root:*:19000:0:99999:7:::\n",
    "bin/sh": b"#!/bin/true\n",
    "bin/su": b"setuid helper\n",
    "d/keep": b"keep\n",
    "data/x": b"x with an xattr\n",
}


def parent_tar() -> bytes:
    """The earlier layer every hostile layer is applied on top of."""
    return tar(
        d("etc"), f("etc/passwd", PASSWD), hl("etc/passwd.hl", "etc/passwd"),
        f("etc/shadow", PARENT_FILES["etc/shadow"], mode=0o640, gid=42),
        d("bin"), f("bin/sh", PARENT_FILES["bin/sh"], mode=0o755),
        f("bin/su", PARENT_FILES["bin/su"], mode=0o4755),
        d("lib"), sym("lib64", "lib"), d("d", mode=0o750), f("d/keep", PARENT_FILES["d/keep"]),
        d("data"), f("data/x", PARENT_FILES["data/x"],
                     pax={"SCHILY.xattr.user.tag": "v", "mtime": "1600000000.123456789"}),
        d("dev"),
    )


# ---- checks -------------------------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def file_is(rel: str | Callable[[Ctx], str], data: bytes = PWN) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        name = rel(ctx) if callable(rel) else rel
        path = os.path.join(root, name)
        assert stat.S_ISREG(os.lstat(path).st_mode), f"{name} is not a regular file"
        assert _read(path) == data, f"{name} has the wrong content"
    return check


def all_of(*checks: Check) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        for c in checks:
            c(ctx, root)
    return check


def parent_content_kept(ctx: Ctx, root: str) -> None:
    """The lower layer's files must still be in the layer (nothing deleted them)."""
    for rel, data in PARENT_FILES.items():
        path = os.path.join(root, rel)
        assert os.path.isfile(path) and _read(path) == data, f"lower file {rel} was lost"


def missing(rel: str) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        assert not os.path.lexists(os.path.join(root, rel)), f"{rel} should be gone"
    return check


def symlink_is(rel: str, target: Callable[[Ctx], str] | str) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        want = target(ctx) if callable(target) else target
        assert os.readlink(os.path.join(root, rel)) == want
    return check


def node(rel: Callable[[Ctx], str], kind: int, mode: int, uid: int = 0, gid: int = 0,
         rdev: tuple[int, int] | None = None) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        st = os.lstat(os.path.join(root, rel(ctx)))
        assert stat.S_IFMT(st.st_mode) == kind, f"wrong file type {oct(st.st_mode)}"
        assert stat.S_IMODE(st.st_mode) == mode, f"mode {oct(st.st_mode)} != {oct(mode)}"
        assert (st.st_uid, st.st_gid) == (uid, gid)
        if rdev is not None:
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == rdev
    return check


def same_inode(a: str, b: str) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        sa, sb = os.lstat(os.path.join(root, a)), os.lstat(os.path.join(root, b))
        assert (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino), f"{a} and {b} not linked"
    return check


def only_entries(names: set[str]) -> Check:
    def check(ctx: Ctx, root: str) -> None:
        found = set(os.listdir(root))
        assert found == names, f"expected only {sorted(names)}, found {sorted(found)}"
    return check


def sparse_file(ctx: Ctx, root: str) -> None:
    st = os.lstat(os.path.join(root, f"{ctx.token}.sparse"))
    assert st.st_size == TIB, "the sparse file must keep its real size"
    assert st.st_blocks * 512 < (64 << 20), "a 1 TiB hole must not be written out as zeros"


# ---- the cases ----------------------------------------------------------------

T = Callable[[Ctx], str]


def tok(fmt: str) -> T:
    return lambda ctx: fmt.format(t=ctx.token)


def _many_files(count: int) -> Callable[[Ctx], bytes]:
    def build(ctx: Ctx) -> bytes:
        out = [header(b"bomb/", typeflag=b"5", mode=0o755)]
        empty = [header(f"bomb/{i:06d}".encode(), size=0) for i in range(count)]
        return b"".join(out + empty) + EOA
    return build


def _sparse_1tib(ctx: Ctx) -> bytes:
    """An old-GNU sparse entry: 512 stored bytes at the end of a 1 TiB file."""
    data = b"end".ljust(512, b"\0")
    patch = {386: octal(TIB - 512, 12) + octal(512, 12), 482: b"\0", 483: octal(TIB, 12)}
    return header(f"{ctx.token}.sparse".encode(), size=512, typeflag=b"S", gnu=True,
                  patch=patch) + data + EOA


def _garbage(ctx: Ctx) -> bytes:
    return random.Random(4).randbytes(64 << 10)


def _deep_path(component: int, depth: int) -> Callable[[Ctx], bytes]:
    def build(ctx: Ctx) -> bytes:
        parts = [(f"{i:03d}" + ctx.token).ljust(component, "x") for i in range(depth)]
        return tar(f("/".join(parts) + "/leaf"))
    return build


def _digits_pax(ctx: Ctx) -> bytes:
    # 512 KiB of digits: CPython < 3.11.10 / 3.12.6 scans it with a backtracking
    # regex (hdrcharset, CVE-2024-6232): ~O(n^2), hours for this size.
    return pax_block(b"1" * (512 << 10)) + regular(ctx.token.encode()) + EOA


def _pax(*records: bytes, name: str = "{t}", data: bytes = PWN) -> Callable[[Ctx], bytes]:
    def build(ctx: Ctx) -> bytes:
        body = b"".join(r.replace(b"{t}", ctx.token.encode()) for r in records)
        return pax_block(body) + regular(name.format(t=ctx.token).encode(), data) + EOA
    return build


def _smuggled_header(ctx: Ctx) -> bytes:
    """PAX size=0 makes the file's data block be read as the next header."""
    inner = header(f"{UP}tmp/{ctx.token}-smuggled".encode(), size=0)
    return (pax_block(record(b"size", b"0")) + header(ctx.token.encode(), size=512)
            + inner + EOA)


CASES: list[Case] = [
    # -- lexical escapes --------------------------------------------------------------------------
    Case("dotdot_name", lambda c: tar(f(f"../{c.token}")), "err", culprit=tok("../{t}")),
    Case("dotdot_deep_to_sentinel",
         lambda c: tar(f(f"a/../../../../../{c.sentinel_rel}/{c.token}")), "err"),
    Case("dotdot_up_to_decoy", lambda c: tar(f(f"{c.up_decoy}/{c.token}")), "err"),
    Case("dotdot_dir_entry", lambda c: tar(d(f"{c.up_decoy}/{c.token}/")), "err"),
    Case("absolute_etc", lambda c: tar(f(f"/etc/{c.token}")), "ok",
         file_is(tok("etc/{t}"))),
    Case("absolute_decoy_passwd", lambda c: tar(f(f"{c.decoy}/etc/passwd")), "ok",
         file_is(lambda c: f"{c.decoy.lstrip('/')}/etc/passwd")),
    Case("absolute_dotdot_mix", lambda c: tar(f(f"/../../{c.token}")), "either",
         file_is(tok("{t}"))),
    # -- symlinks, then entries through them -----------------------------------------
    Case("symlink_etc_then_file",
         lambda c: tar(sym("evil", "/etc"), f(f"evil/{c.token}")), "either",
         all_of(symlink_is("evil", "/etc"), file_is(tok("etc/{t}")))),
    Case("symlink_etc_then_passwd",
         lambda c: tar(sym("evil", "/etc"), f("evil/passwd")), "either",
         file_is("etc/passwd")),
    Case("symlink_up3_then_file",
         lambda c: tar(sym("evil", "../../.."), f(f"evil/{c.token}")), "either",
         file_is(tok("{t}"))),
    Case("symlink_up_decoy_then_file",
         lambda c: tar(sym("evil", c.up_decoy), f(f"evil/{c.token}"), f("evil/etc/passwd")),
         "either"),
    Case("symlink_abs_decoy_then_file",
         lambda c: tar(sym("evil", c.decoy), f(f"evil/{c.token}")), "either"),
    Case("symlink_rel_sentinel_then_file",
         lambda c: tar(sym("evil", c.sentinel_rel), f(f"evil/{c.token}"),
                       f("evil/etc/passwd")), "either"),
    Case("symlink_chain_out",
         lambda c: tar(sym("a", "b"), sym("b", c.up_decoy), f(f"a/{c.token}")), "either"),
    Case("symlink_nested_dir_out",
         lambda c: tar(d("x"), sym("x/y", UP), f(f"x/y/{c.decoy.lstrip('/')}/{c.token}")),
         "either"),
    Case("symlink_then_regular_file",
         lambda c: tar(sym("evil", f"{c.decoy}/etc/passwd"), f("evil")), "ok",
         file_is("evil")),
    Case("symlink_then_dir_entry",
         lambda c: tar(sym("evil", c.up_decoy), d("evil", mode=0o777), f(f"evil/{c.token}")),
         "ok", file_is(tok("evil/{t}"))),
    Case("symlink_over_parent_dir",
         lambda c: tar(sym("etc", c.up_sentinel + "/etc"), f("etc/passwd")), "either"),
    # -- hardlinks --------------------------------------------------------------------------------
    Case("hardlink_up_decoy", lambda c: tar(hl("hl", f"{c.up_decoy}/etc/passwd")), "err",
         culprit=lambda c: "hl"),
    Case("hardlink_up_sentinel", lambda c: tar(hl("hl", f"{c.up_sentinel}/etc/passwd")),
         "err"),
    Case("hardlink_abs_decoy", lambda c: tar(hl("hl", f"{c.decoy}/etc/passwd")), "err"),
    # A link to a lower layer's file: docker's overlay2 unpacks into the upper dir
    # only and fails the same way, and its own Diff never emits such links (docs/protocol.md §6.3).
    Case("hardlink_abs_in_layer", lambda c: tar(hl("hl", "/etc/passwd")), "either",
         all_of(file_is("hl", PASSWD), same_inode("hl", "etc/passwd"))),
    Case("hardlink_missing_target", lambda c: tar(hl("hl", f"nope-{c.token}")), "err",
         culprit=tok("nope-{t}")),
    Case("hardlink_to_symlink_out",
         lambda c: tar(sym("s", f"{c.decoy}/etc/passwd"), hl("hl", "s")), "ok",
         symlink_is("hl", lambda c: f"{c.decoy}/etc/passwd")),
    Case("hardlink_to_symlink_then_write",
         lambda c: tar(sym("s", c.up_decoy + "/etc/passwd"), hl("hl", "s"), f("hl")), "ok",
         all_of(file_is("hl"), symlink_is("s", lambda c: c.up_decoy + "/etc/passwd"))),
    Case("hardlink_via_symlink_dir_decoy",
         lambda c: tar(sym("evil", f"{c.decoy}/etc"), hl("hl", "evil/passwd")), "either"),
    Case("hardlink_via_symlink_dir_up",
         lambda c: tar(sym("evil", f"{c.up_decoy}/etc"), hl("hl", "evil/passwd")), "either"),
    Case("hardlink_via_symlink_dir_etc",
         lambda c: tar(sym("evil", "/etc"), hl("hl", "evil/passwd")), "either",
         file_is("hl", PASSWD)),
    Case("hardlink_to_itself_new", lambda c: tar(hl(c.token, c.token)), "err"),
    Case("hardlink_to_itself_existing", lambda c: tar(hl("etc/passwd", "etc/passwd")),
         "either", file_is("etc/passwd", PASSWD)),
    Case("hardlink_to_directory", lambda c: tar(hl("hl", "etc")), "err"),
    Case("hardlink_to_root", lambda c: tar(hl("hl", "./")), "err"),
    Case("hardlink_then_overwrite_link",
         lambda c: tar(f("a", b"one"), hl("b", "a"), f("b", b"two")), "ok",
         all_of(file_is("a", b"one"), file_is("b", b"two"))),
    Case("hardlink_lower_file_then_replace",
         lambda c: tar(hl("hl", "etc/passwd"), f("etc/passwd")), "either",
         all_of(file_is("hl", PASSWD), file_is("etc/passwd"))),
    Case("hardlink_into_plnk_escape",
         lambda c: tar(hl("hl", f".wh..wh.plnk/{UP}{c.decoy.lstrip('/')}/etc/passwd")),
         "err"),
    Case("plnk_legit_link",
         lambda c: tar(f(".wh..wh.plnk/1", b"plnk"), hl("x", ".wh..wh.plnk/1")), "ok",
         all_of(file_is("x", b"plnk"), missing(".wh..wh.plnk"))),
    # -- a directory replaced by a symlink mid-stream -------------------------------------
    Case("dir_then_symlink_abs_then_file",
         lambda c: tar(d("dd"), sym("dd", c.decoy), f(f"dd/{c.token}")), "either"),
    Case("dir_then_symlink_up_then_file",
         lambda c: tar(d("dd"), sym("dd", c.up_decoy), f(f"dd/{c.token}")), "either"),
    Case("lower_dir_then_symlink_then_file",
         lambda c: tar(sym("d", c.up_sentinel), f("d/keep"), f(f"d/{c.token}")), "either"),
    Case("dir_then_symlink_etc_then_file",
         lambda c: tar(d("dd"), f("dd/a"), sym("dd", "/etc"), f(f"dd/{c.token}")), "either",
         file_is(tok("etc/{t}"))),
    # -- devices and setuid (legal inside the layer) --------------------------------------
    Case("char_device", lambda c: tar(E(f"dev/{c.token}c", CHR, b"", 0o666, major=1, minor=3)),
         "ok", node(tok("dev/{t}c"), stat.S_IFCHR, 0o666, rdev=(1, 3))),
    Case("block_device",
         lambda c: tar(E(f"dev/{c.token}b", BLK, b"", 0o660, gid=6, major=7, minor=200)),
         "ok", node(tok("dev/{t}b"), stat.S_IFBLK, 0o660, gid=6, rdev=(7, 200))),
    Case("fifo", lambda c: tar(E(f"{c.token}.fifo", FIFO, b"", 0o640)), "ok",
         node(tok("{t}.fifo"), stat.S_IFIFO, 0o640)),
    Case("setuid_setgid_file",
         lambda c: tar(f(f"bin/{c.token}", mode=0o6755, uid=1000, gid=1000)), "ok",
         node(tok("bin/{t}"), stat.S_IFREG, 0o6755, 1000, 1000)),
    Case("sticky_setgid_dir", lambda c: tar(d(f"{c.token}.d", mode=0o3777, gid=1000)), "ok",
         node(tok("{t}.d"), stat.S_IFDIR, 0o3777, 0, 1000)),
    Case("device_replaces_lower_file",
         lambda c: tar(E("etc/passwd", CHR, b"", 0o644, major=1, minor=3)), "ok",
         node(lambda c: "etc/passwd", stat.S_IFCHR, 0o644, rdev=(1, 3))),
    # -- PAX headers ------------------------------------------------------------------------
    Case("pax_path_dotdot", _pax(record(b"path", UP.encode() + b"tmp/{t}")), "err"),
    Case("pax_linkpath_out",
         lambda c: tar(E("hl", LNK, b"", pax={"linkpath": f"{c.up_decoy}/etc/passwd"})), "err"),
    Case("pax_global_path_dotdot",
         lambda c: pax_block(record(b"path", f"../{c.token}".encode()), typeflag=b"g")
         + regular(b"innocent") + EOA, "err"),
    Case("pax_record_length_zero", _pax(b"0 path=x\n"), "err"),
    Case("pax_record_length_too_small", _pax(b"5 path={t}\n"), "either"),
    Case("pax_record_length_claims_100mb", _pax(b"104857600 path={t}\n"), "either"),
    Case("pax_record_length_not_numeric", _pax(b"abc path={t}\n"), "either",
         file_is(tok("{t}"))),
    Case("pax_record_length_negative", _pax(b"-20 path={t}x\n"), "either", file_is(tok("{t}"))),
    Case("pax_size_negative", _pax(record(b"size", b"-1")), "err"),
    Case("pax_size_not_numeric", _pax(record(b"size", b"abc")), "either"),
    Case("pax_size_zero_smuggles_header", _smuggled_header, "either"),
    Case("pax_header_claims_100mb",
         lambda c: pax_block(record(b"path", b"x"), size=100 << 20), "err"),
    Case("pax_path_with_nul",
         _pax(record(b"path", b"{t}\0/" + UP.encode() + b"tmp/{t}")), "either",
         file_is(tok("{t}"))),
    Case("pax_gnu_sparse_size_not_numeric", _pax(record(b"GNU.sparse.size", b"abc")), "err"),
    Case("pax_mtime_infinite", _pax(record(b"mtime", b"1e400")), "either",
         file_is(tok("{t}"))),
    Case("pax_uid_huge", _pax(record(b"uid", b"9" * 30)), "either", file_is(tok("{t}"))),
    Case("pax_digits_only_header", _digits_pax, "either", deadline=10.0),
    Case("pax_xattr_bad_capability",
         _pax(record(b"SCHILY.xattr.security.capability", b"\x01garbage")), "either",
         file_is(tok("{t}"))),
    Case("pax_xattr_too_big", _pax(record(b"SCHILY.xattr.user.big", b"v" * (128 << 10))),
         "either", file_is(tok("{t}"))),
    Case("pax_xattr_overlay_opaque",
         lambda c: tar(d(f"{c.token}.d", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})),
         "either"),
    # -- GNU long names -----------------------------------------------------------------------
    Case("gnu_longname_dotdot",
         lambda c: header(b"././@LongLink", size=200, typeflag=b"L", gnu=True)
         + pad((UP + c.token).encode().ljust(200, b"\0")) + regular(b"short") + EOA, "err"),
    Case("gnu_longname_claims_100mb",
         lambda c: header(b"././@LongLink", size=100 << 20, typeflag=b"L", gnu=True)
         + pad(b"x"), "err"),
    Case("gnu_longlink_out",
         lambda c: header(b"././@LongLink", size=200, typeflag=b"K", gnu=True)
         + pad((c.up_decoy + "/etc/passwd").encode().ljust(200, b"\0"))
         + header(b"hl", typeflag=b"1", linkname=b"x") + EOA, "err"),
    # -- truncated and garbage streams ------------------------------------------------------------
    Case("truncated_mid_header", lambda c: tar(f(c.token, b"x" * 5000))[:300], "err"),
    Case("truncated_mid_body",
         lambda c: tar(f("first"), f(c.token, b"x" * 10000))[:512 * 6 + 3000], "err"),
    Case("truncated_mid_pax_record", lambda c: tar(f(c.token, pax={"comment": "c" * 900}))[:700],
         "err"),
    Case("no_end_of_archive_marker", lambda c: tar(f(c.token), end=False), "ok",
         file_is(tok("{t}"))),
    Case("only_end_of_archive_marker", lambda c: EOA, "ok", parent_content_kept),
    Case("empty_body", lambda c: b"", "either", parent_content_kept),
    Case("garbage_stream", _garbage, "err"),
    Case("garbage_after_first_entry",
         lambda c: tar(f(c.token), end=False) + random.Random(5).randbytes(4096), "err"),
    Case("bad_checksum", lambda c: header(c.token.encode(), size=0, checksum_delta=1) + EOA,
         "err"),
    Case("unknown_typeflag", lambda c: header(c.token.encode(), typeflag=b"Z") + EOA, "err"),
    Case("negative_size_base256",
         lambda c: header(c.token.encode(), size_field=b"\xff" * 12) + bytes(2048), "err"),
    Case("size_claims_1tib_then_eof",
         lambda c: header(c.token.encode(), size_field=octal(TIB, 12)) + bytes(512), "err"),
    # -- compressed bodies (the protocol sends uncompressed tar) -----------------------------------
    *[Case(f"compressed_{kind}", compressed_file(kind), "err")
      for kind in ("gzip", "bzip2", "xz", "zstd")],
    # -- names ------------------------------------------------------------------------------------
    Case("name_with_newline", lambda c: tar(d(f"nl\n{c.token}"), f(f"nl\n{c.token}/f\n")), "ok",
         file_is(tok("nl\n{t}/f\n"))),
    Case("name_not_utf8",
         lambda c: regular(b"caf\xe9-" + c.token.encode() + b"-\xff\xfe") + EOA, "ok",
         lambda c, root: file_is(os.fsdecode(b"caf\xe9-" + c.token.encode() + b"-\xff\xfe"))(
             c, root)),
    Case("name_ustar_nul_truncates",
         lambda c: regular(c.token.encode() + b"\0/" + UP.encode()[:80]) + EOA, "ok",
         file_is(tok("{t}"))),
    Case("name_component_over_255", lambda c: tar(f(c.token + "x" * 300)), "either"),
    Case("path_4k_deep", _deep_path(200, 22), "either"),
    Case("path_64k_deep", _deep_path(250, 260), "either"),
    Case("name_only_slashes_and_dots", lambda c: tar(f("/./././")), "err"),
    # -- bombs ------------------------------------------------------------------------------------
    Case("many_empty_files", _many_files(50_000), "ok",
         lambda c, root: _count(os.path.join(root, "bomb"), 50_000), deadline=120.0),
    Case("sparse_claims_1tib", _sparse_1tib, "either", sparse_file, deadline=60.0),
    # -- whiteouts and opaque markers -------------------------------------------------------------
    Case("whiteout_dotdot_at_root", lambda c: tar(f(".wh...", b"")), "either",
         parent_content_kept),
    Case("whiteout_dotdot_nested", lambda c: tar(f("etc/.wh...", b"")), "either",
         parent_content_kept),
    Case("whiteout_dot", lambda c: tar(f("etc/.wh..", b"")), "either", parent_content_kept),
    Case("whiteout_parent_escape", lambda c: tar(f("../.wh.x", b"")), "err"),
    Case("whiteout_up_decoy", lambda c: tar(f(f"{c.up_decoy}/.wh.etc", b"")), "err"),
    Case("whiteout_absolute_in_layer", lambda c: tar(f("/.wh.etc", b"")), "ok",
         all_of(missing("etc"), file_is("bin/sh", PARENT_FILES["bin/sh"]))),
    Case("whiteout_via_symlink_decoy",
         lambda c: tar(sym("evil", c.decoy), f("evil/.wh.etc", b"")), "either"),
    Case("whiteout_via_symlink_up",
         lambda c: tar(sym("evil", c.up_sentinel), f("evil/.wh.etc", b"")), "either"),
    Case("opaque_at_root",
         lambda c: tar(d("./"), f(".wh..wh..opq", b""), f(c.token)), "ok",
         lambda c, root: only_entries({c.token})(c, root)),
    Case("opaque_via_symlink_out",
         lambda c: tar(sym("evil", c.up_sentinel), f("evil/.wh..wh..opq", b"")), "either"),
    # -- duplicates -------------------------------------------------------------------------------
    Case("same_path_twice", lambda c: tar(f(c.token, b"one"), f(c.token, b"two")), "ok",
         file_is(tok("{t}"), b"two")),
    Case("file_dir_file",
         lambda c: tar(f(c.token, b"one"), d(c.token), f(f"{c.token}/child"), f(c.token, b"3")),
         "ok", file_is(tok("{t}"), b"3")),
    Case("file_replaces_lower_dir", lambda c: tar(f("etc")), "ok", file_is("etc")),
    Case("dir_replaces_lower_file", lambda c: tar(d("etc/passwd", mode=0o700)), "ok",
         node(lambda c: "etc/passwd", stat.S_IFDIR, 0o700)),
]


def _count(directory: str, expected: int) -> None:
    assert len(os.listdir(directory)) == expected


assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
