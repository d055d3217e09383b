"""Top log-probabilities of one generated position, shared by the generator service, pair construction
and evaluation, so that P(yes) means the same number wherever it is computed.

Log-probabilities are the log-softmax of the model's *raw* logits (before temperature and top-p), as vLLM
reports them. Two token ids can decode to the same text; where a position is keyed by text, such a clash
keeps the **sum of their probabilities** (log-sum-exp): the probability that the model writes that text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any


def top_token_logprobs(logits: Any, k: int) -> list[tuple[int, float]]:
    """The ``k`` likeliest token ids of one position's logits (a 1-D tensor) and their log-probabilities,
    likeliest first; ids of probability zero (masked to -inf) are left out."""
    import torch

    if k <= 0:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return [
        (index, value)
        for index, value in zip(indices.tolist(), values.tolist(), strict=True)
        if value != -math.inf
    ]


def logsumexp(values: Iterable[float]) -> float:
    """log(sum(exp(v))), stable for very negative values; -inf for no values."""
    values = list(values)
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(value - top) for value in values))


def merge_by_text(entries: Iterable[tuple[str, float]]) -> dict[str, float]:
    """``(token text, log-probability)`` pairs → ``{text: log-probability}``; a repeated text keeps the sum
    of the probabilities, in first-seen order."""
    grouped: dict[str, list[float]] = {}
    for text, logprob in entries:
        grouped.setdefault(text, []).append(float(logprob))
    return {text: logsumexp(values) for text, values in grouped.items()}


def top_logprobs_by_text(logits: Any, k: int, decode: Callable[[int], str]) -> dict[str, float]:
    """The top-``k`` log-probabilities of one position keyed by token text (``decode`` one id)."""
    return merge_by_text((decode(index), value) for index, value in top_token_logprobs(logits, k))
