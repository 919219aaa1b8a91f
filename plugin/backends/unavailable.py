"""devicemapper and aufs: known names this kernel cannot carry.

Docker's devicemapper needs the kernel's device-mapper (``/dev/mapper/control``,
``CONFIG_BLK_DEV_DM``) and aufs needs the out-of-tree aufs module; neither is in
this host's kernel and modules cannot be loaded (``CONFIG_MODULES`` unset).
Init answers with a prerequisites error naming what is missing; there is no
pretend implementation behind these names.
"""

from __future__ import annotations

import os

from plugin.driver.base import Driver
from plugin.driver.probes import filesystems
from plugin.errors import NotSupported, Prerequisites
from plugin.idtools import IDMappings


def devicemapper_init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    if not os.path.exists("/dev/mapper/control"):
        raise Prerequisites(
            "devicemapper: the kernel has no device-mapper support (/dev/mapper/control is "
            "missing; needs CONFIG_BLK_DEV_DM and dm-thin-pool); use overlay or btrfs instead")
    raise NotSupported("devicemapper: this strata version has no devicemapper backend "
                       "(Docker itself removed devicemapper in 25.0)")


def aufs_init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    if "aufs" not in filesystems():
        raise Prerequisites(
            "aufs: the kernel does not support aufs (no 'aufs' in /proc/filesystems; it needs "
            "the out-of-tree aufs module); use overlay instead")
    raise NotSupported("aufs: this strata version has no aufs backend "
                       "(Docker itself removed aufs in 24.0)")
