"""``python -m services.classifier [--host] [--port] [--artifacts]``: serve the classifier with uvicorn."""

from __future__ import annotations

from services.classifier.app import build_app
from services.classifier.settings import ClassifierSettings
from services.common.serve import serve_from_command_line

if __name__ == "__main__":
    serve_from_command_line("classifier", ClassifierSettings, build_app)
