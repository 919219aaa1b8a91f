"""ruff (pyproject's rule set) and ``mypy --strict`` over plugin/ and tests/:
both must report nothing, so CI fails on a finding as it does on a failed test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, check=False, timeout=600)


def test_ruff_is_clean() -> None:
    result = run_tool("ruff", "check", "--no-cache", "--output-format", "concise",
                      "plugin", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    # pyproject's [tool.mypy]: strict, both trees, generated stubs relaxed.
    result = run_tool("mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
