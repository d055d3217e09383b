"""Build the generator app: the service on ``app.state``, the model loaded in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from prometheus_client import Gauge

from services.common.app import build_service_app
from services.generator.api import health, v1
from services.generator.service import GeneratorService
from services.generator.settings import GeneratorSettings

VERSION = "0.1.0"


def _queue_gauges(app: FastAPI, service: GeneratorService) -> None:
    """Queue depth, the signal generator replicas scale on (vLLM exports num_requests_waiting)."""
    registry = app.state.metrics.registry
    waiting = Gauge("mmedrag_generator_requests_waiting", "Requests waiting for the model", registry=registry)
    waiting.set_function(lambda: service.waiting)
    running = Gauge("mmedrag_generator_requests_running", "Requests being generated", registry=registry)
    running.set_function(lambda: service.running)


def build_app(settings: GeneratorSettings | None = None, service: GeneratorService | None = None) -> FastAPI:
    """The OpenAI-compatible app; tests pass an already loaded ``service`` (the lifespan then skips loading).

    A missing or broken model folder makes start-up fail with an ArtifactError naming the file.
    """
    settings = settings or GeneratorSettings()
    generator = service or GeneratorService.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded: GeneratorService = app.state.generator
        if not loaded.ready:
            await anyio.to_thread.run_sync(loaded.load)
        yield
        if service is None:  # this app made the generator: stop its batching thread with it
            await anyio.to_thread.run_sync(loaded.batcher.close)

    async def readiness() -> dict[str, Any]:
        return {"ready": generator.ready, "model": generator.served_model_name}

    app = build_service_app(
        name="generator", title="MMed-RAG generator", version=VERSION, readiness=readiness, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.generator = generator
    _queue_gauges(app, generator)
    generator.attach_metrics(app.state.metrics.registry)
    app.include_router(v1)
    app.include_router(health)
    return app
