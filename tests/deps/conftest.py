"""Prints what the floors test found at the end of the run: the pins, the venv
(built or kept, and how long that took) and the child run's summary line."""

from __future__ import annotations

import pytest

from tests.deps.floors import SUMMARY_KEY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY_KEY, None)
    if not lines:
        return
    terminalreporter.section("strata dependency floors")
    for line in lines:
        terminalreporter.write_line(line)
