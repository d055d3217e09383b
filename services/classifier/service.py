"""The domain classifier: open_clip image features → linear head → softmax over the known domains.

The paper fine-tunes BiomedCLIP image features on a small domain-labelled set; here the tower is any
open_clip model and the head is trained by ``training`` (``save_classifier``). In production an image
of none of the known domains must not be forced into one, so every answer carries the full
distribution and whether the top probability reaches the threshold.

Concurrent requests share a forward pass: ``classify`` preprocesses its images in the caller's thread
(resizing a 512 px image costs ten times the tower's share of a batch, so it must not run serially in
the batch) and hands the pixel tensors to a ``MicroBatcher`` (``services.common.batching``) that gathers
up to ``max_batch`` of them or waits ``max_wait_s``; ``max_batch=1`` runs every request on its own.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import PIL.Image
import torch
from prometheus_client import CollectorRegistry
from safetensors import SafetensorError
from safetensors.torch import load_file

from services.common.artifacts import CLASSIFIER_DIR, ArtifactError, read_json, require_file, sha256_file
from services.common.batching import BatchMetrics, MicroBatcher
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
        max_batch: most images of concurrent requests gathered into one call (1 = no micro-batching).
        max_wait_s: how long an image waits for others before its batch starts anyway.
    """

    def __init__(
        self,
        *,
        threshold: float | None = None,
        batch_size: int = 32,
        max_batch: int = 16,
        max_wait_s: float = 0.002,
    ):
        self.threshold_override = threshold
        self.batch_size = batch_size
        self.batcher: MicroBatcher[torch.Tensor, Classification] = MicroBatcher(
            self._classify_pixels, max_batch=max_batch, max_wait_s=max_wait_s, name="classify"
        )
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

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Export batch sizes, waits and queue depth on an app's registry."""
        self.batcher.attach_metrics(BatchMetrics.on(registry, service="classifier"))

    def classify(self, images: list[PIL.Image.Image]) -> list[Classification]:
        """One ``Classification`` per image; blocks (call it from a worker thread) while concurrent
        callers' images join the same forward pass."""
        if not self.ready:
            raise NotReady("the classifier is still loading")
        if len(images) > 1 or not self.batcher.enabled:  # a caller's own batch: one pass, no queue
            return self._classify(images)
        return self.batcher.submit_blocking(self._pixels(images))

    async def aclassify(self, image: PIL.Image.Image) -> Classification:
        """One image's ``Classification`` from a coroutine, without holding a worker thread while queued."""
        if not self.ready:
            raise NotReady("the classifier is still loading")
        [pixels] = await anyio.to_thread.run_sync(self._pixels, [image])
        return await self.batcher.submit(pixels)

    def _pixels(self, images: list[PIL.Image.Image]) -> list[torch.Tensor]:
        assert self.clip is not None
        return [self.clip.preprocess(image) for image in images]

    def _classify(self, images: list[PIL.Image.Image]) -> list[Classification]:
        return self._classify_pixels(self._pixels(images))

    def _classify_pixels(self, pixels: list[torch.Tensor]) -> list[Classification]:
        """The batched step: image tower (in chunks of ``batch_size``), head, softmax."""
        assert self.clip is not None and self.head is not None
        with torch.inference_mode():
            features = torch.cat(
                [
                    self.clip.model.encode_image(
                        torch.stack(pixels[start : start + self.batch_size]), normalize=True
                    )
                    for start in range(0, len(pixels), self.batch_size)
                ]
            ).float()
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
