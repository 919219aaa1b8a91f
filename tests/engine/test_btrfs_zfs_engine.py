"""Engine ring, btrfs and zfs only: what the shared ring does not cover.

* ``docker run --storage-opt size=…`` is enforced, a write past it fails
  *inside the container*: btrfs with a qgroup limit on the container's
  subvolume, zfs with the dataset's ``quota`` property (as Docker's drivers).
* zfs-fuse keeps no xattrs (docs/host.md §3): Status says so.
* Each layer really is a subvolume / a dataset of the Home's filesystem.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.engine import harness

pytestmark = pytest.mark.engine

RUN = ("run", "--rm", "--network", "none")


@pytest.fixture(scope="module", params=["btrfs", "zfs"])
def backend(request: pytest.FixtureRequest) -> str:
    # overrides conftest's: this module is about these two backends only
    if harness.INTREE_DRIVER:
        pytest.skip("checks strata's btrfs/zfs backends; nothing to check on an in-tree driver")
    return str(request.param)


def driver_status(stack: harness.Stack) -> dict[str, str]:
    rows = json.loads(stack.docker("info", "--format", "{{json .DriverStatus}}").stdout)
    return {key: value for key, value in rows}


def test_storage_opt_size_is_enforced_inside_a_container(
    stack: harness.Stack, base_image: str
) -> None:
    dd = "dd if=/dev/zero of=/big bs=1M count=40 && sync"
    limited = stack.docker(*RUN, "--storage-opt", "size=20M", base_image, "/bin/sh", "-c", dd,
                           check=False)
    assert limited.returncode != 0, limited.stdout + limited.stderr
    assert "Disk quota exceeded" in limited.stderr or "No space left" in limited.stderr, (
        limited.stderr)
    # the same write without a limit succeeds: the limit is what stopped it
    unlimited = stack.docker(*RUN, base_image, "/bin/sh", "-c", dd, check=False)
    assert unlimited.returncode == 0, unlimited.stderr
    # and a write under the limit succeeds with it
    small = stack.docker(*RUN, "--storage-opt", "size=20M", base_image, "/bin/sh", "-c",
                         "dd if=/dev/zero of=/small bs=1M count=5 && sync", check=False)
    assert small.returncode == 0, small.stderr
    if stack.plugin is not None and stack.plugin.backend == "btrfs":
        assert driver_status(stack)["Quotas"] == "enabled"


def test_layers_are_native_objects(stack: harness.Stack, base_image: str) -> None:
    assert stack.plugin is not None
    layers = stack.dockerd.home / "layers"
    ids = sorted(os.listdir(layers))
    assert ids, "the imported image has at least one layer"
    status = driver_status(stack)
    if stack.plugin.backend == "btrfs":
        assert all(os.stat(layers / i / "root").st_ino == 256 for i in ids)  # subvolume roots
        assert status["Backing Filesystem"] == "btrfs"
    else:
        names = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", status["Parent Dataset"]],
                               capture_output=True, text=True, check=True).stdout.split()
        assert {f"{status['Parent Dataset']}/{i}" for i in ids} <= set(names)
        assert "no xattrs" in status["Xattrs"]
