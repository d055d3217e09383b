"""Read the preference pairs ``mmedrag pairs`` writes and turn them into a TRL vision preference dataset.

Pair format (one JSON object a line, ``<pairs>/pairs_<set>.jsonl`` and ``pairs_all.jsonl``): ``id``, ``set``
(``stage1`` | ``cm`` | ``oa1`` | ``oa2``), ``domain``, ``task``, ``image`` and ``rejected_image`` (paths
relative to ``image_root``, or absolute; ``rejected_image`` null means the rejected side sees the real
image too), ``prompt`` (the user text of ``services.common.prompts.build_prompt``), ``chosen``,
``rejected``, ``references``, ``provenance``.

The dataset rows are what ``MMedRAGDPOTrainer`` feeds TRL: ``prompt`` is the vicuna_v1 text up to
``"ASSISTANT:"`` (``render_conversation(prompt)``), ``chosen``/``rejected`` are the rest of
``render_conversation(prompt, answer)`` (``" {answer}</s>"``), so training reads byte for byte the text the
served chat template renders. ``images`` holds the chosen side's image and ``rejected_images`` the
rejected side's (the noise image for stage 1 and D_cm): one image per side, decoded lazily by ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.prompts import render_conversation

PairSet = Literal["stage1", "cm", "oa1", "oa2"]
PAIR_SETS: tuple[str, ...] = ("stage1", "cm", "oa1", "oa2")
# Stage 1 trains on the stage-1 pairs; stage 2 continues on D_cm ∪ D_oa1 ∪ D_oa2 (facts file, "DPO").
STAGE_SETS: dict[int, tuple[str, ...]] = {1: ("stage1",), 2: ("cm", "oa1", "oa2")}
IMAGES = "images"
REJECTED_IMAGES = "rejected_images"


class PairError(ValueError):
    """A pair file is missing, malformed, or names an image that does not exist."""


class PreferencePair(BaseModel):
    """One line of a pair file (the contract between ``mmedrag pairs`` and ``mmedrag dpo``)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    set: PairSet
    domain: str
    task: Literal["vqa", "report"]
    image: str
    image_root: str = ""
    rejected_image: str | None = None
    prompt: str
    chosen: str
    rejected: str
    references: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def image_path(self, image_root: Path | None = None) -> Path:
        """The real (chosen-side) image; ``image_root`` replaces the file's own root when given."""
        return _resolve(self.image, image_root if image_root is not None else Path(self.image_root))

    def rejected_image_path(self, image_root: Path | None = None) -> Path:
        """The image the rejected answer is scored with: the noise image, or the real one when null."""
        if self.rejected_image is None:
            return self.image_path(image_root)
        return _resolve(self.rejected_image, image_root if image_root is not None else Path(self.image_root))

    def prompt_text(self) -> str:
        """The model input before the answer: the vicuna_v1 conversation ending in ``"ASSISTANT:"``."""
        return render_conversation(self.prompt)

    def completion(self, answer: str) -> str:
        """What follows ``prompt_text()`` in ``render_conversation(prompt, answer)``: ``" {answer}</s>"``.

        The answer is stripped first: a generated answer starts with the space of its first token as
        ``decode`` returns it (``" No."``), and the template adds that space itself. Kept, every generated
        side would train ``"ASSISTANT:  No.</s>"`` (two spaces) — text SFT never showed — and DPO then
        teaches the model to open with a lone space token (it answered blanks and "FINDINGS: FINDINGS:").
        """
        full = render_conversation(self.prompt, answer.strip())
        head = self.prompt_text()
        if not full.startswith(head):  # render_conversation's contract; cheap to keep honest
            raise PairError(f"pair {self.id}: the conversation does not extend its prompt")
        return full[len(head) :]


