"""Hypothesis profiles for the fuzz tests, and the input count in pytest's summary.

The profile ``fuzz`` (default here) runs each target's example budget with no
per-example deadline (a 2-core CI runner stalls unpredictably; a real hang is
caught by pytest-timeout instead) and no example database (nothing written
into the work tree; a failure prints its reproduction blob). ``fuzz-long``
multiplies the budgets for a soak run: ``HYPOTHESIS_PROFILE=fuzz-long``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz import INPUTS, OUTCOMES

#: The issue's floor for one fuzz run, all targets together.
MIN_TOTAL_INPUTS = 10_000

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    # Examples share a module-scoped spool/app (set up once, as a node runs for long);
    # generated DICOM is large by design, and some targets filter on validity.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("fuzz", **_COMMON)
settings.register_profile("fuzz-long", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not INPUTS:
        return
    total = sum(INPUTS.values())
    terminalreporter.section("fuzz inputs")
    for target, n in sorted(INPUTS.items()):
        top = ", ".join(f"{k} {v}" for k, v in OUTCOMES[target].most_common(6))
        terminalreporter.write_line(f"{target:<20} {n:>7,}  ({top})")
    terminalreporter.write_line(
        f"{'total':<20} {total:>7,}  (issue floor: {MIN_TOTAL_INPUTS:,} for a full run)"
    )
