"""Session-wide fixtures: tiny artifacts are built once per test session, never per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete artifacts folder of tiny random models (``mmedrag artifacts tiny``), read-only for tests."""
    from training.artifacts.tiny import build_tiny_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    build_tiny_artifacts(out, seed=0, progress=False)
    return out