def _resolve(path: str, root: Path) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def read_pairs(paths: Iterable[Path]) -> list[PreferencePair]:
    """Every pair of the given JSONL files, in file order; errors name the file and line."""
    pairs: list[PreferencePair] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise PairError(f"{path}: pair file not found; build pairs with `mmedrag pairs`")
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    pairs.append(PreferencePair.model_validate(json.loads(line)))
                except (json.JSONDecodeError, ValidationError) as exc:
                    raise PairError(f"{path}:{number}: not a preference pair ({exc})") from exc
    return pairs


def stage_pair_files(pairs_dir: Path, stage: int) -> list[Path]:
    """``pairs_<set>.jsonl`` of each set the stage trains on."""
    if stage not in STAGE_SETS:
        raise ValueError(f"stage must be 1 or 2, not {stage}")
    return [Path(pairs_dir) / f"pairs_{name}.jsonl" for name in STAGE_SETS[stage]]


def select_stage(pairs: Sequence[PreferencePair], stage: int) -> list[PreferencePair]:
    """The pairs of the stage's sets (so ``pairs_all.jsonl`` can be given as is)."""
    wanted = set(STAGE_SETS[stage])
    return [pair for pair in pairs if pair.set in wanted]


def split_held_out(
    pairs: Sequence[PreferencePair], fraction: float, *, salt: str = "mmedrag-dpo"
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): a pair is held out by a hash of its id, so the split survives reordering,
    resumes and added pairs. At least one pair is held out when ``fraction > 0`` and two or more exist."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("the held-out fraction must be in [0, 1)")
    if fraction == 0.0 or len(pairs) < 2:
        return list(pairs), []

    def score(pair: PreferencePair) -> float:
        digest = hashlib.sha256(f"{salt}:{pair.set}:{pair.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held = [pair for pair in pairs if score(pair) < fraction]
    if not held:
        held = [min(pairs, key=score)]
    held_ids = {id(pair) for pair in held}
    return [pair for pair in pairs if id(pair) not in held_ids], held


def check_images(pairs: Sequence[PreferencePair], image_root: Path | None = None) -> None:
    """Fail before training, naming the first image that is missing (not halfway through an epoch)."""
    for pair in pairs:
        for path in {pair.image_path(image_root), pair.rejected_image_path(image_root)}:
            if not path.is_file():
                raise PairError(
                    f"pair {pair.id} ({pair.set}): image {path} not found; give --image-root if the pair "
                    "files were moved"
                )


def pair_rows(pairs: Sequence[PreferencePair], image_root: Path | None = None) -> dict[str, list[Any]]:
    """Column-wise rows of the preference dataset (image columns hold file paths until cast)."""
    return {
        "id": [pair.id for pair in pairs],
        "prompt": [pair.prompt_text() for pair in pairs],
        "chosen": [pair.completion(pair.chosen) for pair in pairs],
        "rejected": [pair.completion(pair.rejected) for pair in pairs],
        IMAGES: [[str(pair.image_path(image_root))] for pair in pairs],
        REJECTED_IMAGES: [[str(pair.rejected_image_path(image_root))] for pair in pairs],
    }


def build_preference_dataset(pairs: Sequence[PreferencePair], image_root: Path | None = None):
    """A ``datasets.Dataset`` for ``MMedRAGDPOTrainer``; images decode to PIL when a row is read."""
    from datasets import Dataset, Image, List

    if not pairs:
        raise PairError("no preference pairs to build a dataset from")
    check_images(pairs, image_root)
    dataset = Dataset.from_dict(pair_rows(pairs, image_root))
    image_list = List(Image())
    return dataset.cast_column(IMAGES, image_list).cast_column(REJECTED_IMAGES, image_list)


def count_pairs(pairs: Sequence[PreferencePair]) -> dict[str, dict[str, int]]:
    """Counts per set and per domain (and how many rejected sides use a noise image), for the summary."""
    return {
        "set": dict(Counter(pair.set for pair in pairs)),
        "domain": dict(Counter(pair.domain for pair in pairs)),
        "task": dict(Counter(pair.task for pair in pairs)),
        "rejected_noise_image": {"yes": sum(pair.rejected_image is not None for pair in pairs)},
    }
