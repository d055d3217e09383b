"""``mmedrag artifacts tiny``: a complete artifacts folder of tiny random-weight models, in seconds.

Every part is in its real format (open_clip folders, a Hugging Face LLaVA folder, an embedded Qdrant
store holding MedSynth reports), so every service starts on it exactly as it would on trained artifacts.
The models are untrained: answers are meaningless, the plumbing is real. Trained artifacts come from
``mmedrag bootstrap``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from services.common.artifacts import (
    CLASSIFIER_DIR,
    GENERATOR_DIR,
    INDEX_DIR,
    MANIFEST,
    RETRIEVERS_DIR,
    sha256_file,
)
from training.data.records import DOMAINS

EXAMPLES_DIR = "examples"
MEDSYNTH_DIR = "medsynth"
TINY_PER_DOMAIN = 24
TINY_IMAGE_SIZE = 64


def weights_checksums(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*.safetensors"))
    }


def write_examples(data_dir: Path, out: Path) -> dict[str, Any]:
    """One test image per domain with one of its questions, for the printed curl example and docs."""
    from training.data.formats import get_format
    from training.data.medsynth.release import dataset_name

    examples: dict[str, Any] = {}
    (out / EXAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        root = data_dir / domain / "images"
        items = (
            get_format("vqa")
            .load(data_dir / domain / "test_vqa.jsonl", root, dataset=dataset_name(domain), domain=domain)
            .records
        )
        item = items[0]
        target = out / EXAMPLES_DIR / f"{domain}{Path(item.image).suffix}"
        shutil.copyfile(root / item.image, target)
        examples[domain] = {
            "image": target.relative_to(out).as_posix(),
            "question": item.question,
            "answer": item.answer,
        }
    (out / EXAMPLES_DIR / "examples.json").write_text(json.dumps(examples, indent=2) + "\n", encoding="utf-8")
    return examples


def build_tiny_artifacts(out: Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Build (or rebuild) every part into ``out`` and write its manifest; return the manifest."""
    from services.common.clip import ClipModel
    from services.retriever.store import VectorStore
    from training.artifacts.classifier import write_tiny_classifier
    from training.artifacts.clip import write_clip_artifact
    from training.artifacts.generator import build_tiny_generator
    from training.artifacts.retriever import write_retriever_sidecar
    from training.data.medsynth.generate import SynthConfig, synthesize
    from training.index import index_reports, load_corpus_from_medsynth

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for part in (CLASSIFIER_DIR, RETRIEVERS_DIR, GENERATOR_DIR, INDEX_DIR, EXAMPLES_DIR, MANIFEST):
        target = out / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    data_dir = out / MEDSYNTH_DIR
    synthesize(
        SynthConfig(
            out=data_dir, seed=seed, per_domain=TINY_PER_DOMAIN, image_size=TINY_IMAGE_SIZE, workers=1
        ),
        progress=progress,
    )
    write_tiny_classifier(out / CLASSIFIER_DIR, seed=seed)
    store = VectorStore.open(url=None, path=out / INDEX_DIR)
    try:
        for offset, domain in enumerate(DOMAINS, start=1):
            folder = out / RETRIEVERS_DIR / domain
            write_clip_artifact(folder, config_name="tiny", seed=seed + offset)
            write_retriever_sidecar(folder, domain)
            clip = ClipModel.load(folder, root=out)
            index_reports(store, domain, load_corpus_from_medsynth(data_dir, domain), clip, progress=progress)
    finally:
        store.close()
    corpus = [report.text for domain in DOMAINS for report in load_corpus_from_medsynth(data_dir, domain)]
    build_tiny_generator(out / GENERATOR_DIR, corpus=corpus, seed=seed)
    examples = write_examples(data_dir, out)

    manifest = {
        "version": 1,
        "kind": "tiny",
        "built_by": "mmedrag artifacts tiny",
        "seed": seed,
        "data": {"medsynth": MEDSYNTH_DIR, "per_domain": TINY_PER_DOMAIN, "image_size": TINY_IMAGE_SIZE},
        "parts": {
            "classifier": {"path": CLASSIFIER_DIR, "weights": weights_checksums(out / CLASSIFIER_DIR)},
            "retrievers": {
                domain: {
                    "path": f"{RETRIEVERS_DIR}/{domain}",
                    "weights": weights_checksums(out / RETRIEVERS_DIR / domain),
                }
                for domain in DOMAINS
            },
            "generator": {"path": GENERATOR_DIR, "weights": weights_checksums(out / GENERATOR_DIR)},
            "index": {"path": INDEX_DIR, "collections": [f"mmedrag_{d}" for d in DOMAINS]},
        },
        "examples": examples,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
