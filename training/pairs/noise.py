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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from services.common.noise import (
    DEFAULT_NOISE_SEED,
    DEFAULT_NOISE_STEP,
    alpha_bar,
    diffusion_noise_image,
    noise_stream,
    pure_noise_image,
)


class NoiseKind(StrEnum):
    """Which noise image the rejected side gets (``--noise``)."""

    pure = "pure"
    diffusion = "diffusion"


def pick_source(key: str, own: str, pool: Sequence[str], seed: int) -> str:
    """Deterministically choose another image than ``own`` from ``pool`` (the domain's images)."""
    others = sorted(set(pool) - {own})
    if not others:
        raise ValueError(
            f"diffusion noise needs another image of the same domain than {own!r}; the pool has none "
            "(use --noise pure, or more images)"
        )
    return others[int(noise_stream(seed, key, 1).integers(len(others)))]


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
