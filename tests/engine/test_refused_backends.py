"""devicemapper and aufs: dockerd pointed at strata running them fails to start,
and its log carries strata's reason, naming the kernel feature this host lacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.engine import harness
from tests.support.plugin import unique_name

MISSING = {
    "devicemapper": ("device-mapper", "/dev/mapper/control"),
    "aufs": ("aufs", "/proc/filesystems"),
}


@pytest.mark.parametrize("refused", sorted(MISSING))
def test_dockerd_gets_the_missing_feature_named(dockerd_bin: str, workdir: Path,
                                                refused: str) -> None:
    if refused == "devicemapper" and os.path.exists("/dev/mapper/control"):
        pytest.skip("this host has device-mapper")
    with open("/proc/filesystems") as f:
        if refused == "aufs" and "aufs" in f.read().split():
            pytest.skip("this host has aufs")
    plugin = harness.Plugin(name=unique_name("strata-r"), backend=refused,
                            state_dir=workdir / "state", log_path=workdir / "plugin.log")
    plugin.start()
    daemon = harness.Dockerd(driver=plugin.name, workdir=workdir / "d", dockerd_bin=dockerd_bin)
    daemon.workdir.mkdir()
    try:
        with pytest.raises(harness.HarnessError, match="exited"):
            daemon.start(timeout=60)
        log = daemon.log_path.read_text(errors="replace")
        # dockerd's own words, then strata's reason verbatim (docs/protocol.md §2.5)
        assert "Failed to GetDriver graph" in log, log[-3000:]
        feature, evidence = MISSING[refused]
        reason = [line for line in log.splitlines() if "Failed to GetDriver graph" in line][-1]
        assert feature in reason and evidence in reason, reason
    finally:
        daemon.close()
        plugin.close()
