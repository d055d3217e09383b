"""Readers and writers for the MMed-RAG release data formats, normalised into the project's records.

Every release file is one of the formats in ``FORMATS`` (``--format NAME`` on the command line):

========================  =====  ============================================================================
name                      file   release record → project record
========================  =====  ============================================================================
retriever-radiology       JSON   ``{id, report, image_path[..], split, image_root}`` → ImageReport
retriever-pmc-oa          JSON   ``{id, image, report, metadata, image_root}`` → ImageReport
retriever-quilt           JSON   ``{id, caption, image_path, …, image_root}`` → ImageReport (text: caption)
retriever-harvard         JSON   Harvard schema → ImageReport (text: ``gpt4_summary``, split: ``use``)
vqa                       JSONL  ``{question_id, question, answer, image, report}`` → VQAItem
report-iu-xray            JSON   ``{id, report, image_path[2], split}`` → ImageReport
report-mimic-cxr          JSON   ``{id, study_id, subject_id, report, image_path[1], split}`` → ImageReport
report-harvard            JSON   Harvard schema → ImageReport (text: ``report``, split: ``use``)
report-pmc-oa             JSON   ``{id, image, report, metadata}`` → ImageReport
report-quilt              JSON   ``{caption, image_path, subset, split, pathology, …}`` → ImageReport
alignment                 JSON   ``{id, image, conversations, rejected_conversations, rejected_noised}``
                                 → PreferencePair
========================  =====  ============================================================================

Rules shared by all formats:

- **Image root.** Image paths are resolved against the ``image_root`` the caller gives. The absolute
  ``image_root`` values inside release files are the authors' machines and are ignored, unless the caller
  passes ``use_file_image_root=True`` (then a record's own ``image_root`` wins, absolute image paths are
  accepted, and the root used is kept in ``metadata["image_root"]``). A path with ``..`` that leaves the
  root is always refused; symbolic links inside the root are followed and not checked.
- **PMC-OA images** are looked up under ``image_root`` first, then under ``image_root/images``,
  ``image_root/train_images`` and ``image_root/test_images`` (training files use numeric names, test
  files PMC names, and the two sets are often kept in separate folders). When found in a sub-folder,
  the record's ``image`` includes that folder, so ``image_root / record.image`` always opens the file;
  the name in the file is kept in ``metadata["release_image"]``.
- **Metadata.** Release fields that have no place in the record are kept in ``metadata`` under their
  own names (Harvard's ``glaucoma``, ``age``, …; PMC-OA's own ``metadata`` field as
  ``metadata["metadata"]``), so writers put them back. Keys the loaders add themselves are listed in
  ``DERIVED_METADATA_KEYS`` and are not written back as fields.
- **Split.** A record's own split field (``split``; ``use`` for Harvard) wins; otherwise the caller's
  ``split``; otherwise the format's default (``train`` for retriever files, ``test`` for test files).
- **Errors** are ``DatasetFormatError`` naming file, record (index, line for JSONL, id when known) and
  field. With ``skip_bad=True`` bad records are skipped and counted in ``LoadResult.skipped``; a file
  that cannot be read as a whole (invalid JSON, wrong top-level type) always raises.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Generic, Literal, TypeVar

from services.common.answers import parse_yes_no
from training.data.errors import DatasetFormatError
from training.data.records import DOMAINS, Domain, ImageReport, PreferencePair, VQAItem

logger = logging.getLogger(__name__)

RecordKind = Literal["image_report", "vqa", "preference"]
Record = ImageReport | VQAItem | PreferencePair
R = TypeVar("R", ImageReport, VQAItem, PreferencePair)
StrPath = str | os.PathLike[str]

# The project's names for the five MMed-RAG datasets and the domain each belongs to.
DATASET_DOMAINS: dict[str, Domain] = {
    "iu-xray": "radiology",
    "mimic-cxr": "radiology",
    "harvard-fairvlmed": "ophthalmology",
    "pmc-oa": "pathology",
    "quilt-1m": "pathology",
}

# Where PMC-OA images are also looked for, in this order, when not directly under the image root.
PMC_OA_IMAGE_DIRS: tuple[str, ...] = ("images", "train_images", "test_images")

# Metadata keys the loaders compute (not release fields); writers leave them out of the release records.
DERIVED_METADATA_KEYS: frozenset[str] = frozenset(
    {
        "image_paths",  # radiology: every image of the study (record.image is the first)
        "release_image",  # PMC-OA: the image name as written in the file, when found in a sub-folder
        "image_naming",  # PMC-OA: "numeric" (8736.jpg), "pmc" (PMC6146807_F2_369615.jpg) or "other"
        "pmc_id",  # PMC-OA "pmc" naming: the article id, e.g. "PMC6146807"
        "pmc_figure",  # PMC-OA "pmc" naming: the rest of the name, e.g. "F2_369615"
        "raw_answer",  # VQA: the answer text before parse_yes_no, e.g. "Yes."
        "image_root",  # use_file_image_root=True: the root the image was resolved against
        "id_is_int",  # the release id was a JSON number; writers write it back as one
        "id_derived",  # Quilt test records without an id: the id was derived from the image path
    }
)

# How many error messages a LoadResult keeps when bad records are skipped.
MAX_KEPT_ERRORS = 20

_IMAGE_MARKER = "<image>"
_PMC_NAME = re.compile(r"^(PMC\d+)_(.+)$")
_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class LoadResult(Generic[R]):
    """What a loader returns: the records, and how many bad records were skipped (``skip_bad=True``)."""

    records: list[R]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_KEPT_ERRORS messages of skipped ones

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)


def pmc_oa_image_naming(image: str) -> dict[str, str]:
    """Tell PMC-OA's two image naming schemes apart: numeric (training files) and PMC (test files)."""
    stem = PurePosixPath(image).stem
    if stem.isdigit():
        return {"image_naming": "numeric"}
    match = _PMC_NAME.match(stem)
    if match:
        return {"image_naming": "pmc", "pmc_id": match.group(1), "pmc_figure": match.group(2)}
    return {"image_naming": "other"}


