"""Native Changes for overlay: walk the upper dir only, look paths up in the lowers.

The result is what docker's ``ChangesDirs`` gives on the two *merged* trees
(``plugin.archive.changes``, docs/protocol.md §6.6), entry for entry and in the same
order, without mounting either tree or walking the (possibly huge) lowers:

* only the upper dir (``diff/``) can hold a change, so only it is walked;
* an upper entry absent from the lower view is ADD (and so is all below it);
  one present there is MODIFY when ``ChangesDirs`` would call it different
  (a copy-up alone, e.g. ``chmod`` and back, is no change);
* a whiteout (char 0:0) is DELETE when the lower view has the name; inside an
  opaque directory every lower name the upper does not hold is DELETE;
* a directory holding a change is MODIFY, placed before its children.

The lower view resolves a path the way overlayfs looks it up: a directory's
"merge stack" is the lowers (top first) where it is a directory, cut after an
opaque one; a child is found in the first layer of its parent's stack that has
it, and hidden by a whiteout there.
"""

from __future__ import annotations

import os
import stat

# The comparison must be the very one ChangesDirs uses, or native and naive drift.
from plugin.archive.changes import Change, ChangeKind
from plugin.archive.changes import _capability as capability
from plugin.archive.changes import _stat_different as stat_different
from plugin.errors import StrataError

OPAQUE_XATTR = "trusted.overlay.opaque"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _may_be_whiteout(entry: os.DirEntry[str]) -> bool:
    """False when the directory entry's type (d_type, no stat) rules a whiteout out."""
    return not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)
                or entry.is_symlink())


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


class LowerView:
    """The merged tree of a lower chain, resolved lazily (nothing is mounted)."""

    def __init__(self, lowers: list[str]) -> None:
        self.lowers = lowers  # top first
        self._stacks: dict[str, list[int]] = {}

    def dir_stack(self, rel: str) -> list[int]:
        """Indexes of the lowers that make up directory ``rel`` ('' is the root)."""
        if rel in self._stacks:
            return self._stacks[rel]
        candidates = (range(len(self.lowers)) if not rel
                      else self.dir_stack(os.path.dirname(rel)))
        stack: list[int] = []
        for index in candidates:
            path = os.path.join(self.lowers[index], rel)
            st = _lstat(path)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break  # a whiteout or a non-dir hides the layers below
            stack.append(index)
            if is_opaque(path):
                break
        self._stacks[rel] = stack
        return stack

    def find(self, rel: str) -> tuple[str, os.stat_result] | None:
        """The real path and lstat of ``rel`` in the lower view, or None."""
        for index in self.dir_stack(os.path.dirname(rel)):
            path = os.path.join(self.lowers[index], rel)
            st = _lstat(path)
            if st is None:
                continue
            return None if is_whiteout(st) else (path, st)
        return None

    def names(self, rel: str) -> set[str]:
        """The entries of directory ``rel`` in the lower view."""
        seen: set[str] = set()
        visible: set[str] = set()
        for index in self.dir_stack(rel):
            with os.scandir(os.path.join(self.lowers[index], rel)) as it:
                for entry in it:
                    if entry.name in seen:
                        continue
                    seen.add(entry.name)
                    if not _may_be_whiteout(entry) or not is_whiteout(
                            entry.stat(follow_symlinks=False)):
                        visible.add(entry.name)
        return visible

    def has(self, rel: str) -> bool:
        """Whether the lower view shows ``rel`` (its parent is a directory there)."""
        return self.find(rel) is not None


def overlay_changes(upper: str, lowers: list[str]) -> list[Change]:
    """ChangesDirs(merged upper-over-lowers, merged lowers), from the upper dir alone."""
    out: list[Change] = []
    view = LowerView(lowers)
    try:
        _walk(upper, "", view, in_lower=True, hides_lower=is_opaque(upper), out=out)
    except RecursionError:
        raise StrataError(f"changes: directory tree under {upper} is too deep") from None
    except OSError as exc:
        raise StrataError(f"changes of {upper}: {exc}") from None
    return out


def _walk(upper: str, rel: str, view: LowerView, *, in_lower: bool, hides_lower: bool,
          out: list[Change]) -> None:
    """Changes below directory ``rel``.  ``in_lower``: the lower view has ``rel`` as a
    directory; ``hides_lower``: the merged ``rel`` shows none of the lower entries."""
    present: set[str] = set()
    whiteouts: set[str] = set()
    with os.scandir(os.path.join(upper, rel)) as it:
        entries = sorted(it, key=lambda e: os.fsencode(e.name))
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        if is_whiteout(st):
            whiteouts.add(entry.name)
            continue
        present.add(entry.name)
        child = os.path.join(rel, entry.name)
        below = view.find(child) if in_lower else None
        if below is None:
            out.append(Change("/" + child, ChangeKind.ADD))
            if stat.S_ISDIR(st.st_mode):
                _walk(upper, child, view, in_lower=False, hides_lower=True, out=out)
            continue
        lower_path, lower_st = below
        listed = stat_different(lower_st, st) or capability(lower_path) != capability(entry.path)
        if listed:
            out.append(Change("/" + child, ChangeKind.MODIFY))
        if stat.S_ISDIR(st.st_mode):
            start = len(out)
            lower_is_dir = stat.S_ISDIR(lower_st.st_mode)
            _walk(upper, child, view, in_lower=lower_is_dir,
                  hides_lower=hides_lower or is_opaque(entry.path), out=out)
            if len(out) > start and not listed:
                out.insert(start, Change("/" + child, ChangeKind.MODIFY))
    if not in_lower:
        return
    # Only a directory hiding the lower one needs the lower listing; elsewhere
    # just the whiteouts are looked up (a changed file in a directory of 10k
    # lower entries must not cost 10k stats).
    if hides_lower:
        gone = view.names(rel) - present
    else:
        gone = {name for name in whiteouts if view.has(os.path.join(rel, name))}
    for name in sorted(gone, key=os.fsencode):
        out.append(Change("/" + os.path.join(rel, name), ChangeKind.DELETE))
