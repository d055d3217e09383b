"""Micro-batching in the classifier service: concurrent requests share a forward pass, same answers."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from services.classifier.app import build_app
from services.classifier.service import DomainClassifier
from services.classifier.settings import ClassifierSettings
from training.artifacts.classifier import write_tiny_classifier

REQUESTS = 6


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(40 + seed, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    write_tiny_classifier(root / "classifier", seed=0)
    return root


def loaded(root: Path, **kwargs: float) -> DomainClassifier:
    service = DomainClassifier(**kwargs)
    service.load(root)
    return service


async def classify_all(service: DomainClassifier, root: Path) -> tuple[list[dict], str]:
    """Send every image at once; the answers (without ids) and the app's /metrics text."""
    app = build_app(ClassifierSettings(artifacts=root), service=service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://classifier") as client:
        responses = await asyncio.gather(
            *(
                client.post("/classify", files={"image": ("i.png", png_bytes(seed), "image/png")})
                for seed in range(REQUESTS)
            )
        )
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = [{k: v for k, v in r.json().items() if k not in ("id", "created")} for r in responses]
    return answers, metrics


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


async def test_concurrent_requests_share_one_forward_pass_and_get_their_own_answers(
    artifacts_root: Path,
) -> None:
    # max_batch = the number of requests and a long wait: all of them meet in one batch
    batched = loaded(artifacts_root, max_batch=REQUESTS, max_wait_s=5.0)
    alone = loaded(artifacts_root, max_batch=1)
    together, metrics = await classify_all(batched, artifacts_root)
    one_by_one, unbatched_metrics = await classify_all(alone, artifacts_root)

    assert metric(metrics, "mmedrag_batch_size_count") == 1
    assert metric(metrics, "mmedrag_batch_size_sum") == REQUESTS
    assert metric(metrics, "mmedrag_batch_wait_seconds_count") == REQUESTS
    assert metric(unbatched_metrics, "mmedrag_batch_size_count") == REQUESTS
    assert metric(unbatched_metrics, "mmedrag_batch_size_sum") == REQUESTS
    assert len({a["label"] + str(a["confidence"]) for a in together}) > 1  # distinct images, distinct rows
    for got, expected in zip(together, one_by_one, strict=True):
        assert got.keys() == expected.keys()
        assert got["label"] == expected["label"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)


def test_blocking_classify_of_several_images_keeps_their_order(artifacts_root: Path) -> None:
    images = [Image.open(io.BytesIO(png_bytes(seed))).convert("RGB") for seed in range(REQUESTS)]
    alone = loaded(artifacts_root, max_batch=1)
    expected = [alone.classify([image])[0] for image in images]
    results = loaded(artifacts_root, max_batch=4, max_wait_s=0.001).classify(images)
    assert [r.label for r in results] == [e.label for e in expected]
    assert [r.confidence for r in results] == pytest.approx([e.confidence for e in expected], abs=1e-6)


async def test_async_classify_batches_too(artifacts_root: Path) -> None:
    service = loaded(artifacts_root, max_batch=3, max_wait_s=5.0)
    images = [Image.open(io.BytesIO(png_bytes(seed))).convert("RGB") for seed in range(3)]
    results = await asyncio.gather(*(service.aclassify(image) for image in images))
    assert [r.label for r in results] == [r.label for r in service.classify(images)]


def test_batching_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, artifacts_root: Path
) -> None:
    monkeypatch.setenv("MMEDRAG_CLASSIFIER_MAX_BATCH", "1")
    monkeypatch.setenv("MMEDRAG_CLASSIFIER_MAX_WAIT_MS", "7.5")
    settings = ClassifierSettings(artifacts=artifacts_root)
    assert (settings.max_batch, settings.max_wait_ms) == (1, 7.5)
    app = build_app(settings)
    classifier: DomainClassifier = app.state.classifier
    assert not classifier.batcher.enabled and classifier.batcher.max_wait_s == pytest.approx(0.0075)
    with pytest.raises(ValueError):
        ClassifierSettings(max_batch=0)
