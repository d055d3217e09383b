"""Entry point for drawing MedSynth images, plus the small drawing toolkit the domain modules share.

``draw_image`` validates the request against the finding catalogue and hands it to the domain's
renderer (``draw_radiology``, ``draw_fundus``, ``draw_pathology``). Two rules make the images useful
for training and easy to test:

* The normal anatomy is drawn only from the caller's generator, with a fixed number of draws whatever
  the findings are, and every finding gets its own generator derived from one seed taken from it. So an
  image drawn with and without a finding from the same seed differs only where that finding is.
* Each finding's visual difference from the normal appearance is scaled by
  ``finding.contrast * style.contrast_scale`` (its "strength"), so subtle findings stay visible but faint.

Everything is drawn in relative coordinates (0..1 across the image) so any ``size`` from 64 to 512 works.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Severity = Literal["mild", "moderate", "severe"]
SEVERITIES: tuple[Severity, ...] = ("mild", "moderate", "severe")

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
MIN_SIZE, MAX_SIZE = 64, 512
MAX_CONTRAST = 1.5
# Domain modules are imported on first use; they import this module for the shared types and helpers.
_RENDERERS = {
    "radiology": "training.data.medsynth.draw_radiology",
    "ophthalmology": "training.data.medsynth.draw_fundus",
    "pathology": "training.data.medsynth.draw_pathology",
}


@dataclass(frozen=True)
class FindingInstance:
    """One finding to draw: which, how extensive, and how conspicuous."""

    name: str  # a key of catalogue[domain]["findings"]
    severity: Severity  # extent/size of the finding (mild small ... severe large)
    contrast: float  # 0 < contrast <= 1.5: visual strength multiplier (subtle ~0.4-0.6, obvious 1.0)


@dataclass(frozen=True)
class DrawStyle:
    """Rendering options shared by all domains."""

    size: int = 224  # output is size x size pixels
    noise: float = 0.03  # std of additive pixel noise in [0,1] intensity units
    contrast_scale: float = 1.0  # global multiplier applied on top of each finding's contrast


@dataclass(frozen=True)
class FindingJob:
    """A validated finding with its private generator and effective strength, as renderers see it."""

    name: str
    severity: Severity
    strength: float  # finding.contrast * style.contrast_scale
    rng: np.random.Generator

    def pick(self, values: Sequence[float]) -> float:
        """The value for this finding's severity from a (mild, moderate, severe) triple."""
        return values[SEVERITIES.index(self.severity)]

    def uniform(self, ranges: Sequence[tuple[float, float]]) -> float:
        """A uniform draw from the (low, high) range of this finding's severity."""
        low, high = ranges[SEVERITIES.index(self.severity)]
        return float(self.rng.uniform(low, high))


@cache
def load_catalogue() -> dict[str, dict]:
    """The finding catalogue; read once because validation runs for every image."""
    return json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))


def finding_names(domain: str) -> tuple[str, ...]:
    """The domain's finding names in catalogue order (the order renderers draw them in)."""
    catalogue = load_catalogue()
    if domain not in catalogue:
        raise ValueError(f"unknown MedSynth domain {domain!r}; expected one of {sorted(catalogue)}")
    return tuple(catalogue[domain]["findings"])


def draw_image(
    domain: str, findings: list[FindingInstance], rng: np.random.Generator, style: DrawStyle
) -> tuple[Image.Image, dict[str, object]]:
    """Returns the image and measurements used by report text."""
    names = finding_names(domain)
    _check_style(style)
    for finding in findings:
        _check_finding(domain, names, finding)
    # One draw from the caller's generator seeds all findings; the rest of it is the anatomy's alone.
    finding_seed = int(rng.integers(0, 2**63 - 1))
    jobs = _finding_jobs(names, findings, finding_seed, style.contrast_scale)
    module = importlib.import_module(_RENDERERS[domain])
    pixels, measurements = module.render(rng, jobs, style)
    return Image.fromarray(pixels), measurements


def _check_style(style: DrawStyle) -> None:
    """Reject styles the drawing code was not designed for, before any drawing starts."""
    if not MIN_SIZE <= style.size <= MAX_SIZE:
        raise ValueError(f"DrawStyle.size must be in {MIN_SIZE}..{MAX_SIZE}, got {style.size}")
    if not style.noise >= 0:
        raise ValueError(f"DrawStyle.noise must be >= 0, got {style.noise}")
    if not style.contrast_scale > 0:
        raise ValueError(f"DrawStyle.contrast_scale must be > 0, got {style.contrast_scale}")


def _check_finding(domain: str, names: tuple[str, ...], finding: FindingInstance) -> None:
    """Reject unknown names and out-of-range values; the message names the finding."""
    if finding.name not in names:
        raise ValueError(f"unknown {domain} finding {finding.name!r}; expected one of {list(names)}")
    if finding.severity not in SEVERITIES:
        raise ValueError(f"finding {finding.name!r}: severity must be one of {SEVERITIES}")
    if not 0 < finding.contrast <= MAX_CONTRAST:
        raise ValueError(f"finding {finding.name!r}: contrast must be in (0, {MAX_CONTRAST}]")


def _finding_jobs(
    names: tuple[str, ...], findings: list[FindingInstance], seed: int, contrast_scale: float
) -> list[FindingJob]:
    """Jobs in catalogue order, each seeded by (seed, finding, repeat): findings never disturb each other."""
    jobs: list[tuple[int, int, FindingJob]] = []
    repeats: dict[str, int] = {}
    for finding in findings:
        index = names.index(finding.name)
        repeat = repeats.get(finding.name, 0)
        repeats[finding.name] = repeat + 1
        rng = np.random.default_rng([seed, index, repeat])
        strength = finding.contrast * contrast_scale
        jobs.append((index, repeat, FindingJob(finding.name, finding.severity, strength, rng)))
    return [job for _, _, job in sorted(jobs, key=lambda item: item[:2])]


# ---------------------------------------------------------------------------------------------------
# Shared drawing toolkit (relative coordinates, float32, vectorised).


@cache
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in 0..1 (x to the right, y down); cached and read-only."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(axis, axis)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def ramp(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-mask from a signed distance (positive inside), anti-aliased over ``width``."""
    return np.clip(signed_distance * (1.0 / width) + 0.5, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (about unit amplitude) with ``cells`` features across the image; cheap to make."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse)  # float32 -> mode "F"
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) * 1.4


def stamp_ellipses(
    layer: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray,
    values: np.ndarray,
    softness: float = 0.35,
) -> None:
    """Max-composite soft filled ellipses into ``layer`` in place.

    ``centres`` (n, 2) and ``radii`` (n, 2) are in pixels; each ellipse only touches a small window
    around itself, which keeps a few dozen blobs far cheaper than full-image fields. ``softness`` is the
    fraction of the radius over which the edge fades (at least about one pixel).
    """
    height, width = layer.shape
    for (cx, cy), (rx, ry), angle, value in zip(
        centres.tolist(), radii.tolist(), angles.tolist(), values.tolist(), strict=True
    ):
        reach = max(rx, ry) + 1.5
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, width)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, height)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        cos, sin = math.cos(angle), math.sin(angle)
        along = (dx * cos + dy * sin) / max(rx, 0.5)
        across = (dy * cos - dx * sin) / max(ry, 0.5)
        q = np.sqrt(along * along + across * across)
        edge = max(softness, 1.0 / max(min(rx, ry), 0.5))
        blob = np.clip((1.0 - q) / edge, 0.0, 1.0) * value
        np.maximum(layer[y0:y1, x0:x1], blob, out=layer[y0:y1, x0:x1])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and quantise, the last step of every renderer."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
