"""Retrieval Recall@k, image→text and text→image, over a gallery of distinct texts.

Reports repeat (MedSynth's "Normal fundus examination.", real templates), so the text gallery holds each
distinct text once and an image's positive is its own text: a hit is its text within the top k. In the
other direction each distinct text queries the images, and every image described by that text is a
positive. Ties count against the query (a positive tied with a negative is ranked after it), so a
degenerate encoder that scores everything alike gets no hits (as in ``training.evaluate.retrieval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import PIL.Image

from training.retriever.data import Pair, load_image

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def recall_at_k(
    similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Share of queries (rows) with at least one positive among their ``k`` most similar gallery items.

    Args:
        similarity: ``(queries, gallery)`` scores, higher is more similar.
        positives: boolean ``(queries, gallery)``: which gallery items are right for each query; every
            query needs at least one.
        ks: cut-offs; ``k`` larger than the gallery counts the whole gallery.

    Returns:
        ``{"r1": ..., "r5": ..., "r10": ...}`` as fractions in [0, 1].

    Example::

        recall_at_k(np.array([[0.9, 0.1], [0.8, 0.2]]), np.eye(2, dtype=bool), ks=(1,))  # {"r1": 0.5}
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if similarity.ndim != 2 or similarity.shape != positives.shape:
        raise ValueError(f"similarity {similarity.shape} and positives {positives.shape} must be equal 2-D")
    if similarity.shape[0] == 0:
        raise ValueError("no queries")
    if not positives.any(axis=1).all():
        raise ValueError("every query needs at least one positive")
    best_positive = np.where(positives, similarity, -np.inf).max(axis=1, keepdims=True)
    # 0-based rank of the best positive; a negative tied with it is ranked before it.
    rank = ((similarity >= best_positive) & ~positives).sum(axis=1)
    return {f"r{k}": float((rank < k).mean()) for k in ks}


def paired_recalls(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    texts: Sequence[str],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k of image i ↔ ``texts[i]`` pairs; ``text_embeddings`` are those of ``distinct_texts(texts)``.

    Returns ``i2t_r1 … i2t_r10``, ``t2i_r1 … t2i_r10`` and ``mean_r1 … mean_r10`` (the mean of both
    directions), as fractions.
    """
    gallery = distinct_texts(texts)
    if len(image_embeddings) != len(texts) or len(text_embeddings) != len(gallery):
        raise ValueError(
            f"{len(image_embeddings)} images for {len(texts)} texts, {len(text_embeddings)} text embeddings "
            f"for {len(gallery)} distinct texts"
        )
    column = {text: j for j, text in enumerate(gallery)}
    positives = np.zeros((len(texts), len(gallery)), dtype=bool)
    positives[np.arange(len(texts)), [column[text] for text in texts]] = True
    similarity = (
        np.asarray(image_embeddings, dtype=np.float64) @ np.asarray(text_embeddings, dtype=np.float64).T
    )
    i2t = recall_at_k(similarity, positives, ks)
    t2i = recall_at_k(similarity.T, positives.T, ks)
    result = {f"i2t_{name}": value for name, value in i2t.items()}
    result |= {f"t2i_{name}": value for name, value in t2i.items()}
    result |= {f"mean_{name}": (i2t[name] + t2i[name]) / 2 for name in i2t}
    return result


def distinct_texts(texts: Sequence[str]) -> list[str]:
    """The texts without repeats, in first-seen order (the text gallery)."""
    return list(dict.fromkeys(texts))


class Encoder(Protocol):
    """What ``evaluate_encoder`` needs of a retriever (``services.common.clip.ClipModel`` is one)."""

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def evaluate_encoder(
    encoder: Encoder, pairs: Sequence[Pair], ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Recall@k of a loaded retriever on image-text pairs (e.g. ``medsynth_pairs(data, domain, "test")``).

    The original image files are encoded by the retriever's own preprocessing, as the service does.
    """
    texts = [pair.text for pair in pairs]
    images = [load_image(pair.image) for pair in pairs]
    return paired_recalls(
        encoder.encode_images(images), encoder.encode_texts(distinct_texts(texts)), texts, ks
    )
