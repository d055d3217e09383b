"""The ``mmedrag`` command line: one entry point for data, training and serving."""