def strip_image_marker(question: str) -> str:
    """Drop the LLaVA ``<image>`` marker the release puts after (or before) a question, and the blanks."""
    text = question.strip()
    if text.endswith(_IMAGE_MARKER):
        text = text[: -len(_IMAGE_MARKER)].rstrip()
    if text.startswith(_IMAGE_MARKER):
        text = text[len(_IMAGE_MARKER) :].lstrip()
    return text


# --------------------------------------------------------------------------------------------------
# Reading: files → raw records → typed records


class _DerivedIds:
    """Stable ids for records that have none (Quilt test): the image path, with ``#n`` for repeats."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def derive(self, image: str) -> str:
        count = self.seen.get(image, 0) + 1
        self.seen[image] = count
        return image if count == 1 else f"{image}#{count}"


@dataclass(frozen=True)
class _LoadOptions:
    path: Path
    image_root: Path
    check_images: bool
    use_file_image_root: bool
    dataset: str | None
    domain: Domain | None
    split: str | None
    split_key: str
    default_split: str | None
    derived_ids: _DerivedIds = field(default_factory=_DerivedIds)  # one per file read


@dataclass
class _Where:
    """Position of a record in its file, for error messages."""

    index: int
    line: int | None = None
    id: str | None = None

    def label(self) -> str | int:
        parts = [f"line {self.line}"] if self.line is not None else []
        if self.id is not None:
            parts.append(f"id {self.id!r}")
        return f"{self.index} ({', '.join(parts)})" if parts else self.index


def _read_raw_records(path: Path, file_type: Literal["json", "jsonl"]) -> Iterator[tuple[_Where, Any]]:
    """Yield each raw record with its position; a JSONL line that is not JSON yields its error instead."""
    if not path.is_file():
        raise DatasetFormatError(path, None, None, "file does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(path, None, None, f"not UTF-8 text ({exc})") from exc
    if file_type == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            raise DatasetFormatError(path, None, None, problem) from exc
        if not isinstance(data, list):
            problem = f"expected a JSON list of records at the top level, got {_json_type(data)}"
            raise DatasetFormatError(path, None, None, problem)
        for index, raw in enumerate(data):
            yield _Where(index), raw
        return
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = _Where(index, line=line_number)
        index += 1
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON at column {exc.colno}: {exc.msg}"
            yield where, DatasetFormatError(path, where.label(), None, problem)


class _RecordReader:
    """Typed access to one raw release record; every accessor raises an error naming the field."""

    def __init__(self, raw: dict[str, Any], where: _Where, options: _LoadOptions):
        self.raw = raw
        self.where = where
        self.options = options
        self.consumed: set[str] = {"image_root"}
        self.derived: dict[str, Any] = {}
        self._root: Path | None = None

    def error(self, field_name: str | None, problem: str) -> DatasetFormatError:
        return DatasetFormatError(self.options.path, self.where.label(), field_name, problem)

    def value(self, key: str, expected: tuple[type, ...], type_name: str, *, required: bool = True) -> Any:
        self.consumed.add(key)
        if key not in self.raw or (not required and self.raw[key] is None):
            if required:
                raise self.error(key, "missing required field")
            return None
        value = self.raw[key]
        # bool is an int in Python, never in JSON.
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise self.error(key, f"expected {type_name}, got {_json_type(value)}")
        return value

    def record_id(self, key: str = "id") -> str:
        value = self.value(key, (str, int), "a string or integer id")
        if isinstance(value, int):
            self.derived["id_is_int"] = True
            value = str(value)
        if not value.strip():
            raise self.error(key, "empty id")
        self.where.id = value
        return value

    def text(self, key: str) -> str:
        value = self.value(key, (str,), "a string")
        if not value.strip():
            raise self.error(key, "empty text")
        return value

    def optional_text(self, key: str) -> str | None:
        return self.value(key, (str,), "a string or null", required=False)

    def split(self) -> str:
        value = self.value(self.options.split_key, (str,), "a string", required=False)
        return value or self.options.split or self.options.default_split or ""

    def image(self, key: str) -> str:
        return self.resolve_image(self.value(key, (str,), "a relative image path"), key)

    def image_list(self, key: str) -> list[str]:
        """A list of image paths (a single string is accepted as a list of one)."""
        value = self.value(key, (list, str), "a list of image paths")
        if isinstance(value, str):
            return [self.resolve_image(value, key)]
        if not value:
            raise self.error(key, "empty list of image paths")
        paths = []
        for position, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{position}]", f"expected an image path, got {_json_type(item)}")
            paths.append(self.resolve_image(item, f"{key}[{position}]"))
        return paths

    @property
    def root(self) -> Path:
        """The folder this record's images are resolved against (looked up once, when first needed)."""
        if self._root is None:
            self._root = self._record_image_root()
        return self._root

    def _record_image_root(self) -> Path:
        if self.options.use_file_image_root and self.raw.get("image_root") is not None:
            value = self.raw["image_root"]
            if not isinstance(value, str) or not value.strip():
                raise self.error("image_root", f"expected a folder path, got {_json_type(value)}")
            root = Path(value)
        else:
            root = self.options.image_root
        if self.options.use_file_image_root:
            self.derived["image_root"] = str(root)
        return root

    def resolve_image(self, raw_path: str, field_name: str, search_dirs: tuple[str, ...] = ()) -> str:
        """Check that an image path stays inside the root and (optionally) exists; return it as stored."""
        if not raw_path.strip():
            raise self.error(field_name, "empty image path")
        is_absolute = PurePosixPath(raw_path).is_absolute() or PureWindowsPath(raw_path).is_absolute()
        if is_absolute and not self.options.use_file_image_root:
            problem = f"absolute image path {raw_path!r}; paths must be relative to the image root"
            raise self.error(field_name, problem)
        normalised = posixpath.normpath(raw_path.replace("\\", "/"))
        if not is_absolute and (normalised == ".." or normalised.startswith("../")):
            raise self.error(field_name, f"image path {raw_path!r} escapes the image root")
        direct = Path(raw_path) if is_absolute else self.root / raw_path
        if direct.is_file() or is_absolute:
            if self.options.check_images and not direct.is_file():
                raise self.error(field_name, f"image file not found: {direct}")
            return raw_path
        for folder in search_dirs:
            if (self.root / folder / raw_path).is_file():
                return f"{folder}/{raw_path}"
        if self.options.check_images:
            also = f" (also looked in {', '.join(search_dirs)} under the root)" if search_dirs else ""
            raise self.error(field_name, f"image file not found: {direct}{also}")
        return raw_path

    def metadata(self, **derived: Any) -> dict[str, Any]:
        """Unconsumed release fields, then what the loaders computed."""
        extras = {key: value for key, value in self.raw.items() if key not in self.consumed}
        return {**extras, **self.derived, **derived}


