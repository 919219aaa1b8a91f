"""The second front-end: containerd's snapshots API (a ``[proxy_plugins]``
snapshotter over gRPC) on the same storage core as the graphdriver server.

This package's root imports nothing: the CLI reads :data:`BACKENDS` from it
without loading gRPC.
"""

#: The core backends whose layers containerd can mount from a spec.  zfs stays
#: graphdriver-only: zfs-fuse has no filesystem type a mount spec can name (its
#: layers are mounted by setting a dataset property), so its ``mounts`` refuses.
BACKENDS = ["overlay", "vfs", "btrfs", "fuse-overlayfs"]
