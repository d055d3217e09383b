"""``mmedrag train classifier`` on a tiny tower and a tiny MedSynth folder, and its negatives generator."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file

import training.classifier as classifier_module
from mmedrag.errors import run_with_clean_errors
from services.classifier.app import build_app
from services.classifier.service import CLASSIFIER_CONFIG, CLASSIFIER_HEAD, DomainClassifier
from services.classifier.settings import ClassifierSettings
from services.common.clip import OPEN_CLIP_WEIGHTS
from training.artifacts.clip import create_clip_model
from training.classifier import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    ClassifierTrainingConfig,
    calibrate_threshold,
    classifier_cli,
    classifier_loss,
    confusion_matrix,
    format_metrics_table,
    load_medsynth_splits,
    train_classifier,
)
from training.data.medsynth.generate import SynthConfig, synthesize
from training.data.negatives import NEGATIVE_KINDS, make_negative_images, negative_kind
from training.data.records import DOMAINS


@pytest.fixture(scope="module")
def medsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("medsynth") / "ms"
    synthesize(SynthConfig(out=out, per_domain=16, image_size=64, seed=0), progress=False)
    return out


def tiny_config(data: Path, out: Path, **overrides) -> ClassifierTrainingConfig:
    """A run of a few seconds: the tiny tower, few negatives; a raised learning rate so two short
    epochs visibly move the loss."""
    arguments = {
        "data": data,
        "out": out,
        "tower": "tiny",
        "epochs": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "head_lr": 3e-2,
        "negatives": 16,
        "eval_negatives": 10,
        "num_threads": 1,
        "progress": False,
    }
    return ClassifierTrainingConfig(**{**arguments, **overrides})


@pytest.fixture(scope="module")
def trained(
    medsynth: Path, tmp_path_factory: pytest.TempPathFactory
) -> classifier_module.ClassifierTrainingResult:
    root = tmp_path_factory.mktemp("artifacts")
    return train_classifier(tiny_config(medsynth, root / "classifier"))


def test_medsynth_splits_are_train_val_test(medsynth: Path) -> None:
    splits = load_medsynth_splits(medsynth)
    assert len(splits.train) == 30 and len(splits.val) == 6 and len(splits.test) == 6
    assert {item.domain for item in splits.train} == set(DOMAINS)
    assert all(item.path.is_file() for item in splits.train + splits.val + splits.test)
    assert not {item.path for item in splits.train} & {item.path for item in splits.test}


def test_training_lowers_the_loss_and_changes_the_tower(trained) -> None:
    history = trained.metrics["training"]["history"]
    assert len(history) == 2
    assert history[-1]["last_loss"] < history[0]["first_loss"]
    saved = load_file(str(trained.out / OPEN_CLIP_WEIGHTS))
    initial = create_clip_model("tiny", seed=0).state_dict()
    visual = [name for name in saved if name.startswith("visual.")]
    assert visual and any(not torch.equal(saved[name], initial[name]) for name in visual)
    # The text tower is not trained: it is stored unchanged.
    assert all(torch.equal(saved[name], initial[name]) for name in saved if not name.startswith("visual."))
    head = load_file(str(trained.out / CLASSIFIER_HEAD))
    assert head["weight"].abs().sum() > 0  # the head starts at zero


def test_metrics_json_has_accuracy_confusion_matrix_and_threshold(trained) -> None:
    metrics = json.loads((trained.out / METRICS_FILE).read_text())
    assert metrics == json.loads(json.dumps(trained.metrics))
    assert metrics["labels"] == list(DOMAINS)
    for part in ("val", "test"):
        assert 0.0 <= metrics[part]["accuracy"] <= 1.0
        matrix = metrics[part]["confusion_matrix"]["matrix"]
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
        assert [sum(row) for row in matrix] == [2, 2, 2]
        correct = sum(matrix[i][i] for i in range(3))
        assert metrics[part]["accuracy"] == pytest.approx(correct / 6, abs=1e-6)
        assert metrics[f"{part}_negatives"]["images"] == 10
        assert set(metrics[f"{part}_negatives"]["by_kind"]) == set(NEGATIVE_KINDS)
    # Calibrated on validation: with 6 images, keeping 99 % means keeping all of them.
    assert metrics["val"]["in_domain_kept"] == 1.0
    stored = json.loads((trained.out / CLASSIFIER_CONFIG).read_text())
    assert stored["threshold"] == metrics["threshold"] and stored["labels"] == list(DOMAINS)
    assert metrics["config"]["tower"] == "tiny" and metrics["training"]["train_negatives"] == 16
    assert not (trained.out / CHECKPOINT_FILE).exists()
    table = format_metrics_table(metrics)
    assert "confusion matrix" in table and "radiology" in table


async def test_the_service_loads_the_output_unchanged_and_agrees(trained, medsynth: Path) -> None:
    root = trained.out.parent
    app = build_app(ClassifierSettings(artifacts=root))
    image = load_medsynth_splits(medsynth).test[0]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://classifier") as http,
    ):
        response = await http.post(
            "/classify", files={"image": ("x.png", image.path.read_bytes(), "image/png")}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body["probabilities"]) == list(DOMAINS)
    assert body["threshold"] == trained.metrics["threshold"]
    assert body["confident"] == (body["confidence"] >= body["threshold"])

    # Same preprocessing at training and serving time: the service reproduces the reported numbers.
    service = DomainClassifier()
    service.load(root)
    splits = load_medsynth_splits(medsynth)
    from PIL import Image

    answers = service.classify([Image.open(item.path).convert("RGB") for item in splits.test])
    accuracy = np.mean(
        [answer.label == item.domain for answer, item in zip(answers, splits.test, strict=True)]
    )
    assert accuracy == pytest.approx(trained.metrics["test"]["accuracy"], abs=1e-6)
    size = trained.metrics["training"]["negative_size"]
    negatives = make_negative_images(10, classifier_module.negative_seed(0, "test"), size)
    rejected = np.mean([not answer.confident for answer in service.classify(negatives)])
    assert rejected == pytest.approx(trained.metrics["test_negatives"]["rejection"], abs=1e-6)


def test_linear_probe_keeps_the_tower(medsynth: Path, tmp_path: Path) -> None:
    result = train_classifier(tiny_config(medsynth, tmp_path / "classifier", mode="linear-probe", epochs=3))
    saved = load_file(str(result.out / OPEN_CLIP_WEIGHTS))
    initial = create_clip_model("tiny", seed=0).state_dict()
    assert all(torch.equal(saved[name], initial[name]) for name in saved)
    assert load_file(str(result.out / CLASSIFIER_HEAD))["weight"].abs().sum() > 0
    history = result.metrics["training"]["history"]
    assert history[-1]["last_loss"] < history[0]["first_loss"]


def test_interrupted_run_resumes_to_the_same_weights(
    medsynth: Path, tmp_path: Path, trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_batches = classifier_module._batches
    calls = []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batches(*args, **kwargs)

    out = tmp_path / "classifier"
    monkeypatch.setattr(classifier_module, "_batches", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(tiny_config(medsynth, out))
    assert (out / CHECKPOINT_FILE).is_file()
    monkeypatch.setattr(classifier_module, "_batches", real_batches)
    with pytest.raises(ValueError, match="other arguments"):
        train_classifier(tiny_config(medsynth, out, lr=1e-3, resume=True))
    resumed = train_classifier(tiny_config(medsynth, out, resume=True))
    # Same seed, same data: the resumed run ends exactly where the uninterrupted one did.
    for name in (CLASSIFIER_HEAD, OPEN_CLIP_WEIGHTS):
        first, second = load_file(str(trained.out / name)), load_file(str(out / name))
        assert all(torch.equal(first[key], second[key]) for key in first)
    assert resumed.metrics["threshold"] == trained.metrics["threshold"]


def test_calibrated_threshold_keeps_the_asked_share() -> None:
    confidences = [i / 100 for i in range(1, 101)]  # 0.01 .. 1.00
    threshold = calibrate_threshold(confidences, keep=0.99)
    assert threshold == 0.02
    assert sum(c >= threshold for c in confidences) == 99
    assert calibrate_threshold(confidences, keep=1.0) == 0.01
    assert calibrate_threshold([0.9, 0.9, 0.9], keep=0.5) == 0.9
    with pytest.raises(ValueError, match="validation"):
        calibrate_threshold([])


def test_outlier_exposure_loss_is_lowest_at_the_uniform_distribution() -> None:
    targets = torch.tensor([0, -1])
    flat = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    peaked = torch.tensor([[5.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    domain_part = torch.nn.functional.cross_entropy(flat[:1], targets[:1])
    assert classifier_loss(flat, targets, 0.5) == pytest.approx(domain_part + 0.5 * np.log(3), abs=1e-6)
    assert classifier_loss(peaked, targets, 0.5) > classifier_loss(flat, targets, 0.5)
    # Without the weight (or without negatives in the batch) it is the plain cross-entropy.
    assert classifier_loss(peaked, targets, 0.0) == pytest.approx(domain_part, abs=1e-6)
    assert classifier_loss(flat[:1], targets[:1], 0.5) == pytest.approx(domain_part, abs=1e-6)


def test_confusion_matrix_counts_true_rows_predicted_columns() -> None:
    assert confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_negatives_are_deterministic_and_varied() -> None:
    first = make_negative_images(10, seed=3, size=48)
    again = make_negative_images(10, seed=3, size=48)
    assert [image.tobytes() for image in first] == [image.tobytes() for image in again]
    assert all(image.mode == "RGB" and image.size == (48, 48) for image in first)
    # The first images do not depend on how many are asked for, and another seed draws others.
    assert [i.tobytes() for i in make_negative_images(3, seed=3, size=48)] == [i.tobytes() for i in first[:3]]
    other = make_negative_images(10, seed=4, size=48)
    assert all(a.tobytes() != b.tobytes() for a, b in zip(first, other, strict=True))
    assert [negative_kind(i) for i in range(6)] == [*NEGATIVE_KINDS, NEGATIVE_KINDS[0]]
    assert len({image.tobytes() for image in first}) == 10
    texts = make_negative_images(2, seed=0, size=64, kinds=["text"])
    assert all(np.asarray(image).mean() > 150 for image in texts)  # dark ink on light paper
    with pytest.raises(ValueError, match="kinds"):
        make_negative_images(1, seed=0, kinds=["cat"])


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*mmedrag data synth"):
        train_classifier(ClassifierTrainingConfig(data=tmp_path / "missing", out=tmp_path / "out"))
    with pytest.raises(ValueError, match=r"unknown open_clip config 'huge'.*tiny"):
        ClassifierTrainingConfig(data=tmp_path, tower="huge")
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        ClassifierTrainingConfig(data=tmp_path, epochs=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ClassifierTrainingConfig(data=tmp_path, mode="zero-shot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"findings\.jsonl"):
        train_classifier(ClassifierTrainingConfig(data=tmp_path, out=tmp_path / "out"))


def _train_app() -> typer.Typer:
    """``mmedrag train`` as the integrator mounts it."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("classifier")(classifier_cli)
    app.command("other")(lambda: None)  # two commands, so the sub-command name is part of the line
    return app


def test_cli_trains_and_prints_the_table(
    medsynth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "classifier"
    arguments = ["--data", str(medsynth), "--out", str(out), "--tower", "tiny", "--epochs", "1"]
    arguments += ["--negatives", "8", "--eval-negatives", "5", "--batch-size", "64"]
    arguments += ["--num-threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as stop:  # Typer's standalone mode exits on success
        run_with_clean_errors(_train_app(), ["classifier", *arguments], verbose=False)
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "test confusion matrix" in printed and f"wrote {out}" in printed
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["training"]["steps"] == 1  # 30 images + 8 negatives fit one batch of 64
    assert metrics["test_negatives"]["images"] == 5


def test_cli_reports_bad_arguments_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run_with_clean_errors(
        _train_app(), ["classifier", "--data", str(tmp_path), "--epochs", "0"], verbose=False
    )
    assert status == 1
    assert capsys.readouterr().err.strip() == "error: epochs must be >= 1, got 0"
