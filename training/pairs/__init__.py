"""RAG-PT preference pairs: noise images, the pair table, the four runs and ``mmedrag pairs``.

Import from the modules (``training.pairs.rules`` …); this package does not load torch on import.
"""
