"""Tiny retriever artifacts built once per session: a small MedSynth folder, one random open_clip
retriever per domain (different seeds) and the embedded index of each domain's corpus."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.artifacts import INDEX_DIR, RETRIEVERS_DIR
from services.common.clip import ClipModel
from services.retriever.service import RetrieverService
from services.retriever.settings import RetrieverSettings
from services.retriever.store import VectorStore
from training.artifacts.clip import write_clip_artifact
from training.artifacts.retriever import write_retriever_sidecar
from training.data.medsynth.generate import SynthConfig, synthesize
from training.data.records import DOMAINS
from training.index import ReportToIndex, index_reports, load_corpus_from_medsynth

SEEDS = {domain: seed for seed, domain in enumerate(DOMAINS, start=1)}


@dataclass(frozen=True)
class RetrieverArtifacts:
    root: Path  # artifacts folder: retrievers/<domain> + index
    data: Path  # the MedSynth folder the corpora come from
    corpora: dict[str, list[ReportToIndex]]

    def texts(self, domain: str) -> set[str]:
        return {report.text.strip() for report in self.corpora[domain]}

    def image(self, domain: str, index: int = 0) -> bytes:
        """Bytes of one of the domain's MedSynth images, as uploaded."""
        paths = sorted((self.data / domain / "images").iterdir())
        return paths[index].read_bytes()


def build_retriever(root: Path, domain: str, seed: int) -> ClipModel:
    folder = root / RETRIEVERS_DIR / domain
    write_clip_artifact(folder, config_name="tiny", seed=seed)
    write_retriever_sidecar(folder, domain)
    return ClipModel.load(folder, root=root)


@pytest.fixture(scope="session")
def retriever_artifacts(tmp_path_factory: pytest.TempPathFactory) -> RetrieverArtifacts:
    base = tmp_path_factory.mktemp("retriever")
    data = base / "medsynth"
    synthesize(SynthConfig(out=data, per_domain=16, image_size=64, workers=1), progress=False)
    root = base / "artifacts"
    corpora = {domain: load_corpus_from_medsynth(data, domain) for domain in DOMAINS}
    store = VectorStore.open(path=root / INDEX_DIR)
    try:
        for domain in DOMAINS:
            clip = build_retriever(root, domain, SEEDS[domain])
            index_reports(store, domain, corpora[domain], clip, progress=False)
    finally:
        store.close()
    return RetrieverArtifacts(root=root, data=data, corpora=corpora)


@pytest.fixture(scope="session")
def retriever_service(retriever_artifacts: RetrieverArtifacts):
    """The loaded service; it owns the embedded store (file lock) for the whole session."""
    service = RetrieverService(RetrieverSettings(artifacts=retriever_artifacts.root))
    service.load()
    yield service
    service.close()


@pytest.fixture
def copied_artifacts(retriever_artifacts: RetrieverArtifacts, tmp_path: Path) -> Path:
    """A private copy of the artifacts (index included) a test may break."""
    target = tmp_path / "artifacts"
    shutil.copytree(retriever_artifacts.root, target)
    return target


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
