"""``mmedrag calibrate``: the objective, a constructed case with a known answer, the written sidecar, and
the retriever service serving the calibrated gamma."""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from services.common.artifacts import INDEX_DIR, RETRIEVERS_DIR
from services.common.clip import ClipModel
from services.retriever.protocol import RETRIEVER_SIDECAR, RetrieverSidecar
from services.retriever.selection import select_paper
from training.artifacts.clip import write_clip_artifact
from training.artifacts.retriever import write_retriever_sidecar
from training.calibrate import (
    GAMMA_GRID,
    KEEP_ALL_GAMMA,
    calibrate_cli,
    calibrate_gamma,
    choose_gamma,
    kept_agreement_f1,
    write_calibration,
)
from training.data.medsynth.generate import SynthConfig, synthesize
from training.evaluate.retrieval import (
    cosine_top_k,
    encode_images,
    encode_texts,
    load_finding_corpus,
    load_split,
)

DOMAIN = "radiology"


# ------------------------------------------------------------------------------------------- objective


def test_objective_is_the_soft_f1_of_kept_versus_agreeing_contexts():
    agreements = [1.0, 1.0, 0.0, 0.0]
    assert kept_agreement_f1(agreements, 2) == 1.0  # exactly the agreeing ones
    assert kept_agreement_f1(agreements, 1) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert kept_agreement_f1(agreements, 3) == pytest.approx(0.8)  # precision 2/3, recall 1
    assert kept_agreement_f1([0.5, 0.5], 1) == pytest.approx(2 * 0.5 / (1 + 1.0))  # partial agreement
    assert kept_agreement_f1([0.0, 0.0], 2) == 0.0  # nothing agrees: nothing to gain
    assert kept_agreement_f1([0.0, 0.0], 0) == 1.0  # ... and keeping nothing is right
    with pytest.raises(ValueError, match="k must be between 0 and 2"):
        kept_agreement_f1([1.0, 0.0], 3)


