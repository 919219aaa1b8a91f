"""Who owns a directory: a graphdriver Home or a snapshotter root, never both.

The two front-ends keep different records over the same core (dockerd's layer
ids and refcounts; containerd keys in sqlite), and each deletes layers its own
records do not claim (the snapshotter's Cleanup, the graphdriver's fsck).  A
directory served by both would lose layers, so each refuses the other's:

* a snapshotter root holds ``snapshotter.db``; its core Home is a subdirectory;
* a graphdriver Home holds the core's ``layers/`` and ``refs.json`` directly.

The check covers the directory and its ancestors (a Home inside a snapshotter
root, a root inside a Home).  A leaf module: both front-ends import it.
"""

from __future__ import annotations

import os

from plugin.errors import InvalidArgument

SNAPSHOTTER_DB = "snapshotter.db"


def _lineage(path: str) -> list[str]:
    path = os.path.abspath(path)
    found = [path]
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        found.append(path)
    return found


def is_graphdriver_home(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "refs.json"))
            and os.path.isdir(os.path.join(path, "layers"))
            and not os.path.isfile(os.path.join(os.path.dirname(path), SNAPSHOTTER_DB)))


def refuse_graphdriver_state(root: str) -> None:
    """A snapshotter root must hold no graphdriver Home, nor lie inside one."""
    for path in _lineage(root):
        if is_graphdriver_home(path):
            raise InvalidArgument(
                f"snapshotter root {root}: {path} is a graphdriver Home (it holds layers/ and "
                "refs.json); a snapshotter root and a Docker Home never share layers")


def refuse_snapshotter_state(home: str) -> None:
    """A graphdriver Home must not be, or lie inside, a snapshotter root."""
    for path in _lineage(home):
        if os.path.isfile(os.path.join(path, SNAPSHOTTER_DB)):
            raise InvalidArgument(
                f"Home {home}: {path} is a containerd snapshotter root (it holds "
                f"{SNAPSHOTTER_DB}); a snapshotter root and a Docker Home never share layers")
