"""Synthetic colour fundus photographs for MedSynth.

A right eye is photographed with the optic disc on the image right and the macula to its left
(temporal); a left eye is the mirror image. The picture is composed as an albedo (retina, disc, cup,
macula, vessels, lesions) multiplied by the camera's illumination fall-off and cut to a circular field
of view. The cup and the vessel course are geometry and follow the findings (glaucoma sets the cup,
tortuosity wiggles the vessels with an amplitude scaled by its strength); haemorrhages and drusen are
painted over the albedo with their strength as opacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from training.data.medsynth.draw import (
    SEVERITIES,
    DrawStyle,
    FindingJob,
    grid,
    ramp,
    smooth_noise,
    stamp_ellipses,
    to_uint8,
)

# Geometry in image units.
FOV_RADIUS = (0.455, 0.48)
DISC_RADIUS = (0.055, 0.065)
DISC_OVAL = (1.03, 1.12)  # the disc (and cup) are slightly taller than wide
DISC_OFFSET = (0.13, 0.16)  # disc centre from the image centre, towards the nasal side
MACULA_DISTANCE_DD = 2.5  # disc diameters from the disc centre to the fovea
NORMAL_CDR = (0.2, 0.4)
GLAUCOMA_CDR = ((0.6, 0.6), (0.7, 0.75), (0.8, 0.9))  # rounded to one decimal

# Colours (linear 0..1 RGB albedo).
RETINA = ((0.86, 0.34, 0.12), (0.98, 0.48, 0.22))
DISC_COLOUR = np.array([0.96, 0.68, 0.4], dtype=np.float32)
CUP_COLOUR = np.array([1.0, 0.95, 0.8], dtype=np.float32)
VEIN_COLOUR = np.array([0.42, 0.06, 0.04], dtype=np.float32)
ARTERY_COLOUR = np.array([0.62, 0.13, 0.07], dtype=np.float32)
HAEMORRHAGE_COLOUR = np.array([0.3, 0.02, 0.02], dtype=np.float32)
DRUSEN_COLOUR = np.array([1.0, 0.93, 0.3], dtype=np.float32)

VEIN_WIDTH, ARTERY_WIDTH, BRANCH_SHARE = 0.016, 0.012, 0.6
TORTUOSITY_AMPLITUDE = (0.005, 0.008, 0.012)  # image units, scaled by the finding's strength
TORTUOSITY_PERIOD = 0.09
HAEMORRHAGE_COUNT = ((4, 6), (8, 12), (14, 20))
DRUSEN_COUNT = ((8, 12), (18, 26), (32, 48))
DRUSEN_RADIUS = ((0.006, 0.009), (0.007, 0.011), (0.008, 0.014))


@dataclass(frozen=True)
class _Eye:
    """Per-image anatomy parameters drawn from the anatomy generator."""

    side: int  # +1 right eye (disc on the image right), -1 left eye
    fov_x: float
    fov_y: float
    fov_r: float
    disc_x: float
    disc_y: float
    disc_r: float
    disc_oval: float
    macula_x: float
    macula_y: float
    cdr: float
    retina: np.ndarray
    vignette: float
    gain: float

    @property
    def temporal(self) -> int:
        """Horizontal direction from the disc towards the macula."""
        return -self.side


@dataclass(frozen=True)
class _Vessel:
    """A vessel centre line as sampled points (image units) with its width at the root."""

    points: np.ndarray  # (n, 2)
    width: float
    vein: bool


def render(rng: np.random.Generator, jobs: list[FindingJob], style: DrawStyle) -> tuple[np.ndarray, dict]:
    """Draw one fundus photograph; returns uint8 (size, size, 3) pixels and the report measurements."""
    size = style.size
    eye = _sample_eye(rng)
    vessels = _vessel_tree(rng, eye)
    texture = smooth_noise(rng, size, 6), smooth_noise(rng, size, max(size // 6, 8))
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)

    by_name = {job.name: job for job in jobs}
    cdr = eye.cdr
    if "glaucoma" in by_name:
        cdr = round(by_name["glaucoma"].uniform(GLAUCOMA_CDR), 1)
    if "tortuous_vessels" in by_name:
        vessels = _make_tortuous(vessels, by_name["tortuous_vessels"])

    albedo = _retina(eye, size, texture)
    disc = _disc_fields(eye, size, cdr, by_name.get("glaucoma"))
    _paint_disc(albedo, disc)
    _paint_vessels(albedo, vessels, size, disc)
    for job in jobs:
        if job.name == "haemorrhage":
            _paint_haemorrhages(albedo, eye, job, size)
        elif job.name == "drusen":
            _paint_drusen(albedo, eye, job, size)
        elif job.name not in ("glaucoma", "tortuous_vessels"):
            raise ValueError(f"no ophthalmology drawing for finding {job.name!r}")

    image = _photograph(albedo, eye, size) + style.noise * noise * _fov(eye, size)[..., None]
    eye_name = "right" if eye.side > 0 else "left"
    return to_uint8(image), {"cup_to_disc_ratio": cdr, "eye": eye_name}


def _sample_eye(rng: np.random.Generator) -> _Eye:
    """Anatomy parameters; a fixed number of draws so findings never move the anatomy."""
    u = rng.uniform(size=16)

    def lerp(index: int, bounds: tuple[float, float]) -> float:
        return float(bounds[0] + (bounds[1] - bounds[0]) * u[index])

    side = 1 if u[0] < 0.5 else -1
    disc_r = lerp(1, DISC_RADIUS)
    disc_x = 0.5 + side * lerp(2, DISC_OFFSET)
    disc_y = 0.5 + lerp(3, (-0.03, 0.02))
    distance = MACULA_DISTANCE_DD * 2 * disc_r * lerp(4, (0.95, 1.05))
    low, high = np.array(RETINA[0]), np.array(RETINA[1])
    return _Eye(
        side=side,
        fov_x=0.5 + lerp(5, (-0.006, 0.006)),
        fov_y=0.5 + lerp(6, (-0.006, 0.006)),
        fov_r=lerp(7, FOV_RADIUS),
        disc_x=disc_x,
        disc_y=disc_y,
        disc_r=disc_r,
        disc_oval=lerp(8, DISC_OVAL),
        macula_x=disc_x - side * distance,
        macula_y=disc_y + lerp(9, (0.005, 0.03)),
        cdr=round(lerp(10, NORMAL_CDR), 1),
        retina=(low + (high - low) * u[11:14]).astype(np.float32),
        vignette=lerp(14, (0.35, 0.55)),
        gain=lerp(15, (0.9, 1.08)),
    )


def _retina(eye: _Eye, size: int, texture: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Orange-red background with patchy pigment, a glow around the disc and the darker macula."""
    x, y = grid(size)
    coarse, fine = texture
    albedo = np.empty((size, size, 3), dtype=np.float32)
    shade = 1.0 + 0.05 * coarse
    choroid = 0.035 * fine
    for channel, scale in enumerate((1.0, 1.3, 1.0)):
        albedo[..., channel] = eye.retina[channel] * (shade + scale * choroid)
    d2_disc = ((x - eye.disc_x) ** 2 + (y - eye.disc_y) ** 2) / (2.5 * eye.disc_r) ** 2
    glow = 0.1 * np.exp(-d2_disc)
    d2_mac = (x - eye.macula_x) ** 2 + (y - eye.macula_y) ** 2
    macula = 0.38 * np.exp(-d2_mac / (2 * 0.05**2)) + 0.25 * np.exp(-d2_mac / (2 * 0.014**2))
    reflex = 0.25 * np.exp(-d2_mac / (2 * 0.0035**2))
    for channel, (g, m) in enumerate(((1.0, 0.75), (0.8, 1.0), (0.5, 1.0))):
        albedo[..., channel] = albedo[..., channel] * (1.0 - m * macula) + g * glow + 0.6 * reflex
    return albedo


