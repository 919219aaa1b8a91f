"""The two on-disk layouts a layer moves between, and what a layer dir must hold.

overlay2 (moby ``daemon/graphdriver/overlay2/overlay.go``) and strata's overlay
backend (``plugin/backends/overlay.py``) keep the same files per layer
(``diff/``, ``link``, ``lower``, ``work/``, ``merged/``) and the same lower
syntax (``l/<LINK>:l/<LINK>…``, relative to Home); they differ in where the
layer dir sits and so where a short link points::

    overlay2:  Home/<id>/            Home/l/<LINK> -> ../<id>/diff
    strata:    Home/layers/<id>/     Home/l/<LINK> -> ../layers/<id>/diff   (+ meta.json)

A layer's id is the same in both (overlay2's dir name is dockerd's cache-id,
and strata's layer id is whatever dockerd asks for), so dockerd's layer
metadata needs no rewrite, only its directory renamed.  The parent strata keeps
in meta.json is read off the layer itself: the first entry of ``lower`` names
the parent's link.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from plugin.backends.overlay import read_small_file
from plugin.errors import InvalidArgument
from plugin.state.layers import validate_id

_LINK_RE = re.compile(r"[A-Za-z0-9]{1,64}")


@dataclass(frozen=True)
class Layout:
    kind: str                      # "overlay2" or "strata-overlay"
    layers_sub: str                # where layer dirs sit, relative to Home ("" = Home)
    skeleton: tuple[str, ...]      # dirs a fresh Home of this layout gets
    other_entries: frozenset[str]  # Home entries that are not layers

    def layers_dir(self, home: str) -> str:
        return os.path.join(home, self.layers_sub) if self.layers_sub else home

    def layer_dir(self, home: str, layer_id: str) -> str:
        return os.path.join(self.layers_dir(home), layer_id)

    def link_target(self, layer_id: str) -> str:
        return os.path.join("..", *filter(None, [self.layers_sub]), layer_id, "diff")

    def make_skeleton(self, home: str) -> None:
        os.mkdir(home, 0o710)
        for sub in self.skeleton:
            os.mkdir(os.path.join(home, sub), 0o700)


OVERLAY2 = Layout("overlay2", "", ("l",), frozenset({"l", "backingFsBlockDev"}))
STRATA_OVERLAY = Layout("strata-overlay", "layers", ("l", "layers"),
                        frozenset({"l", "layers", "staging", "trash", "refs.json",
                                   "refs.json.log"}))


@dataclass
class Layer:
    link: str
    lowers: list[str]           # the lower chain's link names, top first
    parent: str = ""            # filled by ``resolve_parents``


@dataclass
class Scan:
    layers: dict[str, Layer] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_layer(layer_dir: str) -> Layer | str:
    """The layer's link and lowers, or a sentence saying why it is not a layer."""
    if os.path.islink(layer_dir) or not os.path.isdir(layer_dir):
        return "is not a directory"
    diff = os.path.join(layer_dir, "diff")
    if os.path.islink(diff) or not os.path.isdir(diff):
        return "has no diff/ directory"
    try:
        link = read_small_file(os.path.join(layer_dir, "link"))
        lower = read_small_file(os.path.join(layer_dir, "lower"))
    except (OSError, UnicodeDecodeError) as e:
        return f"has an unreadable link or lower file ({e})"
    if not _LINK_RE.fullmatch(link):
        return f"has no usable link file (found {link[:40]!r})"
    lowers = []
    for entry in filter(None, lower.split(":")):
        head, _, name = entry.partition("/")
        if head != "l" or not _LINK_RE.fullmatch(name):
            return f"has a lower entry {entry[:60]!r} that is not l/<LINK>"
        lowers.append(name)
    return Layer(link=link, lowers=lowers)


def scan(home: str, layout: Layout) -> Scan:
    """Every layer of ``home`` read as ``layout``; what does not fit goes to problems."""
    found = Scan()
    if not os.path.isdir(home):
        return found
    if layout.layers_sub:
        for name in sorted(set(os.listdir(home)) - layout.other_entries):
            found.problems.append(f"{os.path.join(home, name)}: not part of the "
                                  f"{layout.kind} layout")
    layers_dir = layout.layers_dir(home)
    if not os.path.isdir(layers_dir):
        return found
    for name in sorted(os.listdir(layers_dir)):
        if not layout.layers_sub and name in layout.other_entries:
            continue
        path = os.path.join(layers_dir, name)
        try:
            validate_id(name, "layer id")
        except InvalidArgument as e:
            found.problems.append(f"{path}: {e}")
            continue
        layer = read_layer(path)
        if isinstance(layer, str):
            found.problems.append(f"{path} {layer}")
        else:
            found.layers[name] = layer
    return found


def resolve_parents(layers: dict[str, Layer]) -> list[str]:
    """Set each layer's parent from its first lower link; return what does not resolve."""
    owner: dict[str, str] = {}
    problems = []
    for layer_id, layer in sorted(layers.items()):
        if layer.link in owner:
            problems.append(f"layers {owner[layer.link]} and {layer_id} share the link "
                            f"{layer.link}")
        owner.setdefault(layer.link, layer_id)
    for layer_id, layer in sorted(layers.items()):
        missing = [name for name in layer.lowers if name not in owner]
        if missing:
            problems.append(f"layer {layer_id}: its lower names l/{missing[0]}, "
                            "which no layer owns")
            continue
        layer.parent = owner[layer.lowers[0]] if layer.lowers else ""
    return problems
