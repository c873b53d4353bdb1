"""Test-wide settings and the fixtures that locate the shared data sets.

S3 fixtures live in ``tests/s3_server.py``; modules that need them import them explicitly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

_SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's shared folder (``../shared`` next to the project root)."""
    return _SHARED


@pytest.fixture(scope="session")
def bottle_dir(shared_dir: Path) -> Path:
    """MVTec AD bottle in MVTec layout; the test is skipped when the data set is absent."""
    path = shared_dir / "datasets" / "mvtec_bottle"
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {path} (put the data set there to run this test)")
    return path
