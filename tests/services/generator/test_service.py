"""Start-up checks of the generator: a missing or broken model folder is named, and settings come from env."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.artifacts import ArtifactError
from services.generator.app import build_app
from services.generator.service import GeneratorService
from services.generator.settings import GeneratorSettings


def _damaged_copy(folder: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    copy = tmp_path / "generator"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def _set_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _shift_image_token(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_token_index": 0}))


DAMAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (damage, file named in the error, problem)
    "no chat template": (lambda f: (f / "chat_template.jinja").unlink(), "chat_template.jinja", "not found"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "weights not found"),
    "no processor config": (
        lambda f: [(f / n).unlink() for n in ("processor_config.json", "preprocessor_config.json")],
        "processor_config.json",
        "not found",
    ),
    "corrupt weights": (
        lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64),
        "model.safetensors",
        "cannot be loaded",
    ),
    "config not json": (lambda f: (f / "config.json").write_text("{"), "config.json", "not valid JSON"),
    "not llava": (_set_model_type, "config.json", "model_type is 'llama'"),
    "image token mismatch": (_shift_image_token, "config.json", "image_token_index 0 differs"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_broken_folder_fails_at_load_naming_the_file(
    case: str, generator_folder: Path, tmp_path: Path
) -> None:
    damage, filename, problem = DAMAGES[case]
    folder = _damaged_copy(generator_folder, tmp_path, damage)
    service = GeneratorService(folder, artifacts_root=tmp_path)
    with pytest.raises(ArtifactError) as caught:
        service.load()
    assert caught.value.path == folder / filename
    assert problem in str(caught.value)
    assert f"--out {tmp_path}" in str(caught.value)  # says how to build the artifacts
    assert not service.ready


def test_missing_folder_is_named(tmp_path: Path) -> None:
    service = GeneratorService.from_settings(GeneratorSettings(artifacts=tmp_path))
    with pytest.raises(ArtifactError, match="generator model folder not found") as caught:
        service.load()
    assert caught.value.path == tmp_path / "generator"


def test_settings_read_their_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMEDRAG_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("MMEDRAG_GENERATOR_SERVED_MODEL_NAME", "llava-med-merged")
    monkeypatch.setenv("MMEDRAG_GENERATOR_MAX_TOKENS_CEILING", "512")
    monkeypatch.setenv("MMEDRAG_GENERATOR_API_KEY", "topsecret-key")
    settings = GeneratorSettings()
    assert settings.port == 8003
    assert settings.model_folder == tmp_path / "generator"
    assert (settings.served_model_name, settings.max_tokens_ceiling) == ("llava-med-merged", 512)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "topsecret-key"
    assert "topsecret-key" not in repr(settings)
    monkeypatch.setenv("MMEDRAG_GENERATOR_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert GeneratorSettings().model_folder == tmp_path / "elsewhere"


@pytest.mark.anyio
async def test_app_start_up_fails_on_a_missing_folder(tmp_path: Path) -> None:
    app = build_app(GeneratorSettings(artifacts=tmp_path))
    with pytest.raises(ArtifactError, match="generator model folder not found"):
        async with app.router.lifespan_context(app):
            pass
