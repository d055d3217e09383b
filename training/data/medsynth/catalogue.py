"""The MedSynth finding catalogue: findings, report phrasing and questions per domain, kept as data."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from typing import Any

from training.data.records import DOMAINS, Domain

CATALOGUE_FILE = "catalogue.json"


@cache
def _catalogue_bytes() -> bytes:
    return resources.files(__package__).joinpath(CATALOGUE_FILE).read_bytes()


def load_catalogue() -> dict[str, Any]:
    """The whole catalogue as a fresh dict (callers may modify their copy)."""
    catalogue = json.loads(_catalogue_bytes())
    missing = [d for d in DOMAINS if d not in catalogue]
    if missing:
        raise ValueError(f"{CATALOGUE_FILE} lacks domains {missing}")
    return catalogue


def finding_names(domain: Domain) -> list[str]:
    """Finding names of a domain, in catalogue order."""
    return list(load_catalogue()[domain]["findings"])


def catalogue_sha256() -> str:
    """Checksum recorded in every generated dataset, so a changed catalogue is visible."""
    return hashlib.sha256(_catalogue_bytes()).hexdigest()
