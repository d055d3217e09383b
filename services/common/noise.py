"""Noise images: the release code's pure Gaussian noise and the paper's forward-diffusion noise.

Shared by training (the rejected side of preference pairs, ``training.pairs.noise``; VCD's noised image,
``training.evaluate.decoding``) and serving (the router's per-request grounding check uses ``pure`` noise:
at request time there is no second image of the domain to diffuse, which the ``diffusion`` kind needs).
The schedule and the definitions are in ``training/pairs/noise.py``'s docstring.
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

DIFFUSION_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
DEFAULT_NOISE_STEP = 500
DEFAULT_NOISE_SEED = 0
# Mean of max(0, min(1, z)) for z ~ N(0, 1): ∫0^1 z φ(z) dz + P(z > 1).
PURE_NOISE_MEAN = (1 - math.exp(-0.5)) / math.sqrt(2 * math.pi) + 0.5 * math.erfc(1 / math.sqrt(2))


def noise_stream(seed: int, key: str, purpose: int) -> np.random.Generator:
    """An independent random stream per (seed, image key, purpose): 0 noise values, 1 source choice."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), purpose])


@lru_cache(maxsize=4)
def _alpha_bars(steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def alpha_bar(
    t: int, *, steps: int = DIFFUSION_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> float:
    """ᾱ_t of the linear-β schedule; t = 0 gives 1 (no noise), t = ``steps`` the noisiest step."""
    if not 0 <= t <= steps:
        raise ValueError(f"noise step must be in [0, {steps}], got {t}")
    return 1.0 if t == 0 else float(_alpha_bars(steps, beta_start, beta_end)[t - 1])


def to_unit(image: Image.Image) -> np.ndarray:
    """An image as a float ``(height, width, 3)`` array in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def from_unit(values: np.ndarray) -> Image.Image:
    """A [0, 1] float array (clipped) as an 8-bit RGB image."""
    return Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8), mode="RGB")


def pure_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """N(0, 1) values of ``shape`` clipped to [0, 1] (the release code's noise image)."""
    return np.clip(rng.standard_normal(shape), 0.0, 1.0)


def diffuse(x0: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """q(x_t | x_0) for a [0, 1] image: noised in [-1, 1] space, returned in [0, 1] (clipped)."""
    a = alpha_bar(t)
    signal = 2.0 * x0 - 1.0
    noisy = math.sqrt(a) * signal + math.sqrt(1.0 - a) * rng.standard_normal(x0.shape)
    return np.clip((noisy + 1.0) / 2.0, 0.0, 1.0)


def pure_noise_image(image: Image.Image, *, key: str, seed: int = DEFAULT_NOISE_SEED) -> Image.Image:
    """The ``pure`` noise image for ``image`` (same size, RGB)."""
    return from_unit(pure_noise((image.height, image.width, 3), noise_stream(seed, key, 0)))


def diffusion_noise_image(
    source: Image.Image, *, size: tuple[int, int], key: str, t: int, seed: int = DEFAULT_NOISE_SEED
) -> Image.Image:
    """``source`` (another real image) resized to ``size`` (width, height) and noised to step ``t``."""
    if source.size != tuple(size):
        source = source.convert("RGB").resize(tuple(size), Image.Resampling.BILINEAR)
    return from_unit(diffuse(to_unit(source), t, noise_stream(seed, key, 0)))
