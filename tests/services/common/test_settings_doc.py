"""Documented environment variables are exactly the ones the services read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.settings_doc import _settings_classes, env_names, render_settings_markdown
from services.launcher import service_environment

ROOT = Path(__file__).resolve().parents[3]


def test_configuration_doc_is_current() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == render_settings_markdown(), (
        "docs/configuration.md is stale: run `python -m services.common.settings_doc`"
    )


@pytest.mark.parametrize(("service", "settings_cls"), _settings_classes())
def test_each_documented_variable_is_read(
    service: str, settings_cls, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"MMEDRAG_{service.upper()}_LOG_LEVEL"
    assert name in env_names(settings_cls)
    monkeypatch.setenv(name, "warning")
    assert settings_cls().log_level == "warning"


def test_launcher_sets_only_variables_that_exist(tmp_path: Path) -> None:
    known = set().union(*(env_names(cls) for _, cls in _settings_classes()))
    env = service_environment(tmp_path, "127.0.0.1", 9000)
    ours = {key for key in env if key.startswith("MMEDRAG_") and key not in os.environ}
    assert ours <= known, ours - known
