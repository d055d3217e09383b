"""Harvard-FairVLMed images: extract the SLO fundus of each ``data_XXXXX.npz`` as ``slo_fundus_XXXXX.jpg``.

FairVLMed ships each patient as an ``.npz`` archive whose ``slo_fundus`` array is the scanning-laser
ophthalmoscopy fundus image (plus other fields); the MMed-RAG release JSON refers to extracted JPEGs.
Arrays come in several shapes and value ranges, so ``fundus_to_uint8`` normalises them first.
Extraction is idempotent: existing JPEGs are kept unless ``overwrite=True``, and each JPEG is written
under a temporary name and renamed, so an interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from training.data.errors import DatasetFormatError

logger = logging.getLogger(__name__)

SLO_FUNDUS_KEY = "slo_fundus"
JPEG_QUALITY = 95
MAX_KEPT_ERRORS = 20

_NPZ_NAME = re.compile(r"^data_(.+)\.npz$")


@dataclass(frozen=True)
class HarvardExtractSummary:
    """What ``extract_harvard`` did: JPEGs written, already present, and files that could not be read."""

    npz_dir: Path
    out_dir: Path
    written: int
    existing: int
    failed: int
    errors: list[str] = field(default_factory=list)  # the first MAX_KEPT_ERRORS messages

    def __str__(self) -> str:
        return (
            f"{self.written} written, {self.existing} already there, {self.failed} failed: "
            f"{self.npz_dir} -> {self.out_dir}"
        )


def slo_fundus_name(npz_name: str) -> str:
    """The release's JPEG name for an archive: ``data_00042.npz`` → ``slo_fundus_00042.jpg``."""
    match = _NPZ_NAME.match(npz_name)
    return f"slo_fundus_{match.group(1) if match else Path(npz_name).stem}.jpg"


def fundus_to_uint8(array: np.ndarray) -> np.ndarray:
    """An HxW or HxWx3 uint8 image from a fundus array; ``ValueError`` says what is wrong with it.

    Accepted: 2-D grayscale; HxWx1/3/4 (alpha dropped) or channel-first 1/3/4xHxW; uint8, bool, other
    integers within 0..255, floats in [0, 1] (scaled by 255) or in [0, 255]. A float image whose maximum
    is at most 1 is read as [0, 1]: nothing else tells the two float conventions apart.
    """
    image = np.asarray(array)
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)) or 0 in image.shape:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {tuple(np.shape(array))}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.integer):
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"integer values outside 0..255 (min {low}, max {high})")
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("the image holds NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < -1e-6 or high > 255 + 1e-6:
            raise ValueError(f"float values outside [0, 1] and [0, 255] (min {low:g}, max {high:g})")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.clip(np.rint(image * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported array type {image.dtype}")


def read_slo_fundus(npz_path: Path, key: str = SLO_FUNDUS_KEY) -> np.ndarray:
    """The fundus image of one archive as uint8; errors name the file and the key."""
    try:
        loaded = np.load(npz_path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetFormatError(npz_path, None, key, "not an .npz archive (a single .npy array)")
        with loaded as archive:
            if key not in archive.files:
                keys = ", ".join(sorted(archive.files)) or "none"
                raise DatasetFormatError(npz_path, None, key, f"missing key {key!r} (keys: {keys})")
            array = archive[key]
    except DatasetFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetFormatError(npz_path, None, key, f"not a readable .npz archive ({exc})") from exc
    try:
        return fundus_to_uint8(array)
    except ValueError as exc:
        raise DatasetFormatError(npz_path, None, key, str(exc)) from exc


def _write_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(image).save(temporary, format="JPEG", quality=quality)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def extract_harvard(
    npz_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    key: str = SLO_FUNDUS_KEY,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quality: int = JPEG_QUALITY,
) -> HarvardExtractSummary:
    """Write ``out_dir/slo_fundus_XXXXX.jpg`` for every ``npz_dir/data_XXXXX.npz`` (not recursive).

    FairVLMed keeps its splits in separate folders: run once per folder, with the same ``out_dir``.
    A bad archive raises ``DatasetFormatError`` (file and key named), or with ``skip_bad`` is counted.
    """
    source, target = Path(npz_dir), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"Harvard-FairVLMed folder {source} does not exist")
    target.mkdir(parents=True, exist_ok=True)
    written = existing = failed = 0
    errors: list[str] = []
    archives = sorted(path for path in source.glob("*.npz") if path.is_file())
    for npz_path in tqdm(archives, desc="SLO fundus to JPEG", unit="file", disable=not progress):
        jpeg_path = target / slo_fundus_name(npz_path.name)
        if jpeg_path.exists() and not overwrite:
            existing += 1
            continue
        try:
            image = read_slo_fundus(npz_path, key)
        except DatasetFormatError as exc:
            if not skip_bad:
                raise
            failed += 1
            if len(errors) < MAX_KEPT_ERRORS:
                errors.append(str(exc))
            continue
        _write_jpeg(image, jpeg_path, quality)
        written += 1
    if failed:
        logger.warning("%s: %d archive(s) could not be extracted; first: %s", source, failed, errors[0])
    return HarvardExtractSummary(source, target, written, existing, failed, errors)
