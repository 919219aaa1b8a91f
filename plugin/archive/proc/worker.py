"""Child process entry points: ``python -m plugin.archive.proc.worker apply|export``.

Docker runs extraction in a re-exec'd child chrooted into the layer
(``pkg/chrootarchive``); so do we.  The parent (``stream.py``) talks to us over
pipes only:

* ``apply ARGS_JSON``: layer tar on stdin; one JSON line on stdout:
  ``{"size": N}`` or ``{"error": "...", "kind": "InvalidArgument"|"StrataError"}``.
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
    if len(argv) == 2 and argv[0] == "zygote":
        from plugin.archive.proc import zygote

        return zygote.main(int(argv[1]), main)
    sys.stderr.write(f"{FATAL_PREFIX}usage: worker apply ARGS_JSON | worker export | "
                     "worker zygote FD\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
