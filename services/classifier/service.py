"""The domain classifier: open_clip image features → linear head → softmax over the known domains.

The paper fine-tunes BiomedCLIP image features on a small domain-labelled set; here the tower is any
open_clip model and the head is trained by ``training`` (``save_classifier``). In production an image
of none of the known domains must not be forced into one, so every answer carries the full
distribution and whether the top probability reaches the threshold.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from services.common.artifacts import CLASSIFIER_DIR, ArtifactError, read_json, require_file, sha256_file
from services.common.clip import ClipModel
from services.common.errors import NotReady

logger = logging.getLogger(__name__)

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_HEAD = "head.safetensors"


@dataclass(frozen=True)
class Classification:
    """The classifier's answer for one image."""

    label: str
    probabilities: dict[str, float]
    confidence: float
    confident: bool


def _check_config(config: dict, path: Path, root: Path) -> tuple[list[str], float]:
    labels = config.get("labels")
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(label, str) and label for label in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ArtifactError(path, "'labels' must be a non-empty list of distinct names", root=root)
    threshold = config.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ArtifactError(path, "'threshold' must be a number in [0, 1]", root=root)
    if config.get("head") != "linear":
        raise ArtifactError(path, f"'head' must be \"linear\", got {config.get('head')!r}", root=root)
    return labels, float(threshold)


class DomainClassifier:
    """Loads ``<artifacts>/classifier`` once and classifies batches of images.

    Args:
        threshold: overrides the artifact's confidence threshold when not None.
        batch_size: images per forward pass of the image tower.
    """

    def __init__(self, *, threshold: float | None = None, batch_size: int = 32):
        self.threshold_override = threshold
        self.batch_size = batch_size
        self.ready = False
        self.clip: ClipModel | None = None
        self.head: torch.nn.Linear | None = None
        self.labels: list[str] = []
        self.threshold = 0.0
        self.model_id = ""

    def load(self, root: Path) -> None:
        """Read and check every file of ``root/classifier``; an ``ArtifactError`` names the bad one."""
        root = Path(root)
        folder = root / CLASSIFIER_DIR
        config_path = folder / CLASSIFIER_CONFIG
        config = read_json(config_path, root, "classifier config")
        labels, threshold = _check_config(config, config_path, root)
        clip = ClipModel.load(folder, root=root, batch_size=self.batch_size)
        if config.get("embed_dim", clip.embed_dim) != clip.embed_dim:
            raise ArtifactError(
                config_path,
                f"'embed_dim' {config.get('embed_dim')} differs from the tower's {clip.embed_dim}",
                root=root,
            )

        head_path = require_file(folder / CLASSIFIER_HEAD, root, "classifier head")
        try:
            tensors = load_file(str(head_path))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(head_path, f"cannot read the head weights ({exc})", root=root) from exc
        weight, bias = tensors.get("weight"), tensors.get("bias")
        expected = (len(labels), clip.embed_dim)
        if (
            weight is None
            or bias is None
            or tuple(weight.shape) != expected
            or tuple(bias.shape) != expected[:1]
        ):
            raise ArtifactError(
                head_path,
                f"expected tensors 'weight' {expected} and 'bias' ({len(labels)},) for labels {labels}",
                root=root,
            )
        head = torch.nn.Linear(clip.embed_dim, len(labels))
        head.load_state_dict({"weight": weight.float(), "bias": bias.float()})

        self.clip, self.head, self.labels = clip, head.eval(), labels
        self.threshold = threshold if self.threshold_override is None else self.threshold_override
        # Identifies tower and head together: retraining only the head changes it too.
        digest = hashlib.sha256(f"{clip.weights_sha256}:{sha256_file(head_path)}".encode())
        self.model_id = digest.hexdigest()[:12]
        # Warm-up: the first request should not pay for lazy initialisation.
        self._classify([PIL.Image.new("RGB", (clip.image_size, clip.image_size))])
        self.ready = True
        logger.info(
            "classifier %s loaded from %s: labels %s, threshold %.2f",
            self.model_id,
            folder,
            labels,
            self.threshold,
        )

    def classify(self, images: list[PIL.Image.Image]) -> list[Classification]:
        """One ``Classification`` per image, computed in batches."""
        if not self.ready:
            raise NotReady("the classifier is still loading")
        return self._classify(images)

    def _classify(self, images: list[PIL.Image.Image]) -> list[Classification]:
        assert self.clip is not None and self.head is not None
        features = self.clip.image_features(images)
        with torch.inference_mode():
            probabilities = torch.softmax(self.head(features), dim=-1).double()
        results = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                Classification(
                    label=self.labels[best],
                    probabilities=dict(zip(self.labels, row, strict=True)),
                    confidence=row[best],
                    confident=row[best] >= self.threshold,
                )
            )
        return results
