"""Access: the plugin socket is 0600 (root only) by default, 0660 for a chosen
group; the kernel refuses anyone else.  Checked with real processes running
as nobody."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from plugin.server.serve import bind_unix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")

def connect_as(path: str, uid: int, gid: int) -> int:
    """0 if a process running as uid:gid can connect, else the errno it got."""
    pid = os.fork()
    if pid == 0:  # child: drop to the user, try, report through the exit code
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
        except OSError as e:
            code = e.errno or 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def nobody() -> tuple[int, int]:
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory anyone may traverse, so only the socket's own mode decides."""
    path = tempfile.mkdtemp(prefix="sa-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_default_socket_refuses_non_root(open_dir: str) -> None:
    path = os.path.join(open_dir, "p.sock")
    sock = bind_unix(path, 0o600, None)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert connect_as(path, *nobody()) == errno.EACCES
        with socket.socket(socket.AF_UNIX) as client:  # root still gets in
            client.connect(path)
    finally:
        sock.close()


def test_group_socket_admits_the_group_only(open_dir: str) -> None:
    path = os.path.join(open_dir, "p.sock")
    uid, gid = nobody()
    sock = bind_unix(path, 0o660, gid)
    try:
        st = os.stat(path)
        assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == gid
        assert connect_as(path, uid, gid) == 0
        assert connect_as(path, uid, grp.getgrnam("daemon").gr_gid) == errno.EACCES
    finally:
        sock.close()


def test_a_live_socket_is_never_taken_over(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "p.sock")
    first = bind_unix(path, 0o600, None)
    try:
        with pytest.raises(SystemExit, match="already served"):
            bind_unix(path, 0o600, None)
    finally:
        first.close()
    bind_unix(path, 0o600, None).close()  # a stale socket file is replaced
