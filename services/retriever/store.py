"""The vector store behind the retrievers: one Qdrant collection per domain, on a server or embedded.

``VectorStore.open(url=...)`` talks to a Qdrant server (production, scale-out); ``VectorStore.open(
path=...)`` opens qdrant-client's embedded local store, a folder (``artifacts/index``) read and written
in-process, so the embedded default needs no server.

**One process per embedded store.** qdrant-client takes a file lock on the folder: a second process (or
a second client in the same process) that opens the same path fails. At serving time the retriever
service is the single owner of ``artifacts/index``; build or rebuild the index (``mmedrag index``)
while the service is stopped, or run a Qdrant server when several processes need the store.

Every qdrant-client failure is translated here into the service errors: an unknown collection is
``NotFound`` naming the command that builds it, an unreachable server ``DependencyUnavailable``, a
server that does not answer in time ``DependencyTimeout``. The retriever checksum each collection was
built with lives in the collection's own metadata (``RETRIEVER_SHA256_KEY``), so a store can never be
served with a retriever whose embeddings it does not hold.

**Exact in-memory index.** The embedded store scores a query in Python/numpy: it upcasts every stored
vector to float64, re-normalises them all and sorts every score, 10-50x slower than one float32 matrix
product (``bench/retrieval.py``: 10k reports, ~43 ms against ~1 ms). ``ExactIndex`` is that matrix
product: every vector of a collection, read once from the store (ids by scroll, vectors by id), held as
a float32 matrix; its top-k is exact (same ids, order and scores as Qdrant's exact search, to float
rounding), so recall stays 1.0. Qdrant stays the source of truth: the index holds vectors and ids only,
and the payloads of the hits are read from Qdrant on each search, so payload edits show at once.
``exact_index`` chooses where it is used: ``"auto"`` (default) for the embedded store and not for a
server (whose HNSW index is made for large corpora and may be written by other processes), ``"on"`` for
both, ``"off"`` never. The index is loaded on the first search of a collection (or at start-up by
``prepare``), reloaded when the collection's point count changes (one count call per search:
in-process for the embedded store, a round trip to a server), and dropped whenever code writes through
``calls()`` (the index builder does); code that writes through ``store.client`` directly without
changing the count must call ``invalidate``. It costs ``points x dim x 4`` bytes of memory (100k x 512:
200 MB) besides the store's own copy, and loading 100k points takes seconds (the store hands vectors out
as Python lists).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.artifacts import collection_name
from services.common.errors import DependencyTimeout, DependencyUnavailable, NotFound

logger = logging.getLogger(__name__)

COLLECTION_PREFIX = collection_name("")  # "mmedrag_"
# Collection metadata keys written by `training.index` and read by the service.
RETRIEVER_SHA256_KEY = "retriever_sha256"
DOMAIN_KEY = "domain"

ExactIndexMode = Literal["auto", "on", "off"]
EXACT_INDEX_MODES: tuple[str, ...] = get_args(ExactIndexMode)
# Loading an exact index: ids per scroll page, and vectors per fetch (bounds the transient lists of floats).
EXACT_ID_PAGE = 65536
EXACT_LOAD_PAGE = 4096
# Qdrant's guard for zero-norm vectors (f32::EPSILON), used the same way so that scores agree.
_EPSILON = 1.1920929e-7
# Candidates re-scored in float64 beyond k: absorbs float32 rounding at the k-th place.
_RESCORE_MARGIN = 8
# Up to this many matrix elements (32k x 512) a query is scored on the calling thread (np.einsum, no BLAS
# threads). BLAS wakes its worker threads for any product of this size; on a busy machine a woken
# thread can wait a scheduler time slice (milliseconds) for a core, which costs a small product far more
# than the threads save. Above it the product is large enough for BLAS threads to pay off.
SINGLE_THREAD_MAX_ELEMENTS = 16_000_000
PointId = int | str


def index_command(domain: str | None) -> str:
    """The command that (re)builds a domain's collection."""
    return f"mmedrag index --domain {domain or 'DOMAIN'}"


