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
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class VectorStore:
    """A Qdrant client with the project's error handling; see the module docstring.

    Args:
        client: an open ``QdrantClient``.
        location: how to name the store in messages ("Qdrant server at ..." / "embedded store ...").
        embedded: True for the local on-disk store (calls are then serialised: it is not built for
            concurrent use).

    Example::

        store = VectorStore.open(url=None, path=Path("artifacts/index"))
        hits = store.search("mmedrag_radiology", vector, limit=10)
    """

    def __init__(self, client: QdrantClient, *, location: str, embedded: bool):
        self.client = client
        self.location = location
        self.embedded = embedded
        self._lock = threading.Lock() if embedded else contextlib.nullcontext()

    @classmethod
    def open(
        cls,
        url: str | None = None,
        path: Path | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        create: bool = True,
    ) -> VectorStore:
        """A server store when ``url`` is given, else the embedded store in the folder ``path``.

        Args:
            url: Qdrant server URL (``http://qdrant:6333``); wins over ``path``.
            path: folder of the embedded store.
            api_key: the server's API key, if it requires one.
            timeout: seconds per server call.
            create: create the embedded folder when missing (the index builder); the service passes
                False so that a missing index is reported instead of silently created empty.
        """
        if url:
            # check_compatibility would call the server here; reachability is checked by ping().
            client = QdrantClient(
                url=url, api_key=api_key, timeout=max(1, round(timeout)), check_compatibility=False
            )
            return cls(client, location=f"Qdrant server at {url}", embedded=False)
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
        return cls(client, location=f"embedded store {path}", embedded=True)

    # ------------------------------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def calls(self, collection: str | None = None) -> Iterator[QdrantClient]:
        """The client, with its failures translated into service errors (and serialised if embedded)."""
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
        with self.calls() as client:
            client.get_collections()

    def collection_exists(self, collection: str) -> bool:
        with self.calls(collection) as client:
            return client.collection_exists(collection)

    def collection_info(self, collection: str) -> CollectionInfo:
        """Size, vector shape and the retriever checksum stored with the collection (NotFound if absent)."""
        if not self.collection_exists(collection):
            raise self.not_found(collection)
        with self.calls(collection) as client:
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
        """The ``limit`` nearest report texts by cosine similarity, best first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        query = np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
        with self.calls(collection) as client:
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

    def close(self) -> None:
        """Release the client (and the embedded store's file lock)."""
        try:
            self.client.close()
        except Exception:  # closing must not mask the error that made us close
            logger.warning("closing %s failed", self.location, exc_info=True)
