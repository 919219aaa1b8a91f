"""Every hostile tar of the corpus through ApplyDiff, over the socket, on every backend.

For each case, on top of a parent layer that was itself made by ApplyDiff:

1. the answer is a clear ``Err`` (4xx, non-empty) or a correct layer, as the
   case expects (``corpus.Case.expect``); a hang is killed at the case deadline;
2. nothing changed outside the layer: the sentinel tree next to Home, the
   decoy tree in /tmp that the links aim at, /etc/passwd, and no file carrying
   the case's token appeared in any directory above the layer, in /, /etc or /tmp;
3. the parent layer is identical (paths, modes, owners, times, inodes, link
   counts, content hashes, xattrs);
4. after the Remove dockerd sends (it does so after a failed ApplyDiff too),
   Exists is false and nothing of the layer is left anywhere under Home.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from tests.hostile import corpus
from tests.hostile.conftest import Snapshot, kill_extractors, snapshot, snapshot_diff
from tests.support.client import PluginError
from tests.support.files import new_layer_id
from tests.support.plugin import PluginUnderTest

pytestmark = pytest.mark.asyncio

#: A runaway write (a 1 TiB hole written as zeros) is stopped once this much
#: free space is gone from Home's filesystem.
DISK_ALARM = 4 << 30
PROBE_DIRS = ("/", "/etc", "/tmp")


@dataclass
class Env:
    plugin: PluginUnderTest
    parent: str
    ctx_base: corpus.Ctx
    tmp: str

    def outside(self) -> dict[str, Snapshot]:
        """Everything a case may not touch, snapshotted."""
        return {
            "next to Home": snapshot(self.tmp, prune=os.path.normpath(self.plugin.home)),
            "decoy": snapshot(self.ctx_base.decoy),
            "/etc/passwd": snapshot("/etc/passwd"),
            "socket dir": snapshot(os.path.dirname(self.plugin.socket_path)),
        }


def _under(path: bytes, top: str) -> bool:
    real, btop = os.path.realpath(path), os.fsencode(top)
    return real == btop or real.startswith(btop + b"/")


def _make_decoys(tmp: str, token: str) -> tuple[str, str]:
    decoy = tempfile.mkdtemp(prefix="strata-decoy-", dir="/tmp")
    sentinel = os.path.join(tmp, "sentinel")
    for top in (decoy, sentinel):
        os.makedirs(os.path.join(top, "etc", "sub"))
        with open(os.path.join(top, "etc", "passwd"), "wb") as fh:
            fh.write(b"decoy passwd, must never change\n")
        os.chmod(os.path.join(top, "etc", "passwd"), 0o644)
        os.symlink("passwd", os.path.join(top, "etc", "passwd.link"))
        with open(os.path.join(top, f"keep-{token}-not"), "wb") as fh:
            fh.write(b"x")
    return decoy, sentinel


@pytest.fixture
async def env(plugin: PluginUnderTest, reap_extractors: None) -> AsyncIterator[Env]:
    token = f"pwn-{uuid.uuid4().hex[:10]}"
    # "Next to Home": the backend fixture may put Home on its own filesystem.
    beside_home = os.path.dirname(plugin.home)
    decoy, sentinel = _make_decoys(beside_home, token)
    try:
        parent = new_layer_id()
        await plugin.client.create(parent)
        await plugin.client.apply_diff(parent, "", corpus.parent_tar())
        ctx = corpus.Ctx(token=token, decoy=decoy, sentinel=sentinel, sentinel_rel="")
        yield Env(plugin, parent, ctx, beside_home)
    finally:
        shutil.rmtree(decoy, ignore_errors=True)


async def layer_view(plugin: PluginUnderTest, layer: str) -> Snapshot:
    """The layer as dockerd sees it (Get) plus its directory under Home/layers."""
    root = await plugin.client.get(layer)
    try:
        view = await asyncio.to_thread(snapshot, root)
        store = os.path.join(plugin.home, "layers", layer)
        if not _under(os.fsencode(root), store):
            view.update({b"<store>/" + k: v for k, v in
                         (await asyncio.to_thread(snapshot, store)).items()})
        return view
    finally:
        await plugin.client.put(layer)


@dataclass
class Outcome:
    status: int = 0
    err: str = ""
    size: int | None = None
    hang: str = ""


async def apply_guarded(plugin: PluginUnderTest, layer: str, parent: str, body: bytes,
                        deadline: float) -> Outcome:
    """ApplyDiff, but kill the extractor if it hangs or starts filling the disk."""
    alarm: list[str] = []

    async def watch_disk() -> None:
        def free() -> int:
            st = os.statvfs(plugin.home)
            return st.f_bavail * st.f_frsize
        start = free()
        while True:
            await asyncio.sleep(0.2)
            if start - free() > DISK_ALARM:
                alarm.append(f"more than {DISK_ALARM >> 30} GiB of disk consumed")
                kill_extractors()
                return

    watcher = asyncio.create_task(watch_disk())
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            size = await plugin.client.apply_diff(layer, parent, body)
        outcome = Outcome(status=200, size=size)
    except PluginError as e:
        outcome = Outcome(status=e.status, err=e.err)
    except TimeoutError:
        kill_extractors()
        outcome = Outcome(hang=f"no answer within {deadline:.0f}s (extractor killed)")
    finally:
        watcher.cancel()
    if alarm:
        outcome.hang = f"{alarm[0]} after {time.monotonic() - started:.1f}s (extractor killed)"
    return outcome


def token_hits(ctx: corpus.Ctx, layer_root: str) -> list[str]:
    """Directories outside the layer that now hold an entry named with the token."""
    dirs = set(PROBE_DIRS)
    current = os.path.dirname(os.path.realpath(layer_root))
    while current != "/":
        dirs.add(current)
        current = os.path.dirname(current)
    hits = []
    for directory in sorted(dirs):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        hits += [os.path.join(directory, n) for n in names if ctx.token in n and "-not" not in n]
    return hits


def stray_state(plugin: PluginUnderTest, layer: str, parent: str) -> list[str]:
    """What is left of ``layer`` under Home after its Remove."""
    stray = []
    layers_dir = os.path.join(plugin.home, "layers")
    if os.path.isdir(layers_dir) and sorted(os.listdir(layers_dir)) != [parent]:
        stray.append(f"Home/layers holds {sorted(os.listdir(layers_dir))}, expected [{parent}]")
    for sub in ("staging", "trash"):
        leftover = os.path.join(plugin.home, sub)
        if os.path.isdir(leftover) and os.listdir(leftover):
            stray.append(f"Home/{sub} not empty: {os.listdir(leftover)}")
    for dirpath, dirnames, filenames in os.walk(plugin.home):
        stray += [os.path.join(dirpath, n) for n in dirnames + filenames if layer in n]
    return stray[:12]


async def run_case(env: Env, case: corpus.Case, tally: Counter[str]) -> list[str]:
    plugin, parent = env.plugin, env.parent
    parent_before = await layer_view(plugin, parent)
    outside_before = await asyncio.to_thread(env.outside)

    layer = new_layer_id()
    await plugin.client.create(layer, parent)
    layer_root = await plugin.client.get(layer)
    await plugin.client.put(layer)
    ctx = corpus.Ctx(token=env.ctx_base.token, decoy=env.ctx_base.decoy,
                     sentinel=env.ctx_base.sentinel,
                     sentinel_rel=os.path.relpath(env.ctx_base.sentinel, layer_root))
    body = await asyncio.to_thread(case.build, ctx)
    outcome = await apply_guarded(plugin, layer, parent, body, case.deadline)

    problems: list[str] = []
    tally["layer.tried"] += 1
    verdict = await judge(plugin, case, ctx, layer, outcome, problems)
    tally[f"layer.{verdict}"] += 1
    if verdict == "clean_err" and case.culprit and case.culprit(ctx) in outcome.err:
        tally["layer.err_names_entry"] += 1

    outside_after = await asyncio.to_thread(env.outside)
    moved = [f"{what}: {line}" for what in outside_before
             for line in snapshot_diff(outside_before[what], outside_after[what])]
    moved += [f"token file outside the layer: {p}" for p in token_hits(ctx, layer_root)]
    if moved:
        tally["layer.outside"] += 1
        problems += ["WRITE OUTSIDE THE LAYER: " + m for m in moved]

    parent_changed = snapshot_diff(parent_before, await layer_view(plugin, parent))
    if parent_changed:
        tally["layer.parent_changed"] += 1
        problems += ["earlier layer changed: " + m for m in parent_changed]

    await plugin.client.remove(layer)
    if await plugin.client.exists(layer):
        problems.append("Exists is still true after Remove")
    stray = await asyncio.to_thread(stray_state, plugin, layer, parent)
    if stray:
        tally["layer.stray"] += 1
        problems += ["stray state after Remove: " + s for s in stray]
    return problems


async def judge(plugin: PluginUnderTest, case: corpus.Case, ctx: corpus.Ctx, layer: str,
                outcome: Outcome, problems: list[str]) -> str:
    """Classify the answer and add what is wrong with it to ``problems``."""
    if outcome.hang:
        problems.append(f"hang: {outcome.hang}")
        return "hang"
    if outcome.status != 200:
        answer = f"HTTP {outcome.status} Err {outcome.err!r}"
        if case.expect == "ok":
            problems.append(f"expected a correct layer, got {answer}")
            return "wrong"
        if not outcome.err.strip() or not 400 <= outcome.status < 500:
            problems.append(f"bad input must get a clear 4xx Err, got {answer}")
            return "unclear_err"
        return "clean_err"
    if outcome.size is None or outcome.size < 0:
        problems.append(f"success with an impossible Size {outcome.size}")
        return "wrong"
    if case.expect == "err":
        problems.append(f"expected an Err, got success (Size {outcome.size})")
        return "wrong"
    if case.check is not None:
        root = await plugin.client.get(layer)
        try:
            await asyncio.to_thread(case.check, ctx, root)
        except (AssertionError, OSError) as e:
            problems.append(f"success, but the layer is wrong: {type(e).__name__}: {e}")
            return "wrong"
        finally:
            await plugin.client.put(layer)
    return "correct"


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
async def test_hostile_layer(env: Env, case: corpus.Case, tally: Counter[str]) -> None:
    problems = await run_case(env, case, tally)
    assert not problems, f"{case.name}:\n  " + "\n  ".join(problems)
    # The server still serves normally afterwards.
    assert await env.plugin.client.exists(env.parent)


# ---- names that must survive the round trip through Diff -----------------------------


NAMES: list[tuple[str, Callable[[str], bytes]]] = [
    ("newline", lambda t: f"nl\n{t}\n".encode()),
    ("not_utf8", lambda t: b"caf\xe9-" + t.encode() + b"-\xff\xfe"),
    ("long_component", lambda t: (t + "y" * 255)[:255].encode()),
]


@pytest.mark.parametrize("kind", [n for n, _ in NAMES])
async def test_odd_names_round_trip(env: Env, kind: str) -> None:
    """A name ApplyDiff accepted comes back byte for byte from Diff and under Get."""
    name = dict(NAMES)[kind](env.ctx_base.token)
    layer = new_layer_id()
    await env.plugin.client.create(layer, env.parent)
    size = await env.plugin.client.apply_diff(layer, env.parent,
                                              corpus.tar(corpus.f(name, b"odd")))
    assert size == 3
    root = await env.plugin.client.get(layer)
    try:
        assert os.path.isfile(os.path.join(os.fsencode(root), name))
    finally:
        await env.plugin.client.put(layer)
    names = await asyncio.to_thread(_tar_names, await env.plugin.client.diff(layer, env.parent))
    assert name in names
    await env.plugin.client.remove(layer)


def _tar_names(data: bytes) -> list[bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tar:
        return [m.name.encode("utf-8", "surrogateescape") for m in tar.getmembers()]