def _domain_of(collection: str) -> str | None:
    return collection[len(COLLECTION_PREFIX) :] if collection.startswith(COLLECTION_PREFIX) else None


@dataclass(frozen=True)
class Hit:
    """One search result: the point id, its report text, the cosine similarity and the whole payload."""

    id: str
    text: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectionInfo:
    """What the service checks before serving a collection."""

    name: str
    points_count: int  # distinct report texts stored
    vector_size: int | None
    distance: str | None
    retriever_sha256: str | None  # None: built by something other than `mmedrag index`
    metadata: dict[str, Any] = field(default_factory=dict)


class ExactIndex:
    """Exact nearest-neighbour search over one collection's vectors, held in memory as a float32 matrix.

    Scores are Qdrant's: cosine normalises the stored rows and the query (a zero vector scores 0), dot
    uses them as they are. Top-k is one float32 matrix-vector product and ``np.argpartition``; the
    ``k + 8`` best candidates are then re-scored in float64 (as Qdrant's embedded store scores) and sorted
    best first, ties by row (the collection's id order). Read-only once built: safe to share between
    threads.

    Args:
        ids: the point ids, one per row of ``vectors``.
        vectors: ``(len(ids), dim)`` array.
        distance: ``"Cosine"`` or ``"Dot"`` (``models.Distance`` values).

    Example::

        index = ExactIndex(["a", "b"], np.eye(2), distance="Cosine")
        index.top_k([1.0, 0.1], 1)  # (["a"], array([0.995...]))
    """

    SUPPORTED = (models.Distance.COSINE.value, models.Distance.DOT.value)

    def __init__(self, ids: Sequence[PointId], vectors: np.ndarray, *, distance: str):
        if distance not in self.SUPPORTED:
            raise ValueError(f"exact index supports {' and '.join(self.SUPPORTED)} distance, got {distance}")
        matrix = np.array(vectors, dtype=np.float32, order="C", copy=True)
        if matrix.ndim != 2 or matrix.shape[0] != len(ids):
            raise ValueError(f"vectors of shape {matrix.shape} do not match {len(ids)} ids")
        if distance == models.Distance.COSINE.value and len(matrix):
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrix /= np.where(norms != 0.0, norms, _EPSILON)
        self.ids = list(ids)
        self.matrix = matrix
        self.distance = distance

    def __len__(self) -> int:
        return self.matrix.shape[0]

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes

    @classmethod
    def from_client(
        cls, client: QdrantClient, collection: str, *, page: int = EXACT_LOAD_PAGE
    ) -> ExactIndex | None:
        """Every point of ``collection``; None when its vectors are not one unnamed dense vector with
        cosine or dot distance (the caller then keeps Qdrant's search).

        The ids are scrolled first (without vectors, in large pages), then the vectors are fetched by id
        in pages of ``page``: the embedded store sorts every id on each scroll page, so scrolling the
        vectors page by page would cost a sort per page.
        """
        params = client.get_collection(collection).config.params.vectors
        if not isinstance(params, models.VectorParams) or params.distance.value not in cls.SUPPORTED:
            return None
        all_ids: list[PointId] = []
        offset: PointId | None = None
        while True:
            records, offset = client.scroll(
                collection, limit=EXACT_ID_PAGE, offset=offset, with_payload=False, with_vectors=False
            )
            all_ids += [record.id for record in records]
            if offset is None:
                break
        ids: list[PointId] = []
        blocks: list[np.ndarray] = []
        for start in range(0, len(all_ids), page):
            rows = []
            for record in client.retrieve(
                collection, all_ids[start : start + page], with_payload=False, with_vectors=True
            ):
                vector = record.vector
                if isinstance(vector, dict):  # a client may name the default vector ""
                    vector = vector.get("")
                if vector is None:  # a point without this vector is never a search result
                    continue
                ids.append(record.id)  # a point deleted meanwhile is simply not returned
                rows.append(vector)
            if rows:
                blocks.append(np.asarray(rows, dtype=np.float32))
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, params.size), dtype=np.float32)
        return cls(ids, vectors, distance=params.distance.value)

    def prepare_query(self, vector: Sequence[float] | np.ndarray) -> np.ndarray:
        """The query as Qdrant scores it: float64, normalised for cosine."""
        query = np.asarray(vector, dtype=np.float64).reshape(-1)
        if query.shape[0] != self.dim:
            raise ValueError(f"query vector has {query.shape[0]} dimensions, the collection {self.dim}")
        if np.isnan(query).any():
            raise ValueError("Query vector must not contain NaN")
        if self.distance == models.Distance.COSINE.value:
            norm = np.linalg.norm(query)
            query = query / (norm if norm != 0.0 else _EPSILON)
        return query

    def _scores(self, query: np.ndarray) -> np.ndarray:
        """float32 scores of every row (see ``SINGLE_THREAD_MAX_ELEMENTS`` for the two kernels)."""
        if self.matrix.size <= SINGLE_THREAD_MAX_ELEMENTS:
            return np.einsum("ij,j->i", self.matrix, query)
        return self.matrix @ query

    def top_k(self, vector: Sequence[float] | np.ndarray, k: int) -> tuple[list[PointId], np.ndarray]:
        """The ids of the ``k`` best rows, best first, and their scores (float64)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        query = self.prepare_query(vector)
        n = len(self)
        if n == 0:
            return [], np.zeros(0)
        m = min(n, k + _RESCORE_MARGIN)
        if m < n:
            rough = self._scores(query.astype(np.float32))
            candidates = np.argpartition(rough, n - m)[n - m :]
        else:
            candidates = np.arange(n)
        scores = self.matrix[candidates].astype(np.float64) @ query
        order = np.lexsort((candidates, -scores))[:k]
        return [self.ids[i] for i in candidates[order]], scores[order]


class VectorStore:
    """A Qdrant client with the project's error handling; see the module docstring.

    Args:
        client: an open ``QdrantClient``.
        location: how to name the store in messages ("Qdrant server at ..." / "embedded store ...").
        embedded: True for the local on-disk store (calls are then serialised: it is not built for
            concurrent use).
        exact_index: where ``search`` uses an in-memory ``ExactIndex``: ``"auto"`` (the embedded store
            only), ``"on"`` or ``"off"``; see the module docstring.

    Example::

        store = VectorStore.open(url=None, path=Path("artifacts/index"))
        hits = store.search("mmedrag_radiology", vector, limit=10)
    """

    def __init__(
        self, client: QdrantClient, *, location: str, embedded: bool, exact_index: ExactIndexMode = "auto"
    ):
        if exact_index not in EXACT_INDEX_MODES:
            raise ValueError(
                f"exact_index must be one of {', '.join(EXACT_INDEX_MODES)}, got {exact_index!r}"
            )
        self.client = client
        self.location = location
        self.embedded = embedded
        self.exact_index: ExactIndexMode = exact_index
        self._lock = threading.Lock() if embedded else contextlib.nullcontext()
        # collection -> (its loaded index, or None: it cannot have one and Qdrant answers; the point count
        # when it was loaded). One tuple per entry: read in one step by concurrent searches.
        self._exact: dict[str, tuple[ExactIndex | None, int]] = {}
        self._load_lock = threading.Lock()  # one load at a time (concurrent first searches wait for it)

    @property
    def uses_exact_index(self) -> bool:
        """Whether ``search`` answers from an in-memory exact index (when the collection allows it)."""
        return self.exact_index == "on" or (self.exact_index == "auto" and self.embedded)

    @classmethod
    def open(
        cls,
        url: str | None = None,
        path: Path | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        create: bool = True,
        exact_index: ExactIndexMode = "auto",
    ) -> VectorStore:
        """A server store when ``url`` is given, else the embedded store in the folder ``path``.

        Args:
            url: Qdrant server URL (``http://qdrant:6333``); wins over ``path``.
            path: folder of the embedded store.
            api_key: the server's API key, if it requires one.
            timeout: seconds per server call.
            create: create the embedded folder when missing (the index builder); the service passes
                False so that a missing index is reported instead of silently created empty.
            exact_index: ``"auto"`` / ``"on"`` / ``"off"``: where searches use an in-memory exact index.
        """
        if url:
            # check_compatibility would call the server here; reachability is checked by ping().
            client = QdrantClient(
                url=url, api_key=api_key, timeout=max(1, round(timeout)), check_compatibility=False
            )
            return cls(client, location=f"Qdrant server at {url}", embedded=False, exact_index=exact_index)
        if path is None:
            raise ValueError("give either a Qdrant server url or the path of the embedded store")
        path = Path(path)
        if not path.is_dir():
            if not create:
                raise NotFound(
                    f"embedded vector store {path} does not exist; build it with `{index_command(None)}` "
                    "for each domain",
                    code="index_not_found",
                )
            path.mkdir(parents=True)
        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as exc:  # portalocker: the folder is locked by another client
            raise DependencyUnavailable(
                f"embedded vector store {path} is in use by another process ({exc}); only one process may "
                "open it: stop the other one (e.g. the retriever service), or use a Qdrant server",
                code="store_locked",
            ) from exc
        return cls(client, location=f"embedded store {path}", embedded=True, exact_index=exact_index)

    # ------------------------------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def calls(self, collection: str | None = None) -> Iterator[QdrantClient]:
        """The client, with its failures translated into service errors (and serialised if embedded).

        The caller may write, so the exact index of ``collection`` (of every collection when None) is
        dropped when the block ends; the next search reloads it.
        """
        try:
            with self._calls(collection) as client:
                yield client
        finally:
            self.invalidate(collection)

    @contextlib.contextmanager
    def _calls(self, collection: str | None = None) -> Iterator[QdrantClient]:
        """``calls`` for this class's own reads: the exact indexes stay."""
        try:
            with self._lock:
                yield self.client
        except ResponseHandlingException as exc:
            source = getattr(exc, "source", None)
            if isinstance(source, httpx.TimeoutException):
                raise DependencyTimeout(f"{self.location} did not answer in time ({source!r})") from exc
            raise DependencyUnavailable(f"{self.location} is unreachable ({source or exc!r})") from exc
        except UnexpectedResponse as exc:
            if exc.status_code == 404 and collection is not None:
                raise self.not_found(collection) from exc
            if exc.status_code in (401, 403):
                raise DependencyUnavailable(
                    f"{self.location} refused the request (HTTP {exc.status_code}); check the API key"
                ) from exc
            raise DependencyUnavailable(
                f"{self.location} answered HTTP {exc.status_code}: {exc.content[:300]!r}"
            ) from exc
        except ValueError as exc:  # the embedded store's "Collection ... not found"
            if collection is not None and "not found" in str(exc).lower():
                raise self.not_found(collection) from exc
            raise

    def not_found(self, collection: str) -> NotFound:
        domain = _domain_of(collection)
        return NotFound(
            f"collection '{collection}' not found in {self.location}; build it with "
            f"`{index_command(domain)}`",
            code="collection_not_found",
        )

    # ------------------------------------------------------------------------------------------ reads

    def ping(self) -> None:
        """A cheap call that fails (DependencyUnavailable / DependencyTimeout) when the store is down."""
        with self._calls() as client:
            client.get_collections()

    def collection_exists(self, collection: str) -> bool:
        with self._calls(collection) as client:
            return client.collection_exists(collection)

    def collection_info(self, collection: str) -> CollectionInfo:
        """Size, vector shape and the retriever checksum stored with the collection (NotFound if absent)."""
        if not self.collection_exists(collection):
            raise self.not_found(collection)
        with self._calls(collection) as client:
            info = client.get_collection(collection)
        vectors = info.config.params.vectors
        params = vectors if isinstance(vectors, models.VectorParams) else None
        metadata = dict(info.config.metadata or {})
        checksum = metadata.get(RETRIEVER_SHA256_KEY)
        return CollectionInfo(
            name=collection,
            points_count=int(info.points_count or 0),
            vector_size=params.size if params else None,
            distance=str(params.distance.value) if params else None,
            retriever_sha256=str(checksum) if checksum else None,
            metadata=metadata,
        )

    def search(self, collection: str, vector: Sequence[float] | np.ndarray, limit: int) -> list[Hit]:
        """The ``limit`` nearest report texts by cosine similarity, best first.

        Answered by the collection's ``ExactIndex`` when ``uses_exact_index`` (same results as Qdrant's
        exact search), else by Qdrant.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        index = self._exact_index(collection)
        if index is not None:
            hits = self._search_exact(collection, index, vector, limit)
            if hits is not None:
                return hits
        return self._search_qdrant(collection, vector, limit)

    def _search_qdrant(self, collection: str, vector: Sequence[float] | np.ndarray, limit: int) -> list[Hit]:
        query = np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
        with self._calls(collection) as client:
            response = client.query_points(collection, query=query, limit=limit, with_payload=True)
        return [
            Hit(
                id=str(point.id),
                text=str((point.payload or {}).get("text", "")),
                score=float(point.score),
                payload=dict(point.payload or {}),
            )
            for point in response.points
        ]

    # ------------------------------------------------------------------------------------------ exact index

    def prepare(self, collection: str) -> ExactIndex | None:
        """Load the collection's exact index now (start-up), so that no request pays for it; None when
        the exact path is off or the collection cannot use it. NotFound if the collection is absent."""
        return self._exact_index(collection)

    def invalidate(self, collection: str | None = None) -> None:
        """Drop the exact index of ``collection`` (every one when None): the next search reloads it."""
        with self._load_lock:
            if collection is None:
                self._exact.clear()
            else:
                self._exact.pop(collection, None)

    def _count(self, collection: str) -> int:
        with self._calls(collection) as client:
            return int(client.count(collection, exact=True).count)

    def _exact_index(self, collection: str) -> ExactIndex | None:
        """The loaded index, (re)loaded when absent or when the collection's point count changed."""
        if not self.uses_exact_index:
            return None
        count = self._count(collection)  # in-process for the embedded store; NotFound if absent
        entry = self._exact.get(collection)
        if entry is not None and entry[1] == count:
            return entry[0]
        with self._load_lock:
            entry = self._exact.get(collection)
            if entry is not None and entry[1] == count:
                return entry[0]  # a concurrent search loaded it meanwhile
            started = time.perf_counter()
            with self._calls(collection) as client:
                index = ExactIndex.from_client(client, collection)
            # Counted after loading: a write during the load shows as a count change on the next search.
            self._exact[collection] = (index, self._count(collection))
        if index is None:
            logger.info(
                "%s in %s: no exact index (vectors are not one cosine/dot vector)", collection, self.location
            )
        else:
            logger.info(
                "%s in %s: exact index of %d x %d vectors (%.1f MB) loaded in %.2f s",
                collection,
                self.location,
                len(index),
                index.dim,
                index.nbytes / 2**20,
                time.perf_counter() - started,
            )
        return index

    def _search_exact(
        self, collection: str, index: ExactIndex, vector: Sequence[float] | np.ndarray, limit: int
    ) -> list[Hit] | None:
        """Top-k from the index, payloads from Qdrant; None when a hit is gone from the store (deleted
        since the index was loaded: the index is dropped and the caller asks Qdrant)."""
        ids, scores = index.top_k(vector, limit)
        if not ids:
            return []
        with self._calls(collection) as client:
            records = client.retrieve(collection, ids, with_payload=True, with_vectors=False)
        payloads = {str(record.id): dict(record.payload or {}) for record in records}
        if len(payloads) != len(ids) or any(str(pid) not in payloads for pid in ids):
            logger.info(
                "%s in %s changed since its exact index was loaded: reloading", collection, self.location
            )
            self.invalidate(collection)
            return None
        return [
            Hit(
                id=str(pid),
                text=str(payloads[str(pid)].get("text", "")),
                score=float(score),
                payload=payloads[str(pid)],
            )
            for pid, score in zip(ids, scores, strict=True)
        ]

    def close(self) -> None:
        """Release the client (and the embedded store's file lock)."""
        self.invalidate()
        try:
            self.client.close()
        except Exception:  # closing must not mask the error that made us close
            logger.warning("closing %s failed", self.location, exc_info=True)
