"""Builders of the artifacts that the services load (tiny test models now; trained ones later)."""
