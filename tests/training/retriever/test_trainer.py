"""``RetrieverTrainer`` on a tiny MedSynth folder: it learns, writes artifacts the services load unchanged,
and resumes where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.common.artifacts import INDEX_DIR, RETRIEVERS_DIR
from services.common.clip import OPEN_CLIP_WEIGHTS, ClipModel
from services.retriever.protocol import RetrieveParams
from services.retriever.service import RetrieverService
from services.retriever.settings import RetrieverSettings
from services.retriever.store import VectorStore
from training.index import index_reports, load_corpus_from_medsynth
from training.retriever.cli import retriever_cli
from training.retriever.config import RetrieverTrainingConfig
from training.retriever.data import medsynth_pairs
from training.retriever.model import build_model, load_model_config
from training.retriever.trainer import CHECKPOINT, METRICS, EpochResult, RetrieverTrainer

DOMAIN = "pathology"


def tiny_config(data: Path, out: Path, **overrides) -> RetrieverTrainingConfig:
    """The tiny open_clip config, a few steps, one thread: seconds per run."""
    settings = {
        "domain": DOMAIN,
        "data_dir": data,
        "out": out,
        "model": "tiny",
        "epochs": 3,
        "batch_size": 4,
        "lr": 5e-4,
        "warmup_fraction": 0.1,
        "augment": False,
        "num_threads": 1,
        "progress": False,
    }
    return RetrieverTrainingConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(retriever_medsynth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny training run into an artifacts layout: <root>/retrievers/<domain>."""
    root = tmp_path_factory.mktemp("trained") / "artifacts"
    out = root / RETRIEVERS_DIR / DOMAIN
    metrics = RetrieverTrainer(tiny_config(retriever_medsynth, out, epochs=12)).train()
    return out, metrics


def test_training_lowers_the_loss_and_changes_the_weights(trained: tuple[Path, dict]):
    out, metrics = trained
    losses = [row["train_loss"] for row in metrics["epochs"]]
    # From above chance (ln 4 = 1.39 for 4 pairs a batch) to well below it.
    assert len(losses) == 12 and losses[0] > 1.5 and losses[-1] < 0.6 * losses[0]
    initial = build_model(load_model_config("tiny"), seed=0).model.state_dict()
    saved = load_file(str(out / OPEN_CLIP_WEIGHTS))
    changed = [name for name, value in saved.items() if not torch.equal(value, initial[name])]
    assert "visual.conv1.weight" in changed and "token_embedding.weight" in changed
    assert len(changed) > 0.9 * len(saved)


