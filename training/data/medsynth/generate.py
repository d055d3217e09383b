"""MedSynth: a seeded, deterministic synthetic medical world written in the MMed-RAG release formats.

Every image is drawn from its own seed (``seed``, domain, index), so images can be drawn in parallel and
the same arguments always give byte-identical files. Ground truth per image (findings, severities, how
subtle each one is, measurements) goes to ``findings.jsonl``; everything else is written in the release
formats of the real datasets (radiology as MIMIC-CXR, ophthalmology as Harvard-FairVLMed, pathology as
PMC-OA) so that the real loaders read it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from training.data.medsynth.catalogue import catalogue_sha256, load_catalogue
from training.data.medsynth.draw import DrawStyle, FindingInstance, draw_image
from training.data.medsynth.text import Question, write_questions, write_report
from training.data.records import DOMAINS, SPLITS

FORMAT_VERSION = 1
DifficultyName = Literal["easy", "default", "hard"]


@dataclass(frozen=True)
class Difficulty:
    """How hard the findings are to see."""

    subtle_fraction: float  # share of findings drawn at low contrast ("subtle")
    noise: float  # std of pixel noise, in [0, 1] intensity units
    contrast_scale: float  # global multiplier of every finding's contrast


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(subtle_fraction=0.0, noise=0.02, contrast_scale=1.3),
    "default": Difficulty(subtle_fraction=0.3, noise=0.04, contrast_scale=1.0),
    "hard": Difficulty(subtle_fraction=0.6, noise=0.07, contrast_scale=0.7),
}

SPLIT_FRACTIONS: dict[str, float] = {
    "retriever_train": 0.6,
    "retriever_val": 0.1,
    "preference": 0.15,
    "test": 0.15,
}
SEVERITIES = ("mild", "moderate", "severe")
SEVERITY_PROBABILITIES = (0.4, 0.35, 0.25)
SUBTLE_CONTRAST = (0.35, 0.55)
OBVIOUS_CONTRAST = (0.85, 1.15)

# File naming follows each release: MIMIC-style ids, Harvard's slo_fundus_XXXXX.jpg, PMC-OA's numeric names.
_IMAGE_NAMES = {
    "radiology": "cxr-{index:05d}.png",
    "ophthalmology": "slo_fundus_{index:05d}.jpg",
    "pathology": "{index:05d}.jpg",
}
_ID_PREFIX = {"radiology": "cxr", "ophthalmology": "fundus", "pathology": "he"}
JPEG_QUALITY = 92


@dataclass(frozen=True)
class SynthConfig:
    """Arguments of ``mmedrag data synth``."""

    out: Path
    seed: int = 0
    per_domain: int = 300
    difficulty: DifficultyName = "default"
    image_size: int = 224
    workers: int = 1
    questions_per_answer: int = 2  # per image: up to this many "yes" and as many "no" questions

    def __post_init__(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {self.difficulty!r}")
        if self.per_domain < 8:
            raise ValueError(f"per_domain must be at least 8 (one image per split), got {self.per_domain}")
        if not 64 <= self.image_size <= 512:
            raise ValueError(f"image_size must be between 64 and 512 pixels, got {self.image_size}")


@dataclass(frozen=True)
class SynthImage:
    """Ground truth and texts of one generated image."""

    id: str
    domain: str
    split: str
    index: int
    image: str  # relative to the dataset folder
    findings: list[FindingInstance]
    measurements: dict[str, Any]
    report: str
    summary: str
    questions: list[Question]
    demographics: dict[str, Any] = field(default_factory=dict)


def image_root(out: Path, domain: str) -> Path:
    """Folder the release files' image paths are relative to."""
    return out / domain / "images"


def _rng(seed: int, domain: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(domain), index, stream])


def assign_splits(n: int, seed: int, domain: str) -> list[str]:
    """Disjoint split per image index, in the fixed fractions, shuffled by a seeded permutation."""
    counts = {s: max(1, round(n * SPLIT_FRACTIONS[s])) for s in SPLITS if s != "retriever_train"}
    counts["retriever_train"] = n - sum(counts.values())
    labels = [s for s in SPLITS for _ in range(counts[s])]
    order = _rng(seed, domain, 0, 0).permutation(n)  # stream 0: splits; 1, 2: per image
    splits = [""] * n
    for position, index in enumerate(order):
        splits[int(index)] = labels[position]
    return splits


def sample_findings(
    domain: str, catalogue: dict[str, Any], difficulty: Difficulty, rng: np.random.Generator
) -> list[FindingInstance]:
    """Each catalogue finding independently by its prevalence; severity and subtlety drawn per finding."""
    findings = []
    for name, spec in catalogue[domain]["findings"].items():
        if rng.random() >= spec["prevalence"]:
            continue
        severity = SEVERITIES[int(rng.choice(len(SEVERITIES), p=SEVERITY_PROBABILITIES))]
        subtle = bool(rng.random() < difficulty.subtle_fraction)
        low, high = SUBTLE_CONTRAST if subtle else OBVIOUS_CONTRAST
        findings.append(
            FindingInstance(name=name, severity=severity, contrast=round(float(rng.uniform(low, high)), 3))
        )
    return findings