def test_ties_go_to_the_median_tied_gamma_and_never_cutting_wins_when_nothing_helps():
    # Agreement falls nowhere along the ranking: cutting only loses recall, so never cutting is best.
    scores = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, 0.2]])
    result = choose_gamma(scores, np.ones_like(scores), domain=DOMAIN, k_min=1, k_max=3)
    assert result.gamma == KEEP_ALL_GAMMA and result.tied == (KEEP_ALL_GAMMA,)
    assert result.sidecar_block()["keep_all"] is True and result.chosen.truncation_rate == 0.0

    # The first context alone agrees and every query has a cliff after it: every gamma below the smallest
    # cliff (log(0.7/0.2) = 1.25 > 0.5) ties, so the median of the finite grid is chosen.
    agreements = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    scores = np.array([[0.9, 0.3, 0.29], [0.7, 0.2, 0.19]])
    result = choose_gamma(scores, agreements, domain=DOMAIN, k_min=1, k_max=3)
    finite = [g for g in GAMMA_GRID if g != KEEP_ALL_GAMMA]
    assert result.tied == tuple(finite) and result.gamma == finite[(len(finite) - 1) // 2] == 0.25


# --------------------------------------------------------------------- the constructed case: cut at 2

# Each query's ranked similarities: a small step inside the top two (u_1 = log(0.9/0.87) = 0.034), a
# cliff after them (u_2 = log(0.87/0.5) = 0.55) and small steps after that (about 0.04 each).
DESIGNED = (0.90, 0.87, 0.50, 0.48, 0.46, 0.44, 0.42)


def designed_vectors(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Query i = e_i; query i's r-th text = S_r e_i + sqrt(1 - S_r^2) (a direction of its own)."""
    k = len(DESIGNED)
    dim = n_queries + n_queries * k
    queries = np.eye(n_queries, dim, dtype=np.float32)
    texts = np.zeros((n_queries * k, dim), dtype=np.float32)
    for i in range(n_queries):
        for r, s in enumerate(DESIGNED):
            texts[i * k + r, i] = s
            texts[i * k + r, n_queries + i * k + r] = math.sqrt(1 - s * s)
    return queries, texts


def test_designed_embeddings_calibrate_to_a_cut_after_rank_two():
    n, k = 5, len(DESIGNED)
    queries, texts = designed_vectors(n)
    indices, scores = cosine_top_k(queries, texts, 6)
    assert np.allclose(scores, np.tile(DESIGNED[:6], (n, 1)), atol=1e-6)
    assert (indices // k == np.arange(n)[:, None]).all()  # each query finds its own texts, in order
    agreements = (indices % k < 2).astype(float)  # the top two agree, the rest do not

    result = choose_gamma(scores, agreements, domain=DOMAIN, k_min=1, k_max=6)
    assert math.log(0.90 / 0.87) < result.gamma < math.log(0.87 / 0.50)
    assert result.k_histogram == {2: n} and result.chosen.score == pytest.approx(1.0)
    assert result.chosen.truncation_rate == 1.0 and result.chosen.precision == pytest.approx(1.0)
    assert min(result.tied) == 0.035 and max(result.tied) == 0.5  # every gamma between the two steps
    by_gamma = {o.gamma: o for o in result.outcomes}
    assert by_gamma[0.0].ks == (1,) * n and by_gamma[0.0].score == pytest.approx(2 / 3)  # cuts too early
    assert result.keep_all.ks == (6,) * n and result.keep_all.score == pytest.approx(2 * 2 / (6 + 2))


@dataclass(frozen=True)
class Built:
    data: Path  # MedSynth folder
    root: Path  # artifacts folder: retrievers/radiology + index


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A tiny MedSynth folder, a random radiology retriever and its embedded index (once per module)."""
    from services.retriever.store import VectorStore
    from training.index import index_reports, load_corpus_from_medsynth

    base = tmp_path_factory.mktemp("calibrate")
    data = base / "medsynth"
    synthesize(SynthConfig(out=data, per_domain=16, image_size=64, workers=1), progress=False)
    root = base / "artifacts"
    folder = root / RETRIEVERS_DIR / DOMAIN
    write_clip_artifact(folder, seed=3)
    write_retriever_sidecar(folder, DOMAIN, k_max_default=6, extra={"trained_by": "test"})
    store = VectorStore.open(path=root / INDEX_DIR)
    try:
        index_reports(
            store,
            DOMAIN,
            load_corpus_from_medsynth(data, DOMAIN),
            ClipModel.load(folder, root=root),
            progress=False,
        )
    finally:
        store.close()
    return Built(data=data, root=root)


def copy_artifacts(built: Built, tmp_path: Path) -> Path:
    target = tmp_path / "artifacts"
    shutil.copytree(built.root, target)
    return target


class DesignedEncoder:
    """Every image gets the same designed embedding; corpus texts get the designed text vectors in order."""

    def __init__(self, corpus_texts: tuple[str, ...]):
        _, texts = designed_vectors(1)
        self.dim = texts.shape[1] + len(corpus_texts)
        self.text_vectors: dict[str, np.ndarray] = {}
        for j, text in enumerate(corpus_texts):
            vector = np.zeros(self.dim, dtype=np.float32)
            if j < len(texts):
                vector[: texts.shape[1]] = texts[j]
            else:  # more texts than designed ones: far away from every query
                vector[texts.shape[1] + j] = 1.0
            self.text_vectors[text] = vector
        self.query = np.zeros(self.dim, dtype=np.float32)
        self.query[0] = 1.0

    def encode_images(self, images):
        return np.tile(self.query, (len(images), 1))

    def encode_texts(self, texts):
        return np.stack([self.text_vectors[text] for text in texts])


def test_calibration_on_a_constructed_medsynth_case_cuts_at_two(built: Built, tmp_path: Path):
    # Rewrite the ground truth: the validation images and the reports of the first two corpus texts
    # share finding "x"; every other corpus report has finding "y" only.
    data = tmp_path / "medsynth"
    shutil.copytree(built.data, data)
    corpus = load_finding_corpus(data, DOMAIN)
    agreeing = set(corpus.report_ids[0] + corpus.report_ids[1])
    lines = []
    for line in (data / "findings.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["domain"] == DOMAIN and record["split"] in ("retriever_train", "retriever_val"):
            name = "x" if record["split"] == "retriever_val" or record["id"] in agreeing else "y"
            record["findings"] = [{"name": name, "severity": None, "subtle": False}]
        lines.append(json.dumps(record))
    (data / "findings.jsonl").write_text("\n".join(lines) + "\n")

    folder = built.root / RETRIEVERS_DIR / DOMAIN  # only its sidecar is read (k_max default 6)
    result = calibrate_gamma(folder, data, DOMAIN, encoder=DesignedEncoder(corpus.texts))
    queries = len(load_split(data, DOMAIN, "retriever_val"))
    assert (result.k_min, result.k_max, result.queries) == (1, 6, queries)
    assert result.k_histogram == {2: queries} and result.chosen.score == pytest.approx(1.0)
    assert math.log(0.90 / 0.87) < result.gamma < math.log(0.87 / 0.50)


# ------------------------------------------------------------------ sidecar, service and command line


async def test_written_sidecar_validates_and_the_service_serves_the_calibrated_gamma(
    built: Built, tmp_path: Path
):
    from services.retriever.app import build_app
    from services.retriever.service import RetrieverService
    from services.retriever.settings import RetrieverSettings

    root = copy_artifacts(built, tmp_path)
    folder = root / RETRIEVERS_DIR / DOMAIN
    # A grid without the service default (0.05), so the response can only show the calibrated value.
    result = calibrate_gamma(folder, built.data, DOMAIN, grid=(0.0123, 0.0456, 0.321))
    path = write_calibration(folder, result)

    sidecar = RetrieverSidecar.model_validate_json(path.read_text())
    assert sidecar.gamma == result.gamma in (0.0123, 0.0456, 0.321)
    assert sidecar.k_max_default == 6 and sidecar.model_extra["trained_by"] == "test"  # kept
    block = sidecar.model_extra["calibration"]
    assert block["objective"] == "dice_kept_vs_agreeing" and block["gamma"] == result.gamma
    assert block["score"] == result.chosen.score and block["k_max"] == 6
    assert sum(block["k_histogram"].values()) == block["queries"] == result.queries
    assert block["retriever_sha256"] == ClipModel.load(folder, root=root).weights_sha256

    service = RetrieverService(RetrieverSettings(artifacts=root, domains=(DOMAIN,)))
    service.load()
    try:
        query = load_split(built.data, DOMAIN, "retriever_val")[0]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app(service=service)), base_url="http://retriever"
        ) as client:
            response = await client.post(
                "/retrieve",
                data={"domain": DOMAIN},
                files={"image": ("q.png", io.BytesIO(query.image.read_bytes()), "image/png")},
            )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["gamma"] == result.gamma and body["k_max"] == 6
        scores = [c["score"] for c in body["contexts"]]
        assert body["k"] == select_paper(scores, gamma=result.gamma, k_min=1, k_max=6)

        # The in-process ranking used for calibration is the service's ranking.
        clip = ClipModel.load(folder, root=root)
        corpus = load_finding_corpus(built.data, DOMAIN)
        indices, in_process = cosine_top_k(
            encode_images(clip, [query.image]), encode_texts(clip, corpus.texts), 6
        )
        assert [corpus.texts[j] for j in indices[0]] == [c["text"] for c in body["contexts"]]
        assert np.allclose(in_process[0], scores, atol=1e-5)
    finally:
        service.close()


def run_cli(args: list[str]):
    app = typer.Typer()
    app.command()(calibrate_cli)
    return CliRunner().invoke(app, args)


def test_command_prints_truncation_and_k_histogram_and_writes_the_sidecar(built: Built, tmp_path: Path):
    root = copy_artifacts(built, tmp_path)
    sidecar_path = root / RETRIEVERS_DIR / DOMAIN / RETRIEVER_SIDECAR
    before = sidecar_path.read_text()
    args = ["--domain", DOMAIN, "--data", str(built.data), "--artifacts", str(root), "--k-max", "4"]

    dry = run_cli([*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing written" in dry.output and sidecar_path.read_text() == before

    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "truncation fired for" in result.output and "k distribution:" in result.output
    assert "k=" in result.output and "wrote gamma" in result.output
    sidecar = RetrieverSidecar.model_validate_json(sidecar_path.read_text())
    block = sidecar.model_extra["calibration"]
    assert block["k_max"] == 4 and block["k_min"] == 1 and sidecar.gamma == block["gamma"]
    assert all(1 <= int(k) <= 4 for k in block["k_histogram"])

    wrong = run_cli(
        ["--domain", "pathology", "--data", str(built.data), "--retriever", str(sidecar_path.parent)]
    )
    assert wrong.exit_code != 0 and "is for domain 'radiology'" in str(wrong.exception)
