"""Where each artifact lives inside the artifacts folder, and the check every service runs at start-up.

Layout (DESIGN.md §4)::

    manifest.json                 what each part is, how it was made, checksums
    classifier/                   open_clip_config.json, open_clip_model.safetensors, classifier.json,
                                  head.safetensors
    retrievers/<domain>/          open_clip_config.json, open_clip_model.safetensors, retriever.json
    generator/                    Hugging Face LLaVA folder (config, weights, tokenizer, processor,
                                  chat_template.jinja): loadable by transformers and by `vllm serve`
    index/                        embedded Qdrant store, one collection ``mmedrag_<domain>``

A service refuses to start on a missing or inconsistent artifact with an ``ArtifactError`` whose message
names the file and the command that builds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CLASSIFIER_DIR = "classifier"
RETRIEVERS_DIR = "retrievers"
GENERATOR_DIR = "generator"
INDEX_DIR = "index"
# open_clip's own local-dir format (the first weights name its factory looks for).
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
BUILD_HINT = (
    "build one with `mmedrag artifacts tiny --out {root}` (tiny test models) "
    "or `mmedrag bootstrap --out {root}` (trained on MedSynth)"
)


class ArtifactError(RuntimeError):
    """An artifact is missing or does not match what the service needs."""

    def __init__(self, path: Path, problem: str, *, root: Path | None = None):
        hint = BUILD_HINT.format(root=root if root is not None else "artifacts")
        super().__init__(f"{path}: {problem}; {hint}")
        self.path = path


def collection_name(domain: str) -> str:
    """Qdrant collection of a domain's report corpus."""
    return f"mmedrag_{domain}"


def require_file(path: Path, root: Path, what: str) -> Path:
    """The path, or an ArtifactError that says what is missing and how to build it."""
    if not path.is_file():
        raise ArtifactError(path, f"{what} not found", root=root)
    return path


def read_json(path: Path, root: Path, what: str) -> dict[str, Any]:
    require_file(path, root, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(path, f"{what} is not valid JSON ({exc})", root=root) from exc
    if not isinstance(data, dict):
        raise ArtifactError(path, f"{what} must be a JSON object", root=root)
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The artifacts manifest; every service reads it first so a half-built folder is caught early."""
    return read_json(root / MANIFEST, root, "artifacts manifest")
