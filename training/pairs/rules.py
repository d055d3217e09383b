"""The pair table of RAG-based preference tuning, as pure functions (no model, no I/O).

Four greedy runs of the base model per item (facts file, "Preference pairs"):

========== =========== =====================
run        image       retrieved context
========== =========== =====================
clean      real        none
noised     noise image none
clean_ref  real        top-1 retrieved report
noised_ref noise image top-1 retrieved report
========== =========== =====================

and the sets built from their outcomes (``PAIR_TABLE``):

====== ============================================= ============ ============ =========== ========
set    condition                                     chosen       rejected     prompt      rej. img
====== ============================================= ============ ============ =========== ========
stage1 clean right AND noised wrong                  clean        noised       no retrieval noise
cm     clean_ref right AND noised_ref right (copied) clean_ref    noised_ref   retrieval   noise
oa2    clean right AND clean_ref wrong (misleads)    clean        clean_ref    retrieval   real
oa1    clean wrong AND clean_ref right (helps)       clean_ref    clean        retrieval   real
====== ============================================= ============ ============ =========== ========

For the report task the chosen side is always the ground-truth report.

**Correctness.** VQA: ``parse_yes_no(answer) == parse_yes_no(truth)`` (the MMed-RAG rule, the same parser
for prediction and label). Reports: sentence BLEU of the generation against the ground truth (NLTK
``sentence_bleu``, default 1–4-gram weights, ``SmoothingFunction().method7``; tokens: the lower-cased text
split on whitespace, punctuation stays attached, so nothing needs downloading), and a run counts as right
when its BLEU is at least the mean BLEU *of the two runs being compared*. The two runs compared are the
set's ``compared`` pair: stage1 clean vs noised, cm clean_ref vs noised_ref, oa1 and oa2 clean vs
clean_ref. With two runs "at least the mean" means "at least the other", so two runs with equal BLEU are
both right (cm for reports: the noise image did exactly as well as the real one, the copying signal) and
stage1 / oa need a strictly better run.

For reports each set's outcomes (kept in the pair's provenance) judge the set's two compared runs against
each other and every other run against its image partner (clean ↔ noised, clean_ref ↔ noised_ref); in the
oa sets (compared clean vs clean_ref) noised is judged against clean and noised_ref against clean_ref.

**Misalignment diagnostics** (facts file, "Evaluation"): copy-reference rate = share of items answered
correctly with a noise image plus the reference (``noised_ref`` right); over-reliance rate = share of the
no-retrieval-correct items (``clean`` right) that become wrong with retrieval (``clean_ref`` wrong). For
reports they are computed on ``report_outcomes(scores, ("clean", "clean_ref"))``: noised_ref right when
its BLEU is at least clean_ref's, clean right / clean_ref wrong when clean's BLEU is higher.

**D_cm balancing.** D_cm is subsampled (seed 42) to ``int(r · (|D_oa1| + |D_oa2|))`` pairs, r = 0.5 by
default (the authors' early code; 0.8 in one released file); the caller applies it per (task, domain).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from services.common.answers import parse_yes_no

Run = Literal["clean", "noised", "clean_ref", "noised_ref"]
RUNS: tuple[Run, ...] = ("clean", "noised", "clean_ref", "noised_ref")
# Runs whose prompt carries the retrieved report, and runs that see the noise image.
RETRIEVAL_RUNS: frozenset[Run] = frozenset({"clean_ref", "noised_ref"})
NOISE_RUNS: frozenset[Run] = frozenset({"noised", "noised_ref"})
SetName = Literal["stage1", "cm", "oa1", "oa2"]
SETS: tuple[SetName, ...] = ("stage1", "cm", "oa1", "oa2")
STAGE2_SETS: tuple[SetName, ...] = ("cm", "oa1", "oa2")
Task = Literal["vqa", "report"]
PromptKind = Literal["no_retrieval", "retrieval"]
RejectedImage = Literal["noise", "real"]
GROUND_TRUTH = "ground_truth"  # the chosen "run" of report pairs

DEFAULT_CM_RATIO = 0.5
DEFAULT_CM_SEED = 42
# A run's image partner (the run with the other image and the same prompt).
IMAGE_PARTNER: dict[Run, Run] = {
    "clean": "noised",
    "noised": "clean",
    "clean_ref": "noised_ref",
    "noised_ref": "clean_ref",
}

T = TypeVar("T")


@dataclass(frozen=True)
class Outcomes:
    """Whether each of the four runs was right."""

    clean: bool
    noised: bool
    clean_ref: bool
    noised_ref: bool

    def __getitem__(self, run: Run) -> bool:
        if run not in RUNS:
            raise KeyError(run)
        return bool(getattr(self, run))

    def as_dict(self) -> dict[str, bool]:
        return {run: self[run] for run in RUNS}


@dataclass(frozen=True)
class RunTexts:
    """The four runs' generated texts for one item."""

    clean: str
    noised: str
    clean_ref: str
    noised_ref: str

    def __getitem__(self, run: Run) -> str:
        if run not in RUNS:
            raise KeyError(run)
        return str(getattr(self, run))

    def as_dict(self) -> dict[str, str]:
        return {run: self[run] for run in RUNS}