@dataclass(frozen=True)
class _DiscFields:
    """Disc and cup masks in a window around the disc (the only place they are non-zero)."""

    rows: slice
    cols: slice
    q: np.ndarray  # elliptical radius in disc radii
    disc: np.ndarray
    cup: np.ndarray


def _disc_fields(eye: _Eye, size: int, cdr: float, glaucoma: FindingJob | None) -> _DiscFields:
    """Disc and cup masks; cup radius = ``cdr`` x disc radius, glaucoma's change scaled by its strength."""
    # Only a window around the disc is computed, which keeps this cheap at any size.
    reach = eye.disc_r * eye.disc_oval + 3.0 / size
    cols = slice(max(int((eye.disc_x - reach) * size), 0), min(int((eye.disc_x + reach) * size) + 2, size))
    rows = slice(max(int((eye.disc_y - reach) * size), 0), min(int((eye.disc_y + reach) * size) + 2, size))
    x, y = (axis[rows, cols] for axis in grid(size))
    q = np.sqrt(((x - eye.disc_x) / eye.disc_r) ** 2 + ((y - eye.disc_y) / (eye.disc_r * eye.disc_oval)) ** 2)
    soft = 1.5 / (size * eye.disc_r)
    disc = ramp(1.0 - q, soft)
    cup = ramp(eye.cdr - q, soft * 1.5)
    if glaucoma is not None:
        cup = np.clip(cup + glaucoma.strength * (ramp(cdr - q, soft * 1.5) - cup), 0.0, 1.0)
    return _DiscFields(rows, cols, q, disc, cup)


