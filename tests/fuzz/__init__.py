"""Fuzz tests of the node's untrusted inputs: C-STORE, the volume assembler, STOW-RS, the TOML loader."""

from __future__ import annotations

import os
from collections import Counter

#: Generated inputs run per target in this session (printed by conftest's terminal summary).
INPUTS: Counter[str] = Counter()
#: What became of them, per target: "stored", "0xC210", "400"... (shows the fuzz reaches both ways).
OUTCOMES: dict[str, Counter[str]] = {}
#: HYPOTHESIS_PROFILE=fuzz-long multiplies every budget by this (a soak run, not CI).
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz-long" else 1


def count_input(target: str, outcome: str) -> None:
    """Count one generated input that went all the way through its target, and its outcome."""
    INPUTS[target] += 1
    OUTCOMES.setdefault(target, Counter())[outcome] += 1


def examples(n: int) -> int:
    """A test's example budget under the active profile."""
    return n * SCALE