@dataclass(frozen=True)
class SetRule:
    """One row of the pair table."""

    name: SetName
    right: frozenset[Run]  # runs that must be right
    wrong: frozenset[Run]  # runs that must be wrong
    compared: tuple[Run, Run]  # the two runs the report BLEU rule compares
    chosen: Run  # report task: the ground truth instead
    rejected: Run
    prompt: PromptKind
    rejected_image: RejectedImage

    def holds(self, outcomes: Outcomes) -> bool:
        return all(outcomes[r] for r in self.right) and not any(outcomes[r] for r in self.wrong)


PAIR_TABLE: tuple[SetRule, ...] = (
    SetRule(
        "stage1",
        right=frozenset({"clean"}),
        wrong=frozenset({"noised"}),
        compared=("clean", "noised"),
        chosen="clean",
        rejected="noised",
        prompt="no_retrieval",
        rejected_image="noise",
    ),
    SetRule(
        "cm",
        right=frozenset({"clean_ref", "noised_ref"}),
        wrong=frozenset(),
        compared=("clean_ref", "noised_ref"),
        chosen="clean_ref",
        rejected="noised_ref",
        prompt="retrieval",
        rejected_image="noise",
    ),
    SetRule(
        "oa1",
        right=frozenset({"clean_ref"}),
        wrong=frozenset({"clean"}),
        compared=("clean", "clean_ref"),
        chosen="clean_ref",
        rejected="clean",
        prompt="retrieval",
        rejected_image="real",
    ),
    SetRule(
        "oa2",
        right=frozenset({"clean"}),
        wrong=frozenset({"clean_ref"}),
        compared=("clean", "clean_ref"),
        chosen="clean",
        rejected="clean_ref",
        prompt="retrieval",
        rejected_image="real",
    ),
)
RULES: dict[SetName, SetRule] = {rule.name: rule for rule in PAIR_TABLE}


# --------------------------------------------------------------------------------------------------
# Correctness


def yes_no_correct(answer: str, truth: str) -> bool:
    """A yes/no answer is right when it parses to the label's answer (both with ``parse_yes_no``)."""
    return parse_yes_no(answer) == parse_yes_no(truth)


def vqa_outcomes(answers: RunTexts, truth: str) -> Outcomes:
    """Each run judged on its own against the yes/no label."""
    return Outcomes(**{run: yes_no_correct(answers[run], truth) for run in RUNS})


def bleu_tokens(text: str) -> list[str]:
    """BLEU tokens: the lower-cased text split on whitespace."""
    return text.lower().split()


def report_bleu(generation: str, truth: str) -> float:
    """Sentence BLEU (NLTK, smoothing method 7) of a generated report against the ground truth."""
    hypothesis = bleu_tokens(generation)
    if not hypothesis:
        return 0.0  # NLTK returns 0 too, with a warning
    # Imported here: nltk takes seconds to import, and every `mmedrag` command would pay for it.
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method7
    return float(sentence_bleu([bleu_tokens(truth)], hypothesis, smoothing_function=smoothing))


def report_scores(answers: RunTexts, truth: str) -> dict[Run, float]:
    return {run: report_bleu(answers[run], truth) for run in RUNS}


def bleu_right(score: float, other: float) -> bool:
    """The report rule: right when the BLEU is at least the mean BLEU of the two runs compared."""
    return score >= (score + other) / 2.0


def report_outcomes(scores: Mapping[Run, float], compared: tuple[Run, Run]) -> Outcomes:
    """Report outcomes for one comparison: the ``compared`` runs against each other, the others against
    their image partner (clean ↔ noised, clean_ref ↔ noised_ref)."""
    a, b = compared
    if a == b or a not in RUNS or b not in RUNS:
        raise ValueError(f"compared must be two different runs of {RUNS}, got {compared}")
    versus: dict[Run, Run] = {**IMAGE_PARTNER, a: b, b: a}
    return Outcomes(**{run: bleu_right(scores[run], scores[versus[run]]) for run in RUNS})


# --------------------------------------------------------------------------------------------------
# Pair decisions


@dataclass(frozen=True)
class PairDecision:
    """What one item contributes to one set: texts, which runs they came from, prompt and images."""

    set: SetName
    chosen: str
    rejected: str
    chosen_run: str  # a Run, or GROUND_TRUTH for reports
    rejected_run: Run
    prompt: PromptKind
    rejected_image: RejectedImage
    outcomes: Outcomes  # as judged for this set
    compared: tuple[Run, Run]

    @property
    def uses_retrieval(self) -> bool:
        return self.prompt == "retrieval"

    @property
    def rejected_noised(self) -> bool:
        return self.rejected_image == "noise"


