"""The domain classifier's artifact folder: an open_clip model (only its image tower is used) + a head.

::

    classifier/
      open_clip_config.json, open_clip_model.safetensors   open_clip local-dir folder
      head.safetensors                                     linear head: weight (n_labels, embed_dim), bias
      classifier.json                                      {"labels", "threshold", "head", "embed_dim"}

The service (``services.classifier.service``) computes softmax(head(normalised image features)).
``save_classifier`` is what the classifier trainer calls; ``write_tiny_classifier`` gives a random one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.classifier.service import CLASSIFIER_CONFIG, CLASSIFIER_HEAD
from services.common.clip import ClipModel
from training.artifacts.clip import create_clip_model, get_clip_config, save_clip_model
from training.data.records import DOMAINS

DEFAULT_THRESHOLD = 0.5


def save_classifier(
    folder: Path,
    clip_model: ClipModel | torch.nn.Module,
    head: torch.nn.Linear,
    labels: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    config_name: str = "tiny",
) -> Path:
    """Write a classifier folder and return it.

    Args:
        folder: where to write (created if needed).
        clip_model: the tower; a ``ClipModel`` carries its own config, a bare open_clip module is
            described by ``config_name``.
        head: ``Linear(embed_dim, len(labels))`` applied to L2-normalised image features.
        labels: class names, in the order of the head's rows.
        threshold: confidence (top probability) under which an image is "none of the known domains".
        config_name: bundled config name or JSON path describing a bare ``clip_model``.
    """
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and unique, got {labels}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if isinstance(clip_model, ClipModel):
        model, model_cfg = clip_model.model, clip_model.config["model_cfg"]
        preprocess_cfg = clip_model.config.get("preprocess_cfg")
    else:
        model, model_cfg, preprocess_cfg = clip_model, get_clip_config(config_name), None
    embed_dim = int(model_cfg["embed_dim"])
    if tuple(head.weight.shape) != (len(labels), embed_dim) or head.bias is None:
        raise ValueError(
            f"head must be Linear({embed_dim}, {len(labels)}) with a bias, "
            f"got weight {tuple(head.weight.shape)}"
        )

    folder = save_clip_model(folder, model, model_cfg, preprocess_cfg=preprocess_cfg)
    save_file(
        {
            "weight": head.weight.detach().to("cpu", torch.float32).contiguous(),
            "bias": head.bias.detach().to("cpu", torch.float32).contiguous(),
        },
        str(folder / CLASSIFIER_HEAD),
        metadata={"format": "pt"},
    )
    config = {"labels": labels, "threshold": threshold, "head": "linear", "embed_dim": embed_dim}
    (folder / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def write_tiny_classifier(folder: Path, *, seed: int = 0, config_name: str = "tiny") -> Path:
    """A classifier with a random tower and a random head over the three domains (deterministic)."""
    model = create_clip_model(config_name, seed=seed)
    embed_dim = int(get_clip_config(config_name)["embed_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        # Features are unit vectors, so a default-initialised head gives near-uniform probabilities;
        # a larger scale makes the tiny classifier actually prefer one label per image.
        head = torch.nn.Linear(embed_dim, len(DOMAINS))
        torch.nn.init.normal_(head.weight, std=2.0)
    return save_classifier(folder, model, head, DOMAINS, DEFAULT_THRESHOLD, config_name=config_name)