def is_subtle(finding: FindingInstance) -> bool:
    return finding.contrast <= SUBTLE_CONTRAST[1]


def _demographics(domain: str, rng: np.random.Generator) -> dict[str, Any]:
    if domain != "ophthalmology":
        return {}
    return {
        "age": int(rng.integers(35, 90)),
        "gender": str(rng.choice(["female", "male"])),
        "race": str(rng.choice(["asian", "black", "white"])),
    }


def _make_image(task: tuple[SynthConfig, str, int, str]) -> SynthImage:
    config, domain, index, split = task
    catalogue = load_catalogue()
    difficulty = DIFFICULTIES[config.difficulty]
    content_rng = _rng(config.seed, domain, index, 1)
    findings = sample_findings(domain, catalogue, difficulty, content_rng)
    style = DrawStyle(
        size=config.image_size, noise=difficulty.noise, contrast_scale=difficulty.contrast_scale
    )
    image, measurements = draw_image(domain, findings, _rng(config.seed, domain, index, 2), style)
    text = write_report(domain, findings, measurements, catalogue, content_rng)
    questions = write_questions(domain, findings, catalogue, content_rng, config.questions_per_answer)
    name = _IMAGE_NAMES[domain].format(index=index)
    path = image_root(config.out, domain) / name
    if name.endswith(".jpg"):
        image.save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(path, format="PNG")
    return SynthImage(
        id=f"{_ID_PREFIX[domain]}-{index:05d}",
        domain=domain,
        split=split,
        index=index,
        image=path.relative_to(config.out).as_posix(),
        findings=findings,
        measurements=dict(measurements),
        report=text.report,
        summary=text.summary,
        questions=questions,
        demographics=_demographics(domain, content_rng),
    )


def _draw_all(
    config: SynthConfig, tasks: list[tuple[SynthConfig, str, int, str]], progress: bool
) -> Iterator[SynthImage]:
    bar = tqdm(total=len(tasks), desc="MedSynth images", unit="img", disable=not progress)
    if config.workers <= 1:
        for task in tasks:
            yield _make_image(task)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=config.workers) as pool:
            for result in pool.map(_make_image, tasks, chunksize=16):
                yield result
                bar.update()
    bar.close()


def _prepare_out(out: Path) -> None:
    """Refuse to mix with unrelated files; replace a previous MedSynth dataset cleanly."""
    if out.exists() and any(out.iterdir()):
        if not (out / "medsynth.json").exists():
            raise FileExistsError(
                f"{out} is not empty and holds no MedSynth dataset (medsynth.json); choose another --out"
            )
        for domain in DOMAINS:
            shutil.rmtree(out / domain, ignore_errors=True)
        for leftover in out.glob("preview_*.png"):
            leftover.unlink()
    for domain in DOMAINS:
        image_root(out, domain).mkdir(parents=True, exist_ok=True)


def synthesize(config: SynthConfig, *, progress: bool = True) -> dict[str, Any]:
    """Generate the whole dataset into ``config.out`` and return the summary written to medsynth.json."""
    from training.data.medsynth.release import write_release_files

    out = config.out
    _prepare_out(out)
    tasks = [
        (config, domain, index, split)
        for domain in DOMAINS
        for index, split in enumerate(assign_splits(config.per_domain, config.seed, domain))
    ]
    images = list(_draw_all(config, tasks, progress))

    with (out / "findings.jsonl").open("w", encoding="utf-8") as handle:
        for item in images:
            handle.write(json.dumps(_ground_truth(item), sort_keys=True) + "\n")
    counts: dict[str, Any] = {}
    for domain in DOMAINS:
        domain_images = [item for item in images if item.domain == domain]
        counts[domain] = write_release_files(out, domain, domain_images, seed=config.seed)

    summary = {
        "generator": "medsynth",
        "version": FORMAT_VERSION,
        "seed": config.seed,
        "per_domain": config.per_domain,
        "difficulty": config.difficulty,
        "difficulty_settings": asdict(DIFFICULTIES[config.difficulty]),
        "image_size": config.image_size,
        "split_fractions": SPLIT_FRACTIONS,
        "catalogue_sha256": catalogue_sha256(),
        "counts": counts,
    }
    (out / "medsynth.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _ground_truth(item: SynthImage) -> dict[str, Any]:
    return {
        "id": item.id,
        "domain": item.domain,
        "split": item.split,
        "image": item.image,
        "findings": [{**asdict(f), "subtle": is_subtle(f)} for f in item.findings],
        "measurements": item.measurements,
    }


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


__all__: Sequence[str] = [
    "DIFFICULTIES",
    "SynthConfig",
    "SynthImage",
    "assign_splits",
    "default_workers",
    "sample_findings",
    "synthesize",
]
