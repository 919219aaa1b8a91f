"""Layer tar streams in and out: the one place strata reads and writes layer tars.

* ``changes`` / ``changes_size``: what differs between two trees (docker
  ``ChangesDirs`` / ``ChangesSize``, docs/protocol.md §6.6).
* ``export_tree`` / ``export_changes``: a layer tar of a tree or of its changes,
  produced by a child process and read through a ``TarStream`` (§6.3); a small
  layer is made in memory by the calling thread instead (``MemoryTarStream``);
  ``export_tree_if_small`` only ever does that (None for a larger tree).
* ``apply_layer``: unpack a layer tar into a directory inside a chrooted child,
  applying whiteouts and opaque directories in aufs or overlay form (§6.2, §6.4).

All of these block; run them in a worker thread.

Who runs what (``tar/`` is the tar format alone, ``proc/`` the processes below)::

    plugin process (threads; never forks)   changes(), proc/stream.py,
      |                                     export_to_memory() of a small layer
      | Popen once: python -m plugin.archive.proc.worker zygote FD
      | control socketpair: argv JSON + 4 fds by SCM_RIGHTS (stdin pipe, stdout
      |   pipe, stderr temp file, a status socketpair: pid, then exit code)
      v
    zygote (worker.py has imported every job; proc/zygote.py)
      | fork per job, reaped by pidfd (no zygote: Popen of the worker per job)
      +-> apply worker: tar on its stdin pipe, chroot(layer), proc/extract.py,
      |     one JSON line on stdout
      |     +-> fork: file helper, in the same chroot (proc/filehelper.py):
      |           small files over a pipe, sync replies over a second pipe
      +-> export worker, not chrooted (proc/export.py): tar on its stdout pipe,
            read by TarStream; FATAL line on stderr on failure
            +-> fork: export helper (dies with it): chunks and replies over a
                  socketpair, tar bytes over its own pipe, spliced in by the worker
"""

from plugin.archive.changes import Change, ChangeKind, changes, changes_size
from plugin.archive.proc.stream import (
    ApplyOptions,
    TarStream,
    apply_layer,
    export_changes,
    export_tree,
    export_tree_if_small,
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
    "export_tree_if_small",
]