def _paint_disc(albedo: np.ndarray, fields: _DiscFields) -> None:
    """Optic disc, slightly paler towards its edge, with the whitish cup."""
    rim = (0.9 + 0.1 * np.clip(1.0 - fields.q, 0, 1))[..., None] * DISC_COLOUR
    colour = rim + fields.cup[..., None] * (CUP_COLOUR - rim)
    window = albedo[fields.rows, fields.cols]
    window += fields.disc[..., None] * (colour - window)


def _vessel_tree(rng: np.random.Generator, eye: _Eye) -> list[_Vessel]:
    """Superior/inferior temporal arcades around the macula, nasal vessels, and branches; veins and
    arteries run side by side. A fixed number of draws per image."""
    dx, dy = eye.disc_x, eye.disc_y
    mx, my = eye.macula_x, eye.macula_y
    t = eye.temporal
    vessels: list[_Vessel] = []
    jitter = rng.normal(0.0, 0.018, (4, 2, 3, 2))
    for k, up in enumerate((-1, 1)):
        # Arcades leave the disc vertically, sweep temporally over/under the macula, then bend back in.
        arcade = np.array([[0.0, up * 0.17], [t * 0.22, up * 0.24], [mx - dx + t * 0.17, my - dy + up * 0.1]])
        nasal = np.array([[-t * 0.06, up * 0.06], [-t * 0.17, up * 0.14], [-t * 0.27, up * 0.32]])
        for j, controls in enumerate((arcade, nasal)):
            for i, vein in enumerate((True, False)):
                ctrl = controls + jitter[2 * k + j, i]
                points = _bezier(np.array([dx, dy]), ctrl + np.array([dx, dy]), 48)
                width = (VEIN_WIDTH if vein else ARTERY_WIDTH) * (1.0 if j == 0 else 0.8)
                vessels.append(_Vessel(points, width, vein))
    vessels += _branches(rng, vessels)
    return vessels


def _bezier(start: np.ndarray, controls: np.ndarray, n: int) -> np.ndarray:
    """Points on a cubic Bezier curve from ``start`` through the three ``controls``."""
    s = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = start, controls[0], controls[1], controls[2]
    return (1 - s) ** 3 * p0 + 3 * (1 - s) ** 2 * s * p1 + 3 * (1 - s) * s**2 * p2 + s**3 * p3