# --------------------------------------------------------------------------------------------------
# Per-format parsing (raw record → typed record) and rendering (typed record → release fields)


def _context(options: _LoadOptions) -> dict[str, Any]:
    return {"dataset": options.dataset, "domain": options.domain}


def _parse_radiology(reader: _RecordReader) -> ImageReport:
    record_id = reader.record_id()
    report = reader.text("report")
    paths = reader.image_list("image_path")
    return ImageReport(
        id=record_id,
        **_context(reader.options),
        split=reader.split(),
        image=paths[0],
        report=report,
        metadata=reader.metadata(image_paths=paths),
    )


def _render_radiology(record: ImageReport) -> dict[str, Any]:
    paths = list(record.metadata.get("image_paths") or [record.image])
    if paths[0] != record.image:
        paths = [record.image, *[path for path in paths if path != record.image]]
    return {"id": _release_id(record), "report": record.report, "image_path": paths}


def _parse_pmc_oa(reader: _RecordReader) -> ImageReport:
    record_id = reader.record_id()
    report = reader.text("report")
    release_image = reader.value("image", (str,), "a relative image path")
    image = reader.resolve_image(release_image, "image", PMC_OA_IMAGE_DIRS)
    derived: dict[str, Any] = pmc_oa_image_naming(release_image)
    if image != release_image:
        derived["release_image"] = release_image
    return ImageReport(
        id=record_id,
        **_context(reader.options),
        split=reader.split(),
        image=image,
        report=report,
        metadata=reader.metadata(**derived),
    )


