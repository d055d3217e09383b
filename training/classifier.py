"""``mmedrag train classifier``: the domain classifier (open_clip image tower + linear head).

The paper routes each query image to its domain's retriever with a classifier trained on a small
domain-labelled set (BiomedCLIP image features, fine-tuned). Here the tower is any bundled open_clip
config, randomly initialised (no weights can be downloaded), and either fine-tuned with the head
(``finetune``, the default: a random tower's features are not good enough) or frozen (``linear-probe``).

**Data.** The trainer takes three lists of ``(image path, domain)``: train, validation (model selection
and threshold calibration) and test (the reported numbers). ``load_medsynth_splits`` builds them from a
MedSynth folder (``retriever_train`` / ``retriever_val`` / ``test``); an importer of real datasets only
has to produce the same ``DomainImageSplits``.

**"None of the known domains".** A softmax head trained on the three domains alone is often just as sure
about a holiday photo as about a radiograph: softmax only compares the domains with one another. So the
trainer uses *outlier exposure* (Hendrycks et al., ICLR 2019): procedural non-medical images
(``training.data.negatives``) are mixed into every epoch with the target "uniform over the three domains"
(loss: cross-entropy to the uniform distribution, weighted by ``ood_weight``). The head keeps exactly the
three domains, so the service contract is untouched (labels = domains, probabilities over them,
confidence = top probability): an out-of-domain image simply gets a flat distribution. A fourth "other"
class was not used because the service reports every head row as a label; dropping the row after
training would leave a three-way softmax that again forces a winner. Measured on MedSynth (1,000 per
domain, default settings otherwise): held-out negatives rejected 100 % with outlier exposure, 93.6 %
without it (``--negatives 0``), about 22 % with a linear probe on the random tower; with only the
``shapes``/``noise``/``checkerboard`` kinds in training, unseen ``photo`` and ``text`` images were still
rejected at 100 % and 98 %.

The threshold is calibrated on validation data: the highest confidence that keeps at least
``in_domain_recall`` (99 %) of the in-domain validation images at or above it, which is also the one
that rejects the most negatives. The rejection rate is reported on validation negatives and on a
held-out set drawn from another seed.

Output (``--out``, by default ``artifacts/classifier``): the folder ``save_classifier`` writes and the
classifier service loads, plus ``metrics.json`` (accuracy, confusion matrix, threshold, rejection rates,
timings, the config) and, while training runs, ``checkpoint.pt`` (removed at the end; ``--resume``
continues from it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from PIL import Image
from tqdm.auto import tqdm

from services.common.threads import torch_threads
from training.data.records import DOMAINS, SPLITS

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_TOWER = "classifier-small"
DEFAULT_OUT = Path("artifacts/classifier")
Mode = Literal["linear-probe", "finetune"]
MODES: tuple[Mode, ...] = ("linear-probe", "finetune")
# Negatives of each part are drawn from their own seed: negative_seed(seed, part).
NEGATIVE_PARTS = ("train", "val", "test")


@dataclass
class ClassifierTrainingConfig:
    """Arguments of ``mmedrag train classifier``.

    Data:
        data, out, negatives, eval_negatives, negative_size.
    Model:
        tower, image_size, mode.
    Optimisation:
        epochs, batch_size, lr, head_lr, weight_decay, warmup_fraction, ood_weight.
    Calibration:
        in_domain_recall.
    Run:
        seed, num_threads, resume, progress.

    The defaults are the measured setting: on MedSynth (default difficulty, 1,000 images per domain)
    a fine-tuned ``classifier-small`` tower at 64 px reaches 100 % test accuracy and rejects 100 % of
    500 held-out negatives after 4 epochs, in about 2 CPU-minutes.
    """

    data: Path | None = field(
        default=None,
        metadata={"help": "MedSynth folder (findings.jsonl): retriever_train / retriever_val / test splits."},
    )
    out: Path = field(
        default=DEFAULT_OUT,
        metadata={"help": "Output folder: the classifier artifact (what the service loads) + metrics.json."},
    )
    tower: str = field(
        default=DEFAULT_TOWER,
        metadata={"help": "open_clip model config: a bundled name (classifier-small, tiny) or a JSON path."},
    )
    mode: Mode = field(
        default="finetune",
        metadata={"help": "finetune: train tower and head; linear-probe: freeze the tower, train the head."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input side in pixels (overrides the tower config's vision_cfg.image_size)."},
    )
    epochs: int = field(default=4, metadata={"help": "Passes over the training images."})
    batch_size: int = field(default=32, metadata={"help": "Images (domain images + negatives) per step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of the tower (AdamW)."})
    head_lr: float = field(
        default=1e-2,
        metadata={"help": "Peak learning rate of the head; higher than the tower's: it starts from zero."},
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (tower matrices and head weight only)."}
    )
    warmup_fraction: float = field(
        default=0.1, metadata={"help": "Share of the steps with a linear warm-up; cosine decay after it."}
    )
    negatives: int = field(
        default=600,
        metadata={"help": "Procedural non-medical training images (outlier exposure); 0 disables it."},
    )
    eval_negatives: int = field(
        default=500,
        metadata={"help": "Non-medical images for calibration and, from another seed, for the test."},
    )
    negative_size: int | None = field(
        default=None,
        metadata={"help": "Side of the generated negatives (default: that of the first training image)."},
    )
    ood_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the outlier-exposure loss (cross-entropy of negatives to uniform)."},
    )
    in_domain_recall: float = field(
        default=0.99,
        metadata={"help": "Share of in-domain validation images the threshold must keep (at or above)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of weights, shuffling and negatives."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads during the run."})
    resume: bool = field(
        default=False, metadata={"help": "Continue from <out>/checkpoint.pt of an interrupted run."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        from training.artifacts.clip import get_clip_config

        self.out = Path(self.out)
        if self.data is not None:
            self.data = Path(self.data)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        get_clip_config(self.tower)  # raises ValueError naming the bundled configs
        for name in ("epochs", "batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("negatives", "eval_negatives"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.ood_weight < 0:
            raise ValueError("weight_decay and ood_weight must be >= 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.in_domain_recall <= 1:
            raise ValueError(f"in_domain_recall must be in (0, 1], got {self.in_domain_recall}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 16 and 1024 pixels, got {self.image_size}")
        if self.negative_size is not None and not 16 <= self.negative_size <= 1024:
            raise ValueError(f"negative_size must be between 16 and 1024 pixels, got {self.negative_size}")

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class LabelledImage:
    """One training example: an image file and its domain."""

    path: Path
    domain: str


@dataclass(frozen=True)
class DomainImageSplits:
    """The classifier's three parts; any dataset loader that yields these can feed the trainer."""

    train: tuple[LabelledImage, ...]
    val: tuple[LabelledImage, ...]
    test: tuple[LabelledImage, ...]

    def check(self, labels: Sequence[str] = DOMAINS) -> None:
        """Every part non-empty, every domain in the training part, no unknown domain."""
        for name in ("train", "val", "test"):
            part: tuple[LabelledImage, ...] = getattr(self, name)
            if not part:
                raise ValueError(f"the {name} part has no images")
            unknown = sorted({item.domain for item in part} - set(labels))
            if unknown:
                raise ValueError(f"the {name} part has images of unknown domains {unknown}; known: {labels}")
        missing = sorted(set(labels) - {item.domain for item in self.train})
        if missing:
            raise ValueError(f"the train part has no images of {missing}")


