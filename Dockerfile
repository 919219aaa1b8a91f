# strata as a container: for hosts that run their services as containers.
#
#   docker build -t strata .
#   docker run -d --name strata --privileged --pid host \
#       -v /run/docker/plugins:/run/docker/plugins \
#       -v /var/lib/docker:/var/lib/docker:rshared \
#       -v /var/lib/strata:/var/lib/strata \
#       strata serve --backend auto
#
# It must run on an engine other than the one it serves (a dockerd cannot
# start a container before its own storage driver answers), e.g. a system
# containerd/nerdctl or a second dockerd.  --privileged is needed for mounts,
# chroot and device nodes; the data root is shared rshared so that layer
# mounts made inside are visible to the host dockerd.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
        btrfs-progs fuse-overlayfs fuse3 \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY plugin /src/plugin
RUN python3 -m venv /opt/strata && /opt/strata/bin/pip install --no-cache-dir /src \
 && rm -rf /src

ENTRYPOINT ["/opt/strata/bin/strata"]
CMD ["serve", "--backend", "auto"]
