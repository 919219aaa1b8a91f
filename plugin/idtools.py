"""UID/GID mappings as dockerd passes them in Init (``--userns-remap``).

A mapping translates a container ID to a host ID:
``host = host_id + (id - container_id)`` for the range that contains ``id``.
Layers on disk hold host IDs; layer tars hold container IDs.  With no maps
both are the identity.  Model: moby ``pkg/idtools/idtools.go``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plugin.errors import InvalidArgument


@dataclass(frozen=True)
class IDMap:
    container_id: int
    host_id: int
    size: int


def _translate(ident: int, maps: tuple[IDMap, ...], *, to_host: bool) -> int:
    if not maps:
        return ident
    for m in maps:
        src, dst = (m.container_id, m.host_id) if to_host else (m.host_id, m.container_id)
        if src <= ident < src + m.size:
            return dst + (ident - src)
    side = "container" if to_host else "host"
    raise InvalidArgument(f"{side} id {ident} is not covered by the id mappings")


@dataclass(frozen=True)
class IDMappings:
    uids: tuple[IDMap, ...] = field(default_factory=tuple)
    gids: tuple[IDMap, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not self.uids and not self.gids

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        return (_translate(uid, self.uids, to_host=True), _translate(gid, self.gids, to_host=True))

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        return (_translate(uid, self.uids, to_host=False),
                _translate(gid, self.gids, to_host=False))

    def root_pair(self) -> tuple[int, int]:
        """Host uid/gid of container root: the owner of every layer's top directory."""
        return self.to_host(0, 0)

    def to_json(self) -> dict[str, list[list[int]]]:
        return {
            "uids": [[m.container_id, m.host_id, m.size] for m in self.uids],
            "gids": [[m.container_id, m.host_id, m.size] for m in self.gids],
        }

    @classmethod
    def from_json(cls, data: dict[str, list[list[int]]]) -> IDMappings:
        return cls(
            uids=tuple(IDMap(*row) for row in data.get("uids", [])),
            gids=tuple(IDMap(*row) for row in data.get("gids", [])),
        )
