"""Python client for the MMed-RAG Serve HTTP API.

Kept as its own distribution with httpx as its only dependency, so that applications calling the
service do not install torch::

    from mmedrag_client import MMedRAGClient

    with MMedRAGClient("http://127.0.0.1:8000") as client:
        result = client.vqa("chest.png", "Is there a pleural effusion?")
        print(result.answer, [e.text for e in result.evidence if e.kept])
"""

from mmedrag_client.client import AsyncMMedRAGClient, MMedRAGClient
from mmedrag_client.types import APIError, DomainInfo, Evidence, Grounding, RAGResult, RetrievalInfo

__version__ = "0.1.0"
__all__ = [
    "APIError",
    "AsyncMMedRAGClient",
    "DomainInfo",
    "Evidence",
    "Grounding",
    "MMedRAGClient",
    "RAGResult",
    "RetrievalInfo",
]
