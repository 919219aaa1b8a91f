"""Which snapshots a List filter selects, and where that is worked out.

containerd matches ``~=`` with Go's ``regexp`` (RE2: time linear in the
input).  Python's ``re`` backtracks: ``name~=^(a+)+$`` against a key of 64
``a`` and a ``!`` would hold a worker thread for longer than the universe
has existed, and a thread cannot be stopped.  So a filter with a ``~=``
selector is evaluated in a child process (``python -m
plugin.snapshotter.listing``) killed after :data:`REGEX_DEADLINE` seconds
(``DeadlineExceeded``); every other filter, and the parsing of all of them
(a malformed filter is ``InvalidArgument``), stays in the process.
containerd's own callers (its metadata GC walks the backend unfiltered) never
pay for the child.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from plugin.errors import DeadlineExceeded, StrataError
from plugin.snapshotter.filters import FieldLookup, parse_all
from plugin.snapshotter.metadata import Info, Kind

REGEX_DEADLINE = 5.0


def lookup(info: Info) -> FieldLookup:
    """containerd ``storage.adaptSnapshot``: the fields a List filter can name."""
    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] == "kind":
            return info.kind.name.lower(), True
        if path[0] == "name":
            return info.name, True
        if path[0] == "parent":
            return info.parent, True
        if path[0] == "labels" and info.labels:
            key = ".".join(path[1:])
            return info.labels.get(key, ""), key in info.labels
        return "", False
    return field


def select(infos: Sequence[Info], filters: Sequence[str]) -> list[Info]:
    """The ``infos`` that ``filters`` (containerd's ``ParseAll``) select, in order."""
    matcher = parse_all(filters)
    if not matcher.uses_regex:
        return [info for info in infos if matcher.match(lookup(info))]
    return [infos[i] for i in _select_in_child(infos, filters)]


def _select_in_child(infos: Sequence[Info], filters: Sequence[str]) -> list[int]:
    request = json.dumps({"filters": list(filters),
                          "infos": [[i.name, i.parent, int(i.kind), i.labels] for i in infos]})
    try:
        done = subprocess.run([sys.executable, "-m", "plugin.snapshotter.listing"],
                              input=request.encode(), capture_output=True, check=False,
                              timeout=REGEX_DEADLINE)
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"List filter {filters[0][:200]!r}: a ~= pattern took over "
                               f"{REGEX_DEADLINE:g}s (it backtracks)") from None
    if done.returncode != 0:
        raise StrataError(f"List filter child failed: {done.stderr.decode()[-500:]}")
    chosen: list[int] = json.loads(done.stdout)
    return chosen


def _main() -> None:
    request = json.load(sys.stdin)
    infos = [Info(name, parent, Kind(kind), 0, 0, labels)
             for name, parent, kind, labels in request["infos"]]
    matcher = parse_all(request["filters"])
    json.dump([n for n, info in enumerate(infos) if matcher.match(lookup(info))], sys.stdout)


if __name__ == "__main__":
    _main()