def load_medsynth_splits(data_dir: Path) -> DomainImageSplits:
    """Train on ``retriever_train``, select and calibrate on ``retriever_val``, report on ``test``.

    The ``preference`` split stays unseen: it is kept for building preference pairs.
    """
    from training.data.medsynth.reader import read_findings

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data folder {data_dir} does not exist; make one with `mmedrag data synth --out {data_dir}`"
        )
    items = read_findings(data_dir)
    parts: dict[str, list[LabelledImage]] = {split: [] for split in SPLITS}
    for item in items:
        parts[item.split].append(LabelledImage(item.path, item.domain))
    return DomainImageSplits(
        train=tuple(parts["retriever_train"]), val=tuple(parts["retriever_val"]), test=tuple(parts["test"])
    )


def negative_seed(seed: int, part: str) -> int:
    """Seed of the negatives of ``part`` (train / val / test): disjoint streams for every run seed."""
    return seed * len(NEGATIVE_PARTS) + NEGATIVE_PARTS.index(part)


def _read_image(path: Path) -> Image.Image:
    """Decode a file exactly as the service decodes an upload (same RGB conversion, same limits)."""
    from services.common.errors import ServiceError
    from services.common.images import decode_image

    try:
        return decode_image(Path(path).read_bytes()).image
    except ServiceError as exc:
        raise ValueError(f"{path}: cannot use this image ({exc.message})") from exc


