"""Harvard-FairVLMed: real .npz archives → slo_fundus_XXXXX.jpg, then the release loaders read them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import formats
from training.data.errors import DatasetFormatError
from training.data.harvard import extract_harvard, fundus_to_uint8, slo_fundus_name

HEIGHT, WIDTH = 24, 32


def gradient(channels: int | None) -> np.ndarray:
    """A smooth uint8 test image (JPEG keeps smooth images nearly exact)."""
    rows = np.linspace(40, 220, HEIGHT)[:, None] * np.ones((1, WIDTH))
    if channels is None:
        return rows.astype(np.uint8)
    return np.stack([rows, rows * 0.8, rows * 0.5][:channels], axis=-1).astype(np.uint8)


def write_npz(folder: Path, name: str, **arrays: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


ARRAYS = {
    "uint8-2d": (gradient(None), "L", gradient(None)),
    "uint8-hw3": (gradient(3), "RGB", gradient(3)),
    "uint8-hw1": (gradient(None)[..., None], "L", gradient(None)),
    "float01-2d": (gradient(None) / 255.0, "L", gradient(None)),
    "float255-hw3": (gradient(3).astype(np.float32), "RGB", gradient(3)),
    "float01-chw": (np.moveaxis(gradient(3), -1, 0) / 255.0, "RGB", gradient(3)),
    "uint16-small": (gradient(None).astype(np.uint16), "L", gradient(None)),
}


@pytest.mark.parametrize(("array", "mode", "expected"), ARRAYS.values(), ids=ARRAYS.keys())
def test_extract_writes_the_fundus_as_the_release_jpeg(
    array: np.ndarray, mode: str, expected: np.ndarray, tmp_path: Path
) -> None:
    write_npz(tmp_path / "npz", "data_00042.npz", slo_fundus=array, glaucoma=np.array(1))

    summary = extract_harvard(tmp_path / "npz", tmp_path / "jpg", progress=False)

    assert (summary.written, summary.existing, summary.failed) == (1, 0, 0)
    with Image.open(tmp_path / "jpg" / "slo_fundus_00042.jpg") as image:
        assert image.format == "JPEG"
        assert image.mode == mode
        assert image.size == (WIDTH, HEIGHT)
        pixels = np.asarray(image).astype(int)
    assert np.abs(pixels - expected.astype(int)).mean() < 3


def test_extraction_is_idempotent_unless_overwrite(tmp_path: Path) -> None:
    for index in (1, 2):
        write_npz(tmp_path / "npz", f"data_{index:05d}.npz", slo_fundus=gradient(None))
    first = extract_harvard(tmp_path / "npz", tmp_path / "jpg", progress=False)
    jpeg = tmp_path / "jpg" / "slo_fundus_00001.jpg"
    jpeg.write_bytes(b"marker: must survive a second run")

    second = extract_harvard(tmp_path / "npz", tmp_path / "jpg", progress=False)
    assert (first.written, second.written, second.existing) == (2, 0, 2)
    assert jpeg.read_bytes() == b"marker: must survive a second run"

    third = extract_harvard(tmp_path / "npz", tmp_path / "jpg", overwrite=True, progress=False)
    assert third.written == 2
    with Image.open(jpeg) as image:
        assert image.size == (WIDTH, HEIGHT)
    assert sorted(path.name for path in (tmp_path / "jpg").iterdir()) == [
        "slo_fundus_00001.jpg",
        "slo_fundus_00002.jpg",
    ]


def test_a_custom_key_is_read(tmp_path: Path) -> None:
    write_npz(tmp_path / "npz", "data_00003.npz", oct_bscans=gradient(None), other=gradient(3))
    summary = extract_harvard(tmp_path / "npz", tmp_path / "jpg", key="other", progress=False)
    assert summary.written == 1
    with Image.open(tmp_path / "jpg" / "slo_fundus_00003.jpg") as image:
        assert image.mode == "RGB"


def _not_an_archive(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data_00005.npz").write_text("this is not a zip archive")
    return folder / "data_00005.npz"


def _plain_npy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "data_00006.npz").open("wb") as handle:
        np.save(handle, gradient(None))
    return folder / "data_00006.npz"


BAD_ARCHIVES = {
    "missing-key": (
        lambda d: write_npz(d, "data_00001.npz", fundus=gradient(None)),
        "missing key 'slo_fundus'",
    ),
    "1d": (lambda d: write_npz(d, "data_00002.npz", slo_fundus=np.arange(10)), "got shape (10,)"),
    "4d": (
        lambda d: write_npz(d, "data_00003.npz", slo_fundus=np.zeros((2, 4, 4, 3))),
        "got shape (2, 4, 4, 3)",
    ),
    "out-of-range": (lambda d: write_npz(d, "data_00004.npz", slo_fundus=np.full((4, 4), 300.0)), "outside"),
    "not-zip": (_not_an_archive, "not a readable .npz archive"),
    "plain-npy": (_plain_npy, "not an .npz archive"),
}


@pytest.mark.parametrize(("make", "problem"), BAD_ARCHIVES.values(), ids=BAD_ARCHIVES.keys())
def test_bad_archives_name_the_file_and_the_key(
    make: Callable[[Path], Path], problem: str, tmp_path: Path
) -> None:
    bad = make(tmp_path / "npz")

    with pytest.raises(DatasetFormatError) as caught:
        extract_harvard(tmp_path / "npz", tmp_path / "jpg", progress=False)

    message = str(caught.value)
    assert bad.name in message and "field 'slo_fundus'" in message and problem in message
    assert not any((tmp_path / "jpg").iterdir())


def test_skip_bad_counts_failures_and_extracts_the_rest(tmp_path: Path) -> None:
    write_npz(tmp_path / "npz", "data_00001.npz", slo_fundus=gradient(3))
    write_npz(tmp_path / "npz", "data_00002.npz", wrong=gradient(3))
    _not_an_archive(tmp_path / "npz")

    summary = extract_harvard(tmp_path / "npz", tmp_path / "jpg", skip_bad=True, progress=False)

    assert (summary.written, summary.failed) == (1, 2)
    assert len(summary.errors) == 2 and "data_00002.npz" in summary.errors[0]
    assert "1 written" in str(summary) and "2 failed" in str(summary)
    assert [path.name for path in (tmp_path / "jpg").iterdir()] == ["slo_fundus_00001.jpg"]


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_harvard(tmp_path / "nope", tmp_path / "jpg", progress=False)


@pytest.mark.parametrize(
    ("name", "jpeg"),
    [
        ("data_00042.npz", "slo_fundus_00042.jpg"),
        ("data_10000.npz", "slo_fundus_10000.jpg"),
        ("eye7.npz", "slo_fundus_eye7.jpg"),
    ],
)
def test_slo_fundus_name(name: str, jpeg: str) -> None:
    assert slo_fundus_name(name) == jpeg


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.array([[np.nan, 0.5]]), "NaN"),
        (np.array([[-5, 10]]), "outside 0..255"),
        (np.array([["a", "b"]]), "unsupported"),
    ],
)
def test_fundus_to_uint8_refuses_what_it_cannot_read(array: np.ndarray, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        fundus_to_uint8(array)


def test_the_harvard_loaders_read_the_extracted_images(tmp_path: Path) -> None:
    """Extraction output + release JSON (foreign image_root inside) → records whose images open."""
    images = tmp_path / "harvard" / "images"
    for index in (1, 2):
        write_npz(tmp_path / "harvard" / "Training", f"data_{index:05d}.npz", slo_fundus=gradient(3))
    extract_harvard(tmp_path / "harvard" / "Training", images, progress=False)
    rows = [
        {
            "id": f"data_{index:05d}",
            "image_path": f"slo_fundus_{index:05d}.jpg",
            "filename": f"data_{index:05d}.npz",
            "report": f"Note {index}.",
            "gpt4_summary": f"Summary {index}.",
            "glaucoma": index % 2,
            "age": 60 + index,
            "gender": "female",
            "race": "white",
            "use": "training",
            "image_root": "/home/author/data/harvard/images",
        }
        for index in (1, 2)
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))

    retriever = formats.load_retriever_harvard(tmp_path / "train.json", images).records
    report = formats.load_report_harvard(tmp_path / "train.json", images).records

    assert [record.report for record in retriever] == ["Summary 1.", "Summary 2."]
    assert [record.report for record in report] == ["Note 1.", "Note 2."]
    assert [record.metadata["glaucoma"] for record in retriever] == [1, 0]
    for record in retriever:
        with Image.open(images / record.image) as image:
            assert image.size == (WIDTH, HEIGHT)
