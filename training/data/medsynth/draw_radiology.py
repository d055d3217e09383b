"""Synthetic PA chest radiographs (grayscale) for MedSynth.

Radiological convention: the patient faces the viewer, so the patient's RIGHT lung is on the IMAGE
LEFT and the heart bulges to the image right. Anatomy lives in "body coordinates" (u, v): u is the
horizontal offset from the thorax midline (negative = image left = patient right), v the height,
both in image units, after a small random rotation and shift of the patient.

The image is an additive attenuation model: a soft-tissue body, minus air in the lungs (restored where
the heart overlies them), plus bone (ribs, clavicles, spine) and lung markings (vessels and parenchymal
texture). Findings are then drawn one by one as changes to that image, each scaled by its strength.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from training.data.medsynth.draw import SEVERITIES, DrawStyle, FindingJob, grid, ramp, smooth_noise, to_uint8

# Anatomy proportions in image units (ranges are sampled per image).
LUNG_HALF_WIDTH = (0.325, 0.365)  # midline to the lateral lung edge (inner ribs) at its widest
LUNG_TOP = (0.12, 0.16)
LUNG_BASE = (0.76, 0.81)  # costophrenic angles of the (lower) patient-left hemidiaphragm
RIGHT_DOME_RAISE = (0.012, 0.035)  # the patient's right hemidiaphragm sits higher (liver)
MEDIASTINUM_HALF = (0.05, 0.065)  # midline to the lungs' medial edges
CHEST_WALL = (0.05, 0.07)
DOME_HEIGHT = (0.15, 0.22)  # diaphragm dome height as a fraction of lung height
APEX_PEAK = 0.4  # the apex is highest at this fraction of the way from medial to lateral
NECK_HALF = 0.11
TILT_DEG = 3.0
SHIFT = 0.015

TISSUE = (0.5, 0.58)  # soft-tissue brightness at the body's edge; the centre is thicker and brighter
AIR = (0.36, 0.42)  # how much the aerated lung darkens the tissue
HEART_OPACITY = 0.93  # fraction of lung air hidden by the heart shadow
BACKGROUND = 0.03

NORMAL_CTR = (0.40, 0.48)
CARDIOMEGALY_CTR = ((0.55, 0.59), (0.59, 0.635), (0.635, 0.68))
HEART_RIGHT_SHARE = 0.32  # share of the heart's width to the image left of the midline
HEART_CENTRE_T = 0.78  # the widest row of the heart, as a fraction of lung height (near the domes)

EFFUSION_HEIGHT = (0.15, 0.30, 0.45)  # fraction of lung height filled, by severity
CONSOLIDATION_BLOBS = (2, 3, 5)
CONSOLIDATION_SIGMA = ((0.022, 0.03), (0.032, 0.042), (0.045, 0.06))
NODULE_RADIUS = ((0.02, 0.028), (0.03, 0.038), (0.04, 0.05))
NODULE_BRIGHTNESS = 0.26
PNEUMOTHORAX_GAP = (0.22, 0.38, 0.55)  # apical gap as a fraction of the apex-to-hilum height


@dataclass(frozen=True)
class _Chest:
    """Per-image anatomy parameters, all drawn from the anatomy generator."""

    mid: float
    shift_y: float
    tilt: float
    half_width: float
    top: float
    base_left_img: float  # patient's right hemidiaphragm (image left)
    base_right_img: float
    gap: float
    wall: float
    dome: float
    tissue: float
    air: float
    ctr: float
    rib_phase: float
    rib_spacing: float
    gain: float
    bias: float
    vignette: float
    gas_bubble: bool

    @property
    def height(self) -> float:
        return self.base_right_img - self.top

    def hilum(self, side: int) -> tuple[float, float]:
        """Hilum (root of the lung vessels) of the lung on image side ``side`` (-1 left, +1 right)."""
        return side * (self.gap + 0.035), self.top + 0.42 * self.height

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Body coordinates -> image coordinates (inverse of the patient's rotation and shift)."""
        cos, sin = math.cos(self.tilt), math.sin(self.tilt)
        xr, yr = u + self.mid - 0.5, v + self.shift_y - 0.5
        return 0.5 + xr * cos + yr * sin, 0.5 - xr * sin + yr * cos


