"""Turn expected failures of a command into one line on stderr and a non-zero exit status."""

from __future__ import annotations

import sys

import typer

from services.common.artifacts import ArtifactError
from services.common.errors import ServiceError
from training.data.errors import DatasetFormatError

# Failures a user can cause and fix (bad input, a missing file): shown as one line, never a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DatasetFormatError,
    ArtifactError,
    ServiceError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    ValueError,
)


def run_with_clean_errors(app: typer.Typer, args: list[str], *, verbose: bool) -> int:
    """Run a Typer app in standalone mode (usage errors exit 2 by themselves); expected errors exit 1."""
    try:
        app(args=args, prog_name="mmedrag")
    except EXPECTED_ERRORS as error:
        if verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
