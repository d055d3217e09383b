"""The request workload shared by the serving benchmarks: MedSynth test-split VQA questions, one per image,
read through the project's own loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VQASample:
    """One test image of a domain and a yes/no question about it."""

    domain: str
    image: Path
    question: str


def medsynth_vqa_samples(medsynth: Path, per_domain: int) -> list[VQASample]:
    """The first ``per_domain`` distinct test images of each domain, each with its first question."""
    from training.data.formats import get_format
    from training.data.medsynth.release import dataset_name
    from training.data.records import DOMAINS

    samples: list[VQASample] = []
    for domain in DOMAINS:
        root = medsynth / domain / "images"
        records = (
            get_format("vqa")
            .load(medsynth / domain / "test_vqa.jsonl", root, dataset=dataset_name(domain), domain=domain)
            .records
        )
        seen: set[str] = set()
        for record in records:
            if len(seen) == per_domain:
                break
            if record.image in seen:
                continue
            seen.add(record.image)
            samples.append(VQASample(domain, root / record.image, record.question))
    if not samples:
        raise SystemExit(f"no VQA items found under {medsynth}")
    return samples
