from tests.backends import btrfs_fs, zfs_pool  # noqa: F401 (fixtures: Homes on btrfs and zfs)
