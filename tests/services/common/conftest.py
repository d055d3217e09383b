"""The image builders of ``tests/image_factories.py`` as fixtures of the same names."""

from __future__ import annotations

import pytest
from image_factories import (
    make_animated,
    make_dicom,
    make_jpeg,
    make_noise_image,
    make_png,
    make_png_declaring,
    pil_bytes,
    truncate,
)


@pytest.fixture(name="pil_bytes")
def _pil_bytes_fixture():
    return pil_bytes


@pytest.fixture(name="make_png")
def _make_png_fixture():
    return make_png


@pytest.fixture(name="make_jpeg")
def _make_jpeg_fixture():
    return make_jpeg


@pytest.fixture(name="make_noise_image")
def _make_noise_image_fixture():
    return make_noise_image


@pytest.fixture(name="make_animated")
def _make_animated_fixture():
    return make_animated


@pytest.fixture(name="truncate")
def _truncate_fixture():
    return truncate


@pytest.fixture(name="make_png_declaring")
def _make_png_declaring_fixture():
    return make_png_declaring


@pytest.fixture(name="make_dicom")
def _make_dicom_fixture():
    return make_dicom
