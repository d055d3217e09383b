"""Answer metrics of the paper: closed VQA (accuracy, F1, AUROC), reports (BLEU, ROUGE-L, METEOR).

Pure functions over predictions and references; they return frozen dataclasses whose ``to_dict()`` is
ready for a JSON or Markdown table. All values are fractions in [0, 1] (the paper prints percentages).

**VQA** (``vqa_metrics``). Predictions and labels are mapped to "yes" / "no" with the MMed-RAG rule
(``services.common.answers.parse_yes_no``; labels are the release's "Yes." / "No"). "yes" is the positive
class. A prediction is *unparsed* when there is no answer at all: ``None`` (the request failed or timed
out) or blank text (the rule would read an empty string as "yes", which would reward saying nothing on
"yes"-heavy sets such as Harvard-FairVLMed). An unparsed prediction is scored as the wrong answer, the
opposite of its label, in every metric, so it never helps a score: for accuracy it is wrong, for F1 it
is a false negative on a "yes" label and a false positive on a "no" label, and for the hard AUROC it sits
on the wrong side too.

- ``accuracy``: share of parsed predictions equal to the label (over all n).
- ``f1``: F1 of "yes" (scikit-learn ``f1_score``; 0 when there is no positive label nor prediction).
- ``auroc_hard``: ROC AUC of the hard answers (score 1 for "yes", 0 for "no"); with two score levels this
  equals balanced accuracy (the paper's AUROC from answers).
- ``auroc_prob``: a real ROC AUC from the probability of "yes" against "no" on the first generated token
  (``yes_probability_from_logprobs``), when the caller has token log-probabilities (vLLM and our
  generator return them with ``logprobs=true, top_logprobs=k``). An example without a probability is
  scored as its wrong extreme (0 for a "yes" label, 1 for a "no" label) and counted in
  ``n_missing_probability``.
- Either AUROC is ``None`` when the labels hold only one class (the ROC is undefined).

**Reports** (``report_metrics``), the common image-captioning practice (pycocoevalcap), which medical
report generation papers follow:

- Text is lower-cased and tokenised like pycocoevalcap's PTB tokenizer with its punctuation removed
  (``report_tokens``; pure Python, so BLEU and ROUGE need no Java). It agrees with the Java tokenizer on
  ordinary report text; it differs on brackets, which it drops (pycocoevalcap keeps ``-lrb-`` tokens
  because it lower-cases before filtering), and on abbreviations with a final period (``e.g.``).
- ``bleu1`` … ``bleu4``: pycocoevalcap's **corpus-level** BLEU-n (clipped n-gram counts and lengths summed
  over the whole set, brevity penalty against the closest reference length), not a mean of sentence
  scores. ``bleu_mean`` is their mean: the paper's "average BLEU".
- ``rouge_l``: ROUGE-L F-measure of Google's ``rouge-score`` (its own tokenizer, no stemming) on the raw
  texts, averaged over examples.
- ``meteor``: METEOR 1.5 through pycocoevalcap (a Java process; ``-l en -norm``; exact, stem, synonym and
  paraphrase modules) on the tokenised texts; the score is METEOR's own corpus aggregate (its ``EVAL``
  line), as pycocoevalcap reports it. It needs a Java runtime (Debian: ``default-jre-headless``); the
  JVM loads a 60 MB paraphrase table once, so keep one ``MeteorScorer`` open for a whole evaluation.

``vqa_metrics_by_domain`` and ``report_metrics_by_domain`` compute the same metrics on each domain's
examples (corpus-level metrics are computed per domain, not averaged from examples).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from services.common.answers import parse_yes_no
from services.common.logprobs import logsumexp, merge_by_text
from training.data.records import DOMAINS
from training.evaluate.extras import import_eval_module

BLEU_ORDERS = 4
JAVA_INSTALL_HINT = "install a Java runtime (Debian: apt-get install -y default-jre-headless)"

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class VQAMetrics:
    """Closed yes/no VQA metrics of one set of predictions ("yes" is the positive class)."""

    n: int  # examples scored
    n_unparsed: int  # predictions that were None or blank: scored as wrong
    accuracy: float
    f1: float
    auroc_hard: float | None  # None when the labels hold one class only
    auroc_prob: float | None = None  # None without probabilities, or with one label class
    n_missing_probability: int = 0  # examples without a yes-probability (scored as wrong)

    @property
    def average(self) -> float | None:
        """Mean of accuracy, F1 and the hard AUROC: the number the paper's ablation tables show."""
        if self.auroc_hard is None:
            return None
        return (self.accuracy + self.f1 + self.auroc_hard) / 3

    def to_dict(self) -> dict[str, Any]:
        """Fields plus ``average``, for JSON tables."""
        return {**asdict(self), "average": self.average}


