"""The classifier service in-process (httpx.ASGITransport) on a tiny classifier artifact."""

from __future__ import annotations

import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from services.classifier.app import build_app
from services.classifier.service import CLASSIFIER_CONFIG, CLASSIFIER_HEAD, DomainClassifier
from services.classifier.settings import ClassifierSettings
from services.common.artifacts import ArtifactError
from training.artifacts.classifier import write_tiny_classifier
from training.data.records import DOMAINS


def png_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    write_tiny_classifier(root / "classifier", seed=0)
    return root


@pytest.fixture(scope="session")
def loaded(artifacts_root: Path) -> DomainClassifier:
    service = DomainClassifier()
    service.load(artifacts_root)
    return service


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://classifier")


@pytest.fixture
async def client(artifacts_root: Path, loaded: DomainClassifier) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(build_app(ClassifierSettings(artifacts=artifacts_root), service=loaded)) as http:
        yield http


async def _classify(http: httpx.AsyncClient, data: bytes, name: str = "image.png") -> httpx.Response:
    return await http.post("/classify", files={"image": (name, data, "image/png")})


async def test_png_upload_is_classified(client: httpx.AsyncClient, loaded: DomainClassifier) -> None:
    response = await _classify(client, png_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    probabilities = body["probabilities"]
    assert list(probabilities) == list(DOMAINS)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert body["label"] == max(probabilities, key=probabilities.get)
    assert body["confidence"] == pytest.approx(probabilities[body["label"]])
    assert body["threshold"] == 0.5
    assert body["confident"] == (body["confidence"] >= body["threshold"])
    assert body["model"] == loaded.model_id and len(body["model"]) == 12
    assert response.headers["X-Request-ID"]


async def test_same_image_same_answer_and_jpeg_accepted(client: httpx.AsyncClient) -> None:
    first = (await _classify(client, png_bytes(seed=3))).json()
    second = (await _classify(client, png_bytes(seed=3))).json()
    assert first["probabilities"] == second["probabilities"]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 10)).save(buffer, format="JPEG")
    response = await client.post("/classify", files={"image": ("x.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200, response.text


def test_batched_classification_equals_one_by_one(loaded: DomainClassifier) -> None:
    images = [Image.open(io.BytesIO(png_bytes(seed=seed))).convert("RGB") for seed in range(3)]
    batch = loaded.classify(images)
    for image, result in zip(images, batch, strict=True):
        [single] = loaded.classify([image])
        assert single.label == result.label
        for label in DOMAINS:
            assert single.probabilities[label] == pytest.approx(result.probabilities[label], abs=1e-5)


@pytest.mark.parametrize(("threshold", "confident"), [(0.0, True), (1.0, False)])
async def test_threshold_setting_overrides_the_artifact(
    artifacts_root: Path, threshold: float, confident: bool
) -> None:
    settings = ClassifierSettings(artifacts=artifacts_root, threshold=threshold)
    app = build_app(settings)
    async with app.router.lifespan_context(app), _client(app) as http:
        body = (await _classify(http, png_bytes())).json()
    assert body["threshold"] == threshold
    assert body["confident"] is confident


def test_threshold_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMEDRAG_CLASSIFIER_THRESHOLD", "0.8")
    monkeypatch.setenv("MMEDRAG_CLASSIFIER_MAX_IMAGE_BYTES", "1000")
    settings = ClassifierSettings()
    assert settings.threshold == 0.8
    assert settings.max_image_bytes == 1000
    assert settings.port == 8001


async def test_missing_file_part_is_400(client: httpx.AsyncClient) -> None:
    for response in (
        await client.post("/classify", files={"picture": ("x.png", png_bytes(), "image/png")}),
        await client.post("/classify"),
    ):
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "'image' is required"
        assert response.json()["error"]["param"] == "image"


async def test_not_an_image_is_415(client: httpx.AsyncClient) -> None:
    response = await _classify(client, b"%PDF-1.7 this is a document, not an image", name="x.pdf")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert response.json()["error"]["param"] == "image"


async def test_corrupt_image_is_422(client: httpx.AsyncClient) -> None:
    data = png_bytes(size=(64, 64))
    response = await _classify(client, data[: len(data) // 2])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_image"


async def test_upload_over_the_byte_limit_is_413(artifacts_root: Path, loaded: DomainClassifier) -> None:
    data = png_bytes()
    app = build_app(
        ClassifierSettings(artifacts=artifacts_root, max_image_bytes=len(data) - 1), service=loaded
    )
    async with _client(app) as http:
        response = await _classify(http, data)
    assert response.status_code == 413


async def test_readyz_200_when_loaded(client: httpx.AsyncClient, loaded: DomainClassifier) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["ready"] is True
    assert response.json()["model"] == loaded.model_id


async def test_not_loaded_service_is_not_ready(artifacts_root: Path) -> None:
    app = build_app(ClassifierSettings(artifacts=artifacts_root), service=DomainClassifier())
    async with _client(app) as http:
        ready = await http.get("/readyz")
        classified = await _classify(http, png_bytes())
        health = await http.get("/healthz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert classified.status_code == 503
    assert classified.json()["error"]["code"] == "not_ready"
    assert health.status_code == 200


async def test_startup_on_empty_artifacts_fails_naming_the_classifier_file(tmp_path: Path) -> None:
    app = build_app(ClassifierSettings(artifacts=tmp_path))
    with pytest.raises(ArtifactError) as excinfo:
        async with app.router.lifespan_context(app):
            pass
    assert excinfo.value.path == tmp_path / "classifier" / CLASSIFIER_CONFIG
    assert "classifier" in str(excinfo.value) and "mmedrag artifacts tiny" in str(excinfo.value)


@pytest.mark.parametrize(
    ("broken", "content", "needle"),
    [
        (CLASSIFIER_HEAD, None, "not found"),
        (CLASSIFIER_HEAD, b"garbage", "head"),
        (CLASSIFIER_CONFIG, b'{"labels": [], "threshold": 0.5, "head": "linear"}', "labels"),
        (CLASSIFIER_CONFIG, b'{"labels": ["a", "b", "c"], "threshold": 2, "head": "linear"}', "threshold"),
        (CLASSIFIER_CONFIG, b'{"labels": ["a", "b"], "threshold": 0.5, "head": "linear"}', "weight"),
        (CLASSIFIER_CONFIG, b"{not json", "not valid JSON"),
    ],
)
def test_broken_classifier_files_are_named(
    artifacts_root: Path, tmp_path: Path, broken: str, content: bytes | None, needle: str
) -> None:
    shutil.copytree(artifacts_root / "classifier", tmp_path / "classifier")
    target = tmp_path / "classifier" / broken
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    service = DomainClassifier()
    with pytest.raises(ArtifactError) as excinfo:
        service.load(tmp_path)
    message = str(excinfo.value)
    expected = CLASSIFIER_HEAD if needle == "weight" else broken
    assert excinfo.value.path == tmp_path / "classifier" / expected
    assert needle in message
    assert not service.ready


async def test_metrics_record_the_stages(client: httpx.AsyncClient) -> None:
    await _classify(client, png_bytes())
    metrics = (await client.get("/metrics")).text
    assert 'mmedrag_stage_seconds_count{service="classifier",stage="classify"}' in metrics
    assert 'mmedrag_stage_seconds_count{service="classifier",stage="decode"}' in metrics
