"""Offline evaluation (``mmedrag eval ...``): metrics tables computed from artifacts and data folders.

- ``retrieval``: Recall@k and finding agreement of retrievers (domain-specific vs shared vs untrained).
"""
