"""Noise images: pure Gaussian statistics, and diffusion noise of a different real image of the domain."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.noise import PURE_NOISE_MEAN, alpha_bar, diffusion_noise_image, pure_noise_image, to_unit
from training.pairs.noise import NoiseKind, noise_image_path, pick_source, write_noise_images


def pattern(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth random picture (blocks of colour, upscaled), different per seed."""
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small, mode="RGB").resize(size, Image.Resampling.BILINEAR)


def correlation(a: Image.Image, b: Image.Image) -> float:
    return float(np.corrcoef(to_unit(a).ravel(), to_unit(b).ravel())[0, 1])


def test_pure_noise_is_clipped_standard_normal_of_the_image_shape() -> None:
    image = pattern(0, size=(256, 192))
    noise = pure_noise_image(image, key="radiology/a.png", seed=0)
    assert noise.size == image.size and noise.mode == "RGB"
    values = to_unit(noise)
    # mean of clip(N(0,1), 0, 1) = φ(0) − φ(1) + P(z > 1) ≈ 0.316
    assert pytest.approx(0.3156, abs=1e-4) == PURE_NOISE_MEAN
    assert values.mean() == pytest.approx(PURE_NOISE_MEAN, abs=0.005)
    assert (values == 0).mean() == pytest.approx(0.5, abs=0.01)  # z <= 0
    assert (values == 1).mean() == pytest.approx(0.5 * math.erfc(1 / math.sqrt(2)), abs=0.01)  # z >= 1
    assert abs(correlation(noise, image)) < 0.02  # nothing of the image survives
    # channels are independent draws
    assert not np.array_equal(values[..., 0], values[..., 1])
    # deterministic per (seed, key); another key or seed gives other noise
    assert np.array_equal(to_unit(pure_noise_image(image, key="radiology/a.png", seed=0)), values)
    assert not np.array_equal(to_unit(pure_noise_image(image, key="radiology/b.png", seed=0)), values)
    assert not np.array_equal(to_unit(pure_noise_image(image, key="radiology/a.png", seed=1)), values)


def test_linear_beta_schedule() -> None:
    assert alpha_bar(0) == 1.0
    assert alpha_bar(1) == pytest.approx(1 - 1e-4)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert alpha_bar(500) == pytest.approx(np.prod(1 - betas[:500]))
    assert 0.07 < alpha_bar(500) < 0.09
    assert alpha_bar(1000) < 1e-4
    assert all(alpha_bar(t) > alpha_bar(t + 50) for t in range(0, 950, 50))
    with pytest.raises(ValueError):
        alpha_bar(1001)


def test_diffusion_noise_fades_the_other_image_with_t() -> None:
    source, own = pattern(1), pattern(2)
    steps = (0, 100, 250, 500, 750, 1000)
    noised = [diffusion_noise_image(source, size=own.size, key="k", t=t, seed=0) for t in steps]
    assert all(image.size == own.size for image in noised)
    assert np.abs(to_unit(noised[0]) - to_unit(source)).max() <= 1 / 255  # t = 0: the other image itself
    correlations = [correlation(image, source) for image in noised]
    assert correlations[0] > 0.99
    assert all(a > b for a, b in itertools.pairwise(correlations)), correlations
    assert correlations[-1] < 0.05
    assert 0.1 < correlations[steps.index(500)] < 0.9  # the default step keeps a trace of the image
    # resized to the real image's size
    assert diffusion_noise_image(source, size=(32, 48), key="k", t=10).size == (32, 48)


def test_pick_source_is_another_image_chosen_by_seed() -> None:
    pool = [f"img{i}.png" for i in range(10)]
    picks = {pick_source(f"radiology/img{i}.png", f"img{i}.png", pool, 0) for i in range(10)}
    for i in range(10):
        chosen = pick_source(f"radiology/img{i}.png", f"img{i}.png", pool, 0)
        assert chosen != f"img{i}.png" and chosen in pool
        assert chosen == pick_source(f"radiology/img{i}.png", f"img{i}.png", list(reversed(pool)), 0)
    assert len(picks) > 3  # not always the same image
    with pytest.raises(ValueError, match="another image"):
        pick_source("radiology/a.png", "a.png", ["a.png"], 0)


def test_write_noise_images_per_domain(tmp_path: Path) -> None:
    images: dict[str, dict[str, Path]] = {}
    for domain in ("radiology", "pathology"):
        folder = tmp_path / "data" / domain
        folder.mkdir(parents=True)
        images[domain] = {}
        for i in range(3):
            path = folder / f"{domain}-{i}.png"
            pattern(10 * len(images) + i).save(path)
            images[domain][path.name] = path
    out = tmp_path / "out"
    written = write_noise_images(images, out, kind="diffusion", step=0, seed=3)
    assert set(written) == {(d, name) for d, paths in images.items() for name in paths}
    for (domain, name), noise in written.items():
        assert noise.path == noise_image_path(out, domain, name) and noise.path.is_file()
        assert noise.kind is NoiseKind.diffusion and noise.step == 0
        assert noise.source in images[domain] and noise.source != name  # same domain, another image
        # step 0: the noise image is the source image itself
        source = Image.open(images[domain][noise.source]).convert("RGB")
        assert np.abs(to_unit(Image.open(noise.path)) - to_unit(source)).max() <= 1 / 255
    again = write_noise_images(images, tmp_path / "again", kind="diffusion", step=0, seed=3)
    assert {k: v.source for k, v in again.items()} == {k: v.source for k, v in written.items()}

    pure = write_noise_images({"radiology": images["radiology"]}, tmp_path / "pure", kind="pure")
    [(key, noise)] = list(pure.items())[:1]
    assert noise.source is None and noise.step is None
    assert Image.open(noise.path).size == Image.open(images["radiology"][key[1]]).size
