"""Write a MedSynth domain in the MMed-RAG release formats, through the same dumpers real data uses.

Radiology is written as MIMIC-CXR (one frontal view per study), ophthalmology as Harvard-FairVLMed
(retrieval text = ``gpt4_summary``), pathology as PMC-OA (numeric image names). Every split gets a report
file and a VQA file; the two retriever splits also get the retriever-training format.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.data.formats import get_format
from training.data.medsynth.catalogue import load_catalogue
from training.data.records import DOMAINS, SPLITS, ImageReport, VQAItem

# (retriever format, report format) per domain; the VQA format is shared.
RELEASE_FORMATS = {
    "radiology": ("retriever-radiology", "report-mimic-cxr"),
    "ophthalmology": ("retriever-harvard", "report-harvard"),
    "pathology": ("retriever-pmc-oa", "report-pmc-oa"),
}
RETRIEVER_SPLITS = {"retriever_train": "retriever_train.json", "retriever_val": "retriever_val.json"}


def dataset_name(domain: str) -> str:
    return load_catalogue()[domain]["dataset"]


def _release_image(item: Any) -> str:
    """Image path relative to the domain's image root (``<domain>/images``)."""
    return Path(item.image).name


def _report_metadata(domain: str, item: Any, *, text_for_retriever: bool) -> dict[str, Any]:
    if domain == "radiology":
        return {"study_id": 50_000_000 + item.index, "subject_id": 10_000_000 + item.index}
    if domain == "ophthalmology":
        glaucoma = any(f.name == "glaucoma" for f in item.findings)
        extra = {"report": item.report} if text_for_retriever else {"gpt4_summary": item.summary}
        return {
            "filename": f"data_{item.index:05d}.npz",
            "glaucoma": "yes" if glaucoma else "no",
            **item.demographics,
            **extra,
        }
    return {"metadata": {"source": "medsynth", "stain": "H&E"}}


def _image_reports(domain: str, items: list[Any], *, for_retriever: bool) -> list[ImageReport]:
    # Harvard's retriever files index the short gpt4_summary; its report files carry the full note.
    use_summary = domain == "ophthalmology" and for_retriever
    return [
        ImageReport(
            id=item.id,
            domain=domain,  # type: ignore[arg-type]  # one of DOMAINS
            dataset=dataset_name(domain),
            split=item.split,
            image=_release_image(item),
            report=item.summary if use_summary else item.report,
            metadata=_report_metadata(domain, item, text_for_retriever=for_retriever),
        )
        for item in items
    ]


def balanced_questions(items: list[Any], seed: int, domain: str, split: str) -> list[VQAItem]:
    """All questions of a split, the majority answer subsampled so yes and no are equally frequent."""
    candidates = [(item, j, q) for item in items for j, q in enumerate(item.questions)]
    by_answer = {answer: [c for c in candidates if c[2].answer == answer] for answer in ("yes", "no")}
    keep = min(len(by_answer["yes"]), len(by_answer["no"]))
    rng = np.random.default_rng([seed, DOMAINS.index(domain), SPLITS.index(split), 3])  # type: ignore[arg-type]
    kept = []
    for answer in ("yes", "no"):
        group = by_answer[answer]
        chosen = sorted(rng.choice(len(group), size=keep, replace=False).tolist()) if keep else []
        kept.extend(group[i] for i in chosen)
    kept.sort(key=lambda c: (c[0].index, c[1]))
    return [
        VQAItem(
            id=f"{item.id}-q{j}",
            domain=domain,  # type: ignore[arg-type]
            dataset=dataset_name(domain),
            split=split,
            image=_release_image(item),
            question=question.text,
            answer=question.answer,  # type: ignore[arg-type]
            report=item.report,
            metadata={"finding": question.finding},
        )
        for item, j, question in kept
    ]


def write_release_files(out: Path, domain: str, items: list[Any], *, seed: int) -> dict[str, Any]:
    """Write every release file of one domain; return counts for medsynth.json."""
    retriever_format, report_format = (get_format(name) for name in RELEASE_FORMATS[domain])
    vqa_format = get_format("vqa")
    folder = out / domain
    counts: dict[str, Any] = {}
    for split in SPLITS:
        split_items = sorted((i for i in items if i.split == split), key=lambda i: i.index)
        if split in RETRIEVER_SPLITS:
            retriever_format.dump(
                _image_reports(domain, split_items, for_retriever=True), folder / RETRIEVER_SPLITS[split]
            )
        report_format.dump(
            _image_reports(domain, split_items, for_retriever=False), folder / f"{split}_report.json"
        )
        questions = balanced_questions(split_items, seed, domain, split)
        vqa_format.dump(questions, folder / f"{split}_vqa.jsonl")
        answers = Counter(q.answer for q in questions)
        counts[split] = {"images": len(split_items), "vqa_yes": answers["yes"], "vqa_no": answers["no"]}
    return counts
