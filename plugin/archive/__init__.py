"""Layer tar streams in and out: the one place strata reads and writes layer tars.

* ``changes`` / ``changes_size``: what differs between two trees (docker
  ``ChangesDirs`` / ``ChangesSize``, protocol.md §6.6).
* ``export_tree`` / ``export_changes``: a layer tar of a tree or of its changes,
  produced by a child process and read through a ``TarStream`` (§6.3).
* ``apply_layer``: unpack a layer tar into a directory inside a chrooted child,
  applying whiteouts and opaque directories in aufs or overlay form (§6.2, §6.4).

All of these block; run them in a worker thread.
"""

from plugin.archive.changes import Change, ChangeKind, changes, changes_size
from plugin.archive.proc.stream import (
    ApplyOptions,
    TarStream,
    apply_layer,
    export_changes,
    export_tree,
)

__all__ = [
    "ApplyOptions",
    "Change",
    "ChangeKind",
    "TarStream",
    "apply_layer",
    "changes",
    "changes_size",
    "export_changes",
    "export_tree",
]