def _render_pmc_oa(record: ImageReport) -> dict[str, Any]:
    image = record.metadata.get("release_image", record.image)
    return {"id": _release_id(record), "image": image, "report": record.report}


def _parse_quilt(reader: _RecordReader, *, id_required: bool) -> ImageReport:
    derived: dict[str, Any] = {}
    record_id = reader.record_id() if id_required or "id" in reader.raw else None
    paths = reader.image_list("image_path")
    if isinstance(reader.raw["image_path"], list):
        derived["image_paths"] = paths
    if record_id is None:
        record_id = reader.options.derived_ids.derive(paths[0])
        reader.where.id = record_id
        derived["id_derived"] = True
    caption = reader.text("caption")
    return ImageReport(
        id=record_id,
        **_context(reader.options),
        split=reader.split(),
        image=paths[0],
        report=caption,
        metadata=reader.metadata(**derived),
    )


def _render_quilt(record: ImageReport) -> dict[str, Any]:
    fields: dict[str, Any] = {} if record.metadata.get("id_derived") else {"id": _release_id(record)}
    image_path: str | list[str] = record.image
    if "image_paths" in record.metadata:
        image_path = [record.image, *[p for p in record.metadata["image_paths"] if p != record.image]]
    return {**fields, "caption": record.report, "image_path": image_path}


def _parse_harvard(reader: _RecordReader, *, text_key: str) -> ImageReport:
    record_id = reader.record_id()
    text = reader.text(text_key)
    image = reader.image("image_path")
    return ImageReport(
        id=record_id,
        **_context(reader.options),
        split=reader.split(),
        image=image,
        report=text,
        metadata=reader.metadata(),
    )


def _render_harvard(text_key: str) -> Callable[[ImageReport], dict[str, Any]]:
    def render(record: ImageReport) -> dict[str, Any]:
        return {"id": _release_id(record), "image_path": record.image, text_key: record.report}

    return render


