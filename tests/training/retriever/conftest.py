"""A small MedSynth folder shared by the retriever-training tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data.medsynth.generate import SynthConfig, synthesize


@pytest.fixture(scope="session")
def retriever_medsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images per domain at 64 px: about 10 retriever-train and 2 retriever-val pairs per domain."""
    out = tmp_path_factory.mktemp("retriever-training") / "medsynth"
    synthesize(SynthConfig(out=out, per_domain=16, image_size=64, workers=1), progress=False)
    return out
