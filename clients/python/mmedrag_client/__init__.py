"""Python client for the MMed-RAG Serve HTTP API.

Kept as its own distribution with httpx as its only dependency, so that applications calling the
service do not install torch. The API methods arrive with the serving stack.
"""

__version__ = "0.1.0"