@dataclass(frozen=True)
class ReportMetrics:
    """Report-generation metrics of one set of generations against their ground-truth reports."""

    n: int
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    bleu_mean: float  # mean of BLEU-1..4: the paper's "BLEU"
    rouge_l: float  # ROUGE-L F-measure, mean over examples
    meteor: float | None  # None when METEOR was not computed (meteor=False)

    @property
    def average(self) -> float | None:
        """Mean of BLEU (mean of 1..4), ROUGE-L and METEOR, as in the paper's ablation tables."""
        if self.meteor is None:
            return None
        return (self.bleu_mean + self.rouge_l + self.meteor) / 3

    def to_dict(self) -> dict[str, Any]:
        """Fields plus ``average``, for JSON tables."""
        return {**asdict(self), "average": self.average}


# --------------------------------------------------------------------------------------------------
# VQA


def _check_lengths(**columns: Sequence[Any] | None) -> int:
    """Length shared by all given columns; a mismatch or an empty set is a caller error."""
    lengths = {name: len(column) for name, column in columns.items() if column is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("no examples to score")
    return n


def _is_unparsed(prediction: str | None) -> bool:
    return prediction is None or not prediction.strip()


def _roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float | None:
    """scikit-learn's ROC AUC, or None when only one class is present (AUC undefined)."""
    if len(set(y_true)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_true, scores))


def vqa_metrics(
    predictions: Sequence[str | None],
    labels: Sequence[str],
    yes_probability: Sequence[float | None] | None = None,
) -> VQAMetrics:
    """Accuracy, F1 ("yes" positive) and AUROC of yes/no answers against the ground-truth labels.

    ``predictions``: the generated answers (free text, parsed with the MMed-RAG rule; None or blank =
    unparsed, scored as wrong). ``labels``: ground truth ("Yes." / "No" or any text the rule parses).
    ``yes_probability``: optional P(yes) per example (``yes_probability_from_logprobs``) for a real ROC.
    """
    n = _check_lengths(predictions=predictions, labels=labels, yes_probability=yes_probability)
    from sklearn.metrics import f1_score

    y_true = [int(parse_yes_no(label) == "yes") for label in labels]
    unparsed = [_is_unparsed(prediction) for prediction in predictions]
    # An unparsed answer becomes the opposite of its label: wrong for every metric below.
    y_pred = [
        1 - truth if prediction is None or missing else int(parse_yes_no(prediction) == "yes")
        for prediction, truth, missing in zip(predictions, y_true, unparsed, strict=True)
    ]
    correct = sum(int(pred == truth) for pred, truth in zip(y_pred, y_true, strict=True))
    auroc_prob = None
    n_missing_probability = 0
    if yes_probability is not None:
        scores = []
        for probability, truth in zip(yes_probability, y_true, strict=True):
            if probability is None or math.isnan(probability):
                n_missing_probability += 1
                scores.append(float(1 - truth))  # the wrong extreme
            elif not 0.0 <= probability <= 1.0:
                raise ValueError(f"yes_probability must lie in [0, 1], got {probability}")
            else:
                scores.append(float(probability))
        auroc_prob = _roc_auc(y_true, scores)
    return VQAMetrics(
        n=n,
        n_unparsed=sum(unparsed),
        accuracy=correct / n,
        f1=float(f1_score(y_true, y_pred, pos_label=1, zero_division=0.0)),
        auroc_hard=_roc_auc(y_true, [float(pred) for pred in y_pred]),
        auroc_prob=auroc_prob,
        n_missing_probability=n_missing_probability,
    )


# Leading markers tokenizers put on a word-initial token: SentencePiece "▁", byte-level BPE "Ġ" / "Ċ".
_TOKEN_MARKERS = "▁ĠĊ"
_YES_NO = {"yes": "yes", "no": "no"}


def _answer_word(token: str) -> str | None:
    """'yes' / 'no' when a vocabulary token spells one of them (any case, spacing or marker)."""
    word = token.strip().lstrip(_TOKEN_MARKERS).strip().rstrip(".,!:;").lower()
    return _YES_NO.get(word)


