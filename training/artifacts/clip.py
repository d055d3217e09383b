"""open_clip artifact folders (classifier tower, retrievers) written from plain JSON model configs.

Models are data, as in open_clip: ``clip_configs/<name>.json`` holds only ``embed_dim``, ``vision_cfg``
and ``text_cfg`` (open_clip's ``model_configs`` format). An artifact folder is open_clip's own
``local-dir:`` layout (see ``services.common.clip``), so ``open_clip.create_model("local-dir:<folder>")``
loads it too.

Sidecars: ``write_clip_artifact(..., extra={"retriever.json": {...}})`` writes each entry of ``extra``
as a JSON file of that name next to the model, so a caller names its own sidecar and the open_clip
config stays pure open_clip.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from services.common.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ClipModel

CLIP_CONFIGS_DIR = Path(__file__).parent / "clip_configs"


def list_clip_configs() -> list[str]:
    """Names of the bundled model configs."""
    return sorted(path.stem for path in CLIP_CONFIGS_DIR.glob("*.json"))


def get_clip_config(name: str) -> dict[str, Any]:
    """A fresh copy of a model config: a bundled name (``"tiny"``) or a path to a JSON file."""
    path = Path(name) if name.endswith(".json") else CLIP_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown open_clip config {name!r}; bundled configs: {list_clip_configs()}")
    config = json.loads(path.read_text(encoding="utf-8"))
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - config.keys()
    if missing:
        raise ValueError(f"{path}: open_clip model config lacks {sorted(missing)}")
    return copy.deepcopy(config)


def default_preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's inference preprocessing for a model config (OpenAI CLIP mean and std)."""
    return {
        "size": model_cfg["vision_cfg"].get("image_size", 224),
        "mode": "RGB",
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def create_clip_model(config_name: str = "tiny", *, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised open_clip model; the same seed gives the same weights.

    Built by open_clip's own factory (it picks ``CLIP`` or ``CustomTextCLIP``), on CPU, in train mode.
    The global torch RNG is left as it was.
    """
    model_cfg = get_clip_config(config_name)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        _write_json(Path(tmp) / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg})
        torch.manual_seed(seed)
        return open_clip.create_model(
            "local-dir:" + tmp, load_weights=False, pretrained_text=False, device="cpu"
        )


def save_clip_model(
    folder: Path,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    *,
    preprocess_cfg: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an open_clip folder and load it back once.

    Loading back makes a model that does not match ``model_cfg`` fail here, at training time, not when
    a service starts.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(
        folder / OPEN_CLIP_CONFIG,
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or default_preprocess_cfg(model_cfg)},
    )
    # Cloned, contiguous CPU tensors: safetensors refuses views and shared storage. Fixed metadata and
    # safetensors' sorted layout make the file a pure function of the weights.
    tensors = {
        name: value.detach().to("cpu").clone().contiguous() for name, value in model.state_dict().items()
    }
    save_file(tensors, str(folder / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    ClipModel.load(folder, root=folder.parent)
    return folder


def write_clip_artifact(
    folder: Path,
    *,
    config_name: str = "tiny",
    seed: int = 0,
    model: torch.nn.Module | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write an open_clip artifact folder and return it.

    Args:
        folder: where to write (created if needed).
        config_name: bundled config name or JSON path; it must describe ``model`` when one is given.
        seed: random initialisation seed when ``model`` is None (same seed → byte-identical weights).
        model: trained weights to store instead of a random initialisation.
        extra: sidecar JSON files to write next to the model, ``{file name: JSON object}``,
            e.g. ``{"retriever.json": {"domain": "radiology"}}``.

    Example::

        write_clip_artifact(root / "retrievers" / "radiology", seed=1, extra={"retriever.json": meta})
    """
    for name in extra or {}:
        if Path(name).name != name or not name.endswith(".json") or name == OPEN_CLIP_CONFIG:
            raise ValueError(
                f"sidecar name {name!r} must be a plain '*.json' file name other than the config"
            )
    model_cfg = get_clip_config(config_name)
    if model is None:
        model = create_clip_model(config_name, seed=seed)
    save_clip_model(folder, model, model_cfg)
    for name, data in (extra or {}).items():
        _write_json(Path(folder) / name, data)
    return Path(folder)
