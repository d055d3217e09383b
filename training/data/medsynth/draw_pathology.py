"""Synthetic H&E histology patches for MedSynth.

The patch is drawn as two stain densities per pixel, haematoxylin (nuclei, purple-blue) and eosin
(stroma and cytoplasm, pink), and rendered with Beer-Lambert absorption, so overlapping structures mix
like real stains. Nuclei are rasterised as small jittered polygons with PIL (hundreds per patch at a
few microseconds each). Findings rewrite the stain layers; each finding's change is scaled by its
strength before the next one is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from training.data.medsynth.draw import SEVERITIES, DrawStyle, FindingJob, grid, ramp, smooth_noise, to_uint8

# Optical density of one unit of stain per RGB channel (-ln of the colour it gives on white).
HAEMATOXYLIN_OD = np.array([1.05, 1.39, 0.51], dtype=np.float32)
EOSIN_OD = np.array([0.08, 0.62, 0.3], dtype=np.float32)

STROMA_EOSIN = (0.62, 0.8)
EPITHELIUM_EOSIN = 0.95
LUMEN_EOSIN = 0.03
NUCLEUS_RADIUS = 0.0105  # image units; round stromal/epithelial nuclei
NUCLEUS_DENSITY = (0.9, 1.3)
STROMAL_NUCLEI = (70, 110)
GLANDS = (2, 4)
POLYGON_VERTICES = 10

TUMOUR_AREA = ((0.12, 0.18), (0.25, 0.33), (0.42, 0.55))
TUMOUR_SPACING = (0.036, 0.042)
INFLAMMATION_CELLS = (80, 160, 280)
INFLAMMATION_CLUSTERS = (1, 2, 3)
NECROSIS_AREA = ((0.1, 0.14), (0.2, 0.26), (0.33, 0.42))
MITOSIS_COUNT = ((3, 4), (5, 7), (9, 12))


@dataclass
class _Stains:
    """Stain density fields plus what later findings need to know about earlier ones."""

    haematoxylin: np.ndarray
    eosin: np.ndarray
    tumour: np.ndarray | None = None
    necrosis: np.ndarray | None = None


@dataclass(frozen=True)
class _Gland:
    """An elliptical gland: centre, radii and rotation in image units, and its lumen's share."""

    x: float
    y: float
    rx: float
    ry: float
    angle: float
    lumen: float  # lumen radius as a fraction of the gland's


def render(rng: np.random.Generator, jobs: list[FindingJob], style: DrawStyle) -> tuple[np.ndarray, dict]:
    """Draw one H&E patch; returns uint8 (size, size, 3) pixels and (no) measurements."""
    size = style.size
    stains, stain_jitter = _draw_tissue(rng, size)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    for job in jobs:
        draw = _FINDINGS.get(job.name)
        if draw is None:
            raise ValueError(f"no pathology drawing for finding {job.name!r}")
        haematoxylin, eosin = draw(job, stains, size)
        # Strengths above 1 extrapolate the change; stain densities cannot go negative.
        stains.haematoxylin = np.maximum(
            stains.haematoxylin + job.strength * (haematoxylin - stains.haematoxylin), 0
        )
        stains.eosin = np.maximum(stains.eosin + job.strength * (eosin - stains.eosin), 0)
    image = _absorb(stains, stain_jitter) + style.noise * noise
    return to_uint8(image), {}


# ---------------------------------------------------------------------------------------------------
# Normal tissue.


