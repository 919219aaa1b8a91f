# strata's image: the rootfs of the managed (v2) Docker plugin, or a container.
#
# As a managed plugin (README, "As a managed Docker plugin"), on a dockerd that
# still runs on another storage driver:
#
#   docker build -t strata .
#   strata plugin-create strata --image strata && docker plugin enable strata
#   # then restart dockerd with --experimental --storage-driver strata
#
# As a plain container, for hosts that run their services as containers:
#
#   docker run -d --name strata --privileged --pid host \
#       -v /run/docker/plugins:/run/docker/plugins \
#       -v /var/lib/docker:/var/lib/docker:rshared \
#       -v /var/lib/strata:/var/lib/strata \
#       strata serve --backend auto
#
# The plain container must run on an engine other than the one it serves (a
# dockerd cannot start a container before its own storage driver answers),
# e.g. a system containerd/nerdctl or a second dockerd. --privileged is needed
# for mounts, chroot and device nodes; the data root is shared rshared so that
# layer mounts made inside are visible to the host dockerd.
#
# Backends in this image: overlay, btrfs (a btrfs data root), vfs. No zfs
# (no zfsutils), no fuse-overlayfs: its FUSE daemons would die with the container
# on every restart, taking the running containers' root filesystems with them.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY plugin /src/plugin
# pip and setuptools only install; the running plugin needs neither.
RUN python3 -m venv /opt/strata \
 && /opt/strata/bin/pip install --no-cache-dir /src \
 && /opt/strata/bin/pip uninstall -y -q pip setuptools

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/strata /opt/strata

ENTRYPOINT ["/opt/strata/bin/strata"]
CMD ["serve", "--backend", "auto"]
