"""A small fake MedSynth folder in the generator's exact layout, for the checker and preview tests.

Every domain gets one trivially visible finding (a bright/coloured square in a corner; subtle cases are
drawn dimmer), one finding labelled at random but drawn nowhere (pure noise, must stay unlearnable), and
radiology also a scattered, position-free finding (a few dozen black pixels at random places, which
only the histogram features can pick up). All other catalogue findings have no positives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# domain -> (visible finding, invisible finding, scattered finding or None, image mode, extension)
FAKE_DOMAINS: dict[str, tuple[str, str, str | None, str, str]] = {
    "radiology": ("nodule", "cardiomegaly", "pneumothorax_right", "L", "png"),
    "ophthalmology": ("haemorrhage", "drusen", None, "RGB", "jpg"),
    "pathology": ("tumour", "mitoses", None, "RGB", "jpg"),
}
# index % 10 -> split: 72 train (60 + 12 val) and 48 held out (12 preference + 36 test) per 120 images.
SPLIT_CYCLE = ["retriever_train"] * 5 + ["retriever_val", "preference", "test", "test", "test"]


def _split(i: int) -> str:
    return SPLIT_CYCLE[i % len(SPLIT_CYCLE)]


def build_fake_medsynth(
    root: Path,
    *,
    per_domain: int = 120,
    size: int = 32,
    seed: int = 0,
    difficulty: str = "default",
    domains: tuple[str, ...] = tuple(FAKE_DOMAINS),
) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "medsynth.json").write_text(
        json.dumps(
            {
                "generator": "medsynth",
                "version": 1,
                "seed": seed,
                "per_domain": per_domain,
                "difficulty": difficulty,
                "image_size": size,
            }
        )
    )
    sq = max(size // 4, 4)
    records = []
    for domain in domains:
        visible, invisible, scattered, mode, ext = FAKE_DOMAINS[domain]
        (root / "images" / domain).mkdir(parents=True, exist_ok=True)
        for i in range(per_domain):
            findings = []
            channels = 1 if mode == "L" else 3
            pixels = rng.integers(40, 141, size=(size, size, channels)).astype(np.uint8)
            if rng.random() < 0.4:
                subtle = bool(rng.random() < 0.3)
                strength = 0.7 if subtle else 1.0
                if domain == "radiology":
                    pixels[:sq, :sq] = int(250 * strength)
                elif domain == "ophthalmology":
                    pixels[-sq:, -sq:] = (int(240 * strength), 20, 20)
                else:
                    pixels[:sq, -sq:] = (int(60 / strength), 0, int(90 / strength))
                findings.append(
                    {"name": visible, "severity": "moderate", "contrast": strength, "subtle": subtle}
                )
            if rng.random() < 0.4:  # labelled, never drawn
                findings.append({"name": invisible, "severity": "mild", "contrast": 0.0, "subtle": False})
            if scattered and rng.random() < 0.4:
                ys = rng.integers(0, size, 40)
                xs = rng.integers(0, size, 40)
                pixels[ys, xs] = 0
                findings.append({"name": scattered, "severity": "mild", "contrast": 1.0, "subtle": False})
            rel = f"images/{domain}/{domain}-{i:04d}.{ext}"
            image = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode)
            image.save(root / rel, quality=95) if ext == "jpg" else image.save(root / rel)
            records.append(
                {
                    "id": f"{domain}-{i:04d}",
                    "domain": domain,
                    "split": _split(i),
                    "image": rel,
                    "findings": findings,
                    "measurements": {},
                }
            )
    with (root / "findings.jsonl").open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return root


@pytest.fixture
def make_fake_medsynth(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_fake_medsynth(name="x", **kwargs)`` builds a fresh fake folder under tmp_path."""

    def make(name: str = "medsynth", **kwargs) -> Path:
        return build_fake_medsynth(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def fake_medsynth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shared read-only fake folder (120 images per domain, 32 px). Do not modify it."""
    return build_fake_medsynth(tmp_path_factory.mktemp("fake_medsynth") / "data")
