"""strata with a Diff that does no filesystem work: the floor under graphtest's DiffBase.

    STRATA_FLOOR=loop|pool python -m tests.bench.floor_server serve <plugin serve args>

The real server (``plugin serve``: aiohttp, the same handlers, the overlay backend)
except for ``GraphDriver.Diff``, which answers from a tar made once per (layer,
parent) at its first Diff:

* ``loop``: on the event loop, no worker hop (what the HTTP round trip through
  dockerd's plugin client costs on its own);
* ``pool``: after a hop to the worker pool with nothing to do (what STYLE.md
  rule 8, filesystem work off the loop, costs at the least).

``bench_graphtest.py --floor`` runs DiffBase on both beside strata and overlay2, so
the README can say how much of the 3x bar is left for reading three files.  A
benchmark instrument only: a cached Diff would serve nothing real (dockerd never
Diffs an unchanged layer twice).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiohttp import web

import plugin.server.serve as serve_module
from plugin import cli
from plugin.server import protocol as p
from plugin.server.app import CONTEXT, POOLED, PluginHandler, decode, driver_of, handle, run

MODE = os.environ.get("STRATA_FLOOR", "pool")


def _nothing() -> None:
    return None


def _whole_diff(request: web.BaseRequest, layer_id: str, parent: str) -> bytes:
    with driver_of(request).diff(layer_id, parent) as stream:
        whole = stream.whole()
        if whole is None:
            raise SystemExit("floor_server: only small layers (a Diff made in memory)")
        return whole


#: (layer, parent) -> its tar, made at the first Diff.
TARS: dict[tuple[str, str], bytes] = {}


class FloorHandler(PluginHandler):
    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != "/GraphDriver.Diff":
            return await super().__call__(request)
        request[CONTEXT] = self.context
        request[POOLED] = False
        return await handle(request, self._diff, self.context.metrics)

    async def _diff(self, request: web.BaseRequest) -> web.StreamResponse:
        req = await decode(request, p.ParentRequest)
        key = (req.ID, req.Parent)
        tar = TARS.get(key)
        if tar is None:
            tar = TARS[key] = await run(request, _whole_diff, request, req.ID, req.Parent)
        elif MODE == "pool":
            await run(request, _nothing)
        return web.Response(body=tar, headers={"Content-Type": "application/x-tar"})


if __name__ == "__main__":
    if MODE not in ("loop", "pool"):
        raise SystemExit(f"STRATA_FLOOR must be loop or pool, not {MODE!r}")
    serve_module.PluginHandler = FloorHandler  # type: ignore[attr-defined]
    sys.exit(cli.main(sys.argv[1:]))
