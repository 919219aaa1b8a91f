"""What the plugin and its archive workers agree on, imported by both sides.

A leaf module: the parent side (``stream.py``, ``zygote.py``) and the child side
(``worker.py``) each import it, never each other for these names, so no import
cycle runs through the process boundary.
"""

from __future__ import annotations

#: The module a worker runs as: ``python -m WORKER_MODULE apply|export|zygote``.
WORKER_MODULE = "plugin.archive.proc.worker"
#: How an export worker marks the message of a fatal error on stderr.
FATAL_PREFIX = "FATAL "