def _parse_vqa(reader: _RecordReader) -> VQAItem:
    record_id = reader.record_id("question_id")
    question = strip_image_marker(reader.text("question"))
    if not question:
        raise reader.error("question", "empty question once the '<image>' marker is removed")
    raw_answer = reader.text("answer")
    image = reader.image("image")
    report = reader.optional_text("report")
    return VQAItem(
        id=record_id,
        **_context(reader.options),
        split=reader.split(),
        image=image,
        question=question,
        answer=parse_yes_no(raw_answer),
        report=report,
        metadata=reader.metadata(raw_answer=raw_answer),
    )


def _render_vqa(record: VQAItem) -> dict[str, Any]:
    raw_answer = record.metadata.get("raw_answer")
    if not isinstance(raw_answer, str) or parse_yes_no(raw_answer) != record.answer:
        raw_answer = "Yes." if record.answer == "yes" else "No"
    fields = {
        "question_id": _release_id(record),
        "question": f"{record.question}\n{_IMAGE_MARKER}",
        "answer": raw_answer,
        "image": record.image,
    }
    if record.report is not None:
        fields["report"] = record.report
    return fields


def _conversation(reader: _RecordReader, key: str) -> tuple[str, str]:
    """A two-turn conversation ``[human, gpt]``; returns both values."""
    turns = reader.value(key, (list,), "a list of two turns")
    if len(turns) != 2:
        raise reader.error(key, f"expected 2 turns (human, gpt), got {len(turns)}")
    values = []
    for position, (turn, speaker) in enumerate(zip(turns, ("human", "gpt"), strict=True)):
        where = f"{key}[{position}]"
        if not isinstance(turn, dict):
            raise reader.error(where, f"expected an object, got {_json_type(turn)}")
        if turn.get("from") != speaker:
            raise reader.error(f"{where}.from", f"expected {speaker!r}, got {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise reader.error(f"{where}.value", f"expected a non-empty string, got {_json_type(value)}")
        values.append(value)
    return values[0], values[1]


def _parse_alignment(reader: _RecordReader) -> PreferencePair:
    record_id = reader.record_id()
    image = reader.image("image")
    prompt, chosen = _conversation(reader, "conversations")
    rejected_prompt, rejected = _conversation(reader, "rejected_conversations")
    if rejected_prompt != prompt:
        problem = "the human turn differs from the one in 'conversations'; both sides need the same prompt"
        raise reader.error("rejected_conversations[0].value", problem)
    noised = reader.value("rejected_noised", (int, bool), "0 or 1")
    if noised not in (0, 1):
        raise reader.error("rejected_noised", f"expected 0 or 1, got {noised!r}")
    derived = {"dataset": reader.options.dataset} if reader.options.dataset else {}
    return PreferencePair(
        id=record_id,
        image=image,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        rejected_noised=bool(noised),
        domain=reader.options.domain,
        metadata=reader.metadata(**derived),
    )


def _render_alignment(record: PreferencePair) -> dict[str, Any]:
    return {
        "id": _release_id(record),
        "image": record.image,
        "conversations": [{"from": "human", "value": record.prompt}, {"from": "gpt", "value": record.chosen}],
        "rejected_conversations": [
            {"from": "human", "value": record.prompt},
            {"from": "gpt", "value": record.rejected},
        ],
        "rejected_noised": int(record.rejected_noised),
    }


def _release_id(record: Record) -> str | int:
    """The id as the release wrote it: a JSON number when it was one."""
    if record.metadata.get("id_is_int") and record.id.lstrip("-").isdigit():
        return int(record.id)
    return record.id


# --------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ReleaseFormat(Generic[R]):
    """One MMed-RAG release format: what it holds, how to load it and how to write it back.

    ``domain`` / ``dataset`` are None where the format does not fix them (the caller passes them).
    """

    name: str
    description: str
    kind: RecordKind
    record_type: type[R]
    file_type: Literal["json", "jsonl"]
    domain: Domain | None
    dataset: str | None
    default_split: str | None  # None: the records carry no split (preference pairs)
    split_key: str  # the release field that holds the split ("use" for Harvard)
    split_native: bool  # the release always has the split field (else it is written only when not default)
    has_image_root: bool  # the release records carry an (ignored) "image_root" field
    parse: Callable[[_RecordReader], R] = field(repr=False)
    render: Callable[[R], dict[str, Any]] = field(repr=False)

    def load(
        self,
        path: StrPath,
        image_root: StrPath,
        *,
        check_images: bool = True,
        skip_bad: bool = False,
        use_file_image_root: bool = False,
        dataset: str | None = None,
        domain: str | None = None,
        split: str | None = None,
    ) -> LoadResult[R]:
        """Read a release file into records; see the module docstring for the rules.

        Args:
            path: the JSON / JSONL release file.
            image_root: the folder image paths are relative to (the file's own ``image_root`` is ignored).
            check_images: a record whose image file is missing is an error.
            skip_bad: skip malformed records and count them instead of raising.
            use_file_image_root: trust the file's ``image_root`` fields and absolute image paths.
            dataset: dataset name; required where the format is shared (VQA, retriever-radiology).
            domain: required where neither the format nor a known dataset name fixes it.
            split: split for records whose release record has none.
        """
        resolved_dataset, resolved_domain = self.resolve_context(dataset, domain)
        options = _LoadOptions(
            path=Path(path),
            image_root=Path(image_root),
            check_images=check_images,
            use_file_image_root=use_file_image_root,
            split=split,
            split_key=self.split_key,
            default_split=self.default_split,
            dataset=resolved_dataset,
            domain=resolved_domain,
        )
        if check_images and not use_file_image_root and not options.image_root.is_dir():
            raise FileNotFoundError(f"image root {options.image_root} is not a folder (format {self.name})")
        records: list[R] = []
        skipped = 0
        errors: list[str] = []
        for where, raw in _read_raw_records(options.path, self.file_type):
            try:
                if isinstance(raw, DatasetFormatError):
                    raise raw
                if not isinstance(raw, dict):
                    problem = f"expected a JSON object, got {_json_type(raw)}"
                    raise DatasetFormatError(options.path, where.label(), None, problem)
                records.append(self.parse(_RecordReader(raw, where, options)))
            except DatasetFormatError as exc:
                if not skip_bad:
                    raise
                skipped += 1
                if len(errors) < MAX_KEPT_ERRORS:
                    errors.append(str(exc))
        if skipped:
            logger.warning("%s: skipped %d bad record(s); first: %s", options.path, skipped, errors[0])
        return LoadResult(records=records, skipped=skipped, errors=errors)

    def dump(self, records: Iterable[R], path: StrPath, *, image_root: StrPath | None = None) -> int:
        """Write records in this release format (JSON list or JSONL); return how many were written.

        ``image_root``, for formats whose records carry one, is written into every record; otherwise a
        root kept by ``use_file_image_root=True`` is written back, or the field is left out.
        """
        if image_root is not None and not self.has_image_root:
            raise ValueError(f"format {self.name!r} has no image_root field; do not pass image_root")
        rows = []
        for record in records:
            if not isinstance(record, self.record_type):
                wanted, got = self.record_type.__name__, type(record).__name__
                raise TypeError(f"format {self.name!r} writes {wanted} records, got {got}")
            rows.append(self._release_record(record, image_root))
        _write_atomically(Path(path), rows, self.file_type)
        return len(rows)

    def _release_record(self, record: R, image_root: StrPath | None) -> dict[str, Any]:
        fields = self.render(record)
        split = getattr(record, "split", None)
        if split is not None and (self.split_native or split != self.default_split):
            fields[self.split_key] = split
        if self.has_image_root:
            root = image_root if image_root is not None else record.metadata.get("image_root")
            if root is not None:
                fields["image_root"] = str(root)
        for key, value in record.metadata.items():
            if key not in DERIVED_METADATA_KEYS:
                fields.setdefault(key, value)
        return fields

    def resolve_context(self, dataset: str | None, domain: str | None) -> tuple[str | None, Domain | None]:
        """The dataset and domain records get: the caller's, else the format's, else the dataset's domain.

        Raises ``ValueError`` where they stay unknown, or the caller contradicts the format.
        """
        dataset = dataset or self.dataset
        if dataset is None and self.kind != "preference":
            raise ValueError(f"format {self.name!r} is shared by several datasets: pass dataset=")
        if self.domain is not None:
            if domain is not None and domain != self.domain:
                raise ValueError(f"format {self.name!r} is {self.domain} data; got domain={domain!r}")
            domain = self.domain
        elif domain is None and dataset is not None:
            domain = DATASET_DOMAINS.get(dataset)
        if domain is None and self.kind != "preference":
            raise ValueError(f"format {self.name!r}: pass domain= (one of {', '.join(DOMAINS)})")
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
        return dataset, domain  # type: ignore[return-value]  # checked against DOMAINS just above


def _write_atomically(path: Path, rows: list[dict[str, Any]], file_type: Literal["json", "jsonl"]) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a release file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            if file_type == "json":
                json.dump(rows, handle, ensure_ascii=False, indent=2)
                handle.write("\n")
            else:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def _image_report_format(
    name: str,
    description: str,
    *,
    domain: Domain,
    dataset: str | None,
    default_split: str,
    parse: Callable[[_RecordReader], ImageReport],
    render: Callable[[ImageReport], dict[str, Any]],
    split_key: str = "split",
    split_native: bool = True,
    has_image_root: bool = False,
) -> ReleaseFormat[ImageReport]:
    return ReleaseFormat(
        name=name,
        description=description,
        kind="image_report",
        record_type=ImageReport,
        file_type="json",
        domain=domain,
        dataset=dataset,
        default_split=default_split,
        split_key=split_key,
        split_native=split_native,
        has_image_root=has_image_root,
        parse=parse,
        render=render,
    )


def _harvard_parser(text_key: str) -> Callable[[_RecordReader], ImageReport]:
    return lambda reader: _parse_harvard(reader, text_key=text_key)


def _quilt_parser(*, id_required: bool) -> Callable[[_RecordReader], ImageReport]:
    return lambda reader: _parse_quilt(reader, id_required=id_required)


RETRIEVER_RADIOLOGY = _image_report_format(
    "retriever-radiology",
    "Retriever train/val JSON, radiology (IU-Xray or MIMIC-CXR: pass dataset=)",
    domain="radiology",
    dataset=None,
    default_split="train",
    parse=_parse_radiology,
    render=_render_radiology,
    has_image_root=True,
)
RETRIEVER_PMC_OA = _image_report_format(
    "retriever-pmc-oa",
    "Retriever train/val JSON, PMC-OA pathology",
    domain="pathology",
    dataset="pmc-oa",
    default_split="train",
    parse=_parse_pmc_oa,
    render=_render_pmc_oa,
    split_native=False,
    has_image_root=True,
)
RETRIEVER_QUILT = _image_report_format(
    "retriever-quilt",
    "Retriever train/val JSON, Quilt-1M pathology (text: caption)",
    domain="pathology",
    dataset="quilt-1m",
    default_split="train",
    parse=_quilt_parser(id_required=True),
    render=_render_quilt,
    split_native=False,
    has_image_root=True,
)
RETRIEVER_HARVARD = _image_report_format(
    "retriever-harvard",
    "Retriever train/val JSON, Harvard-FairVLMed ophthalmology (text: gpt4_summary)",
    domain="ophthalmology",
    dataset="harvard-fairvlmed",
    default_split="train",
    parse=_harvard_parser("gpt4_summary"),
    render=_render_harvard("gpt4_summary"),
    split_key="use",
    split_native=True,
    has_image_root=True,
)
VQA: ReleaseFormat[VQAItem] = ReleaseFormat(
    name="vqa",
    description="Test closed yes/no VQA JSONL, shared by the five datasets (pass dataset=, and domain=)",
    kind="vqa",
    record_type=VQAItem,
    file_type="jsonl",
    domain=None,
    dataset=None,
    default_split="test",
    split_key="split",
    split_native=False,
    has_image_root=False,
    parse=_parse_vqa,
    render=_render_vqa,
)
REPORT_IU_XRAY = _image_report_format(
    "report-iu-xray",
    "Test report-generation JSON, IU-Xray",
    domain="radiology",
    dataset="iu-xray",
    default_split="test",
    parse=_parse_radiology,
    render=_render_radiology,
)
REPORT_MIMIC_CXR = _image_report_format(
    "report-mimic-cxr",
    "Test report-generation JSON, MIMIC-CXR",
    domain="radiology",
    dataset="mimic-cxr",
    default_split="test",
    parse=_parse_radiology,
    render=_render_radiology,
)
REPORT_HARVARD = _image_report_format(
    "report-harvard",
    "Test report-generation JSON, Harvard-FairVLMed (text: report)",
    domain="ophthalmology",
    dataset="harvard-fairvlmed",
    default_split="test",
    parse=_harvard_parser("report"),
    render=_render_harvard("report"),
    split_key="use",
)
REPORT_PMC_OA = _image_report_format(
    "report-pmc-oa",
    "Test JSON, PMC-OA pathology",
    domain="pathology",
    dataset="pmc-oa",
    default_split="test",
    parse=_parse_pmc_oa,
    render=_render_pmc_oa,
    split_native=False,
)
REPORT_QUILT = _image_report_format(
    "report-quilt",
    "Test JSON, Quilt-1M pathology (text: caption; id derived from image_path when absent)",
    domain="pathology",
    dataset="quilt-1m",
    default_split="test",
    parse=_quilt_parser(id_required=False),
    render=_render_quilt,
)
ALIGNMENT: ReleaseFormat[PreferencePair] = ReleaseFormat(
    name="alignment",
    description="Alignment (DPO) JSON: preference pairs (dataset= and domain= are optional)",
    kind="preference",
    record_type=PreferencePair,
    file_type="json",
    domain=None,
    dataset=None,
    default_split=None,
    split_key="split",
    split_native=False,
    has_image_root=True,
    parse=_parse_alignment,
    render=_render_alignment,
)

FORMATS: dict[str, ReleaseFormat[Any]] = {
    spec.name: spec
    for spec in (
        RETRIEVER_RADIOLOGY,
        RETRIEVER_PMC_OA,
        RETRIEVER_QUILT,
        RETRIEVER_HARVARD,
        VQA,
        REPORT_IU_XRAY,
        REPORT_MIMIC_CXR,
        REPORT_HARVARD,
        REPORT_PMC_OA,
        REPORT_QUILT,
        ALIGNMENT,
    )
}


def get_format(name: str) -> ReleaseFormat[Any]:
    """The release format called ``name``; the error lists the known names."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown release format {name!r}; known: {', '.join(FORMATS)}") from None


# Named loaders and writers, one per format (the same as FORMATS[name].load / .dump).
load_retriever_radiology = RETRIEVER_RADIOLOGY.load
load_retriever_pmc_oa = RETRIEVER_PMC_OA.load
load_retriever_quilt = RETRIEVER_QUILT.load
load_retriever_harvard = RETRIEVER_HARVARD.load
load_vqa = VQA.load
load_report_iu_xray = REPORT_IU_XRAY.load
load_report_mimic_cxr = REPORT_MIMIC_CXR.load
load_report_harvard = REPORT_HARVARD.load
load_report_pmc_oa = REPORT_PMC_OA.load
load_report_quilt = REPORT_QUILT.load
load_alignment = ALIGNMENT.load

dump_retriever_radiology = RETRIEVER_RADIOLOGY.dump
dump_retriever_pmc_oa = RETRIEVER_PMC_OA.dump
dump_retriever_quilt = RETRIEVER_QUILT.dump
dump_retriever_harvard = RETRIEVER_HARVARD.dump
dump_vqa = VQA.dump
dump_report_iu_xray = REPORT_IU_XRAY.dump
dump_report_mimic_cxr = REPORT_MIMIC_CXR.dump
dump_report_harvard = REPORT_HARVARD.dump
dump_report_pmc_oa = REPORT_PMC_OA.dump
dump_report_quilt = REPORT_QUILT.dump
dump_alignment = ALIGNMENT.dump
