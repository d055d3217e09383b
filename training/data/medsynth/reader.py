"""Read a MedSynth folder's ground truth (``findings.jsonl``, ``medsynth.json``), validated.

Shared by the learnability check, the contact-sheet preview and the training steps that need per-image
findings (e.g. finding agreement of retrieved reports).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.errors import DatasetFormatError
from training.data.medsynth.catalogue import load_catalogue
from training.data.records import SPLITS


@dataclass(frozen=True)
class FindingMention:
    """One finding drawn on one image."""

    name: str
    severity: str | None
    subtle: bool


@dataclass(frozen=True)
class MedSynthImage:
    """One line of ``findings.jsonl``, with the image path resolved against the data folder."""

    id: str
    domain: str
    split: str
    image: str
    path: Path
    findings: tuple[FindingMention, ...]

    @property
    def finding_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.findings)

    def is_subtle(self, name: str) -> bool:
        """True when every mention of ``name`` on this image is subtle (one obvious mention suffices)."""
        mentions = [f for f in self.findings if f.name == name]
        return bool(mentions) and all(f.subtle for f in mentions)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """``DIR/medsynth.json`` as a dict; an empty dict when the file is absent."""
    path = Path(data_dir) / "medsynth.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(path, None, None, f"not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetFormatError(path, None, None, "expected a JSON object")
    return meta


def id_sort_key(text: str) -> list[Any]:
    """Natural sort key: ``img-2`` before ``img-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_findings(
    data_dir: str | Path, *, catalogue: dict[str, Any] | None = None, check_images: bool = True
) -> list[MedSynthImage]:
    """Parse and validate ``DIR/findings.jsonl``.

    Raises :class:`~training.data.errors.DatasetFormatError` (a ``ValueError``) naming the file when
    the folder has no ``findings.jsonl``, a line is malformed, or (with ``check_images``) an image it
    names does not exist.
    """
    data_dir = Path(data_dir)
    path = data_dir / "findings.jsonl"
    if not path.is_file():
        raise DatasetFormatError(
            path, None, None, "file not found: not a MedSynth folder (no findings.jsonl)"
        )
    catalogue = load_catalogue() if catalogue is None else catalogue
    items: list[MedSynthImage] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(path, lineno, None, f"not valid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise DatasetFormatError(path, lineno, None, "expected a JSON object")
            items.append(_parse_record(path, lineno, obj, data_dir, catalogue, check_images))
    return items


def _parse_record(
    path: Path,
    lineno: int,
    obj: dict[str, Any],
    data_dir: Path,
    catalogue: dict[str, Any],
    check_images: bool,
) -> MedSynthImage:
    record: int | str = lineno
    for key in ("id", "domain", "split", "image"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise DatasetFormatError(path, record, key, "missing or not a non-empty string")
    record = f"{lineno} (id {obj['id']!r})"
    if obj["domain"] not in catalogue:
        raise DatasetFormatError(path, record, "domain", f"unknown domain {obj['domain']!r}")
    if obj["split"] not in SPLITS:
        raise DatasetFormatError(path, record, "split", f"unknown split {obj['split']!r}; expected {SPLITS}")
    raw_findings = obj.get("findings", [])
    if not isinstance(raw_findings, list):
        raise DatasetFormatError(path, record, "findings", "expected a list")
    mentions = []
    for i, f in enumerate(raw_findings):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise DatasetFormatError(path, record, f"findings[{i}]", "expected an object with a 'name'")
        mentions.append(FindingMention(f["name"], f.get("severity"), bool(f.get("subtle", False))))
    image_path = data_dir / obj["image"]
    if check_images and not image_path.is_file():
        raise DatasetFormatError(path, record, "image", f"image file not found: {image_path}")
    return MedSynthImage(
        id=obj["id"],
        domain=obj["domain"],
        split=obj["split"],
        image=obj["image"],
        path=image_path,
        findings=tuple(mentions),
    )
