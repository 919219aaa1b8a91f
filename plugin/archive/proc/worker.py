"""Child process entry points: ``python -m plugin.archive.proc.worker apply|export``.

Docker runs extraction in a re-exec'd child chrooted into the layer
(``pkg/chrootarchive``); so do we.  The parent (``stream.py``) talks to us over
pipes only:

* ``apply ARGS_JSON``: layer tar on stdin; one JSON line on stdout:
  ``{"size": N}`` or ``{"error": "...", "kind": "InvalidArgument"|"StrataError"}``.
* ``apply-server``: a warm apply worker (``warm.py``) on the Unix socket that is its
  stdin: per job, the args JSON with two descriptors (the tar's pipe, a stderr file);
  it chroots into the layer, extracts, leaves the chroot through a descriptor of the
  real root it opened before its first job, and answers one JSON line (as ``apply``,
  plus ``"retire": true`` when it leaves after this job).
* ``zygote FD``: serve fork requests on the socket FD (``zygote.py``); each
  forked child then runs ``apply`` or ``export`` as above.
* ``export``: one JSON line on stdin (root, changes or null, idmap, whiteout
  format; it can be megabytes, too big for argv), the tar on stdout
  (``export.py``; a big layer of small files gets a helper process, which dies
  with the worker).  A fatal failure exits non-zero after a ``FATAL <message>``
  line on stderr.

Everything the extractor needs is imported at module load, before ``chroot``:
after it the interpreter can no longer find stdlib modules.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Any

from plugin.archive.proc.export import export_layer
from plugin.archive.proc.extract import LayerExtractor
from plugin.archive.proc.wire import FATAL_PREFIX
from plugin.errors import InvalidArgument, StrataError
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")


def _apply(args: dict[str, Any], stdin: int) -> dict[str, Any]:
    root = args["root"]
    idmap = IDMappings.from_json(args["idmap"])
    fmt = args["whiteout_format"]
    try:
        extractor = LayerExtractor("/", idmap, fmt, helper_after=int(args["helper_after"]))
        os.chroot(root)
        os.chdir("/")
        return {"size": extractor.run(stdin)}
    except StrataError as exc:
        kind = "InvalidArgument" if isinstance(exc, InvalidArgument) else "StrataError"
        return {"error": str(exc), "kind": kind}
    except Exception as exc:  # the parent must get a message, not a traceback
        log.exception("applying layer to %s", root)
        return {"error": f"applying layer to {root}: {exc}", "kind": "StrataError"}


#: A warm apply worker leaves after a job that moved more than this: its memory then
#: goes back to the system, and a big layer costs the same as with a fresh worker.
WARM_MAX_BYTES = 8 << 20
_MAX_JOB = 1 << 16


def _serve_applies(control: socket.socket) -> int:
    """``apply-server``: apply jobs one at a time until the plugin closes ``control``.

    Every job is confined as a fresh worker's is: ``_apply`` chroots into the layer
    before it reads the tar.  Between jobs the process leaves that chroot by the
    descriptor of the real root it opened first, which nothing in a job uses (the
    extractor resolves every path inside the chroot); a job that failed, or could not
    be left, ends the process instead of leaving it for the next."""
    real_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    while True:
        message, fds, _, _ = socket.recv_fds(control, _MAX_JOB, 2)
        if not message or len(fds) != 2:
            return 0  # the plugin let go of this worker
        tar_fd, err_fd = fds
        os.dup2(err_fd, 2)
        os.close(err_fd)
        try:
            result = _apply(json.loads(message), tar_fd)
        finally:
            os.close(tar_fd)
            os.fchdir(real_root)
            os.chroot(".")
            os.chdir("/")
        retire = "error" in result or result["size"] > WARM_MAX_BYTES
        sys.stderr.flush()
        control.sendall(json.dumps({**result, "retire": retire}).encode() + b"\n")
        if retire:
            return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s %(message)s")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if len(argv) == 2 and argv[0] == "apply":
        # The reader takes the raw pipe: it buffers itself and splices file bodies.
        result = _apply(json.loads(argv[1]), sys.stdin.fileno())
        stdout.write(json.dumps(result).encode() + b"\n")
        stdout.flush()
        return 0
    if len(argv) == 1 and argv[0] == "export":
        try:
            export_layer(json.loads(stdin.readline()), stdout)
        except BrokenPipeError:
            # The reader went away; keep interpreter shutdown from flushing into the pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
            return 1
        except (StrataError, OSError, ValueError, KeyError) as exc:
            sys.stderr.write(f"{FATAL_PREFIX}{exc}\n")
            return 1
        return 0
    if argv == ["apply-server"]:
        return _serve_applies(socket.socket(fileno=stdin.fileno()))
    if len(argv) == 2 and argv[0] == "zygote":
        from plugin.archive.proc import zygote

        return zygote.main(int(argv[1]), main)
    sys.stderr.write(f"{FATAL_PREFIX}usage: worker apply ARGS_JSON | worker export | "
                     "worker zygote FD\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
