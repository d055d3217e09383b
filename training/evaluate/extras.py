"""The evaluation packages (report metrics, plots) are an optional extra, kept out of the serving images;
a missing one is named with the command that installs it, instead of a bare ``ModuleNotFoundError``."""

from __future__ import annotations

import importlib
from types import ModuleType

EVAL_EXTRA = "mmed-rag[eval]"


class EvalExtraMissing(ImportError):
    """A package of the ``eval`` extra is not installed."""


def import_eval_module(name: str) -> ModuleType:
    """``importlib.import_module(name)``, or an error that says to install the ``eval`` extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        package = name.split(".", 1)[0]
        raise EvalExtraMissing(
            f"{package} is not installed; it is part of the evaluation extra: pip install '{EVAL_EXTRA}'"
        ) from exc
