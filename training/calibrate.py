"""``mmedrag calibrate --domain D``: choose the adaptive-selection threshold ``gamma`` on validation data.

The paper's rule (``services.retriever.selection.select_paper``) keeps the retrieved contexts up to the
first similarity "cliff" ``log(S_i / S_{i+1}) > gamma``; the paper publishes no ``gamma``. This command
picks it per domain, on the retriever-validation split, for a stated objective, and writes it into the
retriever's ``retriever.json``, which the retriever service reads.

**Objective: keep the contexts that agree with the query's ground truth.** For each validation image
(MedSynth ``retriever_val`` split; findings from ``findings.jsonl``):

1. retrieve the top ``k_max`` reports of the domain's corpus (its ``retriever_train`` split, one entry
   per distinct text, exactly what ``mmedrag index`` stores) and note their similarities ``S_1..S_K``;
2. give each retrieved report an *agreement* ``a_i`` in [0, 1] with the query: the Jaccard index of
   the two finding sets, two normal studies agreeing fully
   (``training.evaluate.retrieval.finding_agreement``; a text shared by several reports gets their mean);
3. for each ``gamma`` of the grid, ``k = select_paper(S, gamma, k_min, k_max)`` (the service's own
   function, so the guards for non-positive scores apply as served) and score the kept prefix by the
   **soft F1 (Dice) between the kept contexts and the agreeing ones**::

       score(k) = 2 * (a_1 + ... + a_k) / (k + a_1 + ... + a_K)

   i.e. the harmonic mean of precision (mean agreement of what is kept) and recall (share of the
   agreement available in the top K that is kept). Keeping disagreeing reports lowers precision;
   cutting agreeing ones lowers recall, so there is no free penalty weight to tune. A query with no
   agreeing report in its top K scores 0 whatever is kept (1 when nothing is kept either);
4. the calibrated ``gamma`` maximises the mean score over the validation queries. Ties (common: nearby
   grid values often cut every query at the same rank) go to the median of the tied values, the one
   furthest from where the outcome changes.

The grid is 0 to 0.5 in steps of 0.005, plus ``KEEP_ALL_GAMMA`` ("never cut": the retriever's ranking
carries no usable cliff). The sidecar's ``gamma`` must be finite, so "never cut" is written as that large
finite value (a log ratio of two positive float similarities never reaches it), with ``keep_all: true``
in the calibration block.

Retrieval runs in-process (image and text embeddings, cosine by matrix product): the service ranks the
same way (Qdrant cosine over the same embeddings). ``k_min`` and ``k_max`` default to what the service
uses by default (``RetrieverSettings.k_min_default``; ``k_max_default``, else the sidecar's).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from services.common.artifacts import RETRIEVERS_DIR, read_json
from services.retriever.protocol import RETRIEVER_SIDECAR, RetrieverSidecar
from services.retriever.selection import select_paper
from training.artifacts.retriever import write_retriever_sidecar
from training.data.records import DOMAINS
from training.evaluate.retrieval import (
    CORPUS_SPLIT,
    DualEncoder,
    GroundTruth,
    context_agreements,
    cosine_top_k,
    encode_images,
    encode_texts,
    load_finding_corpus,
    load_split,
    read_ground_truth,
)

VALIDATION_SPLIT = "retriever_val"
# "Never cut": larger than any log(S_i / S_{i+1}) of positive float64 similarities (at most ~745).
KEEP_ALL_GAMMA = 1000.0
GAMMA_GRID: tuple[float, ...] = (*(round(0.005 * i, 3) for i in range(101)), KEEP_ALL_GAMMA)
OBJECTIVE = "dice_kept_vs_agreeing"
OBJECTIVE_TEXT = (
    "mean over validation queries of the soft F1 (Dice) between the kept contexts and the contexts "
    "agreeing with the query's ground-truth findings: 2 * sum(a_1..a_k) / (k + sum(a_1..a_K)), "
    "a_i = Jaccard of finding sets (two normals agree fully)"
)
AGREEMENT_TEXT = "Jaccard index of finding sets; two normal studies (no findings) agree fully"


def describe_grid(grid: Sequence[float]) -> str | list[float]:
    """A grid as a short phrase when it is an even progression (plus "never cut"), else its values."""
    finite = sorted(g for g in grid if g != KEEP_ALL_GAMMA)
    steps = np.diff(finite)
    if len(finite) < 3 or not np.allclose(steps, steps[0], rtol=0, atol=1e-9):
        return sorted(grid)
    text = f"{finite[0]:g} to {finite[-1]:g} in steps of {steps[0]:.6g}"
    return text + (f", and {KEEP_ALL_GAMMA:g} (never cut)" if KEEP_ALL_GAMMA in grid else "")


def kept_agreement_f1(agreements: Sequence[float], k: int) -> float:
    """Soft F1 (Dice) between the first ``k`` contexts and the agreeing ones (module docstring, step 3)."""
    values = [float(a) for a in agreements]
    if not 0 <= k <= len(values):
        raise ValueError(f"k must be between 0 and {len(values)}, got {k}")
    total = sum(values)
    if k == 0 and total == 0:
        return 1.0
    return 2 * sum(values[:k]) / (k + total)


@dataclass(frozen=True)
class GammaOutcome:
    """What one grid value does on the validation queries."""

    gamma: float
    score: float  # mean soft F1 (the objective)
    precision: float  # mean agreement of the kept contexts (queries keeping at least one)
    mean_k: float
    truncated: int  # queries cut before their last retrieved context
    truncation_rate: float  # truncated / queries
    ks: tuple[int, ...] = field(repr=False)  # contexts kept, per query


def evaluate_gamma(
    scores: np.ndarray, agreements: np.ndarray, gamma: float, *, k_min: int, k_max: int
) -> GammaOutcome:
    """Apply the paper rule with ``gamma`` to every query's ranked similarities and score the result."""
    ks, f1s, precisions, truncated = [], [], [], 0
    for row_scores, row_agreements in zip(scores, agreements, strict=True):
        k = select_paper([float(s) for s in row_scores], gamma=gamma, k_min=k_min, k_max=k_max)
        ks.append(k)
        f1s.append(kept_agreement_f1(row_agreements, k))
        if k:
            precisions.append(float(np.mean(row_agreements[:k])))
        truncated += k < min(k_max, len(row_scores))
    n = len(ks)
    return GammaOutcome(
        gamma=gamma,
        score=float(np.mean(f1s)) if n else 0.0,
        precision=float(np.mean(precisions)) if precisions else 0.0,
        mean_k=float(np.mean(ks)) if n else 0.0,
        truncated=truncated,
        truncation_rate=truncated / n if n else 0.0,
        ks=tuple(ks),
    )


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen ``gamma`` and the evidence for it."""

    domain: str
    gamma: float  # finite; KEEP_ALL_GAMMA when no cut helps
    k_min: int
    k_max: int
    grid: tuple[float, ...]
    outcomes: tuple[GammaOutcome, ...]  # one per grid value
    chosen: GammaOutcome
    keep_all: GammaOutcome  # the outcome of never cutting (KEEP_ALL_GAMMA), for comparison
    tied: tuple[float, ...]  # grid values scoring as well as the chosen one
    queries: int
    retriever_sha256: str | None = None
    data: str | None = None

    @property
    def k_histogram(self) -> dict[int, int]:
        """Queries per number of kept contexts under the chosen gamma."""
        return dict(sorted(Counter(self.chosen.ks).items()))

    def sidecar_block(self) -> dict[str, Any]:
        """The ``calibration`` entry of ``retriever.json``."""
        return {
            "objective": OBJECTIVE,
            "objective_description": OBJECTIVE_TEXT,
            "agreement": AGREEMENT_TEXT,
            "rule": "adaptive (paper): cut at the first rank with log(S_i / S_{i+1}) > gamma",
            "split": VALIDATION_SPLIT,
            "corpus_split": CORPUS_SPLIT,
            "data": self.data,
            "queries": self.queries,
            "k_min": self.k_min,
            "k_max": self.k_max,
            "grid": describe_grid(self.grid),
            "gamma": self.gamma,
            "keep_all": self.gamma == KEEP_ALL_GAMMA,
            "tied_gammas": [min(self.tied), max(self.tied)],
            "score": self.chosen.score,
            "keep_all_score": self.keep_all.score,
            "mean_kept_agreement": self.chosen.precision,
            "mean_k": self.chosen.mean_k,
            "truncated": self.chosen.truncated,
            "truncation_rate": self.chosen.truncation_rate,
            "k_histogram": {str(k): n for k, n in self.k_histogram.items()},
            "retriever_sha256": self.retriever_sha256,
        }


def choose_gamma(
    scores: np.ndarray,
    agreements: np.ndarray,
    *,
    domain: str,
    k_min: int,
    k_max: int,
    grid: Sequence[float] = GAMMA_GRID,
    retriever_sha256: str | None = None,
    data: str | None = None,
) -> CalibrationResult:
    """The grid value maximising the objective over the queries (ties: the median tied value).

    Args:
        scores: ``(queries, K)`` similarities of the retrieved contexts, each row descending.
        agreements: ``(queries, K)`` agreement of each retrieved context with its query.
        domain: the domain calibrated (recorded).
        k_min, k_max: the bounds the service applies.
        grid: candidate values, each finite and ``>= 0``.
    """
    scores, agreements = np.asarray(scores, dtype=np.float64), np.asarray(agreements, dtype=np.float64)
    if scores.shape != agreements.shape or scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(
            "need one row of scores and agreements per query, got shapes "
            f"{scores.shape} and {agreements.shape}"
        )
    if not 0 <= k_min <= k_max:
        raise ValueError(f"need 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    values = sorted({float(g) for g in grid})
    if not values or any(not math.isfinite(g) or g < 0 for g in values):
        raise ValueError("the gamma grid must hold finite values >= 0")
    outcomes = [evaluate_gamma(scores, agreements, g, k_min=k_min, k_max=k_max) for g in values]
    best = max(o.score for o in outcomes)
    tied = [o for o in outcomes if o.score >= best - 1e-12]
    chosen = tied[(len(tied) - 1) // 2]
    return CalibrationResult(
        domain=domain,
        gamma=chosen.gamma,
        k_min=k_min,
        k_max=k_max,
        grid=tuple(values),
        outcomes=tuple(outcomes),
        chosen=chosen,
        keep_all=evaluate_gamma(scores, agreements, KEEP_ALL_GAMMA, k_min=k_min, k_max=k_max),
        tied=tuple(o.gamma for o in tied),
        queries=scores.shape[0],
        retriever_sha256=retriever_sha256,
        data=data,
    )


def rank_validation(
    encoder: DualEncoder,
    data_dir: Path,
    domain: str,
    *,
    k_max: int,
    ground_truth: GroundTruth | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Retrieve the top ``k_max`` corpus texts for every validation image: ``(scores, agreements)``."""
    ground_truth = read_ground_truth(data_dir) if ground_truth is None else ground_truth
    queries = load_split(data_dir, domain, VALIDATION_SPLIT, ground_truth=ground_truth)
    corpus = load_finding_corpus(data_dir, domain, ground_truth=ground_truth)
    image_vectors = encode_images(encoder, [q.image for q in queries], progress=progress, desc="validation")
    corpus_vectors = encode_texts(encoder, corpus.texts, progress=progress, desc="corpus")
    indices, scores = cosine_top_k(image_vectors, corpus_vectors, k_max)
    return scores.astype(np.float64), context_agreements(queries, corpus, indices)


