"""Engine ring: ``docker diff`` of names that are not text, strata vs overlay2.

A container creates files whose names are not UTF-8 (Latin-1, a cut-short
sequence, an overlong, an encoded surrogate), NFC and NFD spellings of one
word, emoji, and control characters (newline, tab, 0x01, DEL, ESC).  The names
are made inside the container by busybox ``printf`` octal escapes: a name on
the docker command line would pass through Go's JSON and lose its bytes.
``docker diff`` on strata must print the same lines as the in-tree overlay2
driver (each byte that is not UTF-8 becomes U+FFFD, tests/gostring.py; the
order is overlay2's to vary), and so must it after a commit (Diff + ApplyDiff
of those names) and a second container that deletes and changes some of them.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

import pytest

from tests.engine import harness
from tests.engine.harness import BASE_IMAGE
from tests.engine.rootfs import Rootfs
from tests.gostring import go_json_string
from tests.support.names import HOSTILE_NAMES

pytestmark = pytest.mark.engine

NAMES = HOSTILE_NAMES
DIR, INNER = b"dir-\xe9\xff\n", b"inner-\xfe"
#: What the second container deletes and changes (in their own directories, so that
#: the order of a deleted entry among kept ones is not what is compared here).
GONE = [b"gone-\xff\x1b", "gone-😀".encode()]
CHANGED = [b"latin1-\xe9\xff", unicodedata.normalize("NFD", "nfc-é").encode()]
IMAGE = "strata-test/names:1"


def let(var: str, raw: bytes) -> str:
    """Shell that sets ``$var`` to ``raw``, in ASCII (busybox printf octal escapes;
    the ``X`` guards a trailing newline, which ``$(...)`` would strip)."""
    octal = "".join(f"\\{b:03o}" for b in raw)
    return f"{var}=\"$(printf '{octal}X')\"; {var}=\"${{{var}%X}}\""


CREATE = "\n".join([
    "set -e",
    "mkdir /names /old",
    *(f'{let("n", n)}; : > "/names/$n"' for n in NAMES),
    f'{let("d", DIR)}; {let("n", INNER)}; mkdir "/names/$d"; : > "/names/$d/$n"',
    *(f'{let("n", n)}; echo old > "/old/$n"' for n in GONE),
])
MUTATE = "\n".join([
    "set -e",
    *(f'{let("n", n)}; rm "/old/$n"' for n in GONE),
    *(f'{let("n", n)}; echo more >> "/names/$n"' for n in CHANGED),
])


def diff_of(engine: harness.Stack | harness.Dockerd, name: str, image: str,
            script: str) -> str:
    """``docker diff`` of a container that ran ``script`` on ``image``."""
    engine.docker("run", "--name", name, "--network", "none", image, "/bin/sh", "-c", script)
    try:
        out = engine.docker("diff", name).stdout
    finally:
        engine.docker("rm", "-f", name)
    out.encode("utf-8")  # strict: the CLI prints text, every bad byte already U+FFFD
    return out


def run_scenario(engine: harness.Stack | harness.Dockerd, base: str) -> tuple[str, str]:
    """(diff of the creating container, diff of the mutating one on its commit)."""
    engine.docker("run", "--name", "names-make", "--network", "none", base,
                  "/bin/sh", "-c", CREATE)
    try:
        created = engine.docker("diff", "names-make").stdout
        engine.docker("commit", "names-make", IMAGE)
    finally:
        engine.docker("rm", "-f", "names-make")
    mutated = diff_of(engine, "names-mutate", IMAGE, MUTATE)
    engine.docker("rmi", IMAGE)
    return created, mutated


@pytest.fixture(scope="module")
def reference(overlay2: harness.Dockerd, rootfs: Rootfs) -> Iterator[tuple[str, str]]:
    """The scenario's ``docker diff`` outputs on the in-tree overlay2 driver."""
    overlay2.docker("import", str(rootfs.tar), BASE_IMAGE)
    yield run_scenario(overlay2, BASE_IMAGE)


def printed(*entries: tuple[str, bytes]) -> list[str]:
    """The lines ``docker diff`` prints for these changes, in ``sorted_lines`` form."""
    return sorted_lines("".join(f"{kind} {go_json_string(path)}\n" for kind, path in entries))


def sorted_lines(output: str) -> list[str]:
    """``docker diff`` output as a sorted list of lines.  Its order is not
    compared: overlay2's own varies from run to run (it walks Go maps), and a
    name with a newline prints as two lines, which both sides split alike."""
    return sorted(output.split("\n"))


def test_overlay2_prints_each_bad_byte_as_a_replacement(reference: tuple[str, str]) -> None:
    """What the reference daemon prints, checked against Go's rule, so that a
    match below means the names arrived as dockerd shows an in-tree driver's."""
    created, mutated = reference
    added = [b"/names", *(b"/names/" + n for n in NAMES), b"/names/" + DIR,
             b"/names/" + DIR + b"/" + INNER, b"/old", *(b"/old/" + n for n in GONE)]
    assert sorted_lines(created) == printed(*(("A", p) for p in added))
    assert "A /names/latin1-\ufffd\ufffd\n" in created
    assert "A /names/cut-\ufffd\ufffd-short\n" in created
    assert "A /names/nfc-é\n" in created and "A /names/nfc-e\u0301\n" in created
    changed = [b"/names", *(b"/names/" + n for n in CHANGED), b"/old"]
    assert sorted_lines(mutated) == printed(*(("C", p) for p in changed),
                                            *(("D", b"/old/" + n) for n in GONE))


def test_docker_diff_of_hostile_names_matches_overlay2(
    stack: harness.Stack, base_image: str, reference: tuple[str, str]
) -> None:
    created, mutated = run_scenario(stack, base_image)
    assert sorted_lines(created) == sorted_lines(reference[0]), (
        "docker diff after creating the names differs from overlay2's")
    assert sorted_lines(mutated) == sorted_lines(reference[1]), (
        "docker diff after deleting and changing them differs from overlay2's")
