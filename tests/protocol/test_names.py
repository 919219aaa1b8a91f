"""File names that are not text, on every backend, over the real socket.

A Linux file name is any bytes but ``/`` and NUL.  dockerd reads an in-tree
driver's names as Go's ``encoding/json`` writes them (each byte that is not
UTF-8 becomes U+FFFD, tests/gostring.py); strata's replies must read the same,
and must not fail.  NFC and NFD spellings are two names and stay two.  Err
texts and log lines that name such a path stay one printable line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import pytest

from tests.gostring import go_json_string
from tests.support.client import PluginError
from tests.support.names import HOSTILE_NAMES
from tests.support.plugin import PluginUnderTest

pytestmark = pytest.mark.asyncio

ADD, MODIFY, DELETE = 1, 0, 2

#: Names that every backend stores as given (bytes on disk).
NAMES = [*HOSTILE_NAMES, b"rtl-\xe2\x80\xaeexe.txt"]
DIR, INNER = b"dir-\xe9\xff\n", b"inner-\xfe"
GONE, CHANGED = b"gone-\xff\x1b", b"changed-\xe9"


def write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def wire(path: bytes) -> str:
    """What dockerd holds for this path from an in-tree driver."""
    return go_json_string(path)


async def make_layers(plugin: PluginUnderTest, base: str, upper: str) -> None:
    """``base`` holds /old/{GONE,CHANGED,keep}; ``upper`` adds /names/*, drops
    GONE and rewrites CHANGED."""
    c = plugin.client
    await c.create(base)
    root = os.fsencode(await c.get(base))
    os.mkdir(root + b"/old")
    for name in (GONE, CHANGED, b"keep"):
        write(root + b"/old/" + name, b"old")
    await c.put(base)
    await c.create(upper, base, rw=True)
    root = os.fsencode(await c.get(upper))
    os.mkdir(root + b"/names")
    for name in NAMES:
        write(root + b"/names/" + name, name)
    os.mkdir(root + b"/names/" + DIR)
    write(root + b"/names/" + DIR + b"/" + INNER, b"inner")
    os.unlink(root + b"/old/" + GONE)
    write(root + b"/old/" + CHANGED, b"new, longer")
    await c.put(upper)


def expected_changes() -> list[tuple[str, int]]:
    added = [b"/names", *(b"/names/" + n for n in NAMES), b"/names/" + DIR,
             b"/names/" + DIR + b"/" + INNER]
    return ([(wire(p), ADD) for p in added]
            + [(wire(b"/old"), MODIFY), (wire(b"/old/" + GONE), DELETE),
               (wire(b"/old/" + CHANGED), MODIFY)])


async def test_changes_of_names_that_are_not_text(plugin: PluginUnderTest) -> None:
    await make_layers(plugin, "names-base", "names-upper")
    status, data = await plugin.client.raw(
        "GraphDriver.Changes", b'{"ID":"names-upper","Parent":"names-base"}\n')
    assert status == 200, data
    data.decode("utf-8")  # strict: no raw byte that is not UTF-8 on the wire
    found = [(c["Path"], c["Kind"]) for c in json.loads(data)["Changes"]]
    expected = expected_changes()
    assert sorted(found) == sorted(expected)
    assert len(found) == len(expected)
    # NFC and NFD are two entries, neither normalised into the other
    assert "/names/nfc-é" in dict(found) and "/names/nfc-e\u0301" in dict(found)
    # each invalid byte is one U+FFFD, as Go writes it
    assert "/names/latin1-\ufffd\ufffd" in dict(found)
    assert "/names/cut-\ufffd\ufffd-short" in dict(found)


async def test_diff_carries_the_bytes_and_applies_back(plugin: PluginUnderTest) -> None:
    c = plugin.client
    await make_layers(plugin, "names-base", "names-upper")
    tar = await c.diff("names-upper", "names-base")
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8",
                      errors="surrogateescape") as tf:
        names = {os.fsencode(m.name) for m in tf.getmembers()}
    assert {b"names/" + n for n in NAMES} <= names
    assert {b"names/" + DIR + b"/" + INNER, b"old/.wh." + GONE, b"old/" + CHANGED} <= names

    await c.create("names-applied", "names-base")
    await c.apply_diff("names-applied", "names-base", tar)
    root = os.fsencode(await c.get("names-applied"))
    assert sorted(os.listdir(root + b"/names")) == sorted([*NAMES, DIR])
    for name in NAMES:
        with open(root + b"/names/" + name, "rb") as f:
            assert f.read() == name
    assert sorted(os.listdir(root + b"/old")) == sorted([CHANGED, b"keep"])
    await c.put("names-applied")
    assert sorted(await c.changes("names-applied", "names-base")) == sorted(expected_changes())


#: A Home that names can make hostile: control characters, an emoji, NFD.
HOSTILE_HOME = "home-\n-\t-\x01-\x7f-\x1b[31m-😀-e\u0301"


async def test_metadata_and_status_of_a_hostile_home(plugin: PluginUnderTest) -> None:
    """dockerd restarted on another data root: Init with a Home whose name holds
    control characters; every path that comes back names it exactly."""
    c = plugin.client
    home = os.path.join(os.path.dirname(plugin.home), HOSTILE_HOME)
    await c.call("GraphDriver.Init", {"Home": home, "Opts": None,
                                      "UIDMaps": None, "GIDMaps": None})
    await make_layers(plugin, "names-base", "names-upper")
    metadata = (await c.call("GraphDriver.GetMetadata", {"ID": "names-upper"}))["Metadata"]
    paths = [v for v in metadata.values() if v.startswith("/")]
    assert paths and all(v.startswith(home + "/") for v in paths), metadata
    rows = (await c.call("GraphDriver.Status", {}))["Status"]
    assert ["Backend", plugin.backend] in rows
    directory = await c.get("names-upper")
    assert directory.startswith(home + "/") and os.path.isdir(directory)
    await c.put("names-upper")
    assert sorted(await c.changes("names-upper", "names-base")) == sorted(expected_changes())
    await c.call("GraphDriver.Cleanup", {})


async def test_an_err_naming_a_hostile_path_is_one_printable_line(
        plugin: PluginUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    """Errors that name a path under a hostile Home (a layer planted as a symlink)
    or a tar entry named with bytes that are not UTF-8 and a newline: a 4xx Err
    that shows the characters escaped, and one log line."""
    c = plugin.client
    home = os.path.join(os.path.dirname(plugin.home), HOSTILE_HOME)
    await c.call("GraphDriver.Init", {"Home": home, "Opts": None,
                                      "UIDMaps": None, "GIDMaps": None})
    await c.create("probe")  # the backend made its layout under Home
    outside = os.path.join(os.path.dirname(plugin.home), "outside")
    os.makedirs(os.path.join(outside, "root"))
    os.symlink(outside, os.path.join(home, "layers", "planted"))

    entry = b"../\xe9\xff\nforged \x1b[2J"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        info = tarfile.TarInfo(os.fsdecode(entry))
        info.size = 3
        tf.addfile(info, io.BytesIO(b"pwn"))
    await c.create("hostile")
    errs = []
    with caplog.at_level(logging.INFO, logger="strata.server"):
        caplog.clear()
        for call in (c.get("planted"), c.create("kid", "planted"),
                     c.apply_diff("hostile", "", buf.getvalue())):
            with pytest.raises(PluginError) as e:
                await call
            errs.append(e.value)
    for err in errs:
        assert 400 <= err.status < 500, err
        assert err.err.isprintable(), err
        assert not err.err.startswith("GraphDriver."), err
    assert all("planted" in err.err for err in errs[:2]), errs
    shown_home = "home-\\n-\\t-\\x01-\\x7f-\\x1b[31m-😀-e\u0301"  # escaped, NFD kept
    assert all(shown_home in err.err for err in errs[:2]), errs
    assert "forged" in errs[2].err, errs
    lines = [r for r in caplog.records if r.name == "strata.server"]
    assert [r.levelno for r in lines] == [logging.WARNING] * 3, lines
    await c.call("GraphDriver.Cleanup", {})


async def test_errs_do_not_repeat_the_call_name(plugin: PluginUnderTest) -> None:
    """dockerd shows a non-200 Err as ``<Name>: <Err>`` (docs/protocol.md §2.2)."""
    c = plugin.client
    replies = [await c.raw("GraphDriver.Create", body) for body in (b"", b"{not json")]
    replies += [await c.raw("GraphDriver.NoSuchCall", b"{}\n"),
                await c.raw("GraphDriver.Get", b"", method="GET"),
                await c.raw("GraphDriver.Get", b'{"ID":"missing-layer"}\n'),
                await c.raw("GraphDriver.Changes", b'{"ID":"missing-layer"}\n')]
    errs = [(status, json.loads(data)["Err"]) for status, data in replies]
    assert [status for status, _ in errs] == [400, 400, 404, 405, 404, 404], errs
    for _, err in errs:
        assert err and err.isprintable(), errs
        assert not err.startswith(("GraphDriver.", "POST", "GET", "Init:")), errs
    assert "empty request body" in errs[0][1]
    assert "malformed request body" in errs[1][1]
    assert "no such call" in errs[2][1]
    assert "GET" in errs[3][1]
    assert "missing-layer" in errs[4][1] and "missing-layer" in errs[5][1]