def _decision(rule: SetRule, answers: RunTexts, outcomes: Outcomes, truth: str | None) -> PairDecision:
    # Stripped: a generated answer begins with its first token's space (" No."), which the conversation
    # template adds itself; kept, the pair would train a text the model never saw ("ASSISTANT:  No.").
    return PairDecision(
        set=rule.name,
        chosen=(answers[rule.chosen] if truth is None else truth).strip(),
        rejected=answers[rule.rejected].strip(),
        chosen_run=rule.chosen if truth is None else GROUND_TRUTH,
        rejected_run=rule.rejected,
        prompt=rule.prompt,
        rejected_image=rule.rejected_image,
        outcomes=outcomes,
        compared=rule.compared,
    )


def decide_vqa(answers: RunTexts, truth: str) -> list[PairDecision]:
    """Every set a VQA item lands in (an item can land in several, e.g. stage1 and oa2)."""
    outcomes = vqa_outcomes(answers, truth)
    return [_decision(rule, answers, outcomes, None) for rule in PAIR_TABLE if rule.holds(outcomes)]


def decide_report(answers: RunTexts, truth: str) -> list[PairDecision]:
    """Every set a report item lands in; BLEU rule per set, chosen = the ground-truth report."""
    scores = report_scores(answers, truth)
    decisions = []
    for rule in PAIR_TABLE:
        outcomes = report_outcomes(scores, rule.compared)
        if rule.holds(outcomes):
            decisions.append(_decision(rule, answers, outcomes, truth))
    return decisions


def decide(task: Task, answers: RunTexts, truth: str) -> list[PairDecision]:
    if task == "vqa":
        return decide_vqa(answers, truth)
    if task == "report":
        return decide_report(answers, truth)
    raise ValueError(f"task must be 'vqa' or 'report', got {task!r}")


def rate_outcomes(task: Task, answers: RunTexts, truth: str) -> Outcomes:
    """The outcomes the misalignment rates and run accuracies use (see the module docstring)."""
    if task == "vqa":
        return vqa_outcomes(answers, truth)
    return report_outcomes(report_scores(answers, truth), ("clean", "clean_ref"))


# --------------------------------------------------------------------------------------------------
# D_cm balancing


def cm_target(n_oa1: int, n_oa2: int, ratio: float = DEFAULT_CM_RATIO) -> int:
    """How many D_cm pairs to keep: ``int(ratio · (|D_oa1| + |D_oa2|))``."""
    if ratio < 0:
        raise ValueError(f"the D_cm ratio must be >= 0, got {ratio}")
    return int(ratio * (n_oa1 + n_oa2))


def balance_cm(
    cm: Sequence[T], n_oa1: int, n_oa2: int, *, ratio: float = DEFAULT_CM_RATIO, seed: int = DEFAULT_CM_SEED
) -> list[T]:
    """D_cm subsampled to ``cm_target`` pairs (all kept when there are fewer), in their original order."""
    target = cm_target(n_oa1, n_oa2, ratio)
    if len(cm) <= target:
        return list(cm)
    kept = sorted(random.Random(seed).sample(range(len(cm)), target))
    return [cm[i] for i in kept]


# --------------------------------------------------------------------------------------------------
# Misalignment diagnostics


class HasOutcomes(Protocol):
    @property
    def clean(self) -> bool: ...

    @property
    def clean_ref(self) -> bool: ...

    @property
    def noised_ref(self) -> bool: ...


@dataclass(frozen=True)
class MisalignmentRates:
    """Copy-reference and over-reliance rates (None when undefined: no items / no clean-correct item)."""

    copy_reference: float | None
    over_reliance: float | None
    items: int
    clean_correct: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "copy_reference": self.copy_reference,
            "over_reliance": self.over_reliance,
            "items": self.items,
            "clean_correct": self.clean_correct,
        }


def copy_reference_rate(outcomes: Iterable[HasOutcomes]) -> float | None:
    """Share of items answered correctly with a noise image plus the reference."""
    values = [bool(o.noised_ref) for o in outcomes]
    return sum(values) / len(values) if values else None


def over_reliance_rate(outcomes: Iterable[HasOutcomes]) -> float | None:
    """Share of no-retrieval-correct items that become wrong with retrieval."""
    clean_right = [o for o in outcomes if o.clean]
    if not clean_right:
        return None
    return sum(not o.clean_ref for o in clean_right) / len(clean_right)


def misalignment_rates(outcomes: Iterable[HasOutcomes]) -> MisalignmentRates:
    items = list(outcomes)
    return MisalignmentRates(
        copy_reference=copy_reference_rate(items),
        over_reliance=over_reliance_rate(items),
        items=len(items),
        clean_correct=sum(bool(o.clean) for o in items),
    )
