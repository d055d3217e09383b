"""A tiny RAG-PT world, built once per session: a random-weight LLaVA base folder, small PNGs, noise images
and hand-written pair files in the shared format of ``mmedrag pairs`` (every set, plus held-out pairs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from image_factories import make_noise_image, make_png

from services.common.prompts import build_prompt
from training.artifacts.generator import build_tiny_generator

DOMAINS = ("radiology", "ophthalmology", "pathology")
QUESTIONS = (
    "Is there a pleural effusion?",
    "Is the heart enlarged?",
    "Is there a nodule?",
    "Are tumour cells present?",
)
REFERENCE = "There is a small left pleural effusion with adjacent atelectasis."
# Chosen answers are grounded sentences, rejected ones a bare opposite: a preference the tiny model can learn
# and that carries over to held-out pairs with other images and questions.
CHOSEN = "Yes, there is a small left pleural effusion."
REJECTED = "No."


@dataclass(frozen=True)
class PairWorld:
    root: Path  # folder holding everything below
    base: Path  # the tiny LLaVA base model folder
    pairs: Path  # pairs_<set>.jsonl, pairs_all.jsonl, images/, noise/
    held_out: Path  # held-out pair file (stage-1 and stage-2 sets)


def pair_record(index: int, pair_set: str, root: Path, **fields: Any) -> dict[str, Any]:
    """One line of the shared pair format; ``fields`` replace defaults."""
    domain = DOMAINS[index % len(DOMAINS)]
    question = QUESTIONS[index % len(QUESTIONS)]
    references = [] if pair_set == "stage1" else [REFERENCE]
    noised = pair_set in ("stage1", "cm")
    record = {
        "id": f"{pair_set}-{index}",
        "set": pair_set,
        "domain": domain,
        "task": "vqa",
        "image": f"images/{index}.png",
        "image_root": str(root),
        "rejected_image": f"noise/{index}.png" if noised else None,
        "prompt": build_prompt("vqa", domain, references, question),
        "chosen": CHOSEN,
        "rejected": REJECTED,
        "references": references,
        "provenance": {
            "model": "tiny",
            "retriever": None if pair_set == "stage1" else "tiny",
            "outcomes": {"clean": True, "noised": pair_set == "cm", "clean_ref": True, "noised_ref": True},
            "noise": "pure",
        },
    }
    return {**record, **fields}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pair_world(tmp_path_factory: pytest.TempPathFactory) -> PairWorld:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rag_pt")
    base = build_tiny_generator(root / "base", seed=0)
    pairs = root / "pairs"
    (pairs / "images").mkdir(parents=True)
    (pairs / "noise").mkdir()
    for index in range(40):
        colour = (40 + 5 * index, 120, 200 - 4 * index)
        (pairs / "images" / f"{index}.png").write_bytes(make_png((64, 64), colour=colour))
        (pairs / "noise" / f"{index}.png").write_bytes(make_noise_image((64, 64), seed=index))
    sets = {"stage1": range(0, 16), "cm": range(16, 20), "oa1": range(20, 24), "oa2": range(24, 28)}
    every: list[dict[str, Any]] = []
    for name, indices in sets.items():
        records = [pair_record(index, name, pairs) for index in indices]
        write_jsonl(pairs / f"pairs_{name}.jsonl", records)
        every += records
    write_jsonl(pairs / "pairs_all.jsonl", every)
    held = [pair_record(index, "stage1", pairs) for index in range(28, 34)]
    held += [
        pair_record(index, name, pairs)
        for index, name in zip(range(34, 40), ("cm", "oa1", "oa2") * 2, strict=True)
    ]
    held_out = write_jsonl(root / "held_out.jsonl", held)
    return PairWorld(root=root, base=base, pairs=pairs, held_out=held_out)


def _tiny_settings(world: PairWorld, out: Path, **overrides: Any) -> dict[str, Any]:
    """Settings of a seconds-long run. The learning rate is far above the paper's 1e-7 (and the 1e-4
    default) so that a few steps on a random-weight model move the reward margin measurably."""
    settings: dict[str, Any] = {
        "artifacts": str(out),
        "model_dir": str(world.base),
        "pairs_dir": str(world.pairs),
        "eval_pair_files": [str(world.held_out)],
        "learning_rate": 5e-3,
        "max_steps": 12,
        "warmup_steps": 0,
        "logging_steps": 4,
        "save_steps": 1000,
        "seed": 0,
        "num_threads": 1,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
    }
    return {**settings, **overrides}


@pytest.fixture(scope="session")
def tiny_settings() -> Callable[..., dict[str, Any]]:
    """``tiny_settings(world, out, **overrides)``: settings of a seconds-long run."""
    return _tiny_settings


@pytest.fixture(scope="session")
def make_pair() -> Callable[..., dict[str, Any]]:
    """``make_pair(index, set, root, **fields)``: one record of the shared pair format."""
    return pair_record


@pytest.fixture(scope="session")
def save_jsonl() -> Callable[[Path, list[dict[str, Any]]], Path]:
    return write_jsonl