def _draw_tissue(rng: np.random.Generator, size: int) -> tuple[_Stains, np.ndarray]:
    """Fibrous stroma, a few glands lined by nuclei, scattered stromal nuclei; fixed number of draws."""
    x, y = grid(size)
    fibre_angle = float(rng.uniform(0, np.pi))
    eosin = _stroma(rng, size, fibre_angle)
    glands = _place_glands(rng)
    epithelium = np.zeros_like(eosin)
    lumen = np.zeros_like(eosin)
    for gland in glands:
        q = _ellipse_radius(x, y, gland)
        soft = 1.5 / (size * min(gland.rx, gland.ry))
        outer = ramp(1.0 - q, soft)
        inner = ramp(gland.lumen - q, soft)
        epithelium = np.maximum(epithelium, outer - inner)
        lumen = np.maximum(lumen, inner)
    eosin = eosin * (1 - epithelium - lumen) + EPITHELIUM_EOSIN * epithelium + LUMEN_EOSIN * lumen

    canvas = _Canvas(size)
    for gland in glands:
        _draw_gland_nuclei(rng, canvas, gland)
    _draw_stromal_nuclei(rng, canvas, glands, fibre_angle)
    grain = smooth_noise(rng, size, max(size // 3, 16))
    haematoxylin = canvas.field(0.5) * (0.88 + 0.12 * grain)
    jitter = rng.uniform(0.88, 1.12, 6).astype(np.float32)
    return _Stains(haematoxylin, eosin.astype(np.float32)), jitter


def _stroma(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
    """Eosin density of collagen: wavy parallel fibres, patchy density and a few loose clefts."""
    x, y = grid(size)
    warp = smooth_noise(rng, size, 5)
    patch = smooth_noise(rng, size, 7)
    bundles = smooth_noise(rng, size, 9)
    grain = smooth_noise(rng, size, max(size // 3, 16))
    period = float(rng.uniform(0.018, 0.028))
    level = float(rng.uniform(*STROMA_EOSIN))
    phase = (x * math.cos(angle) + y * math.sin(angle)) / period + 1.8 * warp
    gaps = (0.5 + 0.5 * np.sin(2 * np.pi * phase)) ** 6  # thin pale spaces between collagen bundles
    gaps *= np.clip(0.5 + 0.5 * bundles, 0.0, 1.0)
    return level * (1.0 - 0.4 * gaps) * (1.0 + 0.12 * patch + 0.06 * grain)


def _place_glands(rng: np.random.Generator) -> list[_Gland]:
    """A few non-overlapping elliptical glands; candidates drawn up front so the count of draws is fixed."""
    wanted = int(rng.integers(GLANDS[0], GLANDS[1] + 1))
    params = rng.uniform(size=(12, 6))
    glands: list[_Gland] = []
    for p in params:
        rx = 0.09 + 0.06 * p[2]
        gland = _Gland(
            0.1 + 0.8 * p[0], 0.1 + 0.8 * p[1], rx, rx * (0.6 + 0.3 * p[3]), np.pi * p[4], 0.5 + 0.2 * p[5]
        )
        if all(math.hypot(gland.x - g.x, gland.y - g.y) > gland.rx + g.rx + 0.03 for g in glands):
            glands.append(gland)
        if len(glands) == wanted:
            break
    return glands


def _ellipse_radius(x: np.ndarray, y: np.ndarray, gland: _Gland) -> np.ndarray:
    """Normalised elliptical radius of points around a gland (1 on its outer edge)."""
    cos, sin = math.cos(gland.angle), math.sin(gland.angle)
    dx, dy = x - gland.x, y - gland.y
    return np.sqrt(((dx * cos + dy * sin) / gland.rx) ** 2 + ((dy * cos - dx * sin) / gland.ry) ** 2)


class _Canvas:
    """A float haematoxylin canvas that nuclei are drawn into as filled polygons."""

    def __init__(self, size: int):
        self.size = size
        self.image = Image.new("F", (size, size), 0.0)
        self.draw = ImageDraw.Draw(self.image)

    def nuclei(
        self,
        rng: np.random.Generator,
        centres: np.ndarray,
        radii: np.ndarray,
        angles: np.ndarray,
        density: np.ndarray,
        irregularity: float,
    ) -> None:
        """Jittered-ellipse polygons; ``radii`` (n, 2) along/across ``angles``, all in image units."""
        n = len(centres)
        theta = np.linspace(0, 2 * np.pi, POLYGON_VERTICES, endpoint=False)
        wobble = 1.0 + irregularity * rng.uniform(-1, 1, (n, POLYGON_VERTICES))
        ex = radii[:, :1] * np.cos(theta) * wobble
        ey = radii[:, 1:] * np.sin(theta) * wobble
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        px = (centres[:, :1] + ex * cos - ey * sin) * self.size
        py = (centres[:, 1:] + ex * sin + ey * cos) * self.size
        vertices = np.stack([px, py], axis=2).reshape(n, -1)
        for polygon, value in zip(vertices.tolist(), density.tolist(), strict=True):
            self.draw.polygon(polygon, fill=value)

    def field(self, blur_px: float) -> np.ndarray:
        """The drawn densities, softened so nuclei have smooth edges at any size."""
        return gaussian_filter(np.asarray(self.image), blur_px * self.size / 224)


def _draw_gland_nuclei(rng: np.random.Generator, canvas: _Canvas, gland: _Gland) -> None:
    """Basal nuclei lining the gland, elongated across the epithelium (pointing at the lumen)."""
    n = 40  # fixed draw count; only the ones that fit the perimeter are used
    perimeter = 2 * np.pi * math.sqrt((gland.rx**2 + gland.ry**2) / 2)
    count = min(n, int(perimeter / 0.019))
    phase = rng.uniform(0, 2 * np.pi)
    jitter = rng.normal(0, 0.05, (n, 3))[:count]
    t = phase + np.linspace(0, 2 * np.pi, count, endpoint=False) + jitter[:, 0]
    r = gland.lumen + 0.6 * (1 - gland.lumen) + jitter[:, 1] * 0.3
    ex, ey = r * gland.rx * np.cos(t), r * gland.ry * np.sin(t)
    cos, sin = math.cos(gland.angle), math.sin(gland.angle)
    centres = np.stack([gland.x + ex * cos - ey * sin, gland.y + ex * sin + ey * cos], axis=1)
    angles = np.arctan2(centres[:, 1] - gland.y, centres[:, 0] - gland.x)
    radii = np.stack([np.full(count, NUCLEUS_RADIUS * 1.25), np.full(count, NUCLEUS_RADIUS * 0.75)], 1)
    density = rng.uniform(*NUCLEUS_DENSITY, n)[:count]
    canvas.nuclei(rng, centres, radii * (1 + jitter[:, 2:3]), angles, density, 0.08)


def _draw_stromal_nuclei(
    rng: np.random.Generator, canvas: _Canvas, glands: list[_Gland], fibre_angle: float
) -> None:
    """Spindle fibroblast nuclei along the fibres and some round cells, kept out of the glands."""
    n = STROMAL_NUCLEI[1]
    count = int(rng.integers(*STROMAL_NUCLEI))
    centres = rng.uniform(0, 1, (n, 2))
    spindle = rng.uniform(size=n) < 0.55
    size_jitter = rng.uniform(0.8, 1.2, n)
    angles = fibre_angle + rng.normal(0, 0.3, n)
    density = rng.uniform(*NUCLEUS_DENSITY, n)
    keep = np.arange(n) < count
    for gland in glands:
        keep &= _ellipse_radius(centres[:, 0], centres[:, 1], gland) > 1.1
    radii = np.where(spindle[:, None], [[1.7, 0.5]], [[1.0, 0.85]]) * NUCLEUS_RADIUS * size_jitter[:, None]
    canvas.nuclei(rng, centres[keep], radii[keep], angles[keep], density[keep], 0.08)


def _absorb(stains: _Stains, jitter: np.ndarray) -> np.ndarray:
    """Beer-Lambert: transmitted light through both stains, with per-slide stain variation."""
    od = stains.haematoxylin[..., None] * (HAEMATOXYLIN_OD * jitter[:3]) + stains.eosin[..., None] * (
        EOSIN_OD * jitter[3:]
    )
    return np.exp(-od)


# ---------------------------------------------------------------------------------------------------
# Findings: each returns the new (haematoxylin, eosin) at full strength.


def _region(rng: np.random.Generator, size: int, area: float) -> np.ndarray:
    """A blob-shaped soft mask covering about ``area`` of the patch (irregular border)."""
    x, y = grid(size)
    cx, cy = rng.uniform(0.25, 0.75, 2)
    field = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.22**2)) + 0.22 * smooth_noise(rng, size, 5)
    flat = field.ravel()
    k = int((1.0 - area) * (flat.size - 1))
    threshold = np.partition(flat, k)[k]
    return ramp(field - threshold, 0.03)


def _points_in(mask: np.ndarray, points: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Which points (image units) fall where ``mask`` exceeds ``level``."""
    size = mask.shape[0]
    ij = np.clip((points * size).astype(int), 0, size - 1)
    return mask[ij[:, 1], ij[:, 0]] > level


def _tumour(job: FindingJob, stains: _Stains, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A sheet of crowded, enlarged, pleomorphic, hyperchromatic nuclei replacing the normal tissue."""
    rng = job.rng
    mask = _region(rng, size, job.uniform(TUMOUR_AREA))
    spacing = float(rng.uniform(*TUMOUR_SPACING))
    axis = np.arange(spacing / 2, 1.0, spacing)
    gx, gy = np.meshgrid(axis, axis)
    gx = gx + (np.arange(len(axis))[:, None] % 2) * spacing / 2  # staggered rows pack like cells
    centres = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.3, 0.3, (gx.size, 2)) * spacing
    centres = centres[_points_in(mask, centres)]
    n = len(centres)
    radius = NUCLEUS_RADIUS * rng.uniform(1.2, 1.75, n)
    radii = np.stack([radius, radius * rng.uniform(0.65, 1.0, n)], 1)
    canvas = _Canvas(size)
    canvas.nuclei(rng, centres, radii, rng.uniform(0, np.pi, n), rng.uniform(1.05, 1.55, n), 0.2)
    nucleoli = rng.uniform(size=n) < 0.4
    dots = centres[nucleoli] + rng.normal(0, 0.002, (int(nucleoli.sum()), 2))
    canvas.nuclei(
        rng, dots, np.full((len(dots), 2), 0.0022), np.zeros(len(dots)), np.full(len(dots), 2.6), 0.1
    )
    stains.tumour = mask
    haematoxylin = stains.haematoxylin * (1 - mask) + canvas.field(0.5) + 0.1 * mask
    eosin = stains.eosin * (1 - mask) + 0.75 * mask
    return haematoxylin, eosin


def _inflammation(job: FindingJob, stains: _Stains, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense clusters of small, very dark, round lymphocytes that crowd out the collagen."""
    rng = job.rng
    clusters = int(job.pick(INFLAMMATION_CLUSTERS))
    total = int(job.pick(INFLAMMATION_CELLS) * rng.uniform(0.85, 1.15))
    centre = rng.uniform(0.15, 0.85, (clusters, 2))
    spread = rng.uniform(0.035, 0.055, clusters) * (1 + 0.15 * SEVERITIES.index(job.severity))
    which = rng.integers(0, clusters, total)
    centres = centre[which] + rng.normal(0, 1, (total, 2)) * spread[which, None]
    radius = rng.uniform(0.0058, 0.007, total)
    radii = np.stack([radius, radius * rng.uniform(0.85, 1.0, total)], 1)
    canvas = _Canvas(size)
    canvas.nuclei(rng, centres, radii, rng.uniform(0, np.pi, total), rng.uniform(2.0, 2.4, total), 0.06)
    cells = canvas.field(0.45)
    crowding = np.clip(gaussian_filter(cells, 3.0 * size / 224) * 1.5, 0.0, 1.0)
    return np.maximum(stains.haematoxylin * (1 - 0.7 * crowding), cells), stains.eosin * (1 - 0.35 * crowding)


def _necrosis(job: FindingJob, stains: _Stains, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pale, washed-out, structureless pink with small fragments of nuclear debris; no intact nuclei."""
    rng = job.rng
    area = job.uniform(NECROSIS_AREA)
    mask = _region(rng, size, area)
    count = int(1100 * area)
    centres = rng.uniform(0, 1, (count, 2))
    centres = centres[_points_in(mask, centres, 0.6)]
    n = len(centres)
    radius = rng.uniform(0.002, 0.0038, n)
    radii = np.stack([radius, radius * rng.uniform(0.5, 1.0, n)], 1)
    canvas = _Canvas(size)
    canvas.nuclei(rng, centres, radii, rng.uniform(0, np.pi, n), rng.uniform(0.9, 1.5, n), 0.35)
    amorphous = 0.3 + 0.05 * smooth_noise(rng, size, 12)
    stains.necrosis = mask
    haematoxylin = stains.haematoxylin * (1 - mask) + canvas.field(0.4) + 0.05 * mask
    eosin = stains.eosin * (1 - mask) + amorphous * mask
    return haematoxylin, eosin


def _mitoses(job: FindingJob, stains: _Stains, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Very dark star, plate or anaphase chromatin figures, larger than nuclei, each in a clear halo;
    placed preferably inside tumour and never in necrosis."""
    rng = job.rng
    low, high = MITOSIS_COUNT[SEVERITIES.index(job.severity)]
    count = int(rng.integers(low, high + 1))
    centres = _mitosis_sites(rng, stains, count)
    x, y = grid(size)
    halo = np.zeros_like(stains.eosin)
    for cx, cy in centres.tolist():
        halo = np.maximum(halo, ramp(0.036 - np.sqrt((x - cx) ** 2 + (y - cy) ** 2), 0.008))
    canvas = _Canvas(size)
    for cx, cy in centres.tolist():
        _draw_mitotic_figure(rng, canvas, cx, cy)
    haematoxylin = stains.haematoxylin * (1 - halo) + canvas.field(0.45)
    eosin = stains.eosin * (1 - 0.8 * halo)
    return haematoxylin, eosin


def _mitosis_sites(rng: np.random.Generator, stains: _Stains, count: int) -> np.ndarray:
    """Well separated sites, favouring tumour and avoiding necrosis."""
    candidates = rng.uniform(0.07, 0.93, (12 * count, 2))
    score = rng.uniform(0, 1, len(candidates))
    if stains.tumour is not None:
        score += 2.0 * _points_in(stains.tumour, candidates)
    if stains.necrosis is not None:
        score -= 5.0 * _points_in(stains.necrosis, candidates, 0.2)
    score -= 5.0 * ~_points_in(stains.eosin, candidates, 0.3)  # not in a gland lumen
    chosen: list[np.ndarray] = []
    for index in np.argsort(-score):
        point = candidates[index]
        if all(np.hypot(*(point - other)) > 0.07 for other in chosen):
            chosen.append(point)
        if len(chosen) == count:
            break
    return np.array(chosen)


def _draw_mitotic_figure(rng: np.random.Generator, canvas: _Canvas, cx: float, cy: float) -> None:
    """One figure: an aster of chromosome arms, a metaphase plate, or two anaphase plates."""
    kind = int(rng.integers(0, 3))
    angle = float(rng.uniform(0, np.pi))
    density = 3.4  # darker than any nucleus, lymphocytes included
    if kind == 0:  # prometaphase aster: short arms radiating from a dark core
        arms = int(rng.integers(7, 11))
        theta = angle + np.linspace(0, 2 * np.pi, arms, endpoint=False) + rng.normal(0, 0.15, arms)
        length = rng.uniform(0.016, 0.025, arms)
        mid = np.stack([cx + 0.5 * length * np.cos(theta), cy + 0.5 * length * np.sin(theta)], 1)
        radii = np.stack([0.5 * length, np.full(arms, 0.0035)], 1)
        canvas.nuclei(rng, mid, radii, theta, np.full(arms, density), 0.15)
        canvas.nuclei(
            rng, np.array([[cx, cy]]), np.array([[0.009, 0.009]]), np.zeros(1), np.full(1, density), 0.2
        )
    else:  # metaphase plate (one bar) or anaphase (two parallel bars moving apart)
        bars = 1 if kind == 1 else 2
        offsets = [0.0] if bars == 1 else [-0.01, 0.01]
        across = np.array([-math.sin(angle), math.cos(angle)])
        mid = np.array([[cx, cy] + across * o for o in offsets])
        length = 0.026 if bars == 1 else 0.021
        radii = np.tile([[length, 0.0065 if bars == 1 else 0.005]], (bars, 1))
        canvas.nuclei(rng, mid, radii, np.full(bars, angle), np.full(bars, density), 0.25)


_FINDINGS = {
    "tumour": _tumour,
    "inflammation": _inflammation,
    "necrosis": _necrosis,
    "mitoses": _mitoses,
}