# ------------------------------------------------------------------------------------------ evaluation


def calibrate_threshold(confidences: Sequence[float] | torch.Tensor, keep: float = 0.99) -> float:
    """The highest threshold with at least ``keep`` of ``confidences`` at or above it.

    Rejecting negatives only gets better as the threshold rises, so the highest admissible one is the
    best; it is one of the observed confidences (rounded down to 6 decimals, so the stored JSON number
    still keeps that image).
    """
    values = sorted(float(v) for v in confidences)
    if not values:
        raise ValueError("cannot calibrate a threshold without validation images")
    allowed_below = math.floor(len(values) * (1.0 - keep) + 1e-9)
    return math.floor(values[allowed_below] * 1e6) / 1e6


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], n_labels: int) -> list[list[int]]:
    """``matrix[t][p]``: images of label ``t`` predicted as ``p``."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def _part_metrics(
    probabilities: torch.Tensor, targets: torch.Tensor, threshold: float, labels: Sequence[str]
) -> dict[str, Any]:
    confidence, predicted = probabilities.max(dim=1)
    correct = predicted == targets
    kept = confidence >= threshold
    return {
        "images": len(targets),
        "accuracy": round(correct.float().mean().item(), 6),
        "in_domain_kept": round(kept.float().mean().item(), 6),
        "accuracy_of_kept": round(correct[kept].float().mean().item(), 6) if kept.any() else None,
        "confusion_matrix": {
            "labels": list(labels),
            "rows": "true label",
            "columns": "predicted label",
            "matrix": confusion_matrix(targets.tolist(), predicted.tolist(), len(labels)),
        },
    }


def _negative_metrics(probabilities: torch.Tensor, kinds: Sequence[str], threshold: float) -> dict[str, Any]:
    if len(probabilities) == 0:
        return {"images": 0, "rejection": None, "by_kind": {}}
    rejected = probabilities.max(dim=1).values < threshold
    by_kind = {}
    for kind in dict.fromkeys(kinds):
        mask = torch.tensor([k == kind for k in kinds])
        by_kind[kind] = round(rejected[mask].float().mean().item(), 6)
    return {
        "images": len(probabilities),
        "rejection": round(rejected.float().mean().item(), 6),
        "mean_confidence": round(probabilities.max(dim=1).values.mean().item(), 6),
        "by_kind": by_kind,
    }


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text summary of ``metrics.json`` for the terminal."""
    labels = metrics["labels"]
    lines = [f"threshold {metrics['threshold']:.4f} (keeps >= {metrics['in_domain_recall']:.0%} of val)"]
    lines.append(f"{'part':<6} {'images':>6} {'accuracy':>9} {'kept':>7} {'OOD rejected':>13}")
    for part in ("val", "test"):
        m, neg = metrics[part], metrics[f"{part}_negatives"]
        rejection = "-" if neg["rejection"] is None else f"{neg['rejection']:.2%} of {neg['images']}"
        lines.append(
            f"{part:<6} {m['images']:>6} {m['accuracy']:>9.2%} {m['in_domain_kept']:>7.2%} {rejection:>13}"
        )
    width = max(len(label) for label in labels) + 2
    lines.append("test confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, metrics["test"]["confusion_matrix"]["matrix"], strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}}" for count in row))
    by_kind = metrics["test_negatives"]["by_kind"]
    if by_kind:
        lines.append("held-out negatives rejected: " + ", ".join(f"{k} {v:.0%}" for k, v in by_kind.items()))
    lines.append(f"trained in {metrics['training']['wall_seconds']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- training


@dataclass
class ClassifierTrainingResult:
    """What a run produced: the artifact folder and its metrics (also in ``<out>/metrics.json``)."""

    out: Path
    metrics: dict[str, Any]


@dataclass
class _Inputs:
    """Preprocessed images (or frozen-tower features) with labels; label -1 marks a negative."""

    x: torch.Tensor
    y: torch.Tensor
    kinds: list[str] = field(default_factory=list)  # kind of each negative, in order

    @property
    def in_domain(self) -> torch.Tensor:
        return self.y >= 0


class _DomainClassifier(torch.nn.Module):
    """Tower + head as one module: ``forward`` gives the logits the service's softmax will see.

    With ``frozen`` the tower is skipped: inputs are then its features, computed once.
    """

    def __init__(self, model: torch.nn.Module, head: torch.nn.Linear, *, frozen: bool):
        super().__init__()
        self.model, self.head, self.frozen = model, head, frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x if self.frozen else self.model.encode_image(x, normalize=True)
        return self.head(features)

    def features(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        with torch.inference_mode():
            parts = [
                self.model.encode_image(x[i : i + batch_size], normalize=True)
                for i in range(0, len(x), batch_size)
            ]
        return torch.cat(parts)

    def probabilities(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [torch.softmax(self(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
            )


def classifier_loss(logits: torch.Tensor, targets: torch.Tensor, ood_weight: float) -> torch.Tensor:
    """Cross-entropy on domain images (target >= 0) + ``ood_weight`` x outlier exposure on negatives
    (target -1): the cross-entropy from the uniform distribution, lowest when all domains are equal."""
    positive = targets >= 0
    loss = logits.new_zeros(())
    if positive.any():
        loss = loss + torch.nn.functional.cross_entropy(logits[positive], targets[positive])
    if ood_weight > 0 and (~positive).any():
        loss = loss - ood_weight * torch.log_softmax(logits[~positive], dim=1).mean()
    return loss


def _build_classifier(config: ClassifierTrainingConfig, tower_path: Path) -> tuple[_DomainClassifier, dict]:
    """The randomly initialised tower and a zero head; the tower config (image size overridden if asked)
    is written to ``tower_path`` so the saved open_clip config describes exactly the trained model."""
    from training.artifacts.clip import create_clip_model, get_clip_config

    model_cfg = get_clip_config(config.tower)
    if config.image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = config.image_size
    tower_path.write_text(json.dumps(model_cfg), encoding="utf-8")
    model = create_clip_model(str(tower_path), seed=config.seed)
    model.requires_grad_(False)
    if config.mode == "finetune":
        model.visual.requires_grad_(True)  # the text tower is never used, never trained
    head = torch.nn.Linear(int(model_cfg["embed_dim"]), len(DOMAINS))
    # A zero head starts at the uniform distribution: no domain is favoured before training.
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return _DomainClassifier(model, head, frozen=config.mode == "linear-probe"), model_cfg


def _prepare_inputs(
    config: ClassifierTrainingConfig, splits: DomainImageSplits, classifier: _DomainClassifier
) -> tuple[dict[str, _Inputs], int]:
    """Domain images and negatives of each part through the service's preprocessing, once, in memory."""
    import open_clip.transform

    from training.data.negatives import make_negative_images, negative_kind

    # open_clip's eval transform of this tower: what ClipModel.load builds in the service.
    visual = classifier.model.visual
    preprocess = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**visual.preprocess_cfg), is_train=False
    )
    index = {label: i for i, label in enumerate(DOMAINS)}
    negative_size = config.negative_size or max(_read_image(splits.train[0].path).size)
    parts: dict[str, _Inputs] = {}
    for part in ("train", "val", "test"):
        items: tuple[LabelledImage, ...] = getattr(splits, part)
        x = _preprocess_all([item.path for item in items], preprocess, f"{part} images", config.progress)
        y = torch.tensor([index[item.domain] for item in items])
        count = config.negatives if part == "train" else config.eval_negatives
        negatives = make_negative_images(count, negative_seed(config.seed, part), negative_size)
        if negatives:
            x = torch.cat([x, _preprocess_all(negatives, preprocess, f"{part} negatives", config.progress)])
            y = torch.cat([y, torch.full((count,), -1)])
        parts[part] = _Inputs(x, y, [negative_kind(i) for i in range(count)])
    if classifier.frozen:
        # Linear probe: the tower never changes, so its features are computed once.
        for inputs in parts.values():
            inputs.x = classifier.features(inputs.x, config.batch_size)
    return parts, negative_size


def _preprocess_all(
    images: Sequence[Any], preprocess: Callable[[Any], torch.Tensor], desc: str, progress: bool
) -> torch.Tensor:
    tensors = []
    for image in tqdm(images, desc=desc, unit="img", disable=not progress, leave=False):
        tensors.append(preprocess(_read_image(image) if isinstance(image, Path) else image))
    return torch.stack(tensors)


def _optimizer(config: ClassifierTrainingConfig, classifier: _DomainClassifier) -> torch.optim.AdamW:
    tower = [p for p in classifier.model.parameters() if p.requires_grad]
    head = classifier.head
    groups = [
        {"params": [p for p in tower if p.ndim >= 2], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": [p for p in tower if p.ndim < 2], "lr": config.lr, "weight_decay": 0.0},
        {"params": [head.weight], "lr": config.head_lr, "weight_decay": config.weight_decay},
        {"params": [head.bias], "lr": config.head_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]])


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _validate(
    classifier: _DomainClassifier, val: _Inputs, config: ClassifierTrainingConfig
) -> tuple[dict[str, Any], tuple[float, ...]]:
    """Validation numbers of the current weights and their selection score: accuracy first, then the
    negatives rejected at the calibrated threshold, then the mean in-domain confidence."""
    probabilities = classifier.probabilities(val.x, config.batch_size)
    confidence, predicted = probabilities.max(dim=1)
    in_domain = val.in_domain
    threshold = calibrate_threshold(confidence[in_domain], config.in_domain_recall)
    accuracy = (predicted[in_domain] == val.y[in_domain]).float().mean().item()
    negatives = confidence[~in_domain]
    rejection = (negatives < threshold).float().mean().item() if len(negatives) else 0.0
    record = {
        "val_accuracy": round(accuracy, 6),
        "val_threshold": threshold,
        "val_negative_rejection": round(rejection, 6),
    }
    score = (round(accuracy, 6), round(rejection, 6), round(confidence[in_domain].mean().item(), 6))
    return record, score


def train_classifier(
    config: ClassifierTrainingConfig, splits: DomainImageSplits | None = None
) -> ClassifierTrainingResult:
    """Train, select, calibrate and save a domain classifier; return its metrics.

    Args:
        config: the run's arguments.
        splits: the labelled images; default: ``load_medsynth_splits(config.data)``.

    Example::

        result = train_classifier(ClassifierTrainingConfig(data=Path("medsynth"), out=root / "classifier"))
        print(result.metrics["test"]["accuracy"], result.metrics["threshold"])
    """
    if splits is None:
        if config.data is None:
            raise ValueError("give the data folder (--data DIR) or the splits")
        splits = load_medsynth_splits(config.data)
    splits.check(DOMAINS)
    # The global RNG (dropout, if a tower config enables it) is seeded inside a fork: the caller's
    # random state is left as it was.
    with (
        torch_threads(config.num_threads),
        torch.random.fork_rng(devices=[]),
        tempfile.TemporaryDirectory() as tmp,
    ):
        torch.manual_seed(config.seed)
        return _train(config, splits, Path(tmp))


def _train(
    config: ClassifierTrainingConfig, splits: DomainImageSplits, tmp: Path
) -> ClassifierTrainingResult:
    from training.artifacts.classifier import save_classifier

    started = time.perf_counter()
    tower_path = tmp / "tower.json"
    classifier, model_cfg = _build_classifier(config, tower_path)
    parts, negative_size = _prepare_inputs(config, splits, classifier)
    data_seconds = time.perf_counter() - started

    train = parts["train"]
    optimizer = _optimizer(config, classifier)
    steps_per_epoch = math.ceil(len(train.y) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, config.warmup_fraction))
    generator = torch.Generator().manual_seed(config.seed + 1)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None}
    checkpoint = _Checkpoint(config, classifier, optimizer, scheduler, generator)
    if config.resume:
        state = checkpoint.load() or state

    bar = tqdm(
        total=total_steps,
        initial=state["epoch"] * steps_per_epoch,
        desc="train classifier",
        unit="step",
        disable=not config.progress,
    )
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        classifier.train(not classifier.frozen)
        losses = []
        for batch in _batches(len(train.y), config.batch_size, generator):
            loss = classifier_loss(classifier(train.x[batch]), train.y[batch], config.ood_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")

        classifier.eval()
        record, score = _validate(classifier, parts["val"], config)
        record = {
            "epoch": epoch,
            "loss": round(sum(losses) / len(losses), 6),
            "first_loss": round(losses[0], 6),
            "last_loss": round(losses[-1], 6),
            **record,
        }
        state["history"].append(record)
        bar.write(
            f"epoch {epoch}: loss {record['loss']:.4f}, val accuracy {record['val_accuracy']:.2%}, "
            f"threshold {record['val_threshold']:.3f}, "
            f"val negatives rejected {record['val_negative_rejection']:.2%}"
        )
        # Later epochs win ties: same validation numbers, more training.
        if state["best"] is None or score >= tuple(state["best"]["score"]):
            state["best"] = {"score": list(score), "epoch": epoch, "weights": _copy_trainable(classifier)}
        state["epoch"] = epoch
        if epoch < config.epochs:
            checkpoint.save(state)
    bar.close()
    train_seconds = time.perf_counter() - started - data_seconds

    # The selected epoch: calibrate on validation, report on test and the held-out negatives.
    best = state["best"]
    classifier.load_state_dict(best["weights"], strict=False)
    classifier.eval()
    results: dict[str, Any] = {}
    threshold = 0.0
    for part in ("val", "test"):
        inputs = parts[part]
        probabilities = classifier.probabilities(inputs.x, config.batch_size)
        in_domain = inputs.in_domain
        if part == "val":
            threshold = calibrate_threshold(
                probabilities[in_domain].max(dim=1).values, config.in_domain_recall
            )
        results[part] = _part_metrics(probabilities[in_domain], inputs.y[in_domain], threshold, DOMAINS)
        results[f"{part}_negatives"] = _negative_metrics(probabilities[~in_domain], inputs.kinds, threshold)

    out = save_classifier(
        config.out, classifier.model, classifier.head, DOMAINS, threshold, config_name=str(tower_path)
    )
    metrics = {
        "labels": list(DOMAINS),
        "threshold": threshold,
        "in_domain_recall": config.in_domain_recall,
        **results,
        "training": {
            "mode": config.mode,
            "tower": config.tower,
            "image_size": int(model_cfg["vision_cfg"]["image_size"]),
            "train_images": int(train.in_domain.sum().item()),
            "train_negatives": int((~train.in_domain).sum().item()),
            "negative_size": negative_size,
            "steps": total_steps,
            "best_epoch": best["epoch"],
            "history": state["history"],
            "data_seconds": round(data_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "torch_threads": torch.get_num_threads(),
        },
        "config": config.to_json(),
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    checkpoint.remove()
    return ClassifierTrainingResult(out=out, metrics=metrics)


def _copy_trainable(classifier: _DomainClassifier) -> dict[str, torch.Tensor]:
    """The weights training changes (visual tower when fine-tuning, head), copied."""
    names = ("head.", "model.visual.") if not classifier.frozen else ("head.",)
    return {k: v.detach().clone() for k, v in classifier.state_dict().items() if k.startswith(names)}


class _Checkpoint:
    """``<out>/checkpoint.pt``: everything needed to continue after the last finished epoch."""

    def __init__(
        self,
        config: ClassifierTrainingConfig,
        classifier: _DomainClassifier,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
    ):
        self.path = config.out / CHECKPOINT_FILE
        # A checkpoint continues only the run that wrote it (out, resume, progress may differ).
        self.fingerprint = {
            k: v for k, v in config.to_json().items() if k not in ("out", "resume", "progress")
        }
        self.classifier, self.optimizer, self.scheduler = classifier, optimizer, scheduler
        self.generator = generator

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": self.fingerprint,
            "weights": _copy_trainable(self.classifier),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.path)  # never a half-written checkpoint

    def load(self) -> dict[str, Any] | None:
        """Restore the saved run and return its state; None when there is no checkpoint."""
        if not self.path.is_file():
            logger.warning("no checkpoint at %s: starting from scratch", self.path)
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        if saved["config"] != self.fingerprint:
            raise ValueError(f"{self.path} was written by a run with other arguments; drop --resume")
        self.classifier.load_state_dict(saved["weights"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        logger.info("resuming from %s after epoch %d", self.path, saved["state"]["epoch"])
        return saved["state"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- CLI

_FIELDS = {f.name: f for f in dataclasses.fields(ClassifierTrainingConfig)}


def _help(name: str) -> str:
    return _FIELDS[name].metadata["help"]


def _default(name: str) -> Any:
    return _FIELDS[name].default


def classifier_cli(
    data: Annotated[Path, typer.Option("--data", help=_help("data"))],
    out: Annotated[Path, typer.Option("--out", help=_help("out"))] = DEFAULT_OUT,
    tower: Annotated[str, typer.Option("--tower", help=_help("tower"))] = _default("tower"),
    mode: Annotated[str, typer.Option("--mode", help=_help("mode"))] = _default("mode"),
    image_size: Annotated[int | None, typer.Option("--image-size", help=_help("image_size"))] = None,
    epochs: Annotated[int, typer.Option("--epochs", help=_help("epochs"))] = _default("epochs"),
    batch_size: Annotated[int, typer.Option("--batch-size", help=_help("batch_size"))] = _default(
        "batch_size"
    ),
    lr: Annotated[float, typer.Option("--lr", help=_help("lr"))] = _default("lr"),
    head_lr: Annotated[float, typer.Option("--head-lr", help=_help("head_lr"))] = _default("head_lr"),
    weight_decay: Annotated[float, typer.Option("--weight-decay", help=_help("weight_decay"))] = _default(
        "weight_decay"
    ),
    warmup_fraction: Annotated[
        float, typer.Option("--warmup-fraction", help=_help("warmup_fraction"))
    ] = _default("warmup_fraction"),
    negatives: Annotated[int, typer.Option("--negatives", help=_help("negatives"))] = _default("negatives"),
    eval_negatives: Annotated[int, typer.Option("--eval-negatives", help=_help("eval_negatives"))] = _default(
        "eval_negatives"
    ),
    negative_size: Annotated[int | None, typer.Option("--negative-size", help=_help("negative_size"))] = None,
    ood_weight: Annotated[float, typer.Option("--ood-weight", help=_help("ood_weight"))] = _default(
        "ood_weight"
    ),
    in_domain_recall: Annotated[
        float, typer.Option("--in-domain-recall", help=_help("in_domain_recall"))
    ] = _default("in_domain_recall"),
    seed: Annotated[int, typer.Option("--seed", help=_help("seed"))] = _default("seed"),
    num_threads: Annotated[int, typer.Option("--num-threads", help=_help("num_threads"))] = _default(
        "num_threads"
    ),
    resume: Annotated[bool, typer.Option("--resume", help=_help("resume"))] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help=_help("progress"))] = True,
) -> None:
    """Train the domain classifier (open_clip image tower + linear head) on domain-labelled images."""
    config = ClassifierTrainingConfig(
        data=data,
        out=out,
        tower=tower,
        mode=mode,  # type: ignore[arg-type]  # checked in __post_init__
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        negatives=negatives,
        eval_negatives=eval_negatives,
        negative_size=negative_size,
        ood_weight=ood_weight,
        in_domain_recall=in_domain_recall,
        seed=seed,
        num_threads=num_threads,
        resume=resume,
        progress=progress,
    )
    result = train_classifier(config)
    typer.echo(format_metrics_table(result.metrics))
    typer.echo(f"wrote {result.out} (metrics: {result.out / METRICS_FILE})")
