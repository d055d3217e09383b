"""The project's own record types: what every loader produces and every training step consumes.

Release formats differ per dataset (see ``formats.py``); they are normalised into these three kinds:
an image with its report text (retrieval corpus, report generation), a closed yes/no question about an
image (VQA) and a preference pair (DPO). Image paths are always relative to an image root that the
user gives, never absolute paths baked into a file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Domain = Literal["radiology", "ophthalmology", "pathology"]
DOMAINS: tuple[Domain, ...] = ("radiology", "ophthalmology", "pathology")

# The four disjoint parts of every dataset (DESIGN.md §5): the retriever-train split is also the
# retrieval corpus, so it never overlaps the preference or test splits.
Split = Literal["retriever_train", "retriever_val", "preference", "test"]
SPLITS: tuple[Split, ...] = ("retriever_train", "retriever_val", "preference", "test")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageReport(_Record):
    """One image with the report (or caption, or summary) that describes it."""

    id: str
    domain: Domain
    dataset: str
    split: str = Field(description="The dataset's own split name, or one of SPLITS.")
    image: str = Field(description="Path relative to the image root.")
    report: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class VQAItem(_Record):
    """A closed yes/no question about one image; ``answer`` is already normalised."""

    id: str
    domain: Domain
    dataset: str
    split: str
    image: str
    question: str = Field(description="The question text without the trailing '<image>' marker.")
    answer: Literal["yes", "no"]
    report: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class PreferencePair(_Record):
    """A DPO pair: one prompt, a chosen and a rejected answer; the rejected side may use a noise image."""

    id: str
    image: str
    prompt: str
    chosen: str
    rejected: str
    rejected_noised: bool
    domain: Domain | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
