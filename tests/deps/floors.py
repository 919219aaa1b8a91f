"""A venv with every dependency at its floor, for ``test_floors.py``.

The floors are the ``>=`` bounds in pyproject.toml (the runtime dependencies and
the ``test`` extra).  Each is pinned with ``==`` in a venv of its own and strata is
installed into it without dependencies, so nothing newer can slip in.  Building
one downloads a few dozen wheels, so the venv is kept between runs under
``.floors/<key>`` in the checkout (gitignored); the key names the pins, the
interpreter and the checkout.  A kept venv is used only after asking it which
versions it really holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
CACHE = os.path.join(ROOT, ".floors")
#: The extras whose floors are pinned besides the runtime dependencies (``dev`` is
#: ``strata[test]``).
EXTRAS = ("test",)
#: Packages with compiled code: a wheel or nothing.  A fresh machine has no
#: compiler headers (python3-dev), so a floor without a wheel for this Python
#: would not install there even if it builds here.
BINARY_ONLY = ("aiohttp", "msgspec", "uvloop")
#: Lines for the end-of-run summary (conftest.py prints them).
SUMMARY_KEY = pytest.StashKey[list[str]]()
#: What the kept venv is asked: the installed version of each name given, and
#: where strata was installed from.
_ASK_VENV = """
import importlib.metadata as md, json, sys
versions = {}
for name in sys.argv[1:]:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
try:
    origin = json.loads(md.distribution("strata").read_text("direct_url.json") or "{}")
except md.PackageNotFoundError:
    origin = {}
print(json.dumps({"versions": versions, "strata": origin.get("url")}))
"""


@dataclass(frozen=True)
class FloorsVenv:
    path: str
    #: False when the venv was kept from an earlier run.
    built: bool
    #: Time spent making the venv ready (building it, or checking the kept one).
    seconds: float

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")


def floors() -> dict[str, str]:
    """Each runtime and test dependency's (normalised) name and its floor."""
    with open(PYPROJECT, "rb") as f:
        project = tomllib.load(f)["project"]
    specs = list(project["dependencies"])
    for extra in EXTRAS:
        specs += project["optional-dependencies"][extra]
    return dict(floor_of(spec) for spec in specs)


def floor_of(spec: str) -> tuple[str, str]:
    """The name and the ``>=`` version of one requirement; exactly one is required."""
    requirement = Requirement(spec)
    # An exact pin (grpcio-tools, whose protoc wrote the committed stubs) is its own floor.
    lows = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
    if len(lows) != 1:
        raise ValueError(f"{spec!r}: every dependency needs exactly one '>=' floor (or '==')")
    return canonicalize_name(requirement.name), lows[0]


def cache_key(pins: dict[str, str]) -> str:
    what = {"pins": sorted(pins.items()), "python": sys.version,
            "base": sys.base_prefix, "checkout": ROOT}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def index_unreachable() -> str | None:
    """Why the package index cannot be reached, or None if it answers."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/pip/"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return f"the package index ({url}) cannot be reached: {e}"
    return None


def venv_mismatch(path: str, pins: dict[str, str]) -> str | None:
    """What differs between the venv at ``path`` and ``pins`` (None: it matches)."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(os.path.join(path, "complete")) or not os.path.exists(python):
        return "no complete venv"
    # -I: not the checkout's own strata.egg-info, which the cwd would put first.
    answer = subprocess.run([python, "-I", "-c", _ASK_VENV, *pins], capture_output=True,
                            text=True, timeout=120)
    if answer.returncode != 0:
        return f"the venv's python failed: {answer.stderr.strip()[-500:]}"
    held = json.loads(answer.stdout)
    wrong = [f"{name} {held['versions'][name]} (want {floor})" for name, floor in pins.items()
             if held["versions"][name] is None or Version(held["versions"][name]) != Version(floor)]
    if held["strata"] != f"file://{ROOT}":
        wrong.append(f"strata installed from {held['strata']}, not {ROOT}")
    return ", ".join(wrong) or None


def pip(python: str, *args: str) -> None:
    done = subprocess.run([python, "-m", "pip", "install", "-q", *args], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise AssertionError(f"pip install {' '.join(args)} failed:\n"
                             f"{(done.stdout + done.stderr)[-3000:]}")


def build(path: str, pins: dict[str, str]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    # From inside a venv, ``-m venv`` builds on the base interpreter, as .ci/run does.
    subprocess.run([sys.executable, "-m", "venv", path], check=True, timeout=300)
    python = os.path.join(path, "bin", "python")
    pip(python, "--only-binary", ",".join(BINARY_ONLY),
        *(f"{name}=={floor}" for name, floor in pins.items()))
    pip(python, "--no-deps", "-e", ROOT)
    with open(os.path.join(path, "complete"), "w") as f:
        f.write(json.dumps(pins, indent=1) + "\n")


def floors_venv(pins: dict[str, str]) -> FloorsVenv | str:
    """The venv holding exactly ``pins``, built unless kept from an earlier run;
    or why it cannot be built here (the package index is out of reach)."""
    started = time.monotonic()
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, cache_key(pins))
    # Two runs in one checkout build one venv, one after the other.
    with open(os.path.join(CACHE, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if venv_mismatch(path, pins) is None:
            return FloorsVenv(path, built=False, seconds=time.monotonic() - started)
        reason = index_unreachable()
        if reason:
            return reason
        for stale in os.listdir(CACHE):  # venvs of earlier floors
            if stale != "lock":
                shutil.rmtree(os.path.join(CACHE, stale), ignore_errors=True)
        build(path, pins)
        mismatch = venv_mismatch(path, pins)
        if mismatch:
            os.unlink(os.path.join(path, "complete"))
            raise AssertionError(f"the floors venv just built holds other versions: {mismatch}")
    return FloorsVenv(path, built=True, seconds=time.monotonic() - started)
