"""containerd's ``fstest`` appliers and ``checkSnapshots``, in Python: a layer
is a list of steps applied to a tree; a chain of snapshots must look, at every
step, like the steps applied one after another to a plain directory."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Sequence

from tests.snapshotter.harness import Client, mount_all, unmount_all

Step = Callable[[str], None]


def create_file(path: str, data: bytes, mode: int) -> Step:
    def apply(root: str) -> None:
        full = os.path.join(root, path.lstrip("/"))
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, mode)
    return apply


def create_dir(path: str, mode: int) -> Step:
    def apply(root: str) -> None:
        full = os.path.join(root, path.lstrip("/"))
        os.mkdir(full, mode)
        os.chmod(full, mode)
    return apply


def remove_all(path: str) -> Step:
    def apply(root: str) -> None:
        full = os.path.join(root, path.lstrip("/"))
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)
    return apply


def chown(path: str, uid: int, gid: int) -> Step:
    return lambda root: os.lchown(os.path.join(root, path.lstrip("/")), uid, gid)


def link(old: str, new: str) -> Step:
    return lambda root: os.link(os.path.join(root, old.lstrip("/")),
                                os.path.join(root, new.lstrip("/")))


def rename(old: str, new: str) -> Step:
    return lambda root: os.rename(os.path.join(root, old.lstrip("/")),
                                  os.path.join(root, new.lstrip("/")))


def apply(root: str, steps: Sequence[Step]) -> None:
    for step in steps:
        step(root)


def snapshot_tree(root: str) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry under ``root``: (mode, uid, gid, content or link target)."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            body = b""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    body = f.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path).encode()
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, body)
    return found


async def check_snapshots(client: Client, work: str, prefix: str,
                          layers: Sequence[Sequence[Step]]) -> None:
    """containerd ``checkSnapshots``: commit a chain, one layer per step list,
    then a View of each committed snapshot equals the flat tree at that step."""
    flat = os.path.join(work, "flat")
    os.makedirs(flat)
    parent = ""
    committed = []
    for n, steps in enumerate(layers):
        target = os.path.join(work, f"prepare-{n}")
        os.makedirs(target)
        key = f"{prefix}/prepare-{n}"
        mount_all(await client.prepare(key, parent), target)
        try:
            apply(target, steps)
        finally:
            unmount_all(target)
        parent = f"{prefix}/committed-{n}"
        await client.commit(parent, key)
        committed.append(parent)
    for n, name in enumerate(committed):
        apply(flat, layers[n])
        target = os.path.join(work, f"view-{n}")
        os.makedirs(target)
        view = f"{prefix}/view-{n}"
        mount_all(await client.view(view, name), target)
        try:
            assert snapshot_tree(target) == snapshot_tree(flat), f"layer {n}"
        finally:
            unmount_all(target)
        await client.remove(view)
