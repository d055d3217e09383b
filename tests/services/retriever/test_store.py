"""The vector-store adapter on an embedded store: search order, collection info, and its errors."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import models

from services.common.errors import DependencyUnavailable, NotFound
from services.retriever.store import RETRIEVER_SHA256_KEY, VectorStore


@pytest.fixture
def store(tmp_path: Path):
    store = VectorStore.open(path=tmp_path / "index")
    yield store
    store.close()


def _fill(store: VectorStore, name: str = "mmedrag_radiology") -> np.ndarray:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    store.client.create_collection(
        name,
        vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE),
        metadata={RETRIEVER_SHA256_KEY: "ab" * 32},
    )
    store.client.upsert(
        name,
        points=[
            models.PointStruct(id=i, vector=v.tolist(), payload={"text": f"report {i}", "dataset": "d"})
            for i, v in enumerate(vectors)
        ],
    )
    return vectors


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))


def test_search_returns_cosine_nearest_first(store: VectorStore):
    vectors = _fill(store)
    query = vectors[3] + 0.05
    hits = store.search("mmedrag_radiology", query, limit=4)
    expected = np.argsort(-_cosine(query, vectors))[:4]
    assert [hit.id for hit in hits] == [str(i) for i in expected]
    assert [hit.text for hit in hits] == [f"report {i}" for i in expected]
    np.testing.assert_allclose(
        [hit.score for hit in hits], np.sort(_cosine(query, vectors))[::-1][:4], rtol=1e-5
    )
    assert hits[0].payload == {"text": "report 3", "dataset": "d"}
    assert len(store.search("mmedrag_radiology", query, limit=50)) == 6


def test_collection_info_reports_checksum_and_size(store: VectorStore):
    _fill(store)
    info = store.collection_info("mmedrag_radiology")
    assert (info.points_count, info.vector_size, info.distance) == (6, 8, "Cosine")
    assert info.retriever_sha256 == "ab" * 32


def test_missing_collection_names_the_build_command(store: VectorStore):
    for call in (
        lambda: store.collection_info("mmedrag_pathology"),
        lambda: store.search("mmedrag_pathology", [0.1] * 8, limit=3),
    ):
        with pytest.raises(NotFound) as caught:
            call()
        assert "'mmedrag_pathology'" in caught.value.message
        assert "`mmedrag index --domain pathology`" in caught.value.message
        assert caught.value.status_code == 404


def test_missing_embedded_folder_is_not_created_when_serving(tmp_path: Path):
    with pytest.raises(NotFound, match="mmedrag index"):
        VectorStore.open(path=tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


def test_embedded_store_admits_one_client_at_a_time(store: VectorStore, tmp_path: Path):
    with pytest.raises(DependencyUnavailable, match="only one process"):
        VectorStore.open(path=tmp_path / "index")
    store.close()
    VectorStore.open(path=tmp_path / "index").close()  # the lock is released by close()


def test_unreachable_server_is_dependency_unavailable():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = VectorStore.open(url=f"http://127.0.0.1:{port}", timeout=2)
    assert not store.embedded
    with pytest.raises(
        DependencyUnavailable, match=f"Qdrant server at http://127.0.0.1:{port} is unreachable"
    ):
        store.ping()
    with pytest.raises(DependencyUnavailable):
        store.search("mmedrag_radiology", [0.1] * 8, limit=3)
    store.close()


def test_open_needs_a_url_or_a_path():
    with pytest.raises(ValueError, match="url or the path"):
        VectorStore.open()
