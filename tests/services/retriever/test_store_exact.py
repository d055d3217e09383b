"""The in-memory exact index behind ``VectorStore.search``: same answers as Qdrant's exact search, the
``exact_index`` setting choosing the path, and reloading when the collection changes."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from services.common.errors import NotFound
from services.retriever.settings import RetrieverSettings
from services.retriever.store import ExactIndex, Hit, VectorStore

COLLECTION = "mmedrag_radiology"
DIM = 24


@pytest.fixture
def store():
    """An embedded store held in memory: the same local Qdrant collection code as the on-disk store
    (which only adds a per-point sqlite commit on writes), so fills stay fast."""
    store = VectorStore(QdrantClient(":memory:"), location="embedded store :memory:", embedded=True)
    yield store
    store.close()


def qdrant_only(store: VectorStore) -> VectorStore:
    """A second view of the same client that always asks Qdrant (the reference)."""
    return VectorStore(store.client, location=store.location, embedded=True, exact_index="off")


def fill(
    store: VectorStore,
    n: int,
    *,
    seed: int = 0,
    collection: str = COLLECTION,
    distance: models.Distance = models.Distance.COSINE,
) -> tuple[list[str], np.ndarray]:
    """``n`` random points with uuid ids (as `mmedrag index` writes) and a payload naming each."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    ids = [str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i)) for i in range(n)]
    store.client.create_collection(
        collection, vectors_config=models.VectorParams(size=DIM, distance=distance)
    )
    if n:
        store.client.upsert(
            collection,
            points=[
                models.PointStruct(id=pid, vector=v.tolist(), payload={"text": f"report {i}", "i": i})
                for i, (pid, v) in enumerate(zip(ids, vectors, strict=True))
            ],
        )
    return ids, vectors


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k in float64: the ground truth."""
    v = vectors.astype(np.float64)
    scores = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def assert_same_hits(got: list[Hit], want: list[Hit]) -> None:
    assert [h.id for h in got] == [h.id for h in want]
    assert [h.text for h in got] == [h.text for h in want]
    assert [h.payload for h in got] == [h.payload for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-5)


def test_exact_search_equals_qdrant_search_and_brute_force(store: VectorStore):
    ids, vectors = fill(store, 400)
    reference = qdrant_only(store)
    rng = np.random.default_rng(1)
    for _ in range(25):
        query = rng.standard_normal(DIM).astype(np.float32)
        for k in (1, 10, 50):
            hits = store.search(COLLECTION, query, limit=k)
            assert_same_hits(hits, reference.search(COLLECTION, query, limit=k))
            order, scores = brute_force(vectors, query, k)
            assert [h.id for h in hits] == [ids[i] for i in order]  # recall@k = 1.0, same order
            np.testing.assert_allclose([h.score for h in hits], scores, rtol=0, atol=1e-5)
    index = store.prepare(COLLECTION)
    assert len(index) == 400 and store.prepare(COLLECTION) is index  # loaded once, kept


def test_on_disk_store_uses_the_exact_index_by_default(tmp_path: Path):
    store = VectorStore.open(path=tmp_path / "index")
    assert store.uses_exact_index
    try:
        ids, vectors = fill(store, 50)
        hit = store.search(COLLECTION, vectors[17] * 3.0, limit=1)[0]  # cosine ignores the scale
        assert len(store.prepare(COLLECTION)) == 50
    finally:
        store.close()
    assert (hit.id, hit.text) == (ids[17], "report 17")
    assert hit.score == pytest.approx(1.0, abs=1e-6)
    assert hit.payload == {"text": "report 17", "i": 17}


def test_limit_larger_than_the_collection_returns_every_point(store: VectorStore):
    ids, vectors = fill(store, 7)
    query = vectors[0] + vectors[1]
    hits = store.search(COLLECTION, query, limit=50)
    assert sorted(h.id for h in hits) == sorted(ids)
    assert_same_hits(hits, qdrant_only(store).search(COLLECTION, query, limit=50))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_empty_collection_has_no_hits(store: VectorStore):
    fill(store, 0)
    assert store.search(COLLECTION, np.ones(DIM), limit=5) == []
    assert qdrant_only(store).search(COLLECTION, np.ones(DIM), limit=5) == []
    assert len(store.prepare(COLLECTION)) == 0


def test_missing_collection_is_not_found_on_the_exact_path(store: VectorStore):
    with pytest.raises(NotFound, match="`mmedrag index --domain pathology`"):
        store.search("mmedrag_pathology", np.ones(DIM), limit=3)
    with pytest.raises(NotFound):
        store.prepare("mmedrag_pathology")


def test_bad_queries_are_refused_like_qdrant_refuses_them(store: VectorStore):
    fill(store, 5)
    with pytest.raises(ValueError, match="NaN"):
        store.search(COLLECTION, [float("nan")] * DIM, limit=3)
    with pytest.raises(ValueError, match="dimensions"):
        store.search(COLLECTION, np.ones(DIM + 1), limit=3)
    with pytest.raises(ValueError, match="limit"):
        store.search(COLLECTION, np.ones(DIM), limit=0)
    zero = store.search(COLLECTION, np.zeros(DIM), limit=3)  # Qdrant scores a zero query 0 everywhere
    assert [h.score for h in zero] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("mode", "embedded", "exact"),
    [("auto", True, True), ("auto", False, False), ("on", False, True), ("off", True, False)],
)
def test_the_setting_chooses_the_path(store: VectorStore, mode: str, embedded: bool, exact: bool):
    ids, vectors = fill(store, 30)
    view = VectorStore(store.client, location="test", embedded=embedded, exact_index=mode)  # type: ignore[arg-type]
    assert view.uses_exact_index is exact
    asked_qdrant = []
    original = store.client.query_points

    def query_points(*args, **kwargs):
        asked_qdrant.append(1)
        return original(*args, **kwargs)

    store.client.query_points = query_points  # type: ignore[method-assign]
    hits = view.search(COLLECTION, vectors[3], limit=4)
    assert hits[0].id == ids[3]
    assert bool(asked_qdrant) is not exact
    assert (view.prepare(COLLECTION) is not None) is exact


def test_settings_read_the_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    assert RetrieverSettings(artifacts=tmp_path).exact_index == "auto"
    monkeypatch.setenv("MMEDRAG_RETRIEVER_EXACT_INDEX", "off")
    assert RetrieverSettings(artifacts=tmp_path).exact_index == "off"
    monkeypatch.setenv("MMEDRAG_RETRIEVER_EXACT_INDEX", "sometimes")
    with pytest.raises(ValueError, match="exact_index"):
        RetrieverSettings(artifacts=tmp_path)
    with pytest.raises(ValueError, match="exact_index must be one of"):
        VectorStore.open(path=tmp_path / "other", exact_index="sometimes")  # type: ignore[arg-type]


def test_index_follows_writes(store: VectorStore):
    ids, vectors = fill(store, 20)
    rng = np.random.default_rng(5)
    store.search(COLLECTION, vectors[0], limit=3)  # loads the index
    # A new point (the count changes): found without any call to invalidate().
    new = rng.standard_normal(DIM).astype(np.float32)
    store.client.upsert(
        COLLECTION, points=[models.PointStruct(id=999, vector=new.tolist(), payload={"text": "new"})]
    )
    assert store.search(COLLECTION, new, limit=1)[0].id == "999"
    # A payload edit (same count): payloads are read from Qdrant on each search.
    store.client.set_payload(COLLECTION, payload={"text": "edited"}, points=[ids[4]])
    assert store.search(COLLECTION, vectors[4], limit=1)[0].text == "edited"
    # A vector replaced through calls() (same count), as the index builder writes: the index is dropped.
    moved = rng.standard_normal(DIM).astype(np.float32)
    with store.calls(COLLECTION) as client:
        client.upsert(COLLECTION, points=[models.PointStruct(id=ids[6], vector=moved.tolist(), payload={})])
    assert store.search(COLLECTION, moved, limit=1)[0].id == ids[6]
    assert_same_hits(
        store.search(COLLECTION, vectors[6], limit=5),
        qdrant_only(store).search(COLLECTION, vectors[6], limit=5),
    )


def test_a_hit_deleted_behind_the_index_is_never_returned(store: VectorStore):
    ids, vectors = fill(store, 20)
    store.prepare(COLLECTION)
    # Delete the best hit and add another point straight through the client: the count is unchanged.
    store.client.delete(COLLECTION, points_selector=models.PointIdsList(points=[ids[2]]))
    store.client.upsert(
        COLLECTION, points=[models.PointStruct(id=7777, vector=(-vectors[2]).tolist(), payload={})]
    )
    hits = store.search(COLLECTION, vectors[2], limit=3)
    assert ids[2] not in [h.id for h in hits]
    assert_same_hits(hits, qdrant_only(store).search(COLLECTION, vectors[2], limit=3))
    assert store.search(COLLECTION, -vectors[2], limit=1)[0].id == "7777"  # reloaded since


def test_collection_the_index_cannot_hold_falls_back_to_qdrant(store: VectorStore):
    ids, vectors = fill(store, 15, distance=models.Distance.EUCLID)
    assert store.prepare(COLLECTION) is None
    hits = store.search(COLLECTION, vectors[9], limit=3)
    assert hits[0].id == ids[9]
    assert hits[0].score == pytest.approx(0.0, abs=1e-6)  # Euclidean: Qdrant's own scores


def test_concurrent_first_searches_load_the_index_once(store: VectorStore, monkeypatch: pytest.MonkeyPatch):
    ids, vectors = fill(store, 200)
    loads = []
    original = ExactIndex.from_client

    def counting(client, collection, **kwargs):
        loads.append(collection)
        return original(client, collection, **kwargs)

    monkeypatch.setattr(ExactIndex, "from_client", staticmethod(counting))
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = store.search(COLLECTION, vectors[i], limit=1)[0].id

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: ids[i] for i in range(8)}
    assert loads == [COLLECTION]


def test_exact_index_dot_distance_and_integer_ids():
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    index = ExactIndex([10, 11, 12], vectors, distance="Dot")
    ids, scores = index.top_k([1.0, 1.0], 2)
    assert ids == [12, 11]
    np.testing.assert_allclose(scores, [6.0, 2.0])
    cosine = ExactIndex(["a", "b", "c"], vectors, distance="Cosine")
    ids, scores = cosine.top_k([1.0, 1.0], 5)
    assert ids == ["c", "a", "b"]  # equal scores: the earlier row first
    np.testing.assert_allclose(scores, [1.0, np.sqrt(0.5), np.sqrt(0.5)])
    with pytest.raises(ValueError, match="Euclid"):
        ExactIndex([1], np.ones((1, 2)), distance="Euclid")


def test_loading_in_pages_reads_every_point_once(store: VectorStore, monkeypatch: pytest.MonkeyPatch):
    ids, vectors = fill(store, 23)
    monkeypatch.setattr("services.retriever.store.EXACT_ID_PAGE", 5)
    index = ExactIndex.from_client(store.client, COLLECTION, page=4)
    assert index is not None
    assert sorted(index.ids) == sorted(ids)
    rows = [ids.index(pid) for pid in index.ids]
    expected = vectors[rows] / np.linalg.norm(vectors[rows], axis=1, keepdims=True)
    np.testing.assert_allclose(index.matrix, expected, atol=1e-6)