def _branches(rng: np.random.Generator, parents: list[_Vessel]) -> list[_Vessel]:
    """Two or three side branches leaving each main vessel at an angle, curving gently."""
    branches: list[_Vessel] = []
    params = rng.uniform(size=(len(parents), 3, 5))
    extra = rng.uniform(size=len(parents)) < 0.5  # two or three branches
    for parent, rows, third in zip(parents, params, extra.tolist(), strict=True):
        for row in rows[: 3 if third else 2]:
            index = int(10 + row[0] * 28)
            origin = parent.points[index]
            tangent = parent.points[index + 1] - parent.points[index - 1]
            heading = math.atan2(tangent[1], tangent[0]) + (1 if row[1] < 0.5 else -1) * (0.5 + 0.5 * row[2])
            length = 0.09 + 0.12 * row[3]
            bend = (row[4] - 0.5) * 0.8
            ctrl = [
                origin + length / 3 * np.array([math.cos(heading), math.sin(heading)]),
                origin
                + 2 * length / 3 * np.array([math.cos(heading + bend / 2), math.sin(heading + bend / 2)]),
                origin + length * np.array([math.cos(heading + bend), math.sin(heading + bend)]),
            ]
            branches.append(
                _Vessel(_bezier(origin, np.array(ctrl), 24), parent.width * BRANCH_SHARE, parent.vein)
            )
    return branches


def _make_tortuous(vessels: list[_Vessel], job: FindingJob) -> list[_Vessel]:
    """Sinusoidal wiggles across each vessel's course, fading in from the root; amplitude by severity
    times strength, so a subtle finding is a gentler wiggle rather than a ghost vessel."""
    amplitude = job.pick(TORTUOSITY_AMPLITUDE) * job.strength
    result = []
    for vessel in vessels:
        points = vessel.points
        steps = np.diff(points, axis=0)
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(steps[:, 0], steps[:, 1]))])
        tangent = np.gradient(points, axis=0)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
        period = TORTUOSITY_PERIOD * job.rng.uniform(0.75, 1.25)
        phase = job.rng.uniform(0, 2 * np.pi)
        fade = np.clip(arc / 0.04, 0.0, 1.0)
        share = 1.0 if vessel.width >= ARTERY_WIDTH * 0.8 else 0.7
        offset = share * amplitude * fade * np.sin(2 * np.pi * arc / period + phase)
        result.append(_Vessel(points + offset[:, None] * normal, vessel.width, vessel.vein))
    return result


