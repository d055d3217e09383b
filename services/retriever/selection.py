"""How many of the retrieved contexts to keep: MMed-RAG's adaptive rule, the original repository's
ratio rule, a fixed k, and no retrieval at all. Pure functions over a descending list of scores.

Every rule returns ``k``, the length of the kept prefix: contexts are always kept best-first, so "which"
is never in question, only "how many".

Rules (facts file, "Adaptive context selection"):

- **adaptive** (the paper, the default): with ``u_i = log(S_i / S_{i+1})``, keep the first ``i``
  contexts where ``i`` is the first rank with ``u_i > gamma``; if no rank qualifies keep all.
- **ratio** (the original repository): keep the contexts with ``S_1 / S_i < threshold``.
- **fixed**: keep the top ``k``.
- **off**: keep none (generation without retrieval); the service still returns the hits for inspection.

Cosine similarities can be zero or negative, where the log ratio is undefined and a ratio misleads (the
repository's rule kept a context scoring -0.9 after one scoring -0.7, since 0.7/0.9 < 1.5). Both rules
here treat a non-positive score as no evidence: it is kept only when ``k_min`` forces it. In detail,
for the adaptive rule: a non-positive ``S_i`` cuts *before* rank ``i``; a positive ``S_i`` followed by
a non-positive ``S_{i+1}`` is a cliff (``u_i = +inf``) and cuts *after* rank ``i``.

Bounds: the result always lies in ``[min(k_min, n), min(k_max, n)]``, ``k_min`` winning over the rule and
``k_max`` over everything; ``n = 0`` gives 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

SelectionStrategy = Literal["adaptive", "ratio", "fixed", "off"]
STRATEGIES: tuple[SelectionStrategy, ...] = get_args(SelectionStrategy)

# Threshold of the paper rule when the retriever artifact carries no calibrated one: a drop of about 5%
# between neighbouring similarities (log(1 / 0.95) = 0.051) counts as a cliff. The paper publishes no
# value; `retriever.json` holds the per-domain value calibrated on validation data.
DEFAULT_GAMMA = 0.05
# The repository's example threshold for S_1 / S_i.
DEFAULT_RATIO_THRESHOLD = 1.5


def _check_scores(scores: Sequence[float]) -> list[float]:
    values = [float(s) for s in scores]
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"scores must be finite numbers, got {value!r} at position {i}")
    for i in range(len(values) - 1):
        if values[i] < values[i + 1]:
            raise ValueError(
                f"scores must be sorted in descending order, but score {i + 1} ({values[i]:.6g}) "
                f"< score {i + 2} ({values[i + 1]:.6g})"
            )
    return values


def _clamp(keep: int, n: int, k_min: int, k_max: int | None) -> int:
    if k_min < 0:
        raise ValueError(f"k_min must be >= 0, got {k_min}")
    if k_max is not None:
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        if k_min > k_max:
            raise ValueError(f"k_min ({k_min}) must not exceed k_max ({k_max})")
    upper = n if k_max is None else min(k_max, n)
    return min(max(keep, min(k_min, n)), upper)


def select_paper(scores: Sequence[float], *, gamma: float, k_min: int = 1, k_max: int | None = None) -> int:
    """MMed-RAG's rule: cut at the first rank ``i`` whose log similarity ratio ``u_i`` exceeds ``gamma``.

    Args:
        scores: similarities ``S_1 >= S_2 >= ...`` (ValueError when not sorted or not finite).
        gamma: cliff threshold, ``>= 0``; a tie (``u_i = 0``) therefore never cuts, and ``gamma = 0``
            cuts at the first strict decrease.
        k_min: keep at least this many (as far as there are scores).
        k_max: keep at most this many (None: no cap).

    Example: ``select_paper([0.9, 0.88, 0.5, 0.49], gamma=0.1)`` is 2 (``log(0.88/0.5) = 0.57``).
    """
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    values = _check_scores(scores)
    n = len(values)
    keep = n
    for i, current in enumerate(values):
        if current <= 0:  # no evidence from here on: cut before this rank
            keep = i
            break
        if i + 1 < n:
            following = values[i + 1]
            if following <= 0 or math.log(current / following) > gamma:
                keep = i + 1
                break
    return _clamp(keep, n, k_min, k_max)


def select_ratio(
    scores: Sequence[float],
    *,
    threshold: float = DEFAULT_RATIO_THRESHOLD,
    k_min: int = 1,
    k_max: int | None = None,
) -> int:
    """The original repository's rule: keep the contexts with ``S_1 / S_i < threshold``.

    Only positive scores count: when ``S_1 <= 0`` nothing qualifies, and a non-positive ``S_i`` never
    qualifies (``k_min`` can still force them in). ``threshold`` must exceed 1 (else not even the best
    context would qualify).
    """
    if not math.isfinite(threshold) or threshold <= 1:
        raise ValueError(f"ratio threshold must be a finite number > 1, got {threshold!r}")
    values = _check_scores(scores)
    keep = 0
    if values and values[0] > 0:
        # Sorted scores make S_1 / S_i non-decreasing over the positive ones, so the kept set is a prefix.
        for value in values:
            if value <= 0 or values[0] / value >= threshold:
                break
            keep += 1
    return _clamp(keep, len(values), k_min, k_max)


def select_fixed(scores: Sequence[float], *, k: int) -> int:
    """The top ``k`` (fewer when there are fewer scores)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return min(k, len(_check_scores(scores)))


@dataclass(frozen=True)
class SelectionParams:
    """Parameters of every strategy; each strategy reads the ones it needs."""

    gamma: float = DEFAULT_GAMMA  # adaptive: cliff threshold on log(S_i / S_{i+1})
    ratio_threshold: float = DEFAULT_RATIO_THRESHOLD  # ratio: keep S_1 / S_i < threshold
    k_min: int = 1  # adaptive, ratio: keep at least this many
    k_max: int | None = None  # adaptive, ratio: keep at most this many; fixed: keep exactly this many


def select_contexts(
    scores: Sequence[float], strategy: SelectionStrategy = "adaptive", params: SelectionParams | None = None
) -> int:
    """Number of contexts to keep under a named strategy (see the module docstring).

    ``fixed`` keeps ``params.k_max`` (all scores when None); ``off`` keeps none.
    """
    params = params or SelectionParams()
    if strategy == "adaptive":
        return select_paper(scores, gamma=params.gamma, k_min=params.k_min, k_max=params.k_max)
    if strategy == "ratio":
        return select_ratio(scores, threshold=params.ratio_threshold, k_min=params.k_min, k_max=params.k_max)
    if strategy == "fixed":
        return select_fixed(scores, k=len(scores) if params.k_max is None else params.k_max)
    if strategy == "off":
        _check_scores(scores)
        return 0
    raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
