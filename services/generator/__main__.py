"""``python -m services.generator [--host] [--port] [--artifacts]``: serve the OpenAI-compatible API."""

from __future__ import annotations

from services.common.serve import serve_from_command_line
from services.generator.app import build_app
from services.generator.settings import GeneratorSettings

if __name__ == "__main__":
    serve_from_command_line("generator", GeneratorSettings, build_app)