def yes_probability_from_logprobs(top_logprobs: Sequence[Mapping[str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) at the first generated token, from its top log-probabilities.

    ``top_logprobs`` is one mapping per generated position, token text → log-probability (the legacy
    completions format; ``top_logprobs_from_openai`` converts chat-completions ``logprobs.content``).
    Every spelling of an answer word ("Yes", " yes", "▁yes", "YES") adds to that word's mass. None when
    there is no generated token or neither word is among the first position's top tokens; 1.0 (or 0.0)
    when only one of them is (the other is less likely than every listed token).
    """
    if not top_logprobs:
        return None
    mass: dict[str, list[float]] = {"yes": [], "no": []}
    for token, logprob in top_logprobs[0].items():
        word = _answer_word(token)
        if word is not None and logprob is not None and not math.isnan(logprob):
            mass[word].append(float(logprob))
    if not mass["yes"] and not mass["no"]:
        return None
    log_yes = logsumexp(mass["yes"])
    log_no = logsumexp(mass["no"])
    if log_no == -math.inf:
        return 1.0
    if log_yes == -math.inf:
        return 0.0
    # Logistic of the log-odds: stable however negative the log-probabilities are.
    return 1.0 / (1.0 + math.exp(log_no - log_yes))


def _field(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def top_logprobs_from_openai(content: Sequence[Any]) -> list[dict[str, float]]:
    """Chat-completions ``choices[i].logprobs.content`` → one ``{token: logprob}`` per position.

    Accepts JSON dicts or objects with attributes (our generator's ``TokenLogprob``, the openai client's
    types). The sampled token joins its position's alternatives; a token text listed twice (two ids that
    decode alike) keeps the sum of their probabilities.
    """
    positions: list[dict[str, float]] = []
    for entry in content:
        alternatives = _field(entry, "top_logprobs") or []
        listed = [(_field(alt, "token"), _field(alt, "logprob")) for alt in alternatives]
        if _field(entry, "token") not in {token for token, _ in listed}:
            listed.append((_field(entry, "token"), _field(entry, "logprob")))
        positions.append(merge_by_text(listed))
    return positions


# --------------------------------------------------------------------------------------------------
# Reports

# Contractions split off the way the PTB tokenizer does ("don't" → "do n't", "patient's" → "patient 's").
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE)
# A word: word characters joined by inner ". ' / -" ("1.5", "x-ray", "and/or") or by "," between digits
# ("1,000"); a split-off contraction; else any other single character.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:(?:[.'/-]|(?<=\d),(?=\d))\w+)*|\S", re.IGNORECASE)
# pycocoevalcap's PTBTokenizer.PUNCTUATIONS as single characters (multi-character ones like "..." and
# "--" arrive here as runs of them), plus quotes and brackets.
_PUNCTUATION = frozenset(".?!,:;-'`\"()[]{}")


def report_tokens(text: str) -> list[str]:
    """Lower-cased PTB-like tokens of a report with punctuation removed (pycocoevalcap's preprocessing)."""
    text = _CONTRACTION.sub(r" \1", text.lower())
    return [token for token in _TOKEN.findall(text) if token not in _PUNCTUATION]


def _tokenised(texts: Sequence[str]) -> dict[int, list[str]]:
    """pycocoevalcap's input shape: example index → [one space-joined tokenised text]."""
    return {index: [" ".join(report_tokens(text))] for index, text in enumerate(texts)}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Corpus BLEU-1..4 (pycocoevalcap, closest reference length) on ``report_tokens`` text."""
    _check_lengths(predictions=predictions, references=references)
    bleu = import_eval_module("pycocoevalcap.bleu.bleu")

    scores, _ = bleu.Bleu(BLEU_ORDERS).compute_score(
        _tokenised(references), _tokenised(predictions), verbose=0
    )
    return [float(score) for score in scores]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (Google's rouge-score, no stemming) of each prediction vs its reference."""
    n = _check_lengths(predictions=predictions, references=references)
    rouge_scorer = import_eval_module("rouge_score.rouge_scorer")

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    )
    return float(total / n)


class MeteorUnavailable(RuntimeError):
    """METEOR could not run: no Java runtime, or the METEOR process failed."""


class MeteorScorer:
    """pycocoevalcap's METEOR 1.5 kept running across calls (a context manager).

    Starting it costs seconds (the JVM loads METEOR's paraphrase table), so one scorer serves a whole
    evaluation, per-domain breakdowns included. ``close()`` ends the Java process.
    """

    def __init__(self) -> None:
        if shutil.which("java") is None:
            raise MeteorUnavailable(f"METEOR needs Java and none is on PATH: {JAVA_INSTALL_HINT}")
        meteor = import_eval_module("pycocoevalcap.meteor.meteor")

        try:
            self._meteor: Any = meteor.Meteor()
        except OSError as exc:
            raise MeteorUnavailable(f"could not start METEOR ({exc}): {JAVA_INSTALL_HINT}") from exc

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        """Corpus METEOR of the predictions against their references (``report_tokens`` text)."""
        _check_lengths(predictions=predictions, references=references)
        if self._meteor is None:
            raise MeteorUnavailable("this MeteorScorer is closed")
        try:
            score, _ = self._meteor.compute_score(_tokenised(references), _tokenised(predictions))
        except (ValueError, BrokenPipeError) as exc:  # the process died: empty or broken output
            raise MeteorUnavailable(f"the METEOR process failed: {self._stderr()}") from exc
        return float(score)

    def _stderr(self) -> str:
        process = self._meteor.meteor_p
        if process.poll() is None:
            return "process still running"
        return process.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        """End the Java process (idempotent)."""
        if self._meteor is None:
            return
        process = self._meteor.meteor_p
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
        process.kill()
        process.wait()
        self._meteor = None

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def report_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    meteor: MeteorScorer | bool = True,
) -> ReportMetrics:
    """BLEU-1..4 and their mean, ROUGE-L (F) and METEOR of generated reports against ground truth.

    ``meteor``: True starts (and ends) a METEOR process for this call, a ``MeteorScorer`` is reused,
    False skips METEOR (``meteor=None`` in the result; no Java needed).
    """
    n = _check_lengths(predictions=predictions, references=references)
    bleu = corpus_bleu(predictions, references)
    if isinstance(meteor, MeteorScorer):
        meteor_score: float | None = meteor.score(predictions, references)
    elif meteor:
        with MeteorScorer() as scorer:
            meteor_score = scorer.score(predictions, references)
    else:
        meteor_score = None
    return ReportMetrics(
        n=n,
        bleu1=bleu[0],
        bleu2=bleu[1],
        bleu3=bleu[2],
        bleu4=bleu[3],
        bleu_mean=sum(bleu) / len(bleu),
        rouge_l=rouge_l(predictions, references),
        meteor=meteor_score,
    )