def _paint_vessels(albedo: np.ndarray, vessels: list[_Vessel], size: int, disc: _DiscFields) -> None:
    """Rasterise veins then arteries as tapering polylines and lay them over the albedo; they fade
    where they dip into the cup so the cup stays visible."""
    for vein, colour, opacity in ((True, VEIN_COLOUR, 0.85), (False, ARTERY_COLOUR, 0.8)):
        canvas = Image.new("F", (size, size), 0.0)
        draw = ImageDraw.Draw(canvas)
        for vessel in vessels:
            if vessel.vein != vein:
                continue
            pixels = (vessel.points * size).tolist()
            n = len(pixels)
            for k, taper in enumerate((1.0, 0.75, 0.5)):
                chunk = pixels[k * n // 3 : (k + 1) * n // 3 + 1]
                width = max(1, round(vessel.width * taper * size))
                draw.line([tuple(p) for p in chunk], fill=1.0, width=width, joint="curve")
        mask = np.clip(gaussian_filter(np.asarray(canvas), 0.7 * size / 224), 0.0, 1.0) * opacity
        mask[disc.rows, disc.cols] *= 1.0 - 0.75 * disc.cup
        albedo += mask[..., None] * (colour - albedo)


def _posterior_pole_points(job: FindingJob, eye: _Eye, count: int) -> np.ndarray:
    """Random points in the posterior pole (between and around disc and macula), off the disc."""
    cx, cy = (eye.disc_x + eye.macula_x) / 2, (eye.disc_y + eye.macula_y) / 2
    candidates = np.empty((0, 2))
    while len(candidates) < count:
        angle = job.rng.uniform(0, 2 * np.pi, 4 * count)
        radius = 0.25 * np.sqrt(job.rng.uniform(0, 1, 4 * count))
        pts = np.stack([cx + 1.2 * radius * np.cos(angle), cy + radius * np.sin(angle)], axis=1)
        off_disc = np.hypot(pts[:, 0] - eye.disc_x, pts[:, 1] - eye.disc_y) > 1.7 * eye.disc_r
        candidates = np.concatenate([candidates, pts[off_disc]])
    return candidates[:count]


def _paint_haemorrhages(albedo: np.ndarray, eye: _Eye, job: FindingJob, size: int) -> None:
    """Dark-red blots (round, lumpy) and flames (streaks along the nerve fibres, radial to the disc)."""
    low, high = HAEMORRHAGE_COUNT[SEVERITIES.index(job.severity)]
    count = int(job.rng.integers(low, high + 1))
    centres = _posterior_pole_points(job, eye, count)
    flame = job.rng.uniform(size=count) < 0.45
    radial = np.arctan2(centres[:, 1] - eye.disc_y, centres[:, 0] - eye.disc_x)
    length = np.where(flame, job.rng.uniform(0.025, 0.04, count), job.rng.uniform(0.013, 0.024, count))
    width = np.where(flame, job.rng.uniform(0.007, 0.011, count), length * job.rng.uniform(0.75, 1.0, count))
    angle = np.where(flame, radial, job.rng.uniform(0, np.pi, count))
    lobe = job.rng.normal(0.0, 0.5, (count, 2)) * length[:, None]  # a second lump makes blots irregular
    layer = np.zeros((size, size), dtype=np.float32)
    all_centres = np.concatenate([centres, centres + lobe * (~flame)[:, None]]) * size
    radii = np.concatenate([np.stack([length, width], 1), 0.7 * np.stack([length, width], 1)]) * size
    stamp_ellipses(layer, all_centres, radii, np.concatenate([angle, angle]), np.full(2 * count, 0.95), 0.5)
    alpha = np.clip(layer * job.strength, 0.0, 1.0)[..., None]
    albedo += alpha * (HAEMORRHAGE_COLOUR - albedo)


def _paint_drusen(albedo: np.ndarray, eye: _Eye, job: FindingJob, size: int) -> None:
    """Small yellow dots scattered around the fovea, denser and larger with severity."""
    low, high = DRUSEN_COUNT[SEVERITIES.index(job.severity)]
    count = int(job.rng.integers(low, high + 1))
    angle = job.rng.uniform(0, 2 * np.pi, count)
    radius = np.abs(job.rng.normal(0.0, 0.035, count)) + 0.006
    centres = np.stack([eye.macula_x + radius * np.cos(angle), eye.macula_y + radius * np.sin(angle)], 1)
    r = job.uniform(DRUSEN_RADIUS) * job.rng.uniform(0.6, 1.4, count)
    layer = np.zeros((size, size), dtype=np.float32)
    radii = np.stack([r, r * job.rng.uniform(0.8, 1.0, count)], 1) * size
    stamp_ellipses(layer, centres * size, radii, job.rng.uniform(0, np.pi, count), np.full(count, 0.85), 0.6)
    alpha = np.clip(layer * job.strength, 0.0, 1.0)[..., None]
    albedo += alpha * (DRUSEN_COLOUR - albedo)


def _fov(eye: _Eye, size: int) -> np.ndarray:
    """The camera's circular field of view."""
    x, y = grid(size)
    return ramp(eye.fov_r - np.sqrt((x - eye.fov_x) ** 2 + (y - eye.fov_y) ** 2), 2.0 / size)


def _photograph(albedo: np.ndarray, eye: _Eye, size: int) -> np.ndarray:
    """Illumination fall-off towards the rim, exposure, and the black surround."""
    x, y = grid(size)
    r2 = ((x - eye.fov_x) ** 2 + (y - eye.fov_y) ** 2) / eye.fov_r**2
    light = eye.gain * (1.0 - eye.vignette * r2**1.3) * _fov(eye, size)
    return albedo * light[..., None]
