"""Report text and yes/no questions written from an image's findings.

Phrasing is sampled from the catalogue so that reports of the same findings differ in wording (as real
reports do) and carry explicit negations ("No pleural effusion."), which is what makes a retrieved report
of *another* patient plausible-looking yet misleading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.medsynth.draw import FindingInstance

# How each domain words the three severities inside sentences.
SEVERITY_WORDS: dict[str, dict[str, str]] = {
    "radiology": {"mild": "small", "moderate": "moderate", "severe": "large"},
    "ophthalmology": {"mild": "mild", "moderate": "moderate", "severe": "marked"},
    "pathology": {"mild": "small", "moderate": "moderate", "severe": "extensive"},
}

_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


@dataclass(frozen=True)
class ImageText:
    """The texts written for one image: the full report and a short summary of what is abnormal."""

    report: str
    summary: str


def _finish(sentence: str) -> str:
    sentence = _ARTICLE.sub(lambda m: m.group(1) + "n ", sentence.strip())
    return sentence[0].upper() + sentence[1:]


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, severity: str, domain: str, measurements: Mapping[str, Any]) -> str:
    values = {key: value for key, value in measurements.items()}
    values["severity"] = SEVERITY_WORDS[domain][severity]
    return _finish(template.format(**values))


def write_report(
    domain: str,
    findings: Sequence[FindingInstance],
    measurements: Mapping[str, Any],
    catalogue: Mapping[str, Any],
    rng: np.random.Generator,
) -> ImageText:
    """Compose a report: positive sentences, some explicit negations, normal anatomy, an impression."""
    spec = catalogue[domain]
    present = {f.name: f for f in findings}
    positives = [
        _fill(_pick(spec["findings"][name]["positive"], rng), f.severity, domain, measurements)
        for name, f in present.items()
    ]
    absent = [name for name in spec["findings"] if name not in present]
    n_negations = min(len(absent), int(rng.integers(1, 4)))
    negated = sorted(rng.choice(len(absent), size=n_negations, replace=False).tolist()) if absent else []
    negatives = [
        _fill(_pick(spec["findings"][absent[i]]["negative"], rng), "mild", domain, measurements)
        for i in negated
    ]
    if rng.random() < 0.5:
        negatives.append(_pick(spec["grouped_negatives"], rng))
    normal_count = 1 if present else 2
    normals = [
        spec["normal"][i] for i in sorted(rng.choice(len(spec["normal"]), normal_count, replace=False))
    ]

    if present:
        labels = [spec["findings"][name]["label"] for name in present]
        impression = _finish(", ".join(labels[:-1]) + (" and " if len(labels) > 1 else "") + labels[-1]) + "."
    else:
        impression = _pick(spec["impression_normal"], rng)

    body = " ".join(positives + negatives + normals)
    if domain == "radiology":
        report = f"FINDINGS: {body} IMPRESSION: {impression}"
    elif domain == "ophthalmology":
        report = f"Fundus photograph. {body} Assessment: {impression}"
    else:
        report = f"Microscopic description: {body} Diagnosis: {impression}"
    summary = " ".join(positives) + (" " if positives else "") + impression
    return ImageText(report=report, summary=summary)


@dataclass(frozen=True)
class Question:
    """A closed question about one finding, with its ground truth."""

    finding: str
    text: str
    answer: str  # "yes" | "no"


def write_questions(
    domain: str,
    findings: Sequence[FindingInstance],
    catalogue: Mapping[str, Any],
    rng: np.random.Generator,
    per_answer: int = 2,
) -> list[Question]:
    """Up to ``per_answer`` questions about present findings and as many about absent ones."""
    spec = catalogue[domain]["findings"]
    present = [f.name for f in findings]
    absent = [name for name in spec if name not in present]
    questions: list[Question] = []
    for names, answer in ((present, "yes"), (absent, "no")):
        if not names:
            continue
        chosen = rng.choice(len(names), size=min(per_answer, len(names)), replace=False)
        for i in sorted(chosen.tolist()):
            questions.append(Question(names[i], _pick(spec[names[i]]["questions"], rng), answer))
    return questions
