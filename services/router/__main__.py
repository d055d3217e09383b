"""``python -m services.router``: serve the public API with uvicorn."""

from __future__ import annotations

from services.common.serve import serve_from_command_line
from services.router.app import build_app
from services.router.settings import RouterSettings

if __name__ == "__main__":
    serve_from_command_line("router", RouterSettings, build_app)
