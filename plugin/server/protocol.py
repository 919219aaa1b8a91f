"""Wire types of the graphdriver plugin protocol, as dockerd 20.10 speaks it.

Field names are the wire names.  Requests decode leniently like Go's
``encoding/json`` (unknown keys ignored); the quirks that matter are recorded
in docs/protocol.md §1.1 and §10:

* ``Opts``/``UIDMaps``/``GIDMaps`` arrive as ``null`` when unset;
* ``Parent``, ``MountLabel``, ``StorageOpt`` are *omitted* when empty;
* IDMap keys are snake_case (the published docs are wrong);
* ``Capabilities`` is nested, not flat (again the docs are wrong).

Responses omit empty fields so that success is ``{}``; an empty 200 body would
make dockerd fail with ``EOF``, so every JSON reply encodes at least ``{}``.
"""

from __future__ import annotations

import msgspec


class _Wire(msgspec.Struct, omit_defaults=True):
    pass


# ---- requests -------------------------------------------------------------


class IDMapWire(_Wire):
    container_id: int
    host_id: int
    size: int


class InitRequest(_Wire):
    Home: str
    Opts: list[str] | None = None
    UIDMaps: list[IDMapWire] | None = None
    GIDMaps: list[IDMapWire] | None = None


class CreateRequest(_Wire):
    ID: str
    Parent: str = ""
    MountLabel: str = ""
    StorageOpt: dict[str, str] | None = None


class IDRequest(_Wire):
    ID: str


class GetRequest(_Wire):
    ID: str
    MountLabel: str = ""


class ParentRequest(_Wire):
    """Diff, Changes and DiffSize: ``Parent`` is omitted for a base layer."""

    ID: str
    Parent: str = ""


# ---- responses ------------------------------------------------------------


class ErrResponse(_Wire):
    Err: str = ""


class ActivateResponse(_Wire):
    Implements: list[str]


class GetResponse(_Wire):
    Dir: str


class ExistsResponse(_Wire):
    Exists: bool


class StatusResponse(_Wire):
    Status: list[tuple[str, str]]


class MetadataResponse(_Wire):
    Metadata: dict[str, str]


class CapabilitiesBody(msgspec.Struct):
    ReproducesExactDiffs: bool = False


class CapabilitiesResponse(_Wire):
    Capabilities: CapabilitiesBody


class ChangeWire(msgspec.Struct):
    Path: str
    Kind: int


class ChangesResponse(msgspec.Struct):
    Changes: list[ChangeWire]


class SizeResponse(msgspec.Struct):
    Size: int
