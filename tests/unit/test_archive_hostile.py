"""apply_layer never writes outside the layer root, and rejects broken streams."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import tarfile
import threading
from pathlib import Path

import pytest

from plugin.archive import ApplyOptions, apply_layer
from plugin.archive.proc import stream as archive_stream
from plugin.archive.proc.extract import LayerExtractor, clean_name
from plugin.errors import InvalidArgument
from plugin.idtools import IDMappings
from tests.support.procs import descendants, status_kib
from tests.unit.test_archive_util import Entry, make_tar, tree_files

REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


@pytest.fixture()
def jail(tmp_path: Path) -> tuple[Path, Path]:
    """tmp/sandbox/layer (the root) next to tmp/sentinel, which must stay untouched."""
    sentinel = tmp_path / "sentinel"
    (sentinel / "etc").mkdir(parents=True)
    (sentinel / "etc" / "passwd").write_text("real\n")
    root = tmp_path / "sandbox" / "layer"
    root.mkdir(parents=True)
    return root, sentinel


HOSTILE = {
    "dotdot": [Entry("../sentinel/x", data=b"pwn")],
    "deep_dotdot": [Entry("a/../../../sentinel/x", data=b"pwn")],
    "absolute": [Entry("/etc/passwd", data=b"pwn")],
    "symlink_dir": [Entry("evil", type=SYM, linkname="/etc"), Entry("evil/passwd", data=b"pwn")],
    "symlink_rel_dir": [Entry("evil", type=SYM, linkname="../../sentinel/etc"),
                        Entry("evil/passwd", data=b"pwn")],
    "symlink_file": [Entry("evil", type=SYM, linkname="../../sentinel/etc/passwd"),
                     Entry("evil", data=b"pwn")],
    "hardlink_out": [Entry("hl", type=LNK, linkname="../../sentinel/etc/passwd")],
    "hardlink_abs": [Entry("hl", type=LNK, linkname="/etc/passwd")],
    "hardlink_via_symlink": [Entry("evil", type=SYM, linkname="../../sentinel/etc"),
                             Entry("hl", type=LNK, linkname="evil/passwd")],
    "symlink_then_dir": [Entry("evil", type=SYM, linkname="../../sentinel"),
                         Entry("evil/", type=DIR, mode=0o777),
                         Entry("evil/new", data=b"pwn")],
    "root_not_dir": [Entry("./", data=b"pwn")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_stays_inside_root(jail: tuple[Path, Path], case: str) -> None:
    root, sentinel = jail
    before = {p: (sentinel / p).read_bytes() if (sentinel / p).is_file() else None
              for p in tree_files(sentinel)}
    data = make_tar(HOSTILE[case])
    with contextlib.suppress(InvalidArgument):
        apply_layer(str(root), io.BytesIO(data), ApplyOptions())
    after = {p: (sentinel / p).read_bytes() if (sentinel / p).is_file() else None
             for p in tree_files(sentinel)}
    assert after == before
    sandbox = tree_files(root.parent)
    assert {p for p in sandbox if p != "layer" and not p.startswith("layer/")} == set()
    assert sorted(os.listdir(root.parent.parent)) == ["sandbox", "sentinel"]


def test_dotdot_names_are_rejected_like_docker(jail: tuple[Path, Path]) -> None:
    root, _ = jail
    with pytest.raises(InvalidArgument, match="outside"):
        apply_layer(str(root), io.BytesIO(make_tar(HOSTILE["dotdot"])), ApplyOptions())


def test_absolute_names_land_under_root(jail: tuple[Path, Path]) -> None:
    root, _ = jail
    apply_layer(str(root), io.BytesIO(make_tar(HOSTILE["absolute"])), ApplyOptions())
    assert (root / "etc" / "passwd").read_bytes() == b"pwn"


def test_symlinked_dir_resolves_inside_chroot(jail: tuple[Path, Path]) -> None:
    root, _ = jail
    data = make_tar([Entry("etc/", type=DIR, mode=0o755), *HOSTILE["symlink_dir"]])
    apply_layer(str(root), io.BytesIO(data), ApplyOptions())
    # In the chroot, /etc is the layer's own etc.
    assert (root / "etc" / "passwd").read_bytes() == b"pwn"
    assert os.readlink(root / "evil") == "/etc"


def test_hardlink_escape_is_rejected(jail: tuple[Path, Path]) -> None:
    root, _ = jail
    with pytest.raises(InvalidArgument, match="outside"):
        apply_layer(str(root), io.BytesIO(make_tar(HOSTILE["hardlink_out"])), ApplyOptions())


def test_without_chroot_the_extractor_still_confines(jail: tuple[Path, Path]) -> None:
    """Defence in depth: the same hostile tars, in-process, with no chroot."""
    root, sentinel = jail
    for case in ("symlink_dir", "symlink_rel_dir", "hardlink_via_symlink", "symlink_then_dir"):
        extractor = LayerExtractor(str(root), IDMappings())
        with contextlib.suppress(InvalidArgument):
            extractor.run(io.BytesIO(make_tar(HOSTILE[case])))
        assert (sentinel / "etc" / "passwd").read_text() == "real\n"
        assert tree_files(sentinel) == {"etc", "etc/passwd"}
        for p in root.iterdir():
            os.unlink(p) if p.is_symlink() or not p.is_dir() else None


@pytest.mark.parametrize("name,expected", [
    ("a/b", "a/b"), ("./a/./b/", "a/b"), ("/abs/x", "abs/x"), ("//x", "x"),
    ("./", "."), ("", "."), ("/", "."), ("/../x", "x"), ("a/../b", "b"),
])
def test_clean_name(name: str, expected: str) -> None:
    assert clean_name(name) == expected


@pytest.mark.parametrize("name", ["..", "../x", "a/../../x"])
def test_clean_name_rejects_escapes(name: str) -> None:
    with pytest.raises(InvalidArgument):
        clean_name(name)


def _good_tar() -> bytes:
    return make_tar([Entry("d/", type=DIR, mode=0o755), Entry("d/f", data=b"x" * 5000),
                     Entry("g", data=b"y" * 700)])


@pytest.mark.parametrize("cut", [100, 512 + 100, 512 * 3, 512 * 4 + 10])
def test_truncated_stream_is_invalid(tmp_path: Path, cut: int) -> None:
    data = _good_tar()
    with pytest.raises(InvalidArgument):
        apply_layer(str(tmp_path), io.BytesIO(data[:cut]), ApplyOptions())


def test_garbage_after_a_valid_entry_is_invalid(tmp_path: Path) -> None:
    data = make_tar([Entry("a", data=b"x" * 10)])
    bad = data[:1024] + os.urandom(512) + b"\0" * 1024
    with pytest.raises(InvalidArgument, match="header"):
        apply_layer(str(tmp_path), io.BytesIO(bad), ApplyOptions())


@pytest.mark.parametrize("data", [os.urandom(4096), b"not a tar at all" * 40])
def test_garbage_stream_is_invalid(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        apply_layer(str(tmp_path), io.BytesIO(data), ApplyOptions())


def test_empty_stream_is_an_empty_layer(tmp_path: Path) -> None:
    """Go's tar reader says io.EOF for an empty stream, so dockerd's own
    UnpackLayer applies nothing and succeeds: strata does the same."""
    (tmp_path / "kept").write_bytes(b"there before")
    assert apply_layer(str(tmp_path), io.BytesIO(b""), ApplyOptions()) == 0
    assert os.listdir(tmp_path) == ["kept"]


class _CountingStream(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self._src.read(n)
        self.consumed += len(chunk)
        return chunk


def test_stream_is_read_to_eof_even_on_error(tmp_path: Path) -> None:
    data = make_tar([Entry("../x", data=b"x")]) + b"\0" * (5 << 20)
    stream = _CountingStream(data)
    with pytest.raises(InvalidArgument):
        apply_layer(str(tmp_path), stream, ApplyOptions())  # type: ignore[arg-type]
    assert stream.consumed == len(data)


def test_valid_empty_tar_and_trailing_bytes(tmp_path: Path) -> None:
    assert apply_layer(str(tmp_path), io.BytesIO(b"\0" * 10240), ApplyOptions()) == 0
    data = _good_tar() + b"\0" * 100000
    assert apply_layer(str(tmp_path), io.BytesIO(data), ApplyOptions()) == 5700


class _ZeroLayer(io.RawIOBase):
    """A tar with one big zero-filled file, generated on the fly."""

    def __init__(self, size: int) -> None:
        info = tarfile.TarInfo("big")
        info.size = size
        self._header = info.tobuf(tarfile.PAX_FORMAT)
        self._left = size + (-size % 512) + 1024

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._header:
            out, self._header = self._header, b""
            return out
        n = min(n, self._left, 1 << 20)
        self._left -= n
        return b"\0" * n


def test_large_layer_is_streamed(tmp_path: Path) -> None:
    """Neither this process nor the extraction worker holds the layer: peak RSS
    of each stays far below the 256 MiB streamed through them."""
    size = 256 << 20
    me = os.getpid()
    # Earlier children (a zygote, daemons) are not measured; an idle warm apply worker is,
    # as it may take this job.
    already = set(descendants(me)) - {w.proc.pid for w in archive_stream._WARM._idle}
    worker_peak_kib = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal worker_peak_kib
        while not done.wait(0.01):
            for pid in set(descendants(me)) - already:
                worker_peak_kib = max(worker_peak_kib, status_kib(pid, "VmHWM"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        assert apply_layer(str(tmp_path), _ZeroLayer(size), ApplyOptions()) == size  # type: ignore[arg-type]
    finally:
        done.set()
        sampler.join()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 40
    assert os.path.getsize(tmp_path / "big") == size
    assert 0 < worker_peak_kib / 1024 < 100, f"worker peak {worker_peak_kib / 1024:.0f} MiB"
