"""The ``mmedrag`` command line: sub-commands, one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmedrag.cli import main
from training.data.cli import FORMAT_NAMES
from training.data.formats import FORMATS


def test_help_lists_sub_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["data", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for command in ("synth", "check", "preview", "import", "extract-harvard"):
        assert command in out


def test_format_names_in_help_match_the_registry() -> None:
    assert set(FORMAT_NAMES) == set(FORMATS)


def test_synth_then_check_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ms"
    with pytest.raises(SystemExit) as stop:
        main(
            ["data", "synth", "--out", str(out), "--per-domain", "16", "--image-size", "64", "--workers", "1"]
        )
    assert stop.value.code == 0
    assert json.loads((out / "medsynth.json").read_text())["per_domain"] == 16
    assert "wrote 48 images" in capsys.readouterr().out


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["data", "synth", "--out", str(tmp_path), "--difficulty", "extreme"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("error: difficulty must be one of") and "Traceback" not in err


def test_missing_folder_for_check_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["data", "check", str(tmp_path / "nowhere")])
    assert status == 1
    assert "findings.jsonl" in capsys.readouterr().err


def test_unknown_import_format_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["data", "import", "--format", "dicom-zoo", "--root", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert status == 1
    assert "dicom-zoo" in capsys.readouterr().err
