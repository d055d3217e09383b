"""RetrieverService start-up checks (refuses inconsistent artifacts) and query batching."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.artifacts import ArtifactError, sha256_file
from services.common.errors import NotFound
from services.retriever.protocol import RetrieveParams
from services.retriever.selection import select_paper
from services.retriever.service import ImageBatcher, RetrieverService
from services.retriever.settings import RetrieverSettings
from services.retriever.store import VectorStore
from training.artifacts.clip import write_clip_artifact
from training.artifacts.retriever import write_retriever_sidecar

pytestmark = pytest.mark.anyio


def test_refuses_an_index_built_by_another_retriever(copied_artifacts: Path, retriever_service):
    indexed_with = retriever_service.retrievers["radiology"].encoder.weights_sha256
    folder = copied_artifacts / "retrievers" / "radiology"
    shutil.rmtree(folder)
    write_clip_artifact(folder, seed=99)  # retriever B; the index holds retriever A's embeddings
    write_retriever_sidecar(folder, "radiology")
    service = RetrieverService(RetrieverSettings(artifacts=copied_artifacts, domains="radiology"))
    with pytest.raises(ArtifactError) as caught:
        service.load()
    message = str(caught.value)
    assert "collection 'mmedrag_radiology'" in message
    assert indexed_with in message
    assert sha256_file(folder / "open_clip_model.safetensors") in message
    assert "mmedrag index --domain radiology" in message
    assert not service.ready
    VectorStore.open(path=copied_artifacts / "index").close()  # the failed load released the store


def test_missing_collection_stops_start_up_with_the_build_command(copied_artifacts: Path):
    shutil.rmtree(copied_artifacts / "index")
    VectorStore.open(path=copied_artifacts / "index").close()  # an empty store
    service = RetrieverService(RetrieverSettings(artifacts=copied_artifacts, domains="pathology"))
    with pytest.raises(NotFound) as caught:
        service.load()
    assert "'mmedrag_pathology'" in caught.value.message
    assert "`mmedrag index --domain pathology`" in caught.value.message


def test_missing_index_folder_is_reported_not_created(copied_artifacts: Path):
    shutil.rmtree(copied_artifacts / "index")
    with pytest.raises(NotFound, match="mmedrag index"):
        RetrieverService(RetrieverSettings(artifacts=copied_artifacts)).load()
    assert not (copied_artifacts / "index").exists()


def test_sidecar_problems_name_the_file(copied_artifacts: Path):
    sidecar = copied_artifacts / "retrievers" / "ophthalmology" / "retriever.json"
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "domain": "pathology"}))
    settings = RetrieverSettings(artifacts=copied_artifacts, domains="ophthalmology")
    with pytest.raises(ArtifactError, match=r"retriever\.json: is for domain 'pathology'"):
        RetrieverService(settings).load()
    sidecar.write_text(json.dumps({**data, "gamma": -1}))
    with pytest.raises(ArtifactError, match="gamma"):
        RetrieverService(settings).load()
    sidecar.unlink()
    with pytest.raises(ArtifactError, match="retriever sidecar not found"):
        RetrieverService(settings).load()


def test_gamma_comes_from_the_sidecar_else_the_setting(copied_artifacts: Path):
    write_retriever_sidecar(
        copied_artifacts / "retrievers" / "radiology", "radiology", gamma=0.2, k_max_default=7
    )
    service = RetrieverService(
        RetrieverSettings(artifacts=copied_artifacts, domains="radiology,pathology", default_gamma=0.11)
    )
    service.load()
    try:
        assert service.gamma_for("radiology") == 0.2
        assert service.gamma_for("pathology") == 0.11
        assert service.k_max_default_for("radiology") == 7
        assert service.k_max_default_for("pathology") == 10
    finally:
        service.close()


def test_settings_parse_domains_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMEDRAG_RETRIEVER_DOMAINS", "pathology, radiology")
    monkeypatch.setenv("MMEDRAG_RETRIEVER_QDRANT_URL", "http://qdrant:6333")
    settings = RetrieverSettings()
    assert settings.domains == ("pathology", "radiology")
    assert settings.qdrant_url == "http://qdrant:6333" and settings.port == 8002
    with pytest.raises(ValueError, match="dermatology"):
        RetrieverSettings(domains="dermatology")
    with pytest.raises(ValueError, match="k_max_default"):
        RetrieverSettings(k_max_default=60, k_max_ceiling=50)


async def test_retrieve_matches_the_selection_rule(retriever_service, retriever_artifacts):
    image = Image.open(retriever_artifacts.data / "pathology" / "images" / "00001.jpg").convert("RGB")
    response = await retriever_service.retrieve(image, RetrieveParams(domain="pathology", k_max=6, gamma=0.0))
    scores = [c.score for c in response.contexts]
    assert response.k == select_paper(scores, gamma=0.0, k_max=6)
    assert response.kept == response.contexts[: response.k]


# --------------------------------------------------------------------------------------------------
# Batching


class CountingEncoder:
    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        self.batches.append(len(images))
        return np.asarray([[float(np.asarray(image).mean()), 1.0] for image in images], dtype=np.float32)


async def test_concurrent_queries_share_a_forward_pass():
    encoder = CountingEncoder()
    batcher = ImageBatcher(encoder, max_batch=4, max_wait_s=0.05)
    images = [Image.new("RGB", (8, 8), (i * 10, 0, 0)) for i in range(10)]
    vectors = await asyncio.gather(*(batcher.encode(image) for image in images))
    assert sorted(encoder.batches, reverse=True) == [4, 4, 2]
    for i, vector in enumerate(vectors):  # every caller gets its own row
        assert vector[0] == pytest.approx(i * 10 / 3)


async def test_a_failed_batch_fails_every_waiter():
    def broken(images):
        raise RuntimeError("boom")

    batcher = ImageBatcher(broken, max_batch=8, max_wait_s=0.01)
    results = await asyncio.gather(
        *(batcher.encode(Image.new("RGB", (8, 8))) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_images_are_preprocessed_outside_the_batch_and_embed_as_before(
    retriever_service, retriever_artifacts, monkeypatch: pytest.MonkeyPatch
):
    """The batch thread runs only the forward pass: resizing happens in each request's own thread, and the
    vector is the one ``encode_images`` gives."""
    image = Image.open(retriever_artifacts.data / "pathology" / "images" / "00001.jpg").convert("RGB")
    domain = retriever_service._domain("pathology")
    original = domain.encoder.preprocess
    threads: list[str] = []

    def recording(picture):
        threads.append(threading.current_thread().name)
        return original(picture)

    monkeypatch.setattr(domain.encoder, "preprocess", recording)
    response = await retriever_service.retrieve(image, RetrieveParams(domain="pathology", k_max=3))
    assert threads and not any(name.startswith("batcher-") for name in threads)
    expected = domain.encoder.encode_images([image])[0]
    [hit] = retriever_service.store.search(domain.collection, expected, 1)
    assert response.contexts[0].score == pytest.approx(hit.score, abs=1e-5)
