"""The retriever artifact's sidecar, ``retrievers/<domain>/retriever.json``, next to the open_clip folder.

It records what the open_clip files do not: the domain the retriever serves, its embedding size (checked
against the Qdrant collection), the calibrated adaptive-selection threshold ``gamma`` (None until
calibrated on validation data; the service then uses its configured default) and the recommended
``k_max``. The schema is ``services.retriever.protocol.RetrieverSidecar``, shared with the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.common.artifacts import OPEN_CLIP_CONFIG
from services.retriever.protocol import RETRIEVER_SIDECAR, RetrieverSidecar
from training.data.records import DOMAINS


def _embed_dim(folder: Path) -> int:
    path = folder / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write the open_clip model (write_clip_artifact) first")
    config = json.loads(path.read_text(encoding="utf-8"))
    try:
        return int(config["model_cfg"]["embed_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: no model_cfg.embed_dim ({exc!r})") from exc


def write_retriever_sidecar(
    folder: Path,
    domain: str,
    gamma: float | None = None,
    *,
    k_max_default: int = 10,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/retriever.json`` for the open_clip model already in ``folder``; return its path.

    Args:
        folder: a retriever folder written by ``training.artifacts.clip.write_clip_artifact``.
        domain: one of ``DOMAINS``.
        gamma: calibrated threshold of the paper's selection rule (``>= 0``), or None.
        k_max_default: contexts retrieved when a request does not say (the author recommends 6-10).
        extra: more fields to record (e.g. how gamma was calibrated); kept as they are.

    Example::

        write_clip_artifact(root / "retrievers" / "radiology", seed=1)
        write_retriever_sidecar(root / "retrievers" / "radiology", "radiology", gamma=0.08)
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    folder = Path(folder)
    sidecar = RetrieverSidecar(
        domain=domain,  # type: ignore[arg-type]  # checked above
        embed_dim=_embed_dim(folder),
        gamma=gamma,
        k_max_default=k_max_default,
        **(extra or {}),
    )
    path = folder / RETRIEVER_SIDECAR
    path.write_text(json.dumps(sidecar.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path
