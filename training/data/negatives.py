"""Procedural images of *none* of the medical domains: the negatives of the domain classifier.

The classifier must say "none of the known domains" for a holiday photo, a screenshot of text or a noisy
frame, but no such images can be downloaded here. These generators stand in for them, drawn from a seed
so training, calibration and held-out evaluation each get their own reproducible set:

- ``shapes``: smooth two-colour gradients with random ellipses, rectangles, polygons and lines.
- ``photo``: landscape-like photographs: a sky gradient, a horizon, a textured (1/f noise) ground,
  blurred blobs for trees and buildings, uneven lighting.
- ``noise``: white, Gaussian or 1/f noise, in colour or grey, at random brightness and contrast.
- ``text``: printed-page-like images: lines of random words in dark ink on paper.
- ``checkerboard``: two-colour checkerboards of random cell size, phase and rotation.

About a third of the ``shapes``, ``photo``, ``noise`` and ``checkerboard`` images are grey, because grey
images are the hard case next to grey radiographs.

Image ``i`` of a call is drawn from its own generator ``(seed, i)`` and has kind
``kinds[i % len(kinds)]``, so the first ``n`` images do not depend on how many are asked for.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

NegativeKind = Literal["shapes", "photo", "noise", "text", "checkerboard"]
NEGATIVE_KINDS: tuple[NegativeKind, ...] = ("shapes", "photo", "noise", "text", "checkerboard")
GREY_PROBABILITY = 0.3
MIN_SIZE, MAX_SIZE = 16, 1024


def negative_kind(index: int, kinds: Sequence[str] = NEGATIVE_KINDS) -> str:
    """The kind of image ``index`` of a ``make_negative_images`` call with these ``kinds``."""
    return kinds[index % len(kinds)]


def make_negative_images(
    n: int, seed: int, size: int = 224, *, kinds: Sequence[str] = NEGATIVE_KINDS
) -> list[Image.Image]:
    """``n`` RGB images of ``size`` x ``size`` pixels, none of them medical; deterministic in ``seed``.

    Args:
        n: how many images.
        seed: the same seed gives the same pixels; use different seeds for train / calibration / test.
        size: image side in pixels (draw them at the size of the real images the classifier sees,
            so both go through the same resizing).
        kinds: which generators to cycle through (default: all of ``NEGATIVE_KINDS``).

    Example::

        val_negatives = make_negative_images(200, seed=1, size=224)
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    unknown = [kind for kind in kinds if kind not in _DRAWERS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty selection of {NEGATIVE_KINDS}, got {list(kinds)}")
    images = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        kind = negative_kind(index, kinds)
        image = _DRAWERS[kind](rng, size)
        if kind != "text" and rng.random() < GREY_PROBABILITY:
            image = image.convert("L").convert("RGB")
        images.append(image)
    return images


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _to_image(array: np.ndarray) -> Image.Image:
    """A float array in [0, 1], (h, w) or (h, w, 3), as an RGB image."""
    array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(array, mode="RGB")


def _pink_noise(rng: np.random.Generator, size: int, channels: int, exponent: float) -> np.ndarray:
    """Noise with a 1/f^exponent spectrum (natural images are close to exponent 1), scaled to [0, 1]."""
    white = rng.standard_normal((channels, size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(white) / radius**exponent
    spectrum[:, 0, 0] = 0.0
    field = np.real(np.fft.ifft2(spectrum))
    low = field.min(axis=(1, 2), keepdims=True)
    high = field.max(axis=(1, 2), keepdims=True)
    field = (field - low) / np.maximum(high - low, 1e-8)
    return np.moveaxis(field, 0, -1)  # (size, size, channels)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle, (size, size, 3) in [0, 1]."""
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-8)
    start = np.array(_colour(rng), dtype=np.float64) / 255.0
    end = np.array(_colour(rng), dtype=np.float64) / 255.0
    return start + t[:, :, None] * (end - start)


def _draw_shapes(rng: np.random.Generator, size: int) -> Image.Image:
    image = _to_image(_gradient(rng, size))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 9))):
        shape = int(rng.integers(0, 4))
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.6, size=2) * size
        colour = _colour(rng)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 2:
            points = [tuple(p) for p in (rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2)) * size)]
            draw.polygon(points, fill=colour)
        else:
            width = max(1, int(rng.uniform(0.005, 0.04) * size))
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=width)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3.0) * size / 224))
    return image


