"""Synthetic data shared by unit tests (small: unit tests stay fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from radbridge.synth import ct_series, write_series


@pytest.fixture(scope="session")
def small_ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 512x512 synthetic CT series of 24 slices written to disk (slice order)."""
    return write_series(ct_series(n_slices=24), tmp_path_factory.mktemp("ct"))
