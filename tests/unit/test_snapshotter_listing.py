"""plugin.snapshotter.listing: a List filter selects the same snapshots in the
process and in the child that ``~=`` runs in, and a backtracking pattern is cut
off at the deadline instead of holding a thread."""

from __future__ import annotations

import time

import pytest

from plugin.errors import DeadlineExceeded, InvalidArgument
from plugin.snapshotter import listing
from plugin.snapshotter.metadata import Info, Kind

INFOS = [Info("ns/a", "", Kind.COMMITTED, 0, 0, {"containerd.io/gc.root": "x"}),
         Info("ns/b", "ns/a", Kind.ACTIVE, 0, 0, {}),
         Info("other/c é\x00", "ns/a", Kind.VIEW, 0, 0, {"k": "v"})]


@pytest.mark.parametrize(("filters", "names"), [
    ([], ["ns/a", "ns/b", "other/c é\x00"]),
    (["kind==active"], ["ns/b"]),
    (["name~=^ns/"], ["ns/a", "ns/b"]),
    (['name~="é"', "kind==committed"], ["ns/a", "other/c é\x00"]),
    (['labels."containerd.io/gc.root"'], ["ns/a"]),
    (["parent~=a$,kind!=view"], ["ns/b"]),
    (["name~=(["], []),  # a pattern that does not compile matches nothing, as in containerd
])
def test_select(filters: list[str], names: list[str]) -> None:
    assert [i.name for i in listing.select(INFOS, filters)] == names


def test_malformed_filter_is_refused_in_process() -> None:
    with pytest.raises(InvalidArgument):
        listing.select(INFOS, ["name=="])


def test_backtracking_pattern_meets_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "REGEX_DEADLINE", 1.0)
    infos = [Info("a" * 64 + "!", "", Kind.ACTIVE, 0, 0, {})]
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        listing.select(infos, ["name~=^(a+)+$"])
    assert time.monotonic() - start < 10
