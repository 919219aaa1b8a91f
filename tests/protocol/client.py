"""The dockerd-like client now lives in ``tests.support.client``; these names stay
importable from here for the modules that use them."""

from __future__ import annotations

from tests.support.client import HEADERS, SKIP, DockerLikeClient, PluginError

__all__ = ["HEADERS", "SKIP", "DockerLikeClient", "PluginError"]
