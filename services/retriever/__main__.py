"""``python -m services.retriever [--host] [--port] [--artifacts]``: serve the retriever with uvicorn.

Other settings come from ``MMEDRAG_RETRIEVER_*`` variables (see ``settings.py``). With no
``MMEDRAG_RETRIEVER_QDRANT_URL`` the service opens the embedded store ``<artifacts>/index`` and holds
its file lock while it runs: stop it before re-indexing.
"""

from __future__ import annotations

from services.common.serve import serve_from_command_line
from services.retriever.app import build_app
from services.retriever.settings import RetrieverSettings

if __name__ == "__main__":
    serve_from_command_line("retriever", RetrieverSettings, build_app)
