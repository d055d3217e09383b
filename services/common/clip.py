"""Load an open_clip model from an artifact folder and encode images and texts with it.

The classifier and the retrievers are both open_clip models stored in open_clip's own ``local-dir:``
layout, so open_clip (and anyone with open_clip installed) can load them without this project::

    open_clip_config.json         {"model_cfg": {embed_dim, vision_cfg, text_cfg}, "preprocess_cfg": {...}}
    open_clip_model.safetensors   the weights (the first name open_clip 3.3's factory looks for)

Loading never touches the network. The weights file is required by name before open_clip scans the
folder (its scan would otherwise fall back to any ``*.safetensors``, e.g. the classifier's head), and
a Hugging Face text tower or tokenizer must be a local folder, given as an absolute path or as a
path relative to the artifact folder (so artifacts stay movable). The default open_clip tokenizer
(``SimpleTokenizer``) ships its vocabulary inside the open_clip package.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import PIL.Image
import torch
from open_clip.tokenizer import HFTokenizer
from safetensors import SafetensorError

from services.common.artifacts import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    ArtifactError,
    read_json,
    require_file,
    sha256_file,
)

# Files that make a folder a Hugging Face tokenizer (open_clip's local-dir convention puts them next
# to the weights).
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")

Tokenizer = Callable[[list[str]], torch.Tensor]


def _local_folder(name: str, folder: Path) -> Path | None:
    """``name`` as an existing local folder: relative to the artifact folder first, then as given."""
    candidate = Path(name)
    for path in (folder / candidate, candidate) if not candidate.is_absolute() else (candidate,):
        if path.is_dir():
            return path.resolve()
    return None


def _resolve_text_cfg(
    text_cfg: dict[str, Any], folder: Path, config_path: Path, root: Path
) -> dict[str, Any]:
    """A copy of ``text_cfg`` whose Hugging Face tower is a local folder built from its config only."""
    text_cfg = copy.deepcopy(text_cfg)
    hf_model_name = text_cfg.get("hf_model_name")
    if hf_model_name:
        local = _local_folder(hf_model_name, folder)
        if local is None:
            raise ArtifactError(
                config_path,
                f"text_cfg.hf_model_name {hf_model_name!r} must be a local folder (absolute, or relative "
                "to the artifact folder) holding the text tower's config.json; models are never downloaded",
                root=root,
            )
        text_cfg["hf_model_name"] = str(local)
        # The weights come from open_clip_model.safetensors; never fetch pretrained text weights.
        text_cfg["hf_model_pretrained"] = False
    return text_cfg


def _load_tokenizer(text_cfg: dict[str, Any], folder: Path, config_path: Path, root: Path) -> Tokenizer:
    context_length = int(text_cfg.get("context_length") or 77)
    hf_tokenizer_name = text_cfg.get("hf_tokenizer_name")
    if not hf_tokenizer_name:
        return open_clip.get_tokenizer("local-dir:" + str(folder))
    source = _local_folder(hf_tokenizer_name, folder)
    if source is None and any((folder / name).is_file() for name in _HF_TOKENIZER_FILES):
        source = folder  # open_clip's own convention: tokenizer files next to the weights
    if source is None:
        raise ArtifactError(
            config_path,
            f"text_cfg.hf_tokenizer_name {hf_tokenizer_name!r} is not a local tokenizer folder and the "
            "artifact folder holds no tokenizer files; tokenizers are never downloaded",
            root=root,
        )
    try:
        return HFTokenizer(
            str(source),
            context_length=context_length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **(text_cfg.get("tokenizer_kwargs") or {}),
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(source, f"cannot load the Hugging Face tokenizer ({exc})", root=root) from exc


class ClipModel:
    """An open_clip dual encoder in eval mode on CPU, with its preprocessing and tokenizer.

    ``encode_images`` / ``encode_texts`` return float32 L2-normalised rows, computed in batches of
    ``batch_size`` under ``torch.inference_mode``; they may be called from several threads at once.
    ``torch.set_num_threads`` is left to the caller (the service's entry point).

    Example::

        clip = ClipModel.load(root / "retrievers" / "radiology", root=root)
        sims = clip.encode_images([image]) @ clip.encode_texts(["no acute findings"]).T
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        preprocess: Callable[[PIL.Image.Image], torch.Tensor],
        tokenizer: Tokenizer,
        config: dict[str, Any],
        folder: Path,
        weights_sha256: str,
        batch_size: int = 32,
    ):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.config = config
        self.folder = folder
        self.weights_sha256 = weights_sha256
        self.batch_size = batch_size
        self.embed_dim = int(config["model_cfg"]["embed_dim"])
        size = model.visual.preprocess_cfg["size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # Hugging Face fast tokenizers raise "Already borrowed" when one instance is used by two
        # threads at once (padding/truncation state lives in Rust); tokenising is cheap, so serialise it.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, *, root: Path, batch_size: int = 32) -> ClipModel:
        """Load the model in ``folder``; an ``ArtifactError`` names the missing or broken file.

        Args:
            folder: the artifact folder (``open_clip_config.json`` + ``open_clip_model.safetensors``).
            root: the artifacts root, for the "how to build it" hint in errors.
            batch_size: images or texts per forward pass.
        """
        folder = Path(folder)
        config_path = folder / OPEN_CLIP_CONFIG
        config = read_json(config_path, root, "open_clip config")
        model_cfg = config.get("model_cfg")
        if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= model_cfg.keys():
            raise ArtifactError(
                config_path, "'model_cfg' with embed_dim, vision_cfg and text_cfg is required", root=root
            )
        weights_path = require_file(folder / OPEN_CLIP_WEIGHTS, root, "open_clip weights")

        text_cfg = _resolve_text_cfg(model_cfg["text_cfg"], folder, config_path, root)
        try:
            # open_clip picks the weights by its preferred file names, the first being OPEN_CLIP_WEIGHTS
            # (checked above), so a head or sidecar .safetensors next to it is never taken for the model.
            model, _, preprocess = open_clip.create_model_and_transforms(
                "local-dir:" + str(folder), pretrained_text=False, device="cpu", text_cfg=text_cfg
            )
        except (SafetensorError, RuntimeError) as exc:
            # A corrupt file, or tensors whose names or shapes are not those of the configured model.
            raise ArtifactError(
                weights_path, f"weights do not load into the model of {OPEN_CLIP_CONFIG} ({exc})", root=root
            ) from exc
        except (TypeError, ValueError, KeyError, AssertionError, OSError) as exc:
            raise ArtifactError(
                config_path, f"does not describe an open_clip model ({exc})", root=root
            ) from exc
        tokenizer = _load_tokenizer(text_cfg, folder, config_path, root)
        return cls(
            model=model,
            preprocess=preprocess,
            tokenizer=tokenizer,
            config=config,
            folder=folder,
            weights_sha256=sha256_file(weights_path),
            batch_size=batch_size,
        )

    def image_features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings as a float32 tensor (for heads stacked on the image tower)."""
        return self.pixel_features([self.preprocess(image) for image in images])

    def pixel_features(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """``image_features`` of images already through ``preprocess``: a service preprocesses in the
        caller's thread and batches only the forward pass."""
        if not pixels:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                batch = torch.stack(list(pixels[start : start + self.batch_size]))
                parts.append(self.model.encode_image(batch, normalize=True).float())
        return torch.cat(parts)

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """``(n, embed_dim)`` float32, unit-norm rows."""
        return self.encode_pixels([self.preprocess(image) for image in images])

    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """``encode_images`` of preprocessed images."""
        return np.ascontiguousarray(self.pixel_features(pixels).numpy(), dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, embed_dim)`` float32, unit-norm rows."""
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                with self._tokenizer_lock:
                    tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
                parts.append(self.model.encode_text(tokens, normalize=True).float())
        return np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)
