"""Kubernetes' CRI on strata: containerd 1.6's CRI plugin with ``snapshotter = "strata"``,
driven through its gRPC socket as a kubelet would (issue 18).

One private containerd for the module (``tests/containerd/ctrd.py`` with its CRI plugin
on, README's Kubernetes row as its config), strata's snapshotter on overlay beside it, and
a CRI client made from kubernetes/cri-api's ``api.proto`` (``tests/containerd/cri``).
No registry: the sandbox image and busybox (``build_cri_images``) are imported with ``ctr
-n k8s.io images import --snapshotter strata``, and CRI must see them.  No CNI: the pod
shares the node's network.  The flow: a pod sandbox, a container that writes into its
rootfs and reads it back (its CRI log file checked), a long-running one written to by
ExecSync while the namespace's mount table shows its rootfs as strata's overlay, then
every removal, and last containerd's GC leaves strata with no snapshot and no layer.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from grpclib.client import Channel, UnaryUnaryMethod

from tests.containerd.cri import api_pb2
from tests.containerd.cri.api_grpc import ImageServiceStub, RuntimeServiceStub
from tests.containerd.ctrd import PrivateContainerd, containerd_unavailable
from tests.containerd.images import BUSYBOX, PAUSE, CriImageSet, build_cri_images
from tests.support.mounts import Mount, mountinfo, mounts_under
from tests.support.procs import pid_alive, terminate_pid, wait_for
from tests.support.workdir import new_workdir, remove_workdir

BACKEND = "overlay"
K8S = ("-n", "k8s.io")  # the containerd namespace CRI keeps its images and containers in
SNAP = (*K8S, "snapshots", "--snapshotter", "strata")
CALL_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0
GC_TIMEOUT = 30.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class CriClient:
    """The two CRI services over containerd's socket, called synchronously from a loop
    of the client's own (the tests read as a kubelet's sequence of calls)."""

    def __init__(self, socket: str) -> None:
        self.loop = asyncio.new_event_loop()

        async def connect() -> Channel:
            return Channel(path=socket)

        self.channel = self.loop.run_until_complete(connect())
        self.runtime = RuntimeServiceStub(self.channel)
        self.images = ImageServiceStub(self.channel)

    def call(self, method: UnaryUnaryMethod[Req, Resp], request: Req) -> Resp:
        return self.loop.run_until_complete(method(request, timeout=CALL_TIMEOUT))

    def close(self) -> None:
        self.channel.close()
        self.loop.close()


@dataclass
class CriRing:
    ctrd: PrivateContainerd
    images: CriImageSet
    client: CriClient
    cgroup_parent: str  # the pods' cgroup parent, in every hierarchy; removed at the end

    def snapshots(self) -> dict[str, tuple[str, str]]:
        """``ctr -n k8s.io snapshots --snapshotter strata ls``: key -> (parent, kind)."""
        lines = self.ctrd.ctr(*SNAP, "ls").stdout.decode().splitlines()[1:]
        listed = {}
        for line in lines:
            key, *rest = line.split()
            parent, kind = (rest if len(rest) == 2 else ["", rest[0]])
            listed[key] = (parent, kind)
        return listed

    def container_state(self, container_id: str) -> api_pb2.ContainerStatus:
        return self.client.call(self.client.runtime.ContainerStatus,
                                api_pb2.ContainerStatusRequest(container_id=container_id)).status

    def ns_mounts(self, marker: str) -> list[Mount]:
        """The private namespace's mounts whose mount point contains ``marker``."""
        assert self.ctrd.ns is not None
        return [m for m in mountinfo(f"/proc/{self.ctrd.ns.proc.pid}/mountinfo")
                if marker in m.mountpoint]

    def rootfs_mount(self, container_id: str) -> str:
        """The overlay options the shim mounted ``container_id``'s rootfs with, read from the
        private namespace's mount table."""
        found = self.ns_mounts(f"/k8s.io/{container_id}/rootfs")
        assert len(found) == 1, (container_id, found)
        assert found[0].fstype == "overlay", found
        return found[0].super_options


def _cgroup_dirs(parent: str) -> list[str]:
    """Where a cgroupfs driver puts ``parent`` (one per v1 hierarchy, or the v2 one)."""
    roots = {m.mountpoint for m in mountinfo() if m.fstype in ("cgroup", "cgroup2")}
    return [root + parent for root in sorted(roots) if os.path.isdir(root + parent)]


