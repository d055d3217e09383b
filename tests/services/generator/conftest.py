"""One tiny LLaVA folder and one loaded service for the whole session; apps are cheap and built per test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from services.common.images import encode_png, to_data_url
from services.generator.app import build_app
from services.generator.service import GeneratorService
from services.generator.settings import GeneratorSettings
from training.artifacts.generator import build_tiny_generator

SERVED = "mmedrag-llava"
PROMPT = "Is there a pleural effusion? Please answer the question based on the image."


@pytest.fixture(scope="session")
def generator_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_generator(tmp_path_factory.mktemp("artifacts") / "generator", seed=0)


@pytest.fixture(scope="session")
def generator_service(generator_folder: Path) -> GeneratorService:
    service = GeneratorService(
        generator_folder, served_model_name=SERVED, max_tokens_ceiling=64, torch_threads=1
    )
    service.load()
    return service


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def data_url() -> str:
    image = Image.new("RGB", (80, 64), (30, 30, 30))
    image.paste((220, 220, 220), (10, 10, 40, 50))
    return to_data_url(encode_png(image))


@pytest.fixture
def make_app(generator_service: GeneratorService, generator_folder: Path) -> Callable:
    """An app around the session's loaded service; keyword arguments become settings."""

    def _make(**settings: object):
        return build_app(GeneratorSettings(model_dir=generator_folder, **settings), service=generator_service)

    return _make


@pytest.fixture
def chat_body(data_url: str) -> Callable[..., dict]:
    """The request the router sends (one user message, image part first, then the text), greedy, 8 tokens;
    keyword arguments replace or add fields."""

    def _body(url: str = data_url, prompt: str = PROMPT, **fields: object) -> dict:
        message = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
        return {"model": SERVED, "messages": [message], "max_tokens": 8, "temperature": 0, **fields}

    return _body
