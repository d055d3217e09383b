"""Run a service under uvicorn from the command line: ``python -m services.<name> [--host] [--port] …``.

Flags are derived from the service's settings class (``--port`` overrides ``MMEDRAG_<SERVICE>_PORT``),
so configuration is declared once, in the settings. Process-wide concerns are set up here, once, before
the app is built: structured logs (uvicorn's own lines included) and, when enabled, tracing.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common.app import instrument_app, make_tracer_provider
from services.common.logging import configure_logging
from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)


def setup_tracing(name: str, settings: ServiceSettings) -> None:
    """Install the process's tracer provider (OTLP/HTTP export) when ``otel_enabled``."""
    if not settings.otel_enabled:
        return
    provider = make_tracer_provider(name, endpoint=settings.otel_endpoint)  # says what to install if missing
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    logger.info("tracing on: spans exported over OTLP/HTTP to %s", settings.otel_endpoint or "the default")


def serve_from_command_line(
    name: str,
    settings_cls: type[ServiceSettings],
    build_app: Callable[[Any], FastAPI],
    argv: Sequence[str] | None = None,
) -> None:
    """Parse overrides, build settings, set up logs (and tracing), build the app, serve until stopped."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}", description=f"MMed-RAG {name} service."
    )
    parser.add_argument("--host", help="Interface to listen on.")
    parser.add_argument("--port", type=int, help="TCP port.")
    parser.add_argument("--artifacts", type=Path, help="Artifacts folder.")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    settings = settings_cls(**overrides)
    configure_logging(name, settings.log_level, settings.log_format)
    setup_tracing(name, settings)
    app = build_app(settings)
    if settings.otel_enabled:
        instrument_app(app)  # the global provider set above; a no-op where build_app did it already
    # log_config=None: uvicorn keeps the handlers configured above instead of installing its own.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None)