def remove_pod_cgroups(parent: str) -> None:
    """End what a failed test left running in the pods' cgroups (a container's process
    lives in a mount namespace of its own, so ending the namespace's members misses it;
    the cgroup, unique to this run, names it), then remove the cgroups, leaves first."""
    dirs = _cgroup_dirs(parent)
    for top in dirs:
        for where, _, _ in os.walk(top):
            with open(os.path.join(where, "cgroup.procs")) as procs:
                for pid in procs.read().split():
                    terminate_pid(int(pid), timeout=1.0)  # a pid 1 ignores SIGTERM
    for top in dirs:
        for where, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            os.rmdir(where)


@pytest.fixture(scope="module")
def ring() -> Iterator[CriRing]:
    reason = containerd_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = new_workdir("scri")
    root = str(workdir / "sroot")
    ctrd = PrivateContainerd(workdir, root, BACKEND, sandbox_image=PAUSE)
    cgroup_parent = f"/strata-cri-{secrets.token_hex(4)}"
    client: CriClient | None = None
    pids: list[int] = []
    try:
        ctrd.start_or_skip()
        images = build_cri_images(workdir)
        client = CriClient(ctrd.socket)
        yield CriRing(ctrd, images, client, cgroup_parent)
    finally:
        if client is not None:
            client.close()
        if ctrd.ns is not None:
            pids = [p.pid for p in (ctrd.containerd, ctrd.strata) if p] + ctrd.ns.members()
        try:
            ctrd.close()
            remove_pod_cgroups(cgroup_parent)
        finally:
            leaked = mounts_under(root) + mounts_under(workdir)
            remove_workdir(workdir)
        assert not leaked, f"mounts left in the host namespace: {leaked}"
        assert not [p for p in pids if pid_alive(p)], f"processes left: {pids}"


# ---- images -------------------------------------------------------------------------------

def test_cri_serves_runtime_v1(ring: CriRing) -> None:
    version = ring.client.call(ring.client.runtime.Version, api_pb2.VersionRequest())
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1"), version
    status = ring.client.call(ring.client.runtime.Status, api_pb2.StatusRequest()).status
    ready = {c.type: c.status for c in status.conditions}
    assert ready["RuntimeReady"], status  # NetworkReady is false: no CNI, hence host network


def test_imported_images_are_seen_by_cri(ring: CriRing) -> None:
    ring.ctrd.ctr(*K8S, "images", "import", "--snapshotter", "strata", str(ring.images.tar))

    def tags() -> set[str]:
        listed = ring.client.call(ring.client.images.ListImages, api_pb2.ListImagesRequest())
        return {tag for image in listed.images for tag in image.repo_tags}

    wait_for(lambda: tags() == {BUSYBOX, PAUSE}, "CRI to list both images", CALL_TIMEOUT)
    for ref in (BUSYBOX, PAUSE):
        status = ring.client.call(ring.client.images.ImageStatus,
                                  api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)))
        assert status.image.repo_tags == [ref] and status.image.size > 0, status
    # unpacked into strata, under containerd's k8s.io namespace: <namespace>/<seq>/<name>
    (chain_id,) = ring.images.busybox.chain_ids
    assert ring.snapshots() == {chain_id: ("", "Committed")}
    assert [k.split("/")[0::2] for k in ring.ctrd.rows()] == [["k8s.io", chain_id]]


# ---- a pod --------------------------------------------------------------------------------

def _sandbox_config(ring: CriRing, log_dir: Path) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="strata-pod", uid=secrets.token_hex(8),
                                            namespace="strata-test"),
        log_directory=str(log_dir),
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=ring.cgroup_parent,
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE))))


def _create(ring: CriRing, sandbox_id: str, sandbox: api_pb2.PodSandboxConfig, name: str,
            command: list[str]) -> str:
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                     image=api_pb2.ImageSpec(image=BUSYBOX), command=command,
                                     log_path=f"{name}.log")
    request = api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config,
                                             sandbox_config=sandbox)
    created = ring.client.call(ring.client.runtime.CreateContainer, request)
    ring.client.call(ring.client.runtime.StartContainer,
                     api_pb2.StartContainerRequest(container_id=created.container_id))
    return created.container_id


def _log_lines(path: Path) -> list[str]:
    """The messages of a CRI log file (``<time> <stream> <F|P> <message>`` per line)."""
    return [line.split(" ", 3)[3] for line in path.read_text().splitlines()]


