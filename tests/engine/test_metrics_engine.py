"""Metrics scraped while a real dockerd works: each number moves by what Docker did.

dockerd 20.10 on the plugin (vfs), metrics on a unix socket set through the
environment (``STRATA_METRICS_SOCKET``, as a unit's ``Environment=`` would):

* ``docker load`` of an image saved with N layers: N Creates, N ApplyDiffs, and
  ApplyDiff's bytes in are exactly the N ``layer.tar`` sizes in the saved archive;
* ``docker commit``: one Diff streamed straight into one ApplyDiff, so the bytes
  out and in move by the same amount;
* a running container holds Get references; once it is removed they are back to 0;
* layers follow ``rmi`` and ``load``.
"""

from __future__ import annotations

import json
import secrets
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine import harness
from tests.engine.rootfs import Rootfs

IMAGE = "strata-metrics:3"


class Scraper:
    """``GET /metrics`` over the unix socket, parsed into {(name, labels): value}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(self.path))
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := conn.recv(1 << 16):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples}


def calls(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], op: str) -> float:
    return samples.get(("strata_calls_total", (("op", f"GraphDriver.{op}"),)), 0.0)


def tar_bytes(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
              direction: str) -> float:
    return samples[("strata_layer_tar_bytes_total", (("direction", direction),))]


def gauge(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return samples[(name, ())]


@pytest.fixture
def metered(dockerd_bin: str) -> Iterator[tuple[harness.Stack, Scraper]]:
    path = Path(f"/tmp/sm-{secrets.token_hex(4)}.sock")
    stack = harness.start_stack(dockerd_bin, "vfs",
                                plugin_env={"STRATA_METRICS_SOCKET": str(path)})
    try:
        yield stack, Scraper(path)
    finally:
        stack.close()
        path.unlink(missing_ok=True)


def saved_layer_sizes(archive: Path) -> list[int]:
    """The sizes of the layer tars ``docker save`` wrote, in the image's order."""
    with tarfile.open(archive) as saved:
        manifest_file = saved.extractfile("manifest.json")
        assert manifest_file is not None
        manifest = json.load(manifest_file)
        return [saved.getmember(name).size for name in manifest[0]["Layers"]]


def test_metrics_follow_docker(metered: tuple[harness.Stack, Scraper], rootfs: Rootfs,
                               workdir: Path) -> None:
    stack, scrape = metered
    start = scrape()
    assert gauge(start, "strata_layers") == 0

    stack.docker("import", str(rootfs.tar), "strata-metrics:1")
    imported = scrape()
    assert calls(imported, "Create") - calls(start, "Create") == 1
    assert calls(imported, "ApplyDiff") - calls(start, "ApplyDiff") == 1
    assert tar_bytes(imported, "in") - tar_bytes(start, "in") > 0
    assert gauge(imported, "strata_layers") == 1

    # Two commits: each streams the container's Diff into a new layer's ApplyDiff.
    image = "strata-metrics:1"
    for step in (1, 2):
        before = scrape()
        name = f"m{step}-{secrets.token_hex(3)}"
        stack.docker("run", "--name", name, "--network", "none", image, "/bin/sh", "-c",
                     f"head -c {step * 100_000} /dev/urandom > /payload{step}")
        image = IMAGE if step == 2 else "strata-metrics:2"
        stack.docker("commit", name, image)
        stack.docker("rm", name)
        after = scrape()
        assert calls(after, "Diff") - calls(before, "Diff") == 1
        sent = tar_bytes(after, "out") - tar_bytes(before, "out")
        assert sent > step * 100_000
        assert tar_bytes(after, "in") - tar_bytes(before, "in") == sent

    archive = workdir / "saved.tar"
    stack.docker("save", "-o", str(archive), IMAGE)
    sizes = saved_layer_sizes(archive)
    assert len(sizes) == 3
    stack.docker("rmi", IMAGE, "strata-metrics:2", "strata-metrics:1")
    emptied = scrape()
    assert gauge(emptied, "strata_layers") == 0
    assert gauge(emptied, "strata_references") == 0

    stack.docker("load", "-i", str(archive))
    loaded = scrape()
    assert calls(loaded, "Create") - calls(emptied, "Create") == 3
    assert calls(loaded, "ApplyDiff") - calls(emptied, "ApplyDiff") == 3
    assert tar_bytes(loaded, "in") - tar_bytes(emptied, "in") == sum(sizes)
    assert gauge(loaded, "strata_layers") == 3

    name = f"run-{secrets.token_hex(3)}"
    stack.docker("run", "-d", "--name", name, "--network", "none", IMAGE, "/bin/sleep", "300")
    running = scrape()
    assert gauge(running, "strata_references") >= 1
    assert gauge(running, "strata_layers") == 5  # plus the container's init and rw layers
    stack.docker("rm", "-f", name)
    stopped = scrape()
    assert gauge(stopped, "strata_references") == 0
    assert gauge(stopped, "strata_layers") == 3
    errors = [v for (n, _), v in stopped.items() if n == "strata_call_errors_total"]
    assert errors and sum(errors) == 0
