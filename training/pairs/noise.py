"""Noise images for the rejected side of stage-1 and D_cm pairs.

Two kinds, a setting (``--noise``):

- ``pure``: what the authors' code does: Gaussian noise N(0, 1) of the image's shape (every pixel and
  every RGB channel drawn independently), clipped to [0, 1]. Half the pixels are 0, about 16% are 1, the
  mean is φ(0) − φ(1) + (1 − Φ(1)) ≈ 0.316 (``PURE_NOISE_MEAN``).
- ``diffusion`` (default): what the paper describes, "a different but real image with controlled noise":
  another real image of the same domain, chosen deterministically from the seed and the image's key,
  resized to the image's size and noised with the forward diffusion process
  ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`` in [-1, 1] pixel space, then mapped back to [0, 1].
  The schedule is DDPM's linear β from 1e-4 to 0.02 over 1000 steps, ``ᾱ_t = Π_{s≤t} (1 − β_s)``;
  step 0 is the clean other image. The default step 500 (ᾱ ≈ 0.078, signal weight ≈ 0.28) keeps the
  other image's coarse structure visible under strong noise (the paper does not publish its step).

Everything is a function of ``(seed, key)`` (the key is ``"<domain>/<image path>"``), so a noise image is
the same in every run and for every task using the image. Images are 8-bit RGB PNGs on disk: the
model sees exactly what DPO later trains on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

DIFFUSION_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
DEFAULT_NOISE_STEP = 500
DEFAULT_NOISE_SEED = 0
# Mean of max(0, min(1, z)) for z ~ N(0, 1): ∫0^1 z φ(z) dz + P(z > 1).
PURE_NOISE_MEAN = (1 - math.exp(-0.5)) / math.sqrt(2 * math.pi) + 0.5 * math.erfc(1 / math.sqrt(2))


class NoiseKind(StrEnum):
    """Which noise image the rejected side gets (``--noise``)."""

    pure = "pure"
    diffusion = "diffusion"


def _stream(seed: int, key: str, purpose: int) -> np.random.Generator:
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


def pick_source(key: str, own: str, pool: Sequence[str], seed: int) -> str:
    """Deterministically choose another image than ``own`` from ``pool`` (the domain's images)."""
    others = sorted(set(pool) - {own})
    if not others:
        raise ValueError(
            f"diffusion noise needs another image of the same domain than {own!r}; the pool has none "
            "(use --noise pure, or more images)"
        )
    return others[int(_stream(seed, key, 1).integers(len(others)))]


def pure_noise_image(image: Image.Image, *, key: str, seed: int = DEFAULT_NOISE_SEED) -> Image.Image:
    """The ``pure`` noise image for ``image`` (same size, RGB)."""
    return from_unit(pure_noise((image.height, image.width, 3), _stream(seed, key, 0)))


def diffusion_noise_image(
    source: Image.Image, *, size: tuple[int, int], key: str, t: int, seed: int = DEFAULT_NOISE_SEED
) -> Image.Image:
    """``source`` (another real image) resized to ``size`` (width, height) and noised to step ``t``."""
    if source.size != tuple(size):
        source = source.convert("RGB").resize(tuple(size), Image.Resampling.BILINEAR)
    return from_unit(diffuse(to_unit(source), t, _stream(seed, key, 0)))


def noise_image_path(out: Path, domain: str, image: str) -> Path:
    """Where the noise image of ``<domain>/<image>`` is written: ``<out>/noise/<domain>/<image>.png``."""
    relative = Path(image)
    return Path(out) / "noise" / domain / relative.parent / f"{relative.stem}.png"


def load_image(path: Path) -> Image.Image:
    """An image file decoded exactly as the services decode uploads (8-bit RGB)."""
    from services.common.images import decode_image

    return decode_image(Path(path).read_bytes()).image


@dataclass(frozen=True)
class NoiseImage:
    """A written noise image and, for ``diffusion``, the other real image it was made from."""

    path: Path
    kind: NoiseKind
    step: int | None
    source: str | None


def write_noise_images(
    images: Mapping[str, Mapping[str, Path]],
    out: Path,
    *,
    kind: NoiseKind | str = NoiseKind.diffusion,
    step: int = DEFAULT_NOISE_STEP,
    seed: int = DEFAULT_NOISE_SEED,
    pool: Mapping[str, Mapping[str, Path]] | None = None,
    progress: bool = False,
) -> dict[tuple[str, str], NoiseImage]:
    """Write the noise image of every ``images[domain][relative path]``; return them by (domain, path).

    ``pool`` holds the real images ``diffusion`` may draw from per domain (default: ``images``).
    """
    kind = NoiseKind(kind)
    if kind is NoiseKind.diffusion:
        alpha_bar(step)  # fail on a bad step before any work
    pool = images if pool is None else pool
    written: dict[tuple[str, str], NoiseImage] = {}
    todo = [(domain, rel, path) for domain, paths in images.items() for rel, path in sorted(paths.items())]
    for domain, rel, path in tqdm(todo, desc="noise images", unit="img", disable=not progress):
        key = f"{domain}/{rel}"
        image = load_image(path)
        source = None
        if kind is NoiseKind.pure:
            noise = pure_noise_image(image, key=key, seed=seed)
        else:
            candidates = pool.get(domain, {})
            source = pick_source(key, rel, list(candidates), seed)
            noise = diffusion_noise_image(
                load_image(candidates[source]), size=image.size, key=key, t=step, seed=seed
            )
        target = noise_image_path(out, domain, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        noise.save(target, format="PNG")
        written[(domain, rel)] = NoiseImage(
            target, kind, step if kind is NoiseKind.diffusion else None, source
        )
    return written
