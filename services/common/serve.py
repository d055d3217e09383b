"""Run a service under uvicorn from the command line: ``python -m services.<name> [--host] [--port] …``.

Flags are derived from the service's settings class (``--port`` overrides ``MMEDRAG_<SERVICE>_PORT``),
so configuration is declared once, in the settings.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common.settings import ServiceSettings


def serve_from_command_line(
    name: str,
    settings_cls: type[ServiceSettings],
    build_app: Callable[[Any], FastAPI],
    argv: Sequence[str] | None = None,
) -> None:
    """Parse overrides, build settings, build the app, serve it until stopped."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}", description=f"MMed-RAG {name} service."
    )
    parser.add_argument("--host", help="Interface to listen on.")
    parser.add_argument("--port", type=int, help="TCP port.")
    parser.add_argument("--artifacts", type=Path, help="Artifacts folder.")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    settings = settings_cls(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
