"""Retriever service: domain retrievers, the vector-store adapter and adaptive context selection."""
