"""Import a real dataset: normalise one MMed-RAG release file into the project's own record files.

``import_dataset`` writes two files into the output folder:

- ``records.jsonl``: one record per line, the record's ``model_dump`` with a leading ``"kind"``
  (``"image_report"``, ``"vqa"`` or ``"preference"``); ``read_records`` loads them back as typed records.
- ``source.json``: the release format, the source file, the image root, the dataset and domain, the
  counts and the skipped records' first error messages.

**Where the image root comes from.** It is ``root``, the dataset folder the user names (``--root``):
every image path in the release file is resolved against it and every ``image`` in ``records.jsonl``
stays relative to it; ``source.json`` keeps it as an absolute path, so a consumer opens
``Path(source["image_root"]) / record.image``. The absolute ``image_root`` fields that the release
files carry (the authors' machines) are never used.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from training.data.errors import DatasetFormatError
from training.data.formats import Record, RecordKind, ReleaseFormat, get_format
from training.data.records import ImageReport, PreferencePair, VQAItem

RECORDS_FILE = "records.jsonl"
SOURCE_FILE = "source.json"

RECORD_TYPES: dict[RecordKind, type[ImageReport] | type[VQAItem] | type[PreferencePair]] = {
    "image_report": ImageReport,
    "vqa": VQAItem,
    "preference": PreferencePair,
}


def record_kind(record: Record) -> RecordKind:
    """The ``kind`` written next to a record in ``records.jsonl``."""
    for kind, record_type in RECORD_TYPES.items():
        if isinstance(record, record_type):
            return kind
    raise TypeError(f"not a project record: {type(record).__name__}")


def find_data_file(spec: ReleaseFormat[Any], root: Path, data_file: str | os.PathLike[str] | None) -> Path:
    """The release file to read: ``data_file`` (relative: under ``root`` first, then the working
    directory), or else the only ``.json`` / ``.jsonl`` file (as the format wants) directly in ``root``."""
    if data_file is not None:
        given = Path(data_file)
        if not given.is_absolute() and (root / given).is_file():
            return root / given
        if not given.is_file():
            raise FileNotFoundError(f"release file {given} not found (looked under {root} and here)")
        return given.resolve()
    suffix = f".{spec.file_type}"
    candidates = sorted(path for path in root.glob(f"*{suffix}") if path.is_file())
    if len(candidates) != 1:
        found = ", ".join(path.name for path in candidates) or "none"
        raise FileNotFoundError(
            f"format {spec.name!r} reads one {suffix} file; found in {root}: {found}. Pass data_file."
        )
    return candidates[0]


def _counts(records: list[Any], skipped: int) -> dict[str, Any]:
    counts: dict[str, Any] = {"records": len(records), "skipped": skipped}
    splits = Counter(record.split for record in records if hasattr(record, "split"))
    if splits:
        counts["by_split"] = dict(sorted(splits.items()))
    answers = Counter(record.answer for record in records if isinstance(record, VQAItem))
    if answers:
        counts["by_answer"] = dict(sorted(answers.items()))
    return counts


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def import_dataset(
    format_name: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    data_file: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    domain: str | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
) -> dict[str, Any]:
    """Read a release file of ``format_name`` (images under ``root``); write the project's files to ``out``.

    Returns the summary that is also written to ``out/source.json``. Raises ``DatasetFormatError`` on the
    first bad record unless ``skip_bad``; ``ValueError`` for an unknown format or a missing dataset/domain.
    """
    spec = get_format(format_name)
    image_root = Path(root).resolve()
    if not image_root.is_dir():
        raise FileNotFoundError(f"dataset root {image_root} is not a folder")
    source_file = find_data_file(spec, image_root, data_file)
    result = spec.load(
        source_file, image_root, check_images=check_images, skip_bad=skip_bad, dataset=dataset, domain=domain
    )
    resolved_dataset, resolved_domain = spec.resolve_context(dataset, domain)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"kind": record_kind(record), **record.model_dump(mode="json")}, ensure_ascii=False)
        for record in result.records
    ]
    _write_text_atomically(out_dir / RECORDS_FILE, "".join(f"{line}\n" for line in lines))
    summary = {
        "format": spec.name,
        "kind": spec.kind,
        "dataset": resolved_dataset,
        "domain": resolved_domain,
        "source_file": str(source_file.resolve()),
        "image_root": str(image_root),
        "records_file": str((out_dir / RECORDS_FILE).resolve()),
        "counts": _counts(result.records, result.skipped),
        "errors": result.errors,
    }
    _write_text_atomically(out_dir / SOURCE_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def read_source(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``source.json`` of an imported dataset (format, image root, counts)."""
    path = Path(out_dir) / SOURCE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: import the dataset first (mmedrag data import)") from None
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(path, None, None, f"invalid JSON: {exc}") from exc


def read_records(out_dir: str | os.PathLike[str]) -> list[Record]:
    """Load ``records.jsonl`` back as typed records; errors name the line and the field."""
    path = Path(out_dir) / RECORDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: import the dataset first (mmedrag data import)")
    records: list[Record] = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{len(records)} (line {line_number})"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(path, where, None, f"invalid JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise DatasetFormatError(path, where, None, "expected a JSON object")
        kind = data.pop("kind", None)
        if kind not in RECORD_TYPES:
            raise DatasetFormatError(path, where, "kind", f"expected one of {', '.join(RECORD_TYPES)}")
        try:
            records.append(RECORD_TYPES[kind].model_validate(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            field_name = ".".join(str(part) for part in first["loc"]) or None
            raise DatasetFormatError(path, where, field_name, first["msg"]) from exc
    return records
