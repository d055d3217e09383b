"""Image-report pairs for retriever training, read through the release formats (``training.data.formats``).

A MedSynth folder (or any folder in its layout) gives ``<data>/<domain>/retriever_train.json`` and
``retriever_val.json`` in the domain's retriever format (``RELEASE_FORMATS``), images under
``<data>/<domain>/images``. Real release files work the same way given their format name and image root.
The text of a pair is the text the domain's corpus indexes (Harvard-FairVLMed: ``gpt4_summary``), so the
retriever learns to match images against exactly what it will search.

Texts longer than the text tower's context (77 tokens in the bundled configs) are truncated by the
tokenizer, at training and at serving time alike; the share of texts that fill the context is recorded in
``metrics.json`` (``data.texts_at_context_limit``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torch.utils.data import Dataset

from training.data.formats import get_format

# Release file of each MedSynth split: the retriever splits in the retriever format, the others in the
# report format (whose Harvard text is the long note; the retriever's text is its gpt4_summary).
_RETRIEVER_FILES = {"retriever_train": "retriever_train.json", "retriever_val": "retriever_val.json"}
_SUMMARY_KEY = "gpt4_summary"


@dataclass(frozen=True)
class Pair:
    """One image (absolute path) and the text that describes it."""

    id: str
    image: Path
    text: str


def load_pairs(
    path: Path,
    format_name: str,
    image_root: Path,
    *,
    domain: str,
    dataset: str | None = None,
    text_key: str | None = None,
) -> list[Pair]:
    """Pairs of one release file; every image must exist under ``image_root``.

    A radiology study with several images (IU-Xray: frontal and lateral) gives one pair, its first image.

    Args:
        path: the release JSON/JSONL file.
        format_name: its ``training.data.formats`` name (e.g. ``retriever-radiology``).
        image_root: the folder the file's image paths are relative to.
        domain: the domain the records must belong to.
        dataset: dataset name where the format is shared (``retriever-radiology``: iu-xray or mimic-cxr).
        text_key: take the text from this metadata field instead of the format's text (e.g. the
            ``gpt4_summary`` of a Harvard report file).
    """
    image_root = Path(image_root)
    records = get_format(format_name).load(Path(path), image_root, dataset=dataset, domain=domain).records
    pairs = []
    for record in records:
        text = record.report if text_key is None else record.metadata.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: record {record.id!r} has no text in {text_key or 'its report'}")
        pairs.append(Pair(id=record.id, image=image_root / record.image, text=text.strip()))
    if not pairs:
        raise ValueError(f"{path} holds no records")
    return pairs


def medsynth_pairs(data_dir: Path, domain: str, split: str) -> list[Pair]:
    """The pairs of one split of a MedSynth-layout folder, with the text the retrieval corpus uses.

    ``retriever_train`` / ``retriever_val`` come from the retriever files; ``preference`` / ``test`` from
    the report files (Harvard-FairVLMed: their ``gpt4_summary``, the text its retriever is trained on).
    """
    from training.data.medsynth.release import RELEASE_FORMATS, dataset_name

    if domain not in RELEASE_FORMATS:
        raise ValueError(f"domain must be one of {', '.join(RELEASE_FORMATS)}, got {domain!r}")
    retriever_format, report_format = RELEASE_FORMATS[domain]
    folder = Path(data_dir) / domain
    image_root = folder / "images"
    if split in _RETRIEVER_FILES:
        return load_pairs(
            folder / _RETRIEVER_FILES[split],
            retriever_format,
            image_root,
            domain=domain,
            dataset=dataset_name(domain),
        )
    text_key = _SUMMARY_KEY if retriever_format == "retriever-harvard" else None
    return load_pairs(
        folder / f"{split}_report.json",
        report_format,
        image_root,
        domain=domain,
        dataset=dataset_name(domain),
        text_key=text_key,
    )


def files_sha256(paths: Sequence[Path]) -> str:
    """One checksum over the given files' bytes, in order (the data fingerprint in metrics.json)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode("utf-8") + b"\0")
        with Path(path).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_image(path: Path, *, max_side: int | None = None) -> PIL.Image.Image:
    """An RGB image, shrunk (aspect kept) so its shorter side is at most ``max_side``."""
    with PIL.Image.open(path) as image:
        image = image.convert("RGB")
    if max_side is not None and min(image.size) > max_side:
        scale = max_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    return image


class PairDataset(Dataset):
    """Pairs as ``(image tensor, token ids)``; texts are tokenised once, images decoded once and kept.

    Images are kept at ``cache_side`` pixels (shorter side; the model's input size is enough, since the
    transform resizes to it anyway), so an epoch costs no decoding.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        transform: Callable[[PIL.Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        cache_side: int | None = None,
    ):
        self.pairs = list(pairs)
        self.transform = transform
        self.images = [load_image(pair.image, max_side=cache_side) for pair in self.pairs]
        self.tokens = tokenizer([pair.text for pair in self.pairs])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.tokens[index]


def distinct_text_batches(
    texts: Sequence[str], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches (``len(texts) // batch_size`` of them), no text twice in a batch.

    The InfoNCE loss treats every other pair of a batch as a negative, so two images with the same
    report in one batch would be pushed away from their own text. Items are shuffled, grouped by text
    (groups in random order) and dealt round-robin to the batches; a text with more images than there are
    batches gives the surplus (different ones each epoch) a rest, and batches come out that much smaller
    (the step count stays ``len(texts) // batch_size``). With distinct texts this is a plain shuffle into
    batches of ``batch_size``.

    Example: 5 images of "normal" and 3 distinct texts, batch 2 → 4 batches, "normal" in each at most
    once, one "normal" image left out this epoch.
    """
    count = len(texts) // batch_size
    if count < 1:
        raise ValueError(f"{len(texts)} items do not fill one batch of {batch_size}")
    groups: dict[str, list[int]] = {}
    for index in torch.randperm(len(texts), generator=generator).tolist():
        groups.setdefault(texts[index], []).append(index)
    order = [index for group in groups.values() for index in group[:count]]
    # Groups are in first-seen order of the shuffled items: a random order of texts.
    batches: list[list[int]] = [[] for _ in range(count)]
    for position, index in enumerate(order[: count * batch_size]):
        batches[position % count].append(index)
    return batches


def context_limit_share(tokens: torch.Tensor, pad_id: int = 0) -> float:
    """Share of tokenised texts whose last context position is used (truncated, or exactly full)."""
    if tokens.shape[0] == 0:
        return 0.0
    return float((tokens[:, -1] != pad_id).float().mean())
