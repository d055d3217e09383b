"""Prove that MedSynth images carry their findings: per-finding probes trained on the pixels.

Two deliberately small probes look at every domain of a MedSynth folder, both trained on the
``retriever_train`` + ``retriever_val`` images and evaluated on the held-out ``preference`` + ``test`` ones:

* **linear** -- one logistic regression per finding on the image downsampled to ``pixels`` x ``pixels``
  (grayscale for ``L`` images, RGB kept for colour ones) plus per-channel intensity histograms of the
  full-resolution image (position-free, so scattered findings such as mitoses are caught too),
  standardised on the training images, the histogram block up-weighted to the same total variance as
  the pixel block. Quick, but blind to small objects whose position varies and to shape changes.
* **cnn** -- one small convolutional network per domain with one sigmoid output per finding, trained
  for a fixed number of epochs from a fixed seed on ``CnnProbeConfig.pixels`` images. Global max pooling
  over space lets it find a nodule or a haemorrhage wherever it lies; convolutions see wiggly vessels.

A finding is "learnable" when the better probe detects it with balanced accuracy >= 0.70. A finding no
such probe detects is unlikely to be drawn visibly.

The reader of a MedSynth folder (:func:`read_findings`, :func:`read_meta`, :func:`load_catalogue`) is
shared with ``preview.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from training.data.errors import DatasetFormatError
from training.data.medsynth.catalogue import load_catalogue
from training.data.medsynth.reader import MedSynthImage, read_findings, read_meta

if TYPE_CHECKING:
    import torch

TRAIN_SPLITS: tuple[str, ...] = ("retriever_train", "retriever_val")
TEST_SPLITS: tuple[str, ...] = ("preference", "test")
LEARNABLE_THRESHOLD = 0.70

Verdict = Literal["learnable", "weak", "not evaluable"]
Probe = Literal["linear", "cnn", "both"]
PROBES: tuple[str, ...] = get_args(Probe)


@dataclass(frozen=True)
class CnnProbeConfig:
    """The CNN probe's settings; the defaults train on 3 x 1,000 images in about a minute on 2 cores."""

    pixels: int = 96  # side of the image the network sees (a stride-2 stem halves it at once)
    epochs: int = 30
    width: int = 16  # channels of the first layer; later layers use 2x and 4x
    batch_size: int = 32
    lr: float = 1e-2  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4
    shift: int | None = None  # max random translation in pixels; None = pixels // 32
    threads: int | None = None  # domains trained at once, one CPU each; None = the CPUs we may use

    def __post_init__(self) -> None:
        for name in ("pixels", "epochs", "width", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CnnProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pixels < 8:
            raise ValueError(f"CnnProbeConfig.pixels must be >= 8, got {self.pixels}")
        if not self.lr > 0:
            raise ValueError(f"CnnProbeConfig.lr must be > 0, got {self.lr}")
        if self.shift is not None and self.shift < 0:
            raise ValueError(f"CnnProbeConfig.shift must be >= 0, got {self.shift}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"CnnProbeConfig.threads must be >= 1, got {self.threads}")

    @property
    def max_shift(self) -> int:
        return self.pixels // 32 if self.shift is None else self.shift


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def image_features(img: Image.Image, *, mode: str, pixels: int, bins: int) -> np.ndarray:
    """Downsampled pixels (``mode`` ``L`` or ``RGB``) followed by per-channel histograms of the full image."""
    img = img.convert(mode)
    small = np.asarray(img.resize((pixels, pixels), Image.Resampling.BOX), dtype=np.float32) / 255.0
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(len(mode), 256)
    hist = hist.reshape(len(mode), bins, 256 // bins).sum(axis=2)
    hist /= max(img.width * img.height, 1)
    return np.concatenate([small.ravel(), hist.ravel().astype(np.float32)])


def _domain_mode(spec: dict[str, Any]) -> str:
    return "L" if spec.get("image_mode", "RGB") == "L" else "RGB"


def _load_domain(
    items: list[MedSynthImage],
    *,
    findings_path: Path,
    mode: str,
    pixels: int,
    bins: int,
    cnn_pixels: int | None,
    linear: bool,
    desc: str,
    progress: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Open every image once: linear-probe features and/or uint8 ``(n, cnn_pixels, cnn_pixels, c)`` arrays."""
    feats, small = [], []
    for item in tqdm(items, desc=desc, unit="img", disable=not progress):
        try:
            with Image.open(item.path) as img:
                img = img.convert(mode)
                if linear:
                    feats.append(image_features(img, mode=mode, pixels=pixels, bins=bins))
                if cnn_pixels is not None:
                    resized = img.resize((cnn_pixels, cnn_pixels), Image.Resampling.BOX)
                    small.append(np.asarray(resized, dtype=np.uint8).reshape(cnn_pixels, cnn_pixels, -1))
        except OSError as exc:
            raise DatasetFormatError(
                findings_path, item.id, "image", f"cannot read image {item.path}: {exc}"
            ) from exc
    return (np.stack(feats) if linear else None), (np.stack(small) if cnn_pixels is not None else None)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeScores:
    """One probe's held-out metrics for one finding (predictions at the probe's own threshold)."""

    accuracy: float
    balanced_accuracy: float
    auroc: float
    recall_obvious: float | None
    recall_subtle: float | None
    converged: bool | None = None  # linear probe only: the solver stopped before max_iter


@dataclass
class LearnabilityRow:
    """Both probes' results for one (domain, finding); a probe that did not run is ``None``."""

    domain: str
    finding: str
    label: str
    n_train: int
    n_test: int
    n_train_positive: int
    n_test_positive: int
    evaluable: bool
    reason: str | None = None
    prevalence: float | None = None
    baseline_accuracy: float | None = None
    n_test_obvious: int = 0
    n_test_subtle: int = 0
    linear: ProbeScores | None = None
    cnn: ProbeScores | None = None

    @property
    def best_probe(self) -> Literal["linear", "cnn"] | None:
        """The probe with the higher balanced accuracy (linear on ties); ``None`` when none ran."""
        ran = [(s.balanced_accuracy, -i, n) for i, (n, s) in enumerate(self._probes()) if s is not None]
        return max(ran)[2] if ran else None  # type: ignore[return-value]

    @property
    def best(self) -> ProbeScores | None:
        return None if self.best_probe is None else getattr(self, self.best_probe)

    def _probes(self) -> tuple[tuple[str, ProbeScores | None], ...]:
        return (("linear", self.linear), ("cnn", self.cnn))

    @property
    def balanced_accuracy(self) -> float | None:
        return None if self.best is None else self.best.balanced_accuracy

    @property
    def auroc(self) -> float | None:
        return None if self.best is None else self.best.auroc

    @property
    def accuracy(self) -> float | None:
        return None if self.best is None else self.best.accuracy

    @property
    def recall_obvious(self) -> float | None:
        return None if self.best is None else self.best.recall_obvious

    @property
    def recall_subtle(self) -> float | None:
        return None if self.best is None else self.best.recall_subtle

    @property
    def verdict(self) -> Verdict:
        if not self.evaluable or self.balanced_accuracy is None:
            return "not evaluable"
        return "learnable" if self.balanced_accuracy >= LEARNABLE_THRESHOLD else "weak"

    def to_dict(self) -> dict[str, Any]:
        best = {
            key: getattr(self, key)
            for key in ("accuracy", "balanced_accuracy", "auroc", "recall_obvious", "recall_subtle")
        }
        return {**asdict(self), "best_probe": self.best_probe, **best, "verdict": self.verdict}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


@dataclass
class LearnabilityReport:
    """All rows (catalogue order) plus the settings they were computed with."""

    rows: list[LearnabilityRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, domain: str, finding: str) -> LearnabilityRow:
        for r in self.rows:
            if r.domain == domain and r.finding == finding:
                return r
        raise KeyError((domain, finding))

    def to_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "rows": [r.to_dict() for r in self.rows]}

    def to_markdown(self) -> str:
        s = self.settings
        meta = s.get("medsynth", {})
        probe = s.get("probe", "both")
        counts = {v: sum(r.verdict == v for r in self.rows) for v in ("learnable", "weak", "not evaluable")}
        lines = [
            "# MedSynth learnability check",
            "",
            f"Data: `{s.get('data_dir', '?')}` (seed {meta.get('seed', '?')}, "
            f"difficulty {meta.get('difficulty', '?')}, per_domain {meta.get('per_domain', '?')}). "
            f"Probes trained on {' + '.join(TRAIN_SPLITS)}, evaluated on {' + '.join(TEST_SPLITS)} "
            "(held out by image).",
        ]
        if probe in ("linear", "both"):
            lines.append(
                f"Linear probe: logistic regression per finding (C={s.get('C')}, class_weight=balanced) on "
                f"{s.get('pixels')}×{s.get('pixels')} downsampled pixels + {s.get('bins')}-bin per-channel "
                "histograms."
            )
        if probe in ("cnn", "both"):
            c = s.get("cnn", {})
            lines.append(
                f"CNN probe: one small CNN per domain (4 conv layers of width {c.get('width')}-"
                f"{4 * c.get('width', 0)}, global max + average pooling, one sigmoid output per finding, "
                f"BCE with per-finding pos_weight) on {c.get('pixels')}×{c.get('pixels')} images, "
                f"{c.get('epochs')} epochs, seed {s.get('seed')}, random shifts of up to "
                f"{c.get('max_shift')} px (no flips); threshold 0.5."
            )
        lines += [
            f"Verdict: learnable when the balanced accuracy of the better probe (named in the verdict) is "
            f"≥ {LEARNABLE_THRESHOLD:.2f}; acc and recalls are the better probe's. Baseline = accuracy of "
            "always predicting the training majority class. "
            f"Summary: {counts['learnable']} learnable, {counts['weak']} weak, "
            f"{counts['not evaluable']} not evaluable.",
            "",
            "| domain | finding | prevalence | baseline acc | linear bal acc | linear AUROC | CNN bal acc "
            "| CNN AUROC | acc | recall obvious | recall subtle | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            verdict = f"{r.verdict} ({r.best_probe})" if r.evaluable else f"not evaluable ({r.reason})"
            cells = [
                r.domain,
                r.finding,
                _fmt(r.prevalence),
                _fmt(r.baseline_accuracy),
                _fmt(r.linear and r.linear.balanced_accuracy),
                _fmt(r.linear and r.linear.auroc),
                _fmt(r.cnn and r.cnn.balanced_accuracy),
                _fmt(r.cnn and r.cnn.auroc),
                _fmt(r.accuracy),
                _fmt(r.recall_obvious),
                _fmt(r.recall_subtle),
                verdict,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``learnability.json`` and ``learnability.md`` into ``out_dir``; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "learnability.json", out / "learnability.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def _scores(y_test: np.ndarray, pred: np.ndarray, score: np.ndarray, subtle_test: np.ndarray) -> ProbeScores:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    recalls = {}
    for subtle, attr in ((False, "obvious"), (True, "subtle")):
        mask = (y_test == 1) & (subtle_test == subtle)
        recalls[attr] = float(pred[mask].mean()) if mask.any() else None
    return ProbeScores(
        accuracy=float(accuracy_score(y_test, pred)),
        balanced_accuracy=float(balanced_accuracy_score(y_test, pred)),
        auroc=float(roc_auc_score(y_test, score)),
        recall_obvious=recalls["obvious"],
        recall_subtle=recalls["subtle"],
    )


def _linear_scores(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    subtle_test: np.ndarray,
    *,
    C: float,
    max_iter: int,
    seed: int,
) -> ProbeScores:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    scores = _scores(y_test, model.predict(x_test), model.decision_function(x_test), subtle_test)
    scores.converged = bool(np.all(model.n_iter_ < max_iter))
    return scores


def _linear_inputs(feats: np.ndarray, n_train: int, n_hist: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise on the training rows; give the few histogram features the same total weight as the
    many pixel features, so that an L2-regularised probe does not drown a position-free signal in
    per-pixel noise."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(feats[:n_train])
    x_train, x_test = scaler.transform(feats[:n_train]), scaler.transform(feats[n_train:])
    n_pixel = x_train.shape[1] - n_hist
    for x in (x_train, x_test):
        x[:, n_pixel:] *= np.sqrt(n_pixel / n_hist)
    return x_train, x_test


def _cpu_threads(config: CnnProbeConfig) -> int:
    """CPUs for the CNN probe: as configured, else the CPUs this process may run on (never more than
    torch's own default, which honours OMP_NUM_THREADS)."""
    import torch

    if config.threads is not None:
        return config.threads
    affinity = getattr(os, "sched_getaffinity", None)
    available = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    return max(1, min(available, torch.get_num_threads()))


def _build_cnn(channels: int, outputs: int, width: int) -> torch.nn.ModuleDict:
    """Stride-2 stem, three conv-BN-ReLU layers with two 2x2 max pools, then global max + average pooling
    (max finds a small lesion anywhere; average sees diffuse change) into one linear layer."""
    from torch import nn

    def layer(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    trunk = nn.Sequential(
        *layer(channels, width, stride=2),
        *layer(width, 2 * width),
        nn.MaxPool2d(2),
        *layer(2 * width, 4 * width),
        nn.MaxPool2d(2),
        *layer(4 * width, 4 * width),
    )
    return nn.ModuleDict({"trunk": trunk, "head": nn.Linear(8 * width, outputs)})


def _cnn_logits(model: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    import torch

    h = model["trunk"](x)
    return model["head"](torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1))


def _shifted(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by up to ``max_shift`` pixels (edges replicated): position jitter without
    flips, so left/right findings keep their side."""
    import torch
    import torch.nn.functional as F

    if max_shift == 0:
        return batch
    size = batch.shape[-1]
    padded = F.pad(batch, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(batch), 2), generator=generator).tolist()
    crops = [img[:, dy : dy + size, dx : dx + size] for img, (dy, dx) in zip(padded, offsets, strict=True)]
    return torch.stack(crops)


@dataclass
class _CnnJob:
    """One domain's CNN probe: uint8 ``(n, p, p, c)`` images, training images first, and their labels."""

    domain: str
    images: np.ndarray
    y_train: np.ndarray  # (n_train, k) 0/1, one column per evaluable finding
    n_train: int


def _train_cnns(
    jobs: list[_CnnJob], *, config: CnnProbeConfig, seed: int, progress: bool
) -> list[np.ndarray]:
    """Train every domain's CNN and return its sigmoid scores ``(n - n_train, k)`` on the held-out images.

    The domains train side by side, one per CPU (``config.threads``), each on a single intra-op thread:
    these networks are too small for torch to split one step across cores efficiently, and split steps
    slowed to a crawl whenever another process wanted a core. Each network is built in this thread from
    ``seed`` and trains on its own generator, so the numbers do not depend on the number of CPUs. The
    caller's torch RNG state and thread count are left as they were.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    workers = min(_cpu_threads(config), len(jobs))  # before the thread count is lowered below
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = []
        with torch.random.fork_rng(devices=[]):
            for job in jobs:
                torch.manual_seed(seed)
                models.append(_build_cnn(job.images.shape[-1], job.y_train.shape[1], config.width))
        names = ", ".join(job.domain for job in jobs)
        lock = threading.Lock()
        with tqdm(
            total=config.epochs * len(jobs),
            desc=f"training CNNs ({names})",
            unit="epoch",
            disable=not progress,
        ) as bar:

            def epoch_done() -> None:
                with lock:
                    bar.update(1)

            def run(job: _CnnJob, model: torch.nn.ModuleDict) -> np.ndarray:
                torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
                return _fit_and_score(job, model, config=config, seed=seed, epoch_done=epoch_done)

            if workers == 1:
                return [run(job, model) for job, model in zip(jobs, models, strict=True)]
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnn-probe") as pool:
                return list(pool.map(run, jobs, models))
    finally:
        torch.set_num_threads(previous_threads)


def _fit_and_score(
    job: _CnnJob,
    model: torch.nn.ModuleDict,
    *,
    config: CnnProbeConfig,
    seed: int,
    epoch_done: Callable[[], None],
) -> np.ndarray:
    """Train ``model`` on the job's training images (BCE with per-finding pos_weight, AdamW, one-cycle
    learning rate, random shifts) and score its held-out images."""
    import torch
    import torch.nn.functional as F

    n_train = job.n_train
    x = torch.from_numpy(job.images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = x[:n_train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[:n_train].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    x_train, x_test = x[:n_train], x[n_train:]
    y = torch.from_numpy(job.y_train.astype(np.float32))
    positives = y.sum(dim=0)
    pos_weight = (n_train - positives) / positives.clamp_min(1.0)

    model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-n_train // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train, config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a lone image once the map is 1x1
                continue
            batch = _shifted(x_train[idx], config.max_shift, generator)
            batch = batch.contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(
                _cnn_logits(model, batch), y[idx], pos_weight=pos_weight
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        epoch_done()
    model.eval()
    with torch.inference_mode():
        scores = [torch.sigmoid(_cnn_logits(model, part)) for part in x_test.split(256)]
    return torch.cat(scores).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


def check_learnability(
    data_dir: str | Path,
    *,
    probe: Probe = "both",
    pixels: int = 32,
    seed: int = 0,
    progress: bool = True,
    bins: int = 16,
    C: float = 0.1,
    max_iter: int = 2000,
    cnn: CnnProbeConfig | None = None,
) -> LearnabilityReport:
    """Train the probes per domain and report, per finding, how well each detects it on held-out images.

    ``probe`` picks the linear probe, the CNN probe or both (the verdict uses the better one). ``pixels``,
    ``bins`` (must divide 256), ``C`` and ``max_iter`` configure the linear probe, ``cnn`` the CNN probe
    (default :class:`CnnProbeConfig`). Findings without positives or negatives in the train or the test
    part are reported as not evaluable (and left out of the CNN's outputs). Raises ``ValueError`` (a
    :class:`DatasetFormatError` naming the file) when ``findings.jsonl`` or an image is missing.
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}; got {probe!r}")
    if pixels < 1:
        raise ValueError(f"pixels must be >= 1, got {pixels}")
    if bins < 1 or 256 % bins:
        raise ValueError(f"bins must divide 256, got {bins}")
    cnn = cnn or CnnProbeConfig()
    use_linear, use_cnn = probe in ("linear", "both"), probe in ("cnn", "both")
    data_dir = Path(data_dir)
    catalogue = load_catalogue()
    items = read_findings(data_dir, catalogue=catalogue)
    meta = read_meta(data_dir)
    settings: dict[str, Any] = {
        "data_dir": str(data_dir),
        "probe": probe,
        "pixels": pixels,
        "bins": bins,
        "C": C,
        "max_iter": max_iter,
        "seed": seed,
        "train_splits": list(TRAIN_SPLITS),
        "test_splits": list(TEST_SPLITS),
        "threshold": LEARNABLE_THRESHOLD,
        "histogram_block_weight": "sqrt(n_pixel_features / n_histogram_features)",
        "medsynth": {
            k: meta[k] for k in ("seed", "per_domain", "difficulty", "image_size", "version") if k in meta
        },
    }
    if use_cnn:
        settings["cnn"] = {
            **asdict(cnn),
            "max_shift": cnn.max_shift,
            "parallel_domains": _cpu_threads(cnn),  # one intra-op thread each: results do not depend on it
            "decision_threshold": 0.5,
        }
    rows: list[LearnabilityRow] = []
    # Each domain's CNN job with its pending findings; all domains train together once loaded.
    cnn_jobs: list[tuple[_CnnJob, list[tuple[LearnabilityRow, np.ndarray, np.ndarray, np.ndarray]]]] = []
    for domain, spec in catalogue.items():
        dom_items = [it for it in items if it.domain == domain]
        train = [it for it in dom_items if it.split in TRAIN_SPLITS]
        test = [it for it in dom_items if it.split in TEST_SPLITS]
        pending: list[tuple[LearnabilityRow, np.ndarray, np.ndarray, np.ndarray]] = []
        for name, fspec in spec.get("findings", {}).items():
            y_train = np.array([name in it.finding_names for it in train], dtype=int)
            y_test = np.array([name in it.finding_names for it in test], dtype=int)
            row = LearnabilityRow(
                domain=domain,
                finding=name,
                label=fspec.get("label", name),
                n_train=len(train),
                n_test=len(test),
                n_train_positive=int(y_train.sum()),
                n_test_positive=int(y_test.sum()),
                evaluable=False,
            )
            if len(test):
                row.prevalence = float(y_test.mean())
            row.reason = _not_evaluable_reason(y_train, y_test)
            if row.reason is None:
                row.evaluable = True
                row.baseline_accuracy = float(np.mean(y_test == int(y_train.mean() >= 0.5)))
                subtle_test = np.array([it.is_subtle(name) for it in test], dtype=bool)
                row.n_test_obvious = int(((y_test == 1) & ~subtle_test).sum())
                row.n_test_subtle = int(((y_test == 1) & subtle_test).sum())
                pending.append((row, y_train, y_test, subtle_test))
            rows.append(row)
        if not pending:
            continue
        # Images are opened once per domain, only when at least one finding can be evaluated.
        mode = _domain_mode(spec)
        feats, images = _load_domain(
            train + test,
            findings_path=data_dir / "findings.jsonl",
            mode=mode,
            pixels=pixels,
            bins=bins,
            cnn_pixels=cnn.pixels if use_cnn else None,
            linear=use_linear,
            desc=f"{domain}: loading images",
            progress=progress,
        )
        if feats is not None:
            # One BLAS thread: these fits are too small to gain from more, and on a busy machine
            # spinning BLAS threads made them several times slower.
            with threadpool_limits(limits=1):
                x_train, x_test = _linear_inputs(feats, len(train), len(mode) * bins)
                for row, y_train, y_test, subtle_test in pending:
                    row.linear = _linear_scores(
                        x_train, y_train, x_test, y_test, subtle_test, C=C, max_iter=max_iter, seed=seed
                    )
        if images is not None:
            y_train_all = np.stack([y_train for _, y_train, _, _ in pending], axis=1)
            cnn_jobs.append((_CnnJob(domain, images, y_train_all, len(train)), pending))
    if cnn_jobs:
        all_scores = _train_cnns([job for job, _ in cnn_jobs], config=cnn, seed=seed, progress=progress)
        for (_, pending), scores in zip(cnn_jobs, all_scores, strict=True):
            for k, (row, _, y_test, subtle_test) in enumerate(pending):
                row.cnn = _scores(y_test, (scores[:, k] >= 0.5).astype(int), scores[:, k], subtle_test)
    return LearnabilityReport(rows=rows, settings=settings)


def _not_evaluable_reason(y_train: np.ndarray, y_test: np.ndarray) -> str | None:
    problems = []
    for part, y in (("train", y_train), ("test", y_test)):
        if len(y) == 0:
            problems.append(f"no {part} images")
            continue
        if y.sum() == 0:
            problems.append(f"no positives in {part}")
        if y.sum() == len(y):
            problems.append(f"no negatives in {part}")
    return "; ".join(problems) or None
