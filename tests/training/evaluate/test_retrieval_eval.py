"""``mmedrag eval retrieval``: the metrics on hand-made inputs, the data it reads, and the command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from services.common.artifacts import RETRIEVERS_DIR
from services.common.clip import ClipModel
from services.common.images import decode_image
from training.artifacts.clip import write_clip_artifact
from training.artifacts.retriever import write_retriever_sidecar
from training.data.medsynth.generate import SynthConfig, synthesize
from training.data.medsynth.reader import read_findings
from training.data.records import DOMAINS
from training.evaluate.retrieval import (
    FindingCorpus,
    context_agreements,
    cosine_top_k,
    eval_retrieval_cli,
    evaluate_retriever,
    finding_agreement,
    load_finding_corpus,
    load_split,
    recall_at_k,
    retrieval_ranks,
    untrained_retriever,
)

# ------------------------------------------------------------------------------------------ metrics


def test_finding_agreement_is_jaccard_with_normal_agreeing_with_normal():
    assert finding_agreement(set(), set()) == 1.0  # two normal studies
    assert finding_agreement(set(), {"nodule"}) == 0.0  # normal vs abnormal
    assert finding_agreement({"nodule"}, {"effusion"}) == 0.0  # disjoint
    assert finding_agreement({"nodule", "effusion"}, {"nodule", "effusion"}) == 1.0
    assert finding_agreement({"nodule", "effusion"}, {"effusion", "cardiomegaly"}) == pytest.approx(1 / 3)
    assert (
        finding_agreement({"a"}, {"a", "b", "c", "d"})
        == finding_agreement({"a", "b", "c", "d"}, {"a"})
        == 0.25
    )


def test_recall_at_k_on_a_hand_made_similarity_matrix():
    similarity = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # positive 0 ranks 1
            [0.5, 0.4, 0.8, 0.1],  # positive 1 ranks 3
            [0.2, 0.7, 0.6, 0.7],  # positive 3 ties with column 1: counted against it, rank 2
            [0.3, 0.2, 0.1, 0.0],  # positive 3 ranks last (4)
        ]
    )
    positives = [0, 1, 3, 3]
    assert retrieval_ranks(similarity, positives).tolist() == [1, 3, 2, 4]
    assert recall_at_k(similarity, positives, (1, 2, 3, 5)) == {1: 0.25, 2: 0.5, 3: 0.75, 5: 1.0}
    # A constant encoder ties everything: no credit at k = 1.
    assert recall_at_k(np.ones((3, 3)), [0, 1, 2], (1, 3)) == {1: 0.0, 3: 1.0}
    with pytest.raises(ValueError, match="one positive per query"):
        recall_at_k(similarity, [0, 1])
    with pytest.raises(ValueError, match="column indices"):
        recall_at_k(similarity, [0, 1, 2, 4])


def test_cosine_top_k_normalises_orders_and_chunks():
    rng = np.random.default_rng(0)
    queries, gallery = rng.standard_normal((7, 5)) * 3, rng.standard_normal((9, 5)) * 0.2
    indices, scores = cosine_top_k(queries, gallery, 4)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    expected = unit(queries) @ unit(gallery).T
    assert np.array_equal(indices, np.argsort(-expected, axis=1)[:, :4])
    assert np.allclose(scores, np.sort(expected, axis=1)[:, ::-1][:, :4], atol=1e-6)
    chunked = cosine_top_k(queries, gallery, 4, chunk=2)
    assert np.array_equal(chunked[0], indices) and np.allclose(chunked[1], scores)
    assert cosine_top_k(queries, gallery, 50)[0].shape == (7, 9)  # capped at the gallery


def test_agreement_of_a_text_shared_by_several_reports_is_their_mean():
    corpus = FindingCorpus(
        domain="radiology",
        texts=("normal", "effusion"),
        report_ids=(("a", "b"), ("c",)),
        findings=((frozenset(), frozenset({"nodule"})), (frozenset({"effusion"}),)),
    )
    assert corpus.agreement(frozenset(), 0) == 0.5 and corpus.agreement(frozenset({"effusion"}), 1) == 1.0
    from training.evaluate.retrieval import ImageText

    queries = [ImageText("q", Path("q.png"), "t", frozenset({"nodule"}))]
    assert context_agreements(queries, corpus, np.array([[0, 1]])).tolist() == [[0.5, 0.0]]


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def medsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "medsynth"
    synthesize(SynthConfig(out=out, per_domain=16, image_size=64, workers=1), progress=False)
    return out


def test_splits_carry_the_corpus_text_kind_and_the_ground_truth_findings(medsynth: Path):
    from training.index import load_corpus_from_medsynth

    truth = {item.id: item for item in read_findings(medsynth)}
    for domain in DOMAINS:
        corpus = load_finding_corpus(medsynth, domain)
        indexed = load_corpus_from_medsynth(medsynth, domain)
        assert list(corpus.texts) == list(
            dict.fromkeys(r.text.strip() for r in indexed)
        )  # as the index stores
        for ids, sets in zip(corpus.report_ids, corpus.findings, strict=True):
            assert [truth[i].finding_names for i in ids] == list(sets)  # report id == image id
        for split in ("retriever_val", "test"):
            items = load_split(medsynth, domain, split)
            assert {truth[item.id].split for item in items} == {split}
            assert all(
                item.findings == truth[item.id].finding_names and item.image.is_file() for item in items
            )
    # Ophthalmology retrieves the short gpt4_summary, also for the test split's gallery.
    test_reports = json.loads((medsynth / "ophthalmology" / "test_report.json").read_text())
    summaries = {r["id"]: r["gpt4_summary"] for r in test_reports}
    assert {i.id: i.text for i in load_split(medsynth, "ophthalmology", "test")} == summaries


def test_a_report_id_that_is_no_image_id_is_refused(medsynth: Path, tmp_path: Path):
    import shutil

    data = tmp_path / "medsynth"
    shutil.copytree(medsynth, data)
    path = data / "pathology" / "retriever_val.json"
    records = json.loads(path.read_text())
    records[0]["id"] = "he-99999"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"'he-99999' is no image id of findings\.jsonl"):
        load_split(data, "pathology", "retriever_val")


class OracleEncoder:
    """Maps each test image onto the embedding of its own report text (or its opposite): a perfect
    (or worst) retriever, to check the metric plumbing end to end."""

    def __init__(self, items, *, sign: float = 1.0):
        self.sign = sign
        self.text_of = {self._key(decode_image(item.image.read_bytes()).image): item.text for item in items}

    @staticmethod
    def _key(image) -> str:
        return hashlib.sha256(image.tobytes()).hexdigest()

    @staticmethod
    def _text_vector(text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(16).astype(np.float32)

    def encode_images(self, images):
        return np.stack([self.sign * self._text_vector(self.text_of[self._key(image)]) for image in images])

    def encode_texts(self, texts):
        return np.stack([self._text_vector(text) for text in texts])


@pytest.mark.parametrize("domain", DOMAINS)
def test_perfect_and_worst_retrievers_score_the_extremes(medsynth: Path, domain: str):
    items = load_split(medsynth, domain, "test")
    best = evaluate_retriever(OracleEncoder(items), medsynth, domain)
    worst = evaluate_retriever(OracleEncoder(items, sign=-1.0), medsynth, domain)
    assert best.queries == len(items) and best.gallery == len({i.text for i in items})
    assert best.recall == {1: 1.0, 5: 1.0, 10: 1.0}
    assert worst.recall[1] == (0.0 if best.gallery > 1 else 1.0)
    assert set(best.agreement) == {1, 5} and all(0.0 <= v <= 1.0 for v in best.agreement.values())


# ------------------------------------------------------------------------------------------ command


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-artifacts")
    for seed, domain in enumerate(("radiology", "pathology"), start=1):
        folder = root / RETRIEVERS_DIR / domain
        write_clip_artifact(folder, seed=seed)
        write_retriever_sidecar(folder, domain)
    write_clip_artifact(root / "shared", seed=9)
    return root


def test_untrained_retriever_copies_the_architecture_with_seeded_random_weights(
    artifacts: Path, tmp_path: Path
):
    folder = artifacts / RETRIEVERS_DIR / "radiology"
    trained = ClipModel.load(folder, root=artifacts)
    first = untrained_retriever(folder, seed=5, workdir=tmp_path / "a")
    again = untrained_retriever(folder, seed=5, workdir=tmp_path / "b")
    other = untrained_retriever(folder, seed=6, workdir=tmp_path / "c")
    assert first.config == trained.config  # same model_cfg and preprocessing
    assert first.weights_sha256 == again.weights_sha256 != other.weights_sha256
    assert first.weights_sha256 != trained.weights_sha256


def run_cli(args: list[str]):
    app = typer.Typer()
    app.command()(eval_retrieval_cli)
    return CliRunner().invoke(app, args)


def test_command_writes_the_table_and_json_for_every_retriever_kind(
    medsynth: Path, artifacts: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = ["--data", str(medsynth), "--artifacts", str(artifacts), "--out", str(out), "--threads", "1"]
    result = run_cli([*args, "--shared", str(artifacts / "shared")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "retrieval.json").read_text())
    rows = {(row["domain"], row["retriever"]): row for row in report["rows"]}
    assert set(rows) == {(d, kind) for d in DOMAINS for kind in ("domain", "shared", "untrained")}
    assert "no retriever in" in rows[("ophthalmology", "domain")]["skipped"]  # none was built for it
    for key in [("radiology", "domain"), ("pathology", "shared"), ("ophthalmology", "untrained")]:
        row = rows[key]
        assert row["skipped"] is None and 0 <= row["recall@1"] <= row["recall@5"] <= row["recall@10"] <= 1
        assert 0 <= row["agreement@1"] <= 1 and 0 <= row["agreement@5"] <= 1
    untrained = {rows[(d, "untrained")]["weights_sha256"] for d in ("radiology", "pathology")}
    trained = {rows[(d, "domain")]["weights_sha256"] for d in ("radiology", "pathology")}
    assert len(untrained) == 1 and len(trained) == 2 and not untrained & trained  # same config, same seed
    markdown = (out / "retrieval.md").read_text()
    assert markdown.startswith("| domain | retriever | R@1 | R@5 | R@10 | agree@1 | agree@5 |")
    assert "| radiology | domain |" in markdown and "| radiology | domain |" in result.output
    assert "wrote" in result.output

    # Without --shared those rows are skipped with a note; --domain restricts the domains.
    alone = run_cli([*args, "--domain", "pathology"])
    assert alone.exit_code == 0, alone.output
    rows = json.loads((out / "retrieval.json").read_text())["rows"]
    assert [(r["retriever"], r["skipped"]) for r in rows] == [
        ("domain", None),
        ("shared", "no --shared retriever given"),
        ("untrained", None),
    ]
    assert "pathology / shared: skipped (no --shared retriever given)" in alone.output