def _service_defaults(sidecar: RetrieverSidecar | None) -> tuple[int, int]:
    """``(k_min, k_max)`` the retriever service uses when a request does not say."""
    from services.retriever.settings import RetrieverSettings

    settings = RetrieverSettings()
    k_max = settings.k_max_default or (sidecar.k_max_default if sidecar is not None else 10)
    k_max = min(k_max, settings.k_max_ceiling)
    return min(settings.k_min_default, k_max), k_max


def read_retriever_sidecar(folder: Path) -> RetrieverSidecar | None:
    """The folder's ``retriever.json`` validated, or None when there is none yet."""
    path = Path(folder) / RETRIEVER_SIDECAR
    if not path.is_file():
        return None
    return RetrieverSidecar.model_validate(read_json(path, Path(folder).parent, "retriever sidecar"))


def calibrate_gamma(
    folder: Path,
    data_dir: Path,
    domain: str,
    *,
    k_max: int | None = None,
    k_min: int | None = None,
    grid: Sequence[float] = GAMMA_GRID,
    encoder: DualEncoder | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Calibrate the retriever in ``folder`` on ``data_dir``'s validation split (module docstring).

    Args:
        folder: a retriever artifact folder (open_clip files, optionally ``retriever.json``).
        data_dir: a MedSynth folder.
        domain: the retriever's domain.
        k_max, k_min: bounds of the rule; default: the service's defaults.
        grid: candidate gammas.
        encoder: use this instead of loading ``folder`` (tests).
        progress: show progress bars.

    Example::

        result = calibrate_gamma(root / "retrievers" / "radiology", Path("data/medsynth"), "radiology")
        write_calibration(root / "retrievers" / "radiology", result)
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    folder = Path(folder)
    sidecar = read_retriever_sidecar(folder)
    if sidecar is not None and sidecar.domain != domain:
        raise ValueError(f"{folder / RETRIEVER_SIDECAR} is for domain {sidecar.domain!r}, not {domain!r}")
    default_k_min, default_k_max = _service_defaults(sidecar)
    k_max = default_k_max if k_max is None else k_max
    k_min = min(default_k_min, k_max) if k_min is None else k_min
    if k_max < 1 or not 0 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_max and 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if encoder is None:
        from services.common.clip import ClipModel

        encoder = ClipModel.load(folder, root=folder.parent)
    scores, agreements = rank_validation(encoder, Path(data_dir), domain, k_max=k_max, progress=progress)
    sha = getattr(encoder, "weights_sha256", None)
    return choose_gamma(
        scores,
        agreements,
        domain=domain,
        k_min=k_min,
        k_max=k_max,
        grid=grid,
        retriever_sha256=sha if isinstance(sha, str) else None,
        data=str(data_dir),
    )


def write_calibration(folder: Path, result: CalibrationResult) -> Path:
    """Write ``gamma`` and the ``calibration`` block into ``folder/retriever.json`` (kept fields stay)."""
    folder = Path(folder)
    sidecar = read_retriever_sidecar(folder)
    extra: dict[str, Any] = {}
    k_max_default = 10
    if sidecar is not None:
        if sidecar.domain != result.domain:
            raise ValueError(
                f"{folder / RETRIEVER_SIDECAR} is for domain {sidecar.domain!r}, not {result.domain!r}"
            )
        extra = dict(sidecar.model_extra or {})
        k_max_default = sidecar.k_max_default
    extra["calibration"] = result.sidecar_block()
    return write_retriever_sidecar(
        folder, result.domain, result.gamma, k_max_default=k_max_default, extra=extra
    )


def format_summary(result: CalibrationResult, *, width: int = 40) -> str:
    """Human-readable result: the chosen gamma, how often truncation fires, the k histogram."""
    chosen = result.chosen
    gamma = "never cut (keep k_max)" if result.gamma == KEEP_ALL_GAMMA else f"{result.gamma:g}"
    names = [f"{g:g}" if g != KEEP_ALL_GAMMA else "never cut" for g in (min(result.tied), max(result.tied))]
    tied = f"{names[0]}..{names[1]}" if len(result.tied) > 1 else names[0]
    lines = [
        f"{result.domain}: gamma = {gamma}  (ties over {tied}; k_min {result.k_min}, k_max {result.k_max})",
        f"  objective ({OBJECTIVE}): {chosen.score:.4f}  vs never cutting: {result.keep_all.score:.4f}",
        f"  mean agreement of kept contexts: {chosen.precision:.4f} "
        f"(never cutting: {result.keep_all.precision:.4f})",
        f"  truncation fired for {chosen.truncated}/{result.queries} validation queries "
        f"({100 * chosen.truncation_rate:.1f}%); mean k {chosen.mean_k:.2f}",
        "  k distribution:",
    ]
    histogram = result.k_histogram
    peak = max(histogram.values())
    for k in range(min(histogram), max(histogram) + 1):
        n = histogram.get(k, 0)
        bar = "█" * max(1 if n else 0, round(width * n / peak))
        lines.append(f"    k={k:<3d} {bar} {n} ({100 * n / result.queries:.1f}%)")
    return "\n".join(lines)


def calibrate_cli(
    domain: Annotated[str, typer.Option("--domain", help="Domain to calibrate: " + ", ".join(DOMAINS))],
    data: Annotated[Path, typer.Option("--data", help="MedSynth folder (its retriever_val split).")],
    artifacts: Annotated[
        Path,
        typer.Option(
            "--artifacts", envvar="MMEDRAG_ARTIFACTS", help="Artifacts folder (retrievers/<domain>)."
        ),
    ] = Path("artifacts"),
    retriever: Annotated[
        Path | None,
        typer.Option("--retriever", help="Retriever folder; default <artifacts>/retrievers/<domain>."),
    ] = None,
    k_max: Annotated[
        int | None, typer.Option("--k-max", help="Contexts retrieved; default: the service's default.")
    ] = None,
    k_min: Annotated[
        int | None, typer.Option("--k-min", help="Contexts kept at least; default: the service's default.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the result, write nothing.")] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads (default: torch's).")
    ] = None,
) -> None:
    """Choose the adaptive-selection gamma on validation data and write it into retriever.json."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    folder = retriever if retriever is not None else Path(artifacts) / RETRIEVERS_DIR / domain
    result = calibrate_gamma(folder, data, domain, k_max=k_max, k_min=k_min, progress=True)
    typer.echo(format_summary(result))
    if dry_run:
        typer.echo("dry run: nothing written")
        return
    path = write_calibration(folder, result)
    typer.echo(f"wrote gamma {result.gamma:g} to {path}")
