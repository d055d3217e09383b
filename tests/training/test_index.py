"""The index builder: one point per distinct text, idempotent, one retriever per collection, and the
MedSynth retrieval corpus."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from services.common.clip import ClipModel
from services.retriever.store import VectorStore
from training.artifacts.clip import write_clip_artifact
from training.data.medsynth.generate import SynthConfig, synthesize
from training.data.records import DOMAINS
from training.index import ReportToIndex, index_reports, load_corpus, load_corpus_from_medsynth, point_id


class HashEncoder:
    """A stand-in text tower: a fixed random unit vector per text, and a record of what it encoded."""

    embed_dim = 16

    def __init__(self, weights_sha256: str = "a" * 64):
        self.weights_sha256 = weights_sha256
        self.encoded: list[str] = []

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded.extend(texts)
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).standard_normal(self.embed_dim)
            rows.append(row / np.linalg.norm(row))
        return np.asarray(rows, dtype=np.float32)


def report(i: int, text: str, *, dataset: str = "mimic-cxr", split: str = "retriever_train") -> ReportToIndex:
    return ReportToIndex(id=f"r{i}", text=text, dataset=dataset, split=split)


CORPUS = [
    report(0, "No acute cardiopulmonary process."),
    report(1, "Small left pleural effusion."),
    report(2, "No acute cardiopulmonary process.", dataset="iu-xray"),  # same text as r0
    report(3, "  Small left pleural effusion.\n"),  # same text once stripped
    report(4, "Cardiomegaly without pulmonary oedema."),
    report(5, "   "),  # blank: skipped
]


@pytest.fixture
def store(tmp_path: Path):
    store = VectorStore.open(path=tmp_path / "index")
    yield store
    store.close()


def _points(store: VectorStore, collection: str = "mmedrag_radiology") -> dict[str, dict]:
    records, _ = store.client.scroll(collection, limit=1000, with_payload=True)
    return {str(record.id): dict(record.payload or {}) for record in records}


def test_identical_texts_are_stored_once_with_all_their_report_ids(store: VectorStore):
    encoder = HashEncoder()
    summary = index_reports(store, "radiology", CORPUS, encoder, batch_size=2, progress=False)
    assert (summary.reports, summary.skipped_empty, summary.unique_texts) == (6, 1, 3)
    assert (summary.added, summary.updated, summary.unchanged, summary.points) == (3, 0, 0, 3)
    assert sorted(encoder.encoded) == sorted(
        {
            "No acute cardiopulmonary process.",
            "Small left pleural effusion.",
            "Cardiomegaly without pulmonary oedema.",
        }
    )
    points = _points(store)
    normal = points[point_id("No acute cardiopulmonary process.")]
    assert normal["report_ids"] == ["r0", "r2"] and normal["report_id"] == "r0"
    assert normal["datasets"] == ["mimic-cxr", "iu-xray"] and normal["dataset"] == "mimic-cxr"
    assert normal["split"] == "retriever_train" and normal["domain"] == "radiology"
    assert points[point_id("Small left pleural effusion.")]["text"] == "Small left pleural effusion."
    assert points[point_id("Small left pleural effusion.")]["report_ids"] == ["r1", "r3"]


def test_indexing_twice_changes_nothing(store: VectorStore):
    index_reports(store, "radiology", CORPUS, HashEncoder(), progress=False)
    before = _points(store)
    again = HashEncoder()
    summary = index_reports(store, "radiology", CORPUS, again, progress=False)
    assert again.encoded == []  # nothing re-embedded
    assert (summary.added, summary.updated, summary.unchanged, summary.points) == (0, 0, 3, 3)
    assert _points(store) == before


def test_point_ids_depend_on_the_text_only(tmp_path: Path):
    assert point_id("a report") == point_id("a report") != point_id("another report")
    ids = []
    for name in ("one", "two"):
        store = VectorStore.open(path=tmp_path / name)
        index_reports(store, "radiology", CORPUS, HashEncoder(), progress=False)
        ids.append(set(_points(store)))
        store.close()
    assert ids[0] == ids[1]


def test_indexing_more_reports_merges_their_ids(store: VectorStore):
    index_reports(store, "radiology", CORPUS[:2], HashEncoder(), progress=False)
    encoder = HashEncoder()
    summary = index_reports(store, "radiology", CORPUS, encoder, progress=False)
    assert encoder.encoded == ["Cardiomegaly without pulmonary oedema."]
    assert (summary.added, summary.updated, summary.unchanged, summary.points) == (1, 2, 0, 3)
    assert _points(store)[point_id("No acute cardiopulmonary process.")]["report_ids"] == ["r0", "r2"]


def test_search_with_a_stored_vector_finds_its_text(store: VectorStore):
    index_reports(store, "radiology", CORPUS, HashEncoder(), progress=False)
    target = point_id("Small left pleural effusion.")
    [record] = store.client.retrieve("mmedrag_radiology", [target], with_vectors=True)
    hits = store.search("mmedrag_radiology", record.vector, limit=3)
    assert hits[0].id == target and hits[0].text == "Small left pleural effusion."
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1].score < hits[0].score


def test_collection_records_the_retriever_and_refuses_another(store: VectorStore):
    index_reports(store, "radiology", CORPUS, HashEncoder("a" * 64), progress=False)
    assert store.collection_info("mmedrag_radiology").retriever_sha256 == "a" * 64
    with pytest.raises(ValueError) as caught:
        index_reports(store, "radiology", CORPUS, HashEncoder("b" * 64), progress=False)
    message = str(caught.value)
    assert "a" * 64 in message and "b" * 64 in message and "mmedrag_radiology" in message
    assert "mmedrag index --domain radiology --recreate" in message

    summary = index_reports(
        store, "radiology", CORPUS[:2], HashEncoder("b" * 64), progress=False, recreate=True
    )
    assert summary.recreated and summary.points == 2
    assert store.collection_info("mmedrag_radiology").retriever_sha256 == "b" * 64


def test_domains_get_their_own_collections(store: VectorStore):
    index_reports(store, "radiology", CORPUS[:1], HashEncoder(), progress=False)
    index_reports(
        store,
        "pathology",
        [report(9, "Invasive carcinoma.", dataset="pmc-oa")],
        HashEncoder(),
        progress=False,
    )
    assert [p["text"] for p in _points(store, "mmedrag_pathology").values()] == ["Invasive carcinoma."]
    assert [p["text"] for p in _points(store, "mmedrag_radiology").values()] == [
        "No acute cardiopulmonary process."
    ]
    with pytest.raises(ValueError, match="domain must be one of"):
        index_reports(store, "dermatology", CORPUS, HashEncoder(), progress=False)


# --------------------------------------------------------------------------------------------------
# With a real (tiny, random) open_clip retriever and the MedSynth corpus


@pytest.fixture(scope="module")
def medsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("medsynth") / "data"
    synthesize(SynthConfig(out=out, per_domain=16, image_size=64, workers=1), progress=False)
    return out


def test_medsynth_corpus_is_the_retriever_train_split(medsynth: Path):
    for domain in DOMAINS:
        raw = json.loads((medsynth / domain / "retriever_train.json").read_text())
        corpus = load_corpus_from_medsynth(medsynth, domain)
        assert [r.id for r in corpus] == [str(record["id"]) for record in raw]
        assert {r.split for r in corpus} == {"retriever_train"}
        text_key = "gpt4_summary" if domain == "ophthalmology" else "report"
        assert [r.text for r in corpus] == [record[text_key] for record in raw]
    assert {r.dataset for r in load_corpus_from_medsynth(medsynth, "ophthalmology")} == {"medsynth-fundus"}


def test_corpus_refuses_reports_of_other_splits(medsynth: Path, tmp_path: Path):
    records = json.loads((medsynth / "radiology" / "retriever_train.json").read_text())
    records[1]["split"] = "test"
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="split 'test'"):
        load_corpus(path, "retriever-radiology", domain="radiology", dataset="mimic-cxr")


def test_real_retriever_text_query_ranks_its_own_report_first(medsynth: Path, tmp_path: Path):
    root = tmp_path / "artifacts"
    write_clip_artifact(root / "retrievers" / "pathology", seed=3)
    clip = ClipModel.load(root / "retrievers" / "pathology", root=root)
    corpus = load_corpus_from_medsynth(medsynth, "pathology")
    store = VectorStore.open(path=root / "index")
    try:
        summary = index_reports(store, "pathology", corpus, clip, batch_size=4, progress=False)
        assert summary.points == len({r.text.strip() for r in corpus})
        info = store.collection_info("mmedrag_pathology")
        assert (info.vector_size, info.retriever_sha256) == (clip.embed_dim, clip.weights_sha256)
        for text in [corpus[0].text, corpus[-1].text]:
            [query] = clip.encode_texts([text])
            hits = store.search("mmedrag_pathology", query, limit=3)
            assert hits[0].text == text.strip()
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    finally:
        store.close()


def test_index_command_builds_the_collection_from_a_medsynth_folder(medsynth: Path, tmp_path: Path):
    import typer
    from typer.testing import CliRunner

    from training.index import index_cli

    root = tmp_path / "artifacts"
    write_clip_artifact(root / "retrievers" / "ophthalmology", seed=2)
    app = typer.Typer()
    app.command("index")(index_cli)
    args = ["--domain", "ophthalmology", "--data", str(medsynth), "--artifacts", str(root)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    unique = len({r.text for r in load_corpus_from_medsynth(medsynth, "ophthalmology")})
    assert f"mmedrag_ophthalmology: {unique} texts ({unique} added" in first.output
    again = CliRunner().invoke(app, args)
    assert f"(0 added, 0 updated, {unique} unchanged)" in again.output
    neither = CliRunner().invoke(app, ["--domain", "ophthalmology", "--artifacts", str(root)])
    assert neither.exit_code != 0 and "--data" in neither.output