# --------------------------------------------------------------------------------------------------
# Per-domain breakdown


def group_indices(keys: Sequence[str]) -> dict[str, list[int]]:
    """Example indices per key; the paper's domains first in their order, any other key after, sorted."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    order = [domain for domain in DOMAINS if domain in groups] + sorted(set(groups) - set(DOMAINS))
    return {key: groups[key] for key in order}


def by_group(
    keys: Sequence[str], compute: Callable[..., T], *columns: Sequence[Any] | None, **options: Any
) -> dict[str, T]:
    """``compute(*columns, **options)`` on each key's examples (None columns stay None)."""
    _check_lengths(keys=keys, **{f"column {i}": column for i, column in enumerate(columns)})
    results: dict[str, T] = {}
    for key, indices in group_indices(keys).items():
        subsets = [None if column is None else [column[i] for i in indices] for column in columns]
        results[key] = compute(*subsets, **options)
    return results


def vqa_metrics_by_domain(
    domains: Sequence[str],
    predictions: Sequence[str | None],
    labels: Sequence[str],
    yes_probability: Sequence[float | None] | None = None,
) -> dict[str, VQAMetrics]:
    """``vqa_metrics`` on each domain's examples."""
    return by_group(domains, vqa_metrics, predictions, labels, yes_probability)


def report_metrics_by_domain(
    domains: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    meteor: MeteorScorer | bool = True,
) -> dict[str, ReportMetrics]:
    """``report_metrics`` on each domain's examples; one METEOR process serves every domain."""
    if meteor is True:
        with MeteorScorer() as scorer:
            return by_group(domains, report_metrics, predictions, references, meteor=scorer)
    return by_group(domains, report_metrics, predictions, references, meteor=meteor)
