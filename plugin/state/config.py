"""The Init call, persisted: dockerd sends Init once per daemon start, never
after a plugin restart, so a restarted strata reloads it from its state dir."""

from __future__ import annotations

import os

import msgspec

from plugin.idtools import IDMap, IDMappings
from plugin.state.files import write_atomic


class InitRecord(msgspec.Struct):
    home: str
    options: list[str]
    uid_maps: list[tuple[int, int, int]]
    gid_maps: list[tuple[int, int, int]]
    backend: str

    @property
    def idmap(self) -> IDMappings:
        return IDMappings(uids=tuple(IDMap(*m) for m in self.uid_maps),
                          gids=tuple(IDMap(*m) for m in self.gid_maps))


def init_path(state_dir: str) -> str:
    return os.path.join(state_dir, "init.json")


def save_init(state_dir: str, record: InitRecord) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    write_atomic(init_path(state_dir), msgspec.json.encode(record))


def load_init(state_dir: str) -> InitRecord | None:
    try:
        with open(init_path(state_dir), "rb") as f:
            return msgspec.json.decode(f.read(), type=InitRecord)
    except FileNotFoundError:
        return None
