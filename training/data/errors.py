"""Errors raised while reading datasets: they always name the file, the record and the field."""

from __future__ import annotations

from pathlib import Path


class DatasetFormatError(ValueError):
    """A record of a dataset file is malformed, or the image it names is missing.

    Attributes say exactly where: ``path`` (the file), ``record`` (its index, and its id when known)
    and ``field`` (the offending key), so a user can open the file and fix that one record.
    """

    def __init__(self, path: str | Path, record: int | str | None, field: str | None, problem: str):
        self.path = str(path)
        self.record = record
        self.field = field
        self.problem = problem
        where = self.path
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
