from __future__ import annotations

import pytest

from plugin.errors import InvalidArgument
from plugin.idtools import IDMap, IDMappings


def test_identity_without_maps() -> None:
    m = IDMappings()
    assert m.empty and m.to_host(5, 6) == (5, 6) and m.to_container(5, 6) == (5, 6)


def test_ranges_translate_both_ways() -> None:
    m = IDMappings(uids=(IDMap(0, 100000, 1000), IDMap(1000, 5000, 10)),
                   gids=(IDMap(0, 200000, 65536),))
    assert m.to_host(0, 0) == (100000, 200000)
    assert m.to_host(1005, 7) == (5005, 200007)
    assert m.to_container(100999, 265535) == (999, 65535)
    assert m.root_pair() == (100000, 200000)
    assert IDMappings.from_json(m.to_json()) == m


def test_unmapped_id_is_an_error() -> None:
    m = IDMappings(uids=(IDMap(0, 100000, 10),), gids=(IDMap(0, 100000, 10),))
    with pytest.raises(InvalidArgument, match="container id 10"):
        m.to_host(10, 0)
    with pytest.raises(InvalidArgument, match="host id 5"):
        m.to_container(5, 100000)