@dataclass
class _Layers:
    """Full-image fields the findings need to know about."""

    u: np.ndarray
    v: np.ndarray
    lung: np.ndarray  # both lungs, soft mask
    image_left: np.ndarray  # 1 on the image-left half of the body (patient's right)
    lung_a: np.ndarray  # 0 at the medial lung edge .. 1 at the lateral edge
    lung_t: np.ndarray  # 0 at the apex .. 1 at the costophrenic angle
    tissue: np.ndarray  # the body without any air: what fluid or consolidation looks like
    markings: np.ndarray  # vessel and parenchymal texture already added over the lungs
    ribs: np.ndarray  # rib brightness already added over the lungs


def render(rng: np.random.Generator, jobs: list[FindingJob], style: DrawStyle) -> tuple[np.ndarray, dict]:
    """Draw one chest radiograph; returns uint8 (size, size) pixels and the report measurements."""
    size = style.size
    chest = _sample_chest(rng)
    vessel_seed = int(rng.integers(0, 2**63 - 1))
    texture = smooth_noise(rng, size, max(size // 5, 8))
    noise = rng.standard_normal((size, size), dtype=np.float32)

    cardiomegaly = next((job for job in jobs if job.name == "cardiomegaly"), None)
    ctr = round(cardiomegaly.uniform(CARDIOMEGALY_CTR), 2) if cardiomegaly else chest.ctr
    image, layers = _draw_anatomy(chest, size, vessel_seed, texture, ctr, cardiomegaly)

    measurements: dict[str, object] = {"cardiothoracic_ratio": ctr}
    for job in jobs:
        if job.name.startswith("pleural_effusion_"):
            image = image + job.strength * _effusion(job, layers, image)
        elif job.name.startswith("consolidation_"):
            image = image + job.strength * _consolidation(job, chest, layers, image, size)
        elif job.name == "nodule":
            delta, side = _nodule(job, chest, layers, size)
            image = image + job.strength * delta
            measurements["nodule_side"] = side
        elif job.name.startswith("pneumothorax_"):
            image = image + job.strength * _pneumothorax(job, chest, layers, size)
        elif job.name != "cardiomegaly":  # cardiomegaly is part of the anatomy
            raise ValueError(f"no radiology drawing for finding {job.name!r}")

    image = _expose(image, chest, size) + style.noise * noise
    return to_uint8(image), measurements


def _sample_chest(rng: np.random.Generator) -> _Chest:
    """Anatomy parameters; always the same number of draws so findings never shift the anatomy."""
    u = rng.uniform(size=20)

    def lerp(index: int, bounds: tuple[float, float]) -> float:
        return float(bounds[0] + (bounds[1] - bounds[0]) * u[index])

    base_right = lerp(3, LUNG_BASE)
    return _Chest(
        mid=0.5 + lerp(0, (-SHIFT, SHIFT)),
        shift_y=lerp(1, (-SHIFT, SHIFT)),
        tilt=math.radians(lerp(2, (-TILT_DEG, TILT_DEG))),
        half_width=lerp(4, LUNG_HALF_WIDTH),
        top=lerp(5, LUNG_TOP),
        base_left_img=base_right - lerp(6, RIGHT_DOME_RAISE),
        base_right_img=base_right,
        gap=lerp(7, MEDIASTINUM_HALF),
        wall=lerp(8, CHEST_WALL),
        dome=lerp(9, DOME_HEIGHT),
        tissue=lerp(10, TISSUE),
        air=lerp(11, AIR),
        ctr=round(lerp(12, NORMAL_CTR), 2),
        rib_phase=float(u[13]),
        rib_spacing=lerp(14, (0.074, 0.086)),
        gain=lerp(15, (0.9, 1.1)),
        bias=lerp(16, (-0.04, 0.04)),
        vignette=lerp(17, (0.1, 0.25)),
        gas_bubble=bool(u[18] < 0.6),
    )


def _draw_anatomy(
    chest: _Chest,
    size: int,
    vessel_seed: int,
    texture: np.ndarray,
    ctr: float,
    cardiomegaly: FindingJob | None,
) -> tuple[np.ndarray, _Layers]:
    """The normal chest (with the heart already enlarged if cardiomegaly is present) and its layers."""
    x, y = grid(size)
    cos, sin = math.cos(chest.tilt), math.sin(chest.tilt)
    u = 0.5 + (x - 0.5) * cos - (y - 0.5) * sin - chest.mid
    v = 0.5 + (x - 0.5) * sin + (y - 0.5) * cos - chest.shift_y
    px = 1.0 / size
    abs_u = np.abs(u)
    image_left = (u < 0).astype(np.float32)

    body, tissue = _body(chest, abs_u, v, px)
    lung, lung_a, lung_t = _lungs(chest, u, abs_u, v, px)
    heart = _heart(chest, u, v, px, chest.ctr)
    if cardiomegaly is not None:
        enlarged = _heart(chest, u, v, px, ctr)
        heart = np.clip(heart + cardiomegaly.strength * (enlarged - heart), 0.0, 1.0)
    heart = np.maximum(heart, _aortic_knob(chest, u, v, px))
    visible_lung = lung * (1.0 - HEART_OPACITY * heart)

    ribs = _ribs(chest, abs_u, v, px)
    air = chest.air * lung * (0.8 + 0.2 * np.clip(lung_a, 0, 1)) * (1.0 - 0.3 * np.clip(lung_t, 0, 1) ** 2)
    vessels = _vessels(chest, size, vessel_seed)
    markings = visible_lung * (0.11 * vessels + 0.018 * texture)
    rib_light = ribs * (0.03 + 0.05 * visible_lung)

    image = tissue - air * (1.0 - HEART_OPACITY * heart) + rib_light + markings + _hila(chest, u, v) * lung
    image += _spine_and_clavicles(chest, u, abs_u, v, px) * body
    image -= _trachea(chest, abs_u, v, px)
    if chest.gas_bubble:
        image -= _gas_bubble(chest, u, v, px)
    image = BACKGROUND + (image - BACKGROUND) * body
    layers = _Layers(u, v, lung, image_left, lung_a, lung_t, tissue, markings, rib_light)
    return image, layers


def _body(chest: _Chest, abs_u: np.ndarray, v: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Body silhouette (neck, shoulders, trunk) and its soft-tissue brightness, thicker in the middle."""
    trunk = chest.half_width + chest.wall
    shoulders = np.sqrt(np.clip((v + 0.02) / (chest.top + 0.02), 0.0, 1.0))
    half = NECK_HALF + (trunk + 0.035 - NECK_HALF) * shoulders - 0.03 * np.clip((v - 0.75) / 0.25, 0, 1)
    body = ramp(half - abs_u, 2.5 * px)
    thickness = 1.0 - (abs_u / half) ** 2
    below_diaphragm = ramp(v - chest.base_left_img + 0.02, 0.08)
    tissue = body * (chest.tissue + 0.14 * np.clip(thickness, 0, 1) + 0.05 * below_diaphragm)
    return body, tissue


def _lungs(
    chest: _Chest, u: np.ndarray, abs_u: np.ndarray, v: np.ndarray, px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both lung fields: rounded apices, sharp costophrenic angles, diaphragm domes at the bases."""
    base = np.where(u < 0, chest.base_left_img, chest.base_right_img)
    height = base - chest.top
    a = (abs_u - chest.gap) / (chest.half_width - chest.gap)
    t = (v - chest.top) / height
    apex = np.where(
        a > APEX_PEAK,
        0.42 * ((a - APEX_PEAK) / (1 - APEX_PEAK)) ** 2,
        0.16 * ((APEX_PEAK - a) / APEX_PEAK) ** 2,
    )
    dome = 1.0 - chest.dome * (1.0 - ((a - 0.45) / 0.55) ** 2)
    inside = np.minimum(
        np.minimum(chest.half_width - abs_u, abs_u - chest.gap),
        np.minimum((t - apex) * height, (dome - t) * height),
    )
    return ramp(inside, 2.0 * px), a, t


def _heart(chest: _Chest, u: np.ndarray, v: np.ndarray, px: float, ctr: float) -> np.ndarray:
    """Heart shadow whose widest extent is exactly ``ctr`` times the thoracic width."""
    width = ctr * 2.0 * chest.half_width
    left_edge = -HEART_RIGHT_SHARE * width
    centre_u = left_edge + 0.42 * width
    rx = np.where(u < centre_u, centre_u - left_edge, width - (centre_u - left_edge))
    ry = 0.5 * (0.55 * width + 0.15)
    centre_v = chest.top + HEART_CENTRE_T * chest.height
    q = np.sqrt(((u - centre_u) / rx) ** 2 + ((v - centre_v) / ry) ** 2)
    return ramp((1.0 - q) * np.minimum(rx, ry), 2.0 * px)


def _aortic_knob(chest: _Chest, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """The aortic arch, a small bulge of the mediastinum into the image-right upper lung."""
    cu, cv, radius = chest.gap - 0.008, chest.top + 0.2 * chest.height, 0.026
    return ramp(radius - np.sqrt((u - cu) ** 2 + (v - cv) ** 2), 2.0 * px)


def _hila(chest: _Chest, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Denser vascular shadows at both lung roots."""
    hu, hv = chest.hilum(1)
    return 0.09 * np.exp(-((np.abs(u) - hu) ** 2 + ((v - hv) / 1.6) ** 2) / (2 * 0.028**2))


def _ribs(chest: _Chest, abs_u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Posterior ribs as curved bands (rising slightly from the spine, falling laterally) and fainter
    anterior ribs sloping the other way."""
    a = abs_u / chest.half_width
    posterior = (v - chest.top - 0.15 * a**2.5 + 0.04 * a) / chest.rib_spacing + chest.rib_phase
    anterior = (v - chest.top + 0.1 * a) / (1.15 * chest.rib_spacing) + 0.5 * chest.rib_phase
    band_p = np.clip((np.cos(2 * np.pi * posterior) - 0.3) / 0.4, 0.0, 1.0)
    band_a = np.clip((np.cos(2 * np.pi * anterior) - 0.35) / 0.5, 0.0, 1.0) * np.clip(a - 0.25, 0, 1)
    cage = ramp(chest.half_width + 0.6 * chest.wall - abs_u, 3 * px) * ramp(abs_u - 0.03, 3 * px)
    cage = cage * ramp(v - chest.top + 0.06, 0.02) * ramp(chest.base_right_img + 0.03 - v, 0.03)
    return cage * (band_p + 0.45 * band_a)


def _spine_and_clavicles(
    chest: _Chest, u: np.ndarray, abs_u: np.ndarray, v: np.ndarray, px: float
) -> np.ndarray:
    """Faint vertebral column (segmented) behind the mediastinum, and the two clavicles."""
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * v / 0.048)
    spine = 0.05 * ramp(0.028 - np.abs(u), 3 * px) * vertebrae * ramp(v - chest.top + 0.1, 0.05)
    course = chest.top + 0.035 - 0.22 * abs_u + 0.32 * abs_u**2
    reach = ramp(abs_u - 0.035, 2 * px) * ramp(0.33 - abs_u, 0.03)
    clavicle = 0.09 * ramp(0.011 - np.abs(v - course), 2 * px) * reach
    return spine + clavicle


def _trachea(chest: _Chest, abs_u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Dark air column of the trachea down to the carina."""
    return 0.1 * ramp(0.014 - abs_u, 3 * px) * ramp(chest.top + 0.27 * chest.height - v, 0.02)


def _gas_bubble(chest: _Chest, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Stomach gas under the patient's left hemidiaphragm (image right)."""
    cu, cv = 0.55 * chest.half_width, chest.base_right_img + 0.045
    q = np.sqrt(((u - cu) / 0.05) ** 2 + ((v - cv) / 0.03) ** 2)
    return 0.12 * ramp((1.0 - q) * 0.03, 3 * px)


def _vessels(chest: _Chest, size: int, seed: int) -> np.ndarray:
    """Pulmonary vessel trees fanning out of both hila, tapering to the periphery (0..1 field)."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(canvas)
    thick, thin = max(1, round(size * 0.009)), max(1, round(size * 0.0045))
    for side in (-1, 1):
        hu, hv = chest.hilum(side)
        trunks = 8
        angles = np.linspace(math.radians(-95), math.radians(70), trunks) + rng.normal(0, 0.12, trunks)
        for angle in angles.tolist():
            su, sv = hu + side * rng.uniform(-0.01, 0.025), hv + rng.uniform(-0.035, 0.035)
            path = _random_walk(rng, su, sv, angle, steps=9, step=0.034, side=side)
            _draw_path(draw, chest, path, size, thick, thin, fade=0.075)
            for start in rng.integers(2, 6, size=2).tolist():
                turn = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 0.8))
                su, sv = path[start]
                heading = math.atan2(path[start + 1][1] - sv, (path[start + 1][0] - su) * side) + turn
                branch = _random_walk(rng, su, sv, heading, steps=5, step=0.028, side=side)
                _draw_path(draw, chest, branch, size, thin, thin, fade=0.12, first=0.6)
    return gaussian_filter(np.asarray(canvas), 0.6 * size / 224)


def _random_walk(
    rng: np.random.Generator, u0: float, v0: float, angle: float, steps: int, step: float, side: int
) -> list[tuple[float, float]]:
    """A gently wandering path; ``angle`` is measured for the image-right lung and mirrored for the left."""
    headings = angle + np.cumsum(rng.normal(0, 0.16, steps))
    lengths = step * rng.uniform(0.8, 1.2, steps)
    du = np.cumsum(side * lengths * np.cos(headings))
    dv = np.cumsum(lengths * np.sin(headings))
    return [(u0, v0), *zip((u0 + du).tolist(), (v0 + dv).tolist(), strict=True)]


def _draw_path(
    draw: ImageDraw.ImageDraw,
    chest: _Chest,
    path: list[tuple[float, float]],
    size: int,
    thick: int,
    thin: int,
    fade: float,
    first: float = 1.0,
) -> None:
    """Draw a path segment by segment, thinner and fainter away from the hilum."""
    us, vs = np.array(path).T
    xs, ys = chest.to_image(us, vs)
    points = np.stack([xs * size, ys * size], axis=1).tolist()
    for k in range(len(points) - 1):
        width = thick if k < 3 else thin
        draw.line([tuple(points[k]), tuple(points[k + 1])], fill=max(first - fade * k, 0.15), width=width)


def _expose(image: np.ndarray, chest: _Chest, size: int) -> np.ndarray:
    """Film response: per-image gain and offset, and darker corners."""
    x, y = grid(size)
    r2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
    return (image * chest.gain + chest.bias) * (1.0 - chest.vignette * r2 * 2.0)


# ---------------------------------------------------------------------------------------------------
# Findings: each returns the change to the current image at full strength.


def _side_of(name: str) -> float:
    """Image side of a finding named after the patient's side: right -> image left (-1)."""
    return -1.0 if "_right" in name else 1.0


def _lung_of(layers: _Layers, side: float) -> np.ndarray:
    """The lung on image side ``side`` (-1 left, +1 right)."""
    return layers.lung * (layers.image_left if side < 0 else 1.0 - layers.image_left)


def _effusion(job: FindingJob, layers: _Layers, image: np.ndarray) -> np.ndarray:
    """Fluid filling the lung base with a meniscus rising along the chest wall; hides the dome and the
    costophrenic angle."""
    side = _side_of(job.name)
    level = job.pick(EFFUSION_HEIGHT) * job.rng.uniform(0.92, 1.08)
    a = np.clip(layers.lung_a, 0.0, 1.0)
    meniscus = 1.0 - level + 0.05 - 0.16 * a**3  # in lung-height fractions (t), rising laterally
    fill = np.clip((layers.lung_t - meniscus) / 0.06, 0.0, 1.0) ** 0.7
    fluid = _lung_of(layers, side) * fill
    return fluid * (layers.tissue + 0.02 - image)


def _consolidation(
    job: FindingJob, chest: _Chest, layers: _Layers, image: np.ndarray, size: int
) -> np.ndarray:
    """Patchy airspace opacity: a few overlapping gaussians broken up by texture, in one lung zone."""
    side = _side_of(job.name)
    lower = job.name.endswith("_lower")
    count = int(job.pick(CONSOLIDATION_BLOBS))
    t = job.rng.uniform(0.52, 0.78, count) if lower else job.rng.uniform(0.18, 0.45, count)
    # The patient's left lower zone is partly behind the heart: keep the opacity lateral to it.
    a = job.rng.uniform(0.5, 0.8, count) if lower and side > 0 else job.rng.uniform(0.3, 0.75, count)
    sigma = job.rng.uniform(*CONSOLIDATION_SIGMA[SEVERITIES.index(job.severity)], count)
    weight = job.rng.uniform(0.7, 1.0, count)
    base = chest.base_left_img if side < 0 else chest.base_right_img
    cu = side * (chest.gap + a * (chest.half_width - chest.gap))
    cv = chest.top + t * (base - chest.top)
    field = np.zeros_like(image)
    for u0, v0, s, w in zip(cu.tolist(), cv.tolist(), sigma.tolist(), weight.tolist(), strict=True):
        field += w * np.exp(-((layers.u - u0) ** 2 + ((layers.v - v0) / 1.2) ** 2) / (2 * s * s))
    patchy = np.clip(0.75 + 0.25 * smooth_noise(job.rng, size, max(size // 10, 8)), 0.3, None)
    opacity = 0.85 * (1.0 - np.exp(-2.5 * field * patchy))
    return _lung_of(layers, side) * opacity * (layers.tissue - 0.02 - image)


def _nodule(job: FindingJob, chest: _Chest, layers: _Layers, size: int) -> tuple[np.ndarray, str]:
    """A small round well-defined opacity in the mid or upper zone of one lung."""
    side = float(job.rng.choice([-1.0, 1.0]))
    radius = job.uniform(NODULE_RADIUS)
    a, t = job.rng.uniform(0.35, 0.75), job.rng.uniform(0.22, 0.5)
    base = chest.base_left_img if side < 0 else chest.base_right_img
    cu = side * (chest.gap + a * (chest.half_width - chest.gap))
    cv = chest.top + t * (base - chest.top)
    distance = np.sqrt((layers.u - cu) ** 2 + (layers.v - cv) ** 2)
    disc = ramp(radius - distance, 1.5 / size)
    dome = np.sqrt(np.clip(1.0 - (distance / radius) ** 2, 0.0, 1.0))
    delta = NODULE_BRIGHTNESS * disc * (0.75 + 0.25 * dome)
    return delta, "right" if side < 0 else "left"


def _pneumothorax(job: FindingJob, chest: _Chest, layers: _Layers, size: int) -> np.ndarray:
    """Air outside the collapsing lung: apical/lateral rim without markings, bounded by the visceral
    pleural line (the edge of an ellipse around the hilum that shrinks with severity)."""
    side = _side_of(job.name)
    hu, hv = chest.hilum(side)
    gap = job.pick(PNEUMOTHORAX_GAP) * job.rng.uniform(0.9, 1.1)
    ry_up = (hv - chest.top) * (1.0 - gap)
    rx = (chest.half_width - abs(hu)) * (1.2 - 0.95 * gap)
    du = layers.u - hu
    dv = layers.v - hv
    # Below the hilum the boundary swings out past the chest wall: air collects apically and laterally.
    lateral = chest.half_width - abs(hu)
    below = np.clip(dv / (1.2 * gap * (chest.base_right_img - hv)), 0.0, 1.0)
    rx_v = rx + (1.3 * lateral - rx) * below
    ry = np.where(dv < 0, ry_up, 1.5 * (chest.base_right_img - hv))
    q = np.sqrt((du / rx_v) ** 2 + (dv / ry) ** 2)
    lung = _lung_of(layers, side)
    scale = np.minimum(rx_v, ry)
    outside = ramp((q - 1.0) * scale, 1.5 / size) * lung
    line = ramp(1.2 / size - np.abs(q - 1.0) * scale, 1.0 / size) * lung
    darker = 0.06 * outside
    return -outside * (layers.markings + 0.8 * layers.ribs) - darker + 0.16 * line
