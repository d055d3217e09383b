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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data.errors import DatasetFormatError
from training.data.medsynth.catalogue import load_catalogue
from training.data.medsynth.reader import MedSynthImage, read_findings, read_meta

TRAIN_SPLITS: tuple[str, ...] = ("retriever_train", "retriever_val")
TEST_SPLITS: tuple[str, ...] = ("preference", "test")
LEARNABLE_THRESHOLD = 0.70

Verdict = Literal["learnable", "weak", "not evaluable"]


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
    desc: str,
    progress: bool,
) -> np.ndarray:
    feats = []
    for item in tqdm(items, desc=desc, unit="img", disable=not progress):
        try:
            with Image.open(item.path) as img:
                feats.append(image_features(img, mode=mode, pixels=pixels, bins=bins))
        except OSError as exc:
            raise DatasetFormatError(
                findings_path, item.id, "image", f"cannot read image {item.path}: {exc}"
            ) from exc
    return np.stack(feats)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass
class LearnabilityRow:
    """The probe's result for one (domain, finding). Metrics are ``None`` when not evaluable."""

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
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    auroc: float | None = None
    recall_obvious: float | None = None
    recall_subtle: float | None = None
    n_test_obvious: int = 0
    n_test_subtle: int = 0
    converged: bool | None = None

    @property
    def verdict(self) -> Verdict:
        if not self.evaluable or self.balanced_accuracy is None:
            return "not evaluable"
        return "learnable" if self.balanced_accuracy >= LEARNABLE_THRESHOLD else "weak"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


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
        counts = {v: sum(r.verdict == v for r in self.rows) for v in ("learnable", "weak", "not evaluable")}
        lines = [
            "# MedSynth learnability check",
            "",
            f"Data: `{s.get('data_dir', '?')}` (seed {meta.get('seed', '?')}, "
            f"difficulty {meta.get('difficulty', '?')}, per_domain {meta.get('per_domain', '?')}).",
            f"Probe: logistic regression (C={s.get('C')}, class_weight=balanced) on {s.get('pixels')}×"
            f"{s.get('pixels')} downsampled pixels + {s.get('bins')}-bin per-channel histograms, trained on "
            f"{' + '.join(TRAIN_SPLITS)}, evaluated on {' + '.join(TEST_SPLITS)} (held out by image).",
            f"Verdict: learnable when balanced accuracy ≥ {LEARNABLE_THRESHOLD:.2f}. "
            f"Baseline = accuracy of always predicting the training majority class. "
            f"Summary: {counts['learnable']} learnable, {counts['weak']} weak, "
            f"{counts['not evaluable']} not evaluable.",
            "",
            "| domain | finding | prevalence | baseline acc | acc | balanced acc | AUROC "
            "| recall obvious | recall subtle | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            verdict = r.verdict if r.evaluable else f"not evaluable ({r.reason})"
            cells = [
                r.domain,
                r.finding,
                _fmt(r.prevalence),
                _fmt(r.baseline_accuracy),
                _fmt(r.accuracy),
                _fmt(r.balanced_accuracy),
                _fmt(r.auroc),
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
# The check
# --------------------------------------------------------------------------------------------------


def _evaluate(
    row: LearnabilityRow,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    subtle_test: np.ndarray,
    *,
    C: float,
    max_iter: int,
    seed: int,
) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    model = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    row.converged = bool(np.all(model.n_iter_ < max_iter))
    pred = model.predict(x_test)
    score = model.decision_function(x_test)
    majority = int(y_train.mean() >= 0.5)
    row.prevalence = float(y_test.mean())
    row.baseline_accuracy = float(np.mean(y_test == majority))
    row.accuracy = float(accuracy_score(y_test, pred))
    row.balanced_accuracy = float(balanced_accuracy_score(y_test, pred))
    row.auroc = float(roc_auc_score(y_test, score))
    for subtle, attr in ((False, "obvious"), (True, "subtle")):
        mask = (y_test == 1) & (subtle_test == subtle)
        setattr(row, f"n_test_{attr}", int(mask.sum()))
        setattr(row, f"recall_{attr}", float(pred[mask].mean()) if mask.any() else None)


def check_learnability(
    data_dir: str | Path,
    *,
    pixels: int = 32,
    seed: int = 0,
    progress: bool = True,
    bins: int = 16,
    C: float = 0.1,
    max_iter: int = 2000,
) -> LearnabilityReport:
    """Train one linear probe per (domain, finding) and report how well it detects the finding.

    ``bins`` must divide 256. Findings without positives or negatives in the train or the test part are
    reported as not evaluable. Raises ``ValueError`` (a :class:`DatasetFormatError` naming the file)
    when ``findings.jsonl`` or an image is missing.
    """
    from sklearn.preprocessing import StandardScaler

    if pixels < 1:
        raise ValueError(f"pixels must be >= 1, got {pixels}")
    if bins < 1 or 256 % bins:
        raise ValueError(f"bins must divide 256, got {bins}")
    data_dir = Path(data_dir)
    catalogue = load_catalogue()
    items = read_findings(data_dir, catalogue=catalogue)
    meta = read_meta(data_dir)
    settings: dict[str, Any] = {
        "data_dir": str(data_dir),
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
    rows: list[LearnabilityRow] = []
    for domain, spec in catalogue.items():
        dom_items = [it for it in items if it.domain == domain]
        train = [it for it in dom_items if it.split in TRAIN_SPLITS]
        test = [it for it in dom_items if it.split in TEST_SPLITS]
        findings = spec.get("findings", {})
        pending: list[tuple[LearnabilityRow, np.ndarray, np.ndarray]] = []
        for name, fspec in findings.items():
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
                pending.append((row, y_train, y_test))
            rows.append(row)
        if not pending:
            continue
        # Images are loaded once per domain, only when at least one finding can be evaluated.
        feats = _load_domain(
            train + test,
            findings_path=data_dir / "findings.jsonl",
            mode=_domain_mode(spec),
            pixels=pixels,
            bins=bins,
            desc=f"{domain}: loading images",
            progress=progress,
        )
        scaler = StandardScaler().fit(feats[: len(train)])
        x_train = scaler.transform(feats[: len(train)])
        x_test = scaler.transform(feats[len(train) :])
        # Give the few histogram features the same total weight as the many pixel features, so that an
        # L2-regularised probe does not drown a position-free signal in per-pixel noise.
        n_hist = len(_domain_mode(spec)) * bins
        n_pixel = x_train.shape[1] - n_hist
        for x in (x_train, x_test):
            x[:, n_pixel:] *= np.sqrt(n_pixel / n_hist)
        for row, y_train, y_test in pending:
            subtle_test = np.array([it.is_subtle(row.finding) for it in test], dtype=bool)
            _evaluate(row, x_train, y_train, x_test, y_test, subtle_test, C=C, max_iter=max_iter, seed=seed)
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