def test_metrics_json_records_the_run(trained: tuple[Path, dict], retriever_medsynth: Path):
    out, metrics = trained
    assert json.loads((out / METRICS).read_text()) == metrics
    train_pairs = len(medsynth_pairs(retriever_medsynth, DOMAIN, "retriever_train"))
    schedule = metrics["schedule"]
    assert schedule["steps_per_epoch"] == train_pairs // 4
    assert schedule["total_steps"] == 12 * schedule["steps_per_epoch"]
    assert schedule["warmup_steps"] == -(-schedule["total_steps"] // 10)  # ceil(0.1 * total)
    assert metrics["completed"] and metrics["best_epoch"] in range(1, 13)
    assert metrics["best"]["epoch"] == metrics["best_epoch"]
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r5"} <= metrics["best"].keys()
    assert len(metrics["data"]["sha256"]) == 64 and metrics["data"]["train_pairs"] == train_pairs
    assert metrics["settings"]["lr"] == 5e-4 and metrics["paper_settings"]["lr"] == 1e-3
    assert not (out / CHECKPOINT).exists()  # removed after the last epoch unless keep_checkpoint


def test_the_artifact_loads_in_clip_model_with_its_sidecar(trained: tuple[Path, dict]):
    out, metrics = trained
    root = out.parent.parent
    clip = ClipModel.load(out, root=root)
    sidecar = json.loads((out / "retriever.json").read_text())
    assert sidecar["domain"] == DOMAIN and sidecar["embed_dim"] == clip.embed_dim
    assert sidecar["epoch"] == metrics["best_epoch"]


async def test_the_retriever_service_serves_the_trained_artifact(
    trained: tuple[Path, dict], retriever_medsynth: Path, tmp_path: Path
):
    out, _ = trained
    root = tmp_path / "artifacts"
    shutil.copytree(out, root / RETRIEVERS_DIR / DOMAIN)  # a moved artifact still loads
    clip = ClipModel.load(root / RETRIEVERS_DIR / DOMAIN, root=root)
    corpus = load_corpus_from_medsynth(retriever_medsynth, DOMAIN)
    store = VectorStore.open(path=root / INDEX_DIR)
    try:
        index_reports(store, DOMAIN, corpus, clip, progress=False)
    finally:
        store.close()
    service = RetrieverService(RetrieverSettings(artifacts=root, domains=DOMAIN))
    service.load()
    try:
        pair = medsynth_pairs(retriever_medsynth, DOMAIN, "retriever_train")[0]
        image = Image.open(pair.image).convert("RGB")
        response = await service.retrieve(image, RetrieveParams(domain=DOMAIN, k_max=3, strategy="fixed"))
    finally:
        service.close()
    texts = {report.text for report in corpus}
    assert len(response.contexts) == 3 and all(context.text in texts for context in response.contexts)
    # The service's score is the cosine of the trained towers' embeddings.
    expected = clip.encode_images([image]) @ clip.encode_texts([response.contexts[0].text]).T
    assert response.contexts[0].score == pytest.approx(float(expected[0, 0]), abs=1e-4)


class Interrupt(Exception):
    pass


def test_resume_continues_from_the_saved_epoch(retriever_medsynth: Path, tmp_path: Path):
    def stop_after_first(result: EpochResult) -> None:
        if result.epoch == 1:
            raise Interrupt

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        RetrieverTrainer(
            tiny_config(retriever_medsynth, interrupted, epochs=3), on_epoch_end=stop_after_first
        ).train()
    checkpoint = torch.load(interrupted / CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 1 and {"optimizer", "scheduler", "model"} <= checkpoint.keys()

    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        RetrieverTrainer(tiny_config(retriever_medsynth, interrupted, epochs=3, lr=1e-3, resume=True)).train()

    seen: list[int] = []
    resumed = RetrieverTrainer(
        tiny_config(retriever_medsynth, interrupted, epochs=3, resume=True, keep_checkpoint=True),
        on_epoch_end=lambda result: seen.append(result.epoch),
    ).train()
    assert seen == [2, 3]  # epoch 1 was not trained again
    assert [row["epoch"] for row in resumed["epochs"]] == [1, 2, 3]

    straight = RetrieverTrainer(
        tiny_config(retriever_medsynth, tmp_path / "straight", epochs=3, keep_checkpoint=True)
    ).train()
    # Same seeds per epoch: the resumed run ends where an uninterrupted one does.
    for key in ("train_loss", "val_loss", "mean_r5"):
        assert [row[key] for row in resumed["epochs"]] == pytest.approx(
            [row[key] for row in straight["epochs"]]
        )
    a = torch.load(interrupted / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)["model"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_the_cli_function_trains_and_reports(retriever_medsynth: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    retriever_cli(
        domain="ophthalmology",
        data=retriever_medsynth,
        out=out,
        model="tiny",
        epochs=1,
        batch_size=4,
        max_steps=2,
        num_threads=1,
        progress=False,
    )
    printed = capsys.readouterr().out
    assert "untrained" in printed and "kept" in printed and str(out) in printed
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["schedule"]["total_steps"] == 2 and metrics["epochs"][0]["global_step"] == 2
    # Harvard-FairVLMed: the retriever learns the texts its corpus indexes (gpt4_summary).
    corpus = {report.text for report in load_corpus_from_medsynth(retriever_medsynth, "ophthalmology")}
    assert {
        pair.text for pair in medsynth_pairs(retriever_medsynth, "ophthalmology", "retriever_train")
    } == corpus
    assert np.isfinite(metrics["epochs"][0]["train_loss"])
