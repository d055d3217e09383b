"""The retriever: image → domain retriever embedding → nearest reports in Qdrant → adaptive selection.

``RetrieverService.load()`` refuses to start on anything inconsistent: a missing retriever folder or
sidecar, a sidecar for another domain, a collection that is missing, empty, of another vector size or
built by another retriever (the sha256 of the retriever weights is stored with the collection by
``mmedrag index``). Each error names what is wrong and the command that fixes it.

Concurrent queries of one domain share a forward pass of its image tower (``ImageBatcher``, from
``services.common.batching``; ``batch_size=1`` turns it off); ``attach_metrics`` exports its batch sizes,
waits and queue depth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread
import numpy as np
import PIL.Image
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.common.artifacts import INDEX_DIR, RETRIEVERS_DIR, ArtifactError, collection_name, read_json
from services.common.batching import BatchMetrics, ImageBatcher
from services.common.clip import ClipModel
from services.common.errors import (
    DependencyTimeout,
    DependencyUnavailable,
    InvalidInput,
    NotFound,
    NotReady,
)
from services.retriever.protocol import (
    RETRIEVER_ID_CHARS,
    RETRIEVER_SIDECAR,
    RetrievedContext,
    RetrieveParams,
    RetrieveResponse,
    RetrieverSidecar,
)
from services.retriever.selection import SelectionParams, select_contexts
from services.retriever.settings import RetrieverSettings
from services.retriever.store import CollectionInfo, Hit, VectorStore, index_command
from training.data.records import DOMAINS

logger = logging.getLogger(__name__)


class ImageEncoder(Protocol):
    """What the service needs of a retriever (``ClipModel`` is one)."""

    embed_dim: int
    image_size: int
    weights_sha256: str

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray: ...

    def preprocess(self, image: PIL.Image.Image) -> Any: ...

    def encode_pixels(self, pixels: Sequence[Any]) -> np.ndarray: ...


EncoderLoader = Callable[..., ImageEncoder]  # (folder, *, root) -> encoder


@dataclass
class DomainRetriever:
    """Everything loaded for one domain."""

    domain: str
    collection: str
    encoder: ImageEncoder
    sidecar: RetrieverSidecar
    collection_info: CollectionInfo
    batcher: ImageBatcher

    @property
    def retriever_id(self) -> str:
        return self.encoder.weights_sha256[:RETRIEVER_ID_CHARS]


def read_sidecar(folder: Path, root: Path) -> RetrieverSidecar:
    """``retriever.json`` of a retriever folder, validated (ArtifactError names the file)."""
    path = folder / RETRIEVER_SIDECAR
    try:
        return RetrieverSidecar.model_validate(read_json(path, root, "retriever sidecar"))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(root)'}: {error['msg']}" for error in exc.errors()
        )
        raise ArtifactError(path, f"invalid retriever sidecar ({problems})", root=root) from exc


class RetrieverService:
    """Loads every configured domain's retriever, checks its collection, and answers retrievals.

    Args:
        settings: the service settings.
        store: an open vector store (tests); default: opened by ``load()`` from the settings.
        load_encoder: how to load a retriever folder (tests may pass a fake); default ``ClipModel.load``.

    Example::

        service = RetrieverService(RetrieverSettings(artifacts=root))
        service.load()
        response = await service.retrieve(image, RetrieveParams(domain="radiology", k_max=8))
    """

    def __init__(
        self,
        settings: RetrieverSettings,
        *,
        store: VectorStore | None = None,
        load_encoder: EncoderLoader = ClipModel.load,
    ):
        self.settings = settings
        self.store = store
        self._owns_store = store is None
        self._load_encoder = load_encoder
        self.retrievers: dict[str, DomainRetriever] = {}
        self.ready = False
        self._batch_metrics: BatchMetrics | None = None

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Export the domains' batching metrics on an app's registry (before or after ``load``)."""
        self._batch_metrics = BatchMetrics.on(registry, service="retriever")
        for retriever in self.retrievers.values():
            retriever.batcher.attach_metrics(self._batch_metrics)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.retrievers)

    # ------------------------------------------------------------------------------------------ loading

    def _open_store(self) -> VectorStore:
        settings = self.settings
        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        store = VectorStore.open(
            url=settings.qdrant_url,
            path=settings.artifacts / INDEX_DIR,
            api_key=api_key,
            timeout=settings.qdrant_timeout_s,
            create=False,
            exact_index=settings.exact_index,
        )
        if store.embedded:
            return store
        deadline = time.monotonic() + settings.qdrant_wait_s
        while True:  # a server may still be starting next to us: bounded wait
            try:
                store.ping()
                return store
            except (DependencyUnavailable, DependencyTimeout):
                if time.monotonic() >= deadline:
                    store.close()
                    raise
                logger.info("waiting for %s", store.location)
                time.sleep(1.0)

    def _check_collection(
        self, store: VectorStore, domain: str, encoder: ImageEncoder, folder: Path
    ) -> CollectionInfo:
        root = self.settings.artifacts
        collection = collection_name(domain)
        info = store.collection_info(collection)  # NotFound names the collection and `mmedrag index`
        rebuild = f"rebuild the index with `{index_command(domain)} --recreate`"
        if info.retriever_sha256 != encoder.weights_sha256:
            raise ArtifactError(
                folder,
                f"collection '{collection}' in {store.location} was built with retriever sha256 "
                f"{info.retriever_sha256 or '(none recorded)'}, but this retriever's weights have sha256 "
                f"{encoder.weights_sha256}: its embeddings do not match; {rebuild} (or restore the "
                "retriever it was built with)",
                root=root,
            )
        if info.vector_size != encoder.embed_dim:
            raise ArtifactError(
                folder,
                f"collection '{collection}' stores vectors of size {info.vector_size}, the retriever "
                f"embeds into {encoder.embed_dim}; {rebuild}",
                root=root,
            )
        if info.points_count == 0:
            raise ArtifactError(
                folder, f"collection '{collection}' in {store.location} is empty; {rebuild}", root=root
            )
        return info

    def _load_domain(self, store: VectorStore, domain: str) -> DomainRetriever:
        root = self.settings.artifacts
        folder = root / RETRIEVERS_DIR / domain
        sidecar = read_sidecar(folder, root)
        if sidecar.domain != domain:
            raise ArtifactError(
                folder / RETRIEVER_SIDECAR, f"is for domain {sidecar.domain!r}, not {domain!r}", root=root
            )
        encoder = self._load_encoder(folder, root=root)
        if encoder.embed_dim != sidecar.embed_dim:
            raise ArtifactError(
                folder / RETRIEVER_SIDECAR,
                f"embed_dim {sidecar.embed_dim} differs from the model's {encoder.embed_dim}",
                root=root,
            )
        info = self._check_collection(store, domain, encoder, folder)
        store.prepare(info.name)  # the exact in-memory index, if used, loads now rather than on a request
        # Warm-up: the first request should not pay for lazy initialisation.
        encoder.encode_images([PIL.Image.new("RGB", (encoder.image_size, encoder.image_size))])
        batcher = ImageBatcher(  # of preprocessed pixels: requests resize in their own threads
            encoder.encode_pixels,
            max_batch=self.settings.batch_size,
            max_wait_s=self.settings.batch_wait_ms / 1000,
            name=domain,
            metrics=self._batch_metrics,
        )
        return DomainRetriever(domain, info.name, encoder, sidecar, info, batcher)

    def load(self) -> None:
        """Load every configured domain (blocking; call it in a thread from async code)."""
        store = self.store or self._open_store()
        try:
            retrievers = {domain: self._load_domain(store, domain) for domain in self.settings.domains}
        except BaseException:
            if self._owns_store:
                store.close()
            raise
        self.store, self.retrievers, self.ready = store, retrievers, True
        for r in retrievers.values():
            logger.info(
                "retriever %s: %s (%d texts in %s), gamma %s",
                r.domain,
                r.retriever_id,
                r.collection_info.points_count,
                r.collection,
                self.gamma_for(r.domain),
            )

    def close(self) -> None:
        self.ready = False
        for retriever in self.retrievers.values():
            retriever.batcher.close()
        if self.store is not None and self._owns_store:
            self.store.close()
            self.store = None

    async def readiness(self) -> dict[str, Any]:
        """Loaded, and the store answers (a cheap call for a server; the embedded one is in-process)."""
        if not self.ready or self.store is None:
            return {"ready": False, "reason": "loading"}
        details: dict[str, Any] = {
            "store": self.store.location,
            "domains": {
                d: {"retriever": r.retriever_id, "collection": r.collection}
                for d, r in self.retrievers.items()
            },
        }
        if not self.store.embedded:
            try:
                await anyio.to_thread.run_sync(self.store.ping)
            except (DependencyUnavailable, DependencyTimeout) as exc:
                return {"ready": False, "reason": exc.message, **details}
        return {"ready": True, **details}

    # ------------------------------------------------------------------------------------------ serving

    def gamma_for(self, domain: str) -> float:
        """The domain's calibrated gamma, else the configured default."""
        gamma = self.retrievers[domain].sidecar.gamma
        return self.settings.default_gamma if gamma is None else gamma

    def k_max_default_for(self, domain: str) -> int:
        value = self.settings.k_max_default or self.retrievers[domain].sidecar.k_max_default
        return min(value, self.settings.k_max_ceiling)

    def _domain(self, domain: str) -> DomainRetriever:
        if not self.ready:
            raise NotReady("the retriever is still loading; retry when /readyz answers 200")
        if domain in self.retrievers:
            return self.retrievers[domain]
        served = ", ".join(self.retrievers)
        if domain in DOMAINS:
            raise NotFound(
                f"domain '{domain}' is not served by this retriever (it serves: {served})",
                param="domain",
                code="domain_not_served",
            )
        raise InvalidInput(f"unknown domain '{domain}'; choose one of: {served}", param="domain")

    def resolve(self, params: RetrieveParams) -> tuple[DomainRetriever, int, SelectionParams]:
        """Fill the request's defaults and check the limits that depend on this service."""
        retriever = self._domain(params.domain)
        ceiling = self.settings.k_max_ceiling
        k_max = params.k_max if params.k_max is not None else self.k_max_default_for(params.domain)
        if k_max > ceiling:
            raise InvalidInput(f"k_max must be between 1 and {ceiling}, got {k_max}", param="k_max")
        k_min = params.k_min if params.k_min is not None else min(self.settings.k_min_default, k_max)
        if k_min > k_max:
            raise InvalidInput(f"k_min ({k_min}) must not exceed k_max ({k_max})", param="k_min")
        selection = SelectionParams(
            gamma=params.gamma if params.gamma is not None else self.gamma_for(params.domain),
            ratio_threshold=params.ratio_threshold or self.settings.ratio_threshold,
            k_min=k_min,
            k_max=k_max,
        )
        return retriever, k_max, selection

    async def retrieve(self, image: PIL.Image.Image, params: RetrieveParams) -> RetrieveResponse:
        """The ``k_max`` nearest reports of the domain's corpus, with the kept prefix chosen by strategy."""
        retriever, k_max, selection = self.resolve(params)
        strategy = params.strategy or self.settings.default_strategy
        store = self.store
        if store is None:  # closed while the request was on its way
            raise NotReady("the retriever is shutting down")
        pixels = await anyio.to_thread.run_sync(retriever.encoder.preprocess, image)
        vector = await retriever.batcher.encode(pixels)
        hits = await anyio.to_thread.run_sync(store.search, retriever.collection, vector, k_max)
        hits = sorted(hits, key=lambda hit: -hit.score)  # Qdrant's order, made a guarantee (stable on ties)
        k = select_contexts([hit.score for hit in hits], strategy, selection)
        return RetrieveResponse(
            domain=retriever.domain,  # type: ignore[arg-type]  # one of DOMAINS
            collection=retriever.collection,
            strategy=strategy,
            k_max=k_max,
            k=k,
            k_min=selection.k_min,
            gamma=selection.gamma if strategy == "adaptive" else None,
            ratio_threshold=selection.ratio_threshold if strategy == "ratio" else None,
            retriever=retriever.retriever_id,
            contexts=[_context(hit, rank, kept=rank <= k) for rank, hit in enumerate(hits, start=1)],
        )


def _context(hit: Hit, rank: int, *, kept: bool) -> RetrievedContext:
    payload = hit.payload
    report_ids = [str(i) for i in payload.get("report_ids") or []]
    return RetrievedContext(
        id=str(payload.get("report_id") or (report_ids[0] if report_ids else hit.id)),
        text=hit.text,
        score=hit.score,
        rank=rank,
        source=payload.get("dataset"),
        kept=kept,
        report_ids=report_ids,
    )
