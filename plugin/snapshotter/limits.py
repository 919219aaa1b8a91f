"""What one snapshotter request may carry: containerd's own limits, so that
nothing containerd sends is refused and nothing it could not send is kept.

* A key, name or parent of at most :data:`MAX_KEY` bytes (UTF-8): containerd
  keeps every snapshot key as a bolt key (its metadata store and
  ``snapshots/storage``), and bolt refuses keys past ``MaxKeySize``, so a longer
  one never comes from containerd.  Longer is ``InvalidArgument``.
* A label's key plus value of at most :data:`MAX_LABEL` bytes: containerd's
  ``labels.Validate``, which its metadata snapshotter runs on Prepare, View,
  Commit and Update.  Longer is ``InvalidArgument``.
* All labels of one snapshot together at most :data:`MAX_LABELS_TOTAL` bytes:
  List answers in blocks of 100 snapshots (``service.LIST_BATCH``) and
  containerd reads at most :data:`MAX_MESSAGE` per message; 100 snapshots of
  a 32 KiB name, a 32 KiB parent and 64 KiB of labels make 12.5 MiB, so no
  stored snapshot can make List unreadable for containerd.  containerd hands
  a backend only its ``containerd.io/snapshot/`` labels (a handful), so this
  refuses no real client.  More is ``ResourceExhausted``.
* A gRPC message of at most :data:`MAX_MESSAGE` bytes: containerd's
  ``defaults.DefaultMaxRecvMsgSize``.  More is ``RESOURCE_EXHAUSTED``, as
  grpc-go answers, checked before the body is read (``service``).
"""

from __future__ import annotations

from collections.abc import Mapping

from plugin.errors import InvalidArgument, ResourceExhausted

MAX_KEY = 32 << 10
MAX_LABEL = 4096
MAX_LABELS_TOTAL = 64 << 10
MAX_MESSAGE = 16 << 20


def _shown(text: str) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def check_key(key: str, what: str = "key") -> None:
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY:
        raise InvalidArgument(f"snapshot {what} {_shown(key)} is {size} bytes; "
                              f"at most {MAX_KEY} (bolt's MaxKeySize)")


def check_labels(labels: Mapping[str, str]) -> None:
    total = 0
    for key, value in labels.items():
        size = len(key.encode("utf-8", "surrogatepass")) + \
            len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_LABEL:
            raise InvalidArgument(f"label key and value greater than maximum size "
                                  f"({MAX_LABEL} bytes), key: {_shown(key)}")
        total += size
    if total > MAX_LABELS_TOTAL:
        raise ResourceExhausted(f"{len(labels)} labels of {total} bytes in all; "
                                f"a snapshot keeps at most {MAX_LABELS_TOTAL} bytes of labels")