def _draw_photo(rng: np.random.Generator, size: int) -> Image.Image:
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    horizon = rng.uniform(0.3, 0.7)
    sky_top = rng.uniform([0.2, 0.3, 0.5], [0.6, 0.8, 1.0])
    sky_bottom = rng.uniform([0.6, 0.6, 0.6], [1.0, 1.0, 1.0])
    ground = rng.uniform([0.1, 0.15, 0.05], [0.6, 0.6, 0.4])
    texture = _pink_noise(rng, size, 3, exponent=rng.uniform(0.8, 1.4))
    sky = sky_top + (y / horizon) * (sky_bottom - sky_top)
    land = ground * (0.6 + 0.8 * texture)
    # A wavy horizon, so the boundary is not a straight line.
    wave = horizon + 0.05 * _pink_noise(rng, size, 1, exponent=2.0)[size // 2, :, 0][None, :, None]
    array = np.where(y < wave, sky * np.ones((1, size, 1)), land)
    image = _to_image(array)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 10))):
        cx = rng.uniform(0, 1) * size
        base = (horizon + rng.uniform(-0.05, 0.3)) * size
        w, h = rng.uniform(0.03, 0.2) * size, rng.uniform(0.05, 0.4) * size
        colour = tuple(int(v) for v in rng.uniform([10, 30, 10], [120, 140, 110]))
        if rng.random() < 0.5:
            draw.ellipse([cx - w, base - h, cx + w, base], fill=colour)  # a tree
        else:
            draw.rectangle([cx - w, base - h, cx + w, base], fill=_colour(rng))  # a building
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * size / 224))
    # Uneven lighting and a little sensor noise.
    light = _gradient(rng, size).mean(axis=2, keepdims=True)
    array = np.asarray(image, dtype=np.float64) / 255.0 * (0.7 + 0.6 * light)
    array += rng.normal(0.0, rng.uniform(0.0, 0.03), size=array.shape)
    return _to_image(array)


def _draw_noise(rng: np.random.Generator, size: int) -> Image.Image:
    channels = 3 if rng.random() < 0.7 else 1
    variant = int(rng.integers(0, 3))
    if variant == 0:
        field = rng.uniform(0.0, 1.0, size=(size, size, channels))
    elif variant == 1:
        field = 0.5 + rng.normal(0.0, 0.25, size=(size, size, channels))
    else:
        field = _pink_noise(rng, size, channels, exponent=rng.uniform(0.5, 2.0))
    mean, contrast = rng.uniform(0.2, 0.8), rng.uniform(0.2, 1.0)
    field = mean + (field - 0.5) * contrast
    if channels == 1:
        field = field[:, :, 0]
    return _to_image(field)


_LETTERS = string.ascii_letters + string.digits + ".,;:!?-()"


def _draw_text(rng: np.random.Generator, size: int) -> Image.Image:
    paper = tuple(int(v) for v in rng.uniform([200, 200, 190], [256, 256, 256]))
    ink = tuple(int(v) for v in rng.uniform([0, 0, 0], [90, 90, 120]))
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    font_size = max(6, int(size * rng.uniform(0.04, 0.1)))
    font = ImageFont.load_default(size=font_size)
    line_height = int(font_size * rng.uniform(1.2, 1.8))
    margin = int(size * rng.uniform(0.02, 0.1))
    y = margin
    while y + font_size < size - margin:
        words = [
            "".join(rng.choice(list(_LETTERS), size=int(rng.integers(1, 10))))
            for _ in range(int(rng.integers(2, 14)))
        ]
        draw.text((margin, y), " ".join(words), fill=ink, font=font)
        y += line_height
    if rng.random() < 0.5:
        image = image.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    return image


def _draw_checkerboard(rng: np.random.Generator, size: int) -> Image.Image:
    cell = rng.uniform(0.03, 0.25) * size
    angle = rng.uniform(0, math.pi / 2) if rng.random() < 0.5 else 0.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = x * math.cos(angle) + y * math.sin(angle) + rng.uniform(0, cell)
    v = -x * math.sin(angle) + y * math.cos(angle) + rng.uniform(0, cell)
    mask = ((np.floor(u / cell) + np.floor(v / cell)) % 2)[:, :, None]
    first = np.array(_colour(rng), dtype=np.float64) / 255.0
    second = np.array(_colour(rng), dtype=np.float64) / 255.0
    return _to_image(first + mask * (second - first))


_DRAWERS = {
    "shapes": _draw_shapes,
    "photo": _draw_photo,
    "noise": _draw_noise,
    "text": _draw_text,
    "checkerboard": _draw_checkerboard,
}