def test_pod_runs_on_strata(ring: CriRing) -> None:
    (chain_id,) = ring.images.busybox.chain_ids
    calls_before = len(ring.ctrd.calls())
    log_dir = ring.ctrd.workdir / f"pod-logs-{secrets.token_hex(3)}"
    log_dir.mkdir()
    sandbox = _sandbox_config(ring, log_dir)
    sandbox_id = ring.client.call(ring.client.runtime.RunPodSandbox,
                                  api_pb2.RunPodSandboxRequest(config=sandbox)).pod_sandbox_id
    # the sandbox's rootfs is an active snapshot of strata's, on the image's layer
    assert ring.snapshots().get(sandbox_id) == (chain_id, "Active"), ring.snapshots()
    assert f"upperdir={ring.ctrd.strata_root}/" in ring.rootfs_mount(sandbox_id)

    writer = _create(ring, sandbox_id, sandbox, "writer", [
        "sh", "-c", "echo written-inside > /root/new && cat /root/new && cat /etc/motd "
        "&& awk '$5 == \"/\"' /proc/self/mountinfo"])
    wait_for(lambda: ring.container_state(writer).state == api_pb2.CONTAINER_EXITED,
             "the writer container to exit", EXIT_TIMEOUT)
    state = ring.container_state(writer)
    assert (state.exit_code, state.reason) == (0, "Completed"), state
    log = log_dir / "writer.log"
    wait_for(lambda: log.exists() and len(_log_lines(log)) >= 3, "the writer's log", CALL_TIMEOUT)
    written, motd, rootfs = _log_lines(log)
    assert (written, motd) == ("written-inside", "hello from motd"), rootfs
    fields = rootfs.split()
    assert fields[fields.index("-") + 1] == "overlay", rootfs
    assert f"upperdir={ring.ctrd.strata_root}/{BACKEND}/layers/" in rootfs, rootfs

    sleeper = _create(ring, sandbox_id, sandbox, "sleeper", ["sleep", "inf"])
    wait_for(lambda: ring.container_state(sleeper).state == api_pb2.CONTAINER_RUNNING,
             "the sleeper container to run", EXIT_TIMEOUT)
    assert f"upperdir={ring.ctrd.strata_root}/" in ring.rootfs_mount(sleeper)
    executed = ring.client.call(ring.client.runtime.ExecSync, api_pb2.ExecSyncRequest(
        container_id=sleeper, timeout=30,
        cmd=["sh", "-c", "echo by-exec > /tmp/e && cat /tmp/e /etc/motd"]))
    assert (executed.exit_code, executed.stdout) == (0, b"by-exec\nhello from motd\n"), executed
    assert {k for k, (parent, kind) in ring.snapshots().items()
            if (parent, kind) == (chain_id, "Active")} == {sandbox_id, writer, sleeper}

    ring.client.call(ring.client.runtime.StopContainer,
                     api_pb2.StopContainerRequest(container_id=sleeper, timeout=0))
    for container_id in (writer, sleeper):
        ring.client.call(ring.client.runtime.RemoveContainer,
                         api_pb2.RemoveContainerRequest(container_id=container_id))
    ring.client.call(ring.client.runtime.StopPodSandbox,
                     api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    ring.client.call(ring.client.runtime.RemovePodSandbox,
                     api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    pods = ring.client.call(ring.client.runtime.ListPodSandbox, api_pb2.ListPodSandboxRequest())
    assert not pods.items, pods

    ring.ctrd.sync_gc()
    wait_for(lambda: ring.snapshots() == {chain_id: ("", "Committed")},
             "containerd's GC to remove the pod's three active snapshots", GC_TIMEOUT)
    wait_for(lambda: [k.rsplit("/", 1)[1] for k in ring.ctrd.rows()] == [chain_id],
             "strata's Remove of them", GC_TIMEOUT)  # containerd's metadata goes first
    calls = ring.ctrd.calls()[calls_before:]
    # CRI used the layer the import unpacked (no unpack again: no Commit), and every
    # call strata answered succeeded
    assert not [c for c in calls if c[0] == "Commit" or c[2] != "ok"], calls
    assert len([c for c in calls if c[0] == "Remove"]) == 3, calls
    for pod_object in (sandbox_id, writer, sleeper):  # rootfs, and the sandbox's /dev/shm
        assert not ring.ns_mounts(pod_object), ring.ns_mounts(pod_object)


# ---- removal: last, it empties the store --------------------------------------------------

def test_remove_image_then_gc_leaves_nothing(ring: CriRing) -> None:
    for ref in (BUSYBOX, PAUSE):
        ring.client.call(ring.client.images.RemoveImage,
                         api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)))
    listed = ring.client.call(ring.client.images.ListImages, api_pb2.ListImagesRequest()).images
    assert not listed, listed
    ring.ctrd.sync_gc()
    wait_for(lambda: not ring.ctrd.rows(), "strata's records to empty", GC_TIMEOUT)
    assert ring.snapshots() == {}
    assert ring.ctrd.layer_dirs() == []
