"""Shared fixtures: a local Ray instance for the session, the real photos in ../shared/data/cub_mini."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUB_MINI = REPO.parent / "shared" / "data" / "cub_mini"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for all tests that need it (2 logical CPUs, fractional CPUs per worker)."""
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cub_mini() -> Path:
    if not (CUB_MINI / "CUB_200_2011" / "images.txt").is_file():
        pytest.skip(f"{CUB_MINI} not present")
    return CUB_MINI
