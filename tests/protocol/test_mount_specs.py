"""The engine-neutral core's mount specs: what ``Driver.mounts`` describes is the
tree Get mounts, on every backend that can describe its mounts.

Each spec is mounted the way containerd mounts a snapshotter's answer, by
``mount -t TYPE -o OPTIONS SOURCE TARGET`` (mount(8), not strata's own mount
code), on a three-layer chain and on a 130-layer chain, deeper than mount(2)'s
one-page option limit allows with absolute paths: containerd then mounts from
the lowers' common directory, and strata's 26-character short links keep each
lower at 27 bytes: (4095 - ~300 bytes of absolute upper and work dirs) / 27
leaves room for about 140 lowers.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from plugin.driver.base import MountSpec
from plugin.driver.mountapi import unmount
from plugin.errors import NotSupported
from tests.support.files import new_layer_id, read_file, write_file
from tests.support.plugin import PluginUnderTest

pytestmark = pytest.mark.asyncio


def tree(root: str) -> dict[str, bytes]:
    found = {}
    for parent, _, files in os.walk(root):
        for name in files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, root)] = read_file(path)
    return found


def containerd_compact(options: list[str]) -> tuple[str | None, list[str]]:
    """containerd 1.6's ``compactLowerdirOption`` (mount/mount_linux.go): the
    lowers' longest common string prefix, cut back to a directory, becomes the
    cwd; only ``lowerdir`` is rewritten (upper and work dirs stay absolute)."""
    (index,) = [i for i, o in enumerate(options) if o.startswith("lowerdir=")]
    lowers = options[index].removeprefix("lowerdir=").split(":")
    # A string prefix on purpose: containerd compares characters, not path parts.
    common = os.path.dirname(os.path.commonprefix(lowers)) + "/"  # noqa: RUF071
    if len(lowers) == 1 or common == "/":
        return None, options
    rest = options[:index] + options[index + 1:]
    return common, [*rest, "lowerdir=" + ":".join(lower[len(common):] for lower in lowers)]


def mount_by_mount8(spec: MountSpec, target: str) -> None:
    """Mount a spec as containerd 1.6 does: options past a page get their
    lowers compacted, and the mount runs from their common directory."""
    options, cwd = list(spec.options), None
    if spec.type == "bind":
        subprocess.run(["mount", "--rbind" if "rbind" in options else "--bind", spec.source,
                        target], check=True, capture_output=True)
        if "ro" in options:
            subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True,
                           capture_output=True)
        return
    if len(",".join(options)) >= os.sysconf("SC_PAGE_SIZE") - 1:
        cwd, options = containerd_compact(options)
    fstype = spec.type.removeprefix("fuse3.")
    if fstype != spec.type:  # what mount.fuse3 runs: the helper, -o options, target
        argv = [fstype, "-o", ",".join(options), target]
    else:
        argv = ["mount", "-t", fstype, "-o", ",".join(options), spec.source, target]
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{argv[:4]}…: {result.stderr}"


@pytest.fixture
def target() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="strata-spec-")
    yield path
    while unmount(path):
        pass
    os.rmdir(path)


async def chain(plugin: PluginUnderTest, depth: int) -> list[str]:
    """``depth`` layers, each adding ``f<n>`` and overwriting ``top``."""
    ids, parent = [], ""
    for n in range(depth):
        layer = new_layer_id()
        await plugin.client.create(layer, parent)
        root = await plugin.client.get(layer)
        write_file(os.path.join(root, f"f{n}"), str(n).encode())
        write_file(os.path.join(root, "top"), str(n).encode())
        await plugin.client.put(layer)
        ids.append(layer)
        parent = layer
    return ids


async def specs(plugin: PluginUnderTest, layer: str, read_only: bool) -> list[MountSpec]:
    """The core call, in a thread as the front-ends make it (it reads the disk)."""
    assert plugin.manager is not None
    try:
        return await asyncio.to_thread(plugin.manager.driver.mounts, layer, read_only=read_only)
    except NotSupported as e:
        pytest.skip(f"{plugin.backend}: {e}")


#: Docker stops at 128 layers; containerd compacts lowers past one page itself.
@pytest.mark.parametrize("depth", [1, 3, 130])
async def test_a_mounted_spec_is_the_tree_get_returns(
        plugin: PluginUnderTest, target: str, depth: int) -> None:
    if depth > 3 and plugin.backend not in ("overlay", "fuse-overlayfs"):
        pytest.skip("deep chains only change the spec of the overlay backends")
    ids = await chain(plugin, depth)
    top = ids[-1]
    (spec,) = await specs(plugin, top, read_only=False)
    expected = tree(await plugin.client.get(top))
    await plugin.client.put(top)
    assert expected["top"] == str(depth - 1).encode() and len(expected) == depth + 1
    await asyncio.to_thread(mount_by_mount8, spec, target)
    assert tree(target) == expected
    write_file(os.path.join(target, "written"), b"through the spec")
    await asyncio.to_thread(unmount, target)
    assert read_file(os.path.join(await plugin.client.get(top), "written")) == b"through the spec"
    await plugin.client.put(top)


async def test_a_read_only_spec_cannot_write(plugin: PluginUnderTest, target: str) -> None:
    ids = await chain(plugin, 2)
    view = new_layer_id()
    await plugin.client.create(view, ids[-1])
    (spec,) = await specs(plugin, view, read_only=True)
    await asyncio.to_thread(mount_by_mount8, spec, target)
    assert tree(target) == {"f0": b"0", "f1": b"1", "top": b"1"}
    with pytest.raises(OSError) as refused:
        write_file(os.path.join(target, "nope"), b"x")
    assert refused.value.errno == errno.EROFS
