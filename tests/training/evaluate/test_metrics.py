"""Answer metrics: hand-computed cases, and our wrappers against the reference implementations."""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from services.generator.protocol import TokenLogprob, TopLogprob
from training.evaluate import metrics
from training.evaluate.extras import EvalExtraMissing
from training.evaluate.metrics import (
    MeteorScorer,
    MeteorUnavailable,
    ReportMetrics,
    VQAMetrics,
    corpus_bleu,
    group_indices,
    report_metrics,
    report_metrics_by_domain,
    report_tokens,
    rouge_l,
    top_logprobs_from_openai,
    vqa_metrics,
    vqa_metrics_by_domain,
    yes_probability_from_logprobs,
)

# Fixed report pairs (generation, ground truth) in the style of chest X-ray / fundus / pathology reports.
PREDICTIONS = [
    "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. There's a small left pleural effusion, unchanged since the prior study.",
    "The optic disc is normal; cup-to-disc ratio 0.4. No signs of glaucoma.",
    "Tumor cells with enlarged nuclei are seen in the stroma.",
    "No acute cardiopulmonary process.",
    "Retinal vessels appear attenuated with scattered hemorrhages.",
]
REFERENCES = [
    "Heart size is normal. Lungs are clear without focal consolidation. No pleural effusion.",
    "The heart is mildly enlarged. Small left pleural effusion is unchanged from the prior exam.",
    "Cup-to-disc ratio of 0.7 in the right eye, suspicious for glaucoma.",
    "Sheets of tumor cells with enlarged pleomorphic nuclei infiltrate the stroma.",
    "No acute cardiopulmonary abnormality. The heart size is normal.",
    "Scattered retinal hemorrhages and attenuated vessels, consistent with retinopathy.",
]


# METEOR and the PTB tokenizer are Java programs: CI installs a runtime (.ci/install-java.sh); elsewhere these
# tests are skipped, saying so, where no `java` is on PATH.
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="no Java runtime on PATH (run .ci/install-java.sh)"
)


def _coco_inputs(texts: list[str]) -> dict[int, list[str]]:
    return {i: [" ".join(report_tokens(text))] for i, text in enumerate(texts)}


@pytest.fixture(scope="module")
def meteor() -> Iterator[MeteorScorer]:
    """One METEOR process for the module: starting it loads METEOR's paraphrase table (seconds)."""
    with MeteorScorer() as scorer:
        yield scorer


# ------------------------------------------------------------------------------------------------ VQA


def test_vqa_perfect_answers_score_one():
    labels = ["Yes.", "No", "Yes.", "No"]
    result = vqa_metrics(["Yes, there is.", "No, it is not present.", "yes", "no"], labels)
    assert result == VQAMetrics(n=4, n_unparsed=0, accuracy=1.0, f1=1.0, auroc_hard=1.0)
    assert result.average == 1.0


def test_vqa_all_wrong_answers_score_zero():
    result = vqa_metrics(["No", "Yes", "There is no effusion."], ["Yes.", "No", "Yes."])
    assert (result.accuracy, result.f1, result.auroc_hard) == (0.0, 0.0, 0.0)


def test_vqa_hand_computed_mixed_case_matches_sklearn():
    labels = ["Yes.", "Yes.", "Yes.", "No", "No"]
    predictions = ["Yes", "No", "Yes", "Yes", "No"]
    result = vqa_metrics(predictions, labels)
    # TP 2, FN 1, FP 1, TN 1
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert result.auroc_hard == pytest.approx((2 / 3 + 1 / 2) / 2)  # balanced accuracy
    y_true, y_pred = [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]
    assert result.f1 == pytest.approx(f1_score(y_true, y_pred))
    assert result.auroc_hard == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert result.auroc_hard == pytest.approx(roc_auc_score(y_true, y_pred))
    assert result.average == pytest.approx((3 / 5 + 2 / 3 + 7 / 12) / 3)


def test_vqa_uses_the_mmed_rag_parsing_rule_for_answers_and_labels():
    # "not" anywhere in the first sentence means "no"; text after the first "." is ignored.
    predictions = ["The lesion is not visible.", "Yes. But no effusion.", "Effusion present"]
    result = vqa_metrics(predictions, ["No", "Yes.", "Yes."])
    assert result.accuracy == 1.0


def test_unparsed_answers_count_as_wrong_in_every_metric():
    labels = ["Yes.", "No", "Yes.", "No"]
    predictions = [None, "   ", "Yes", "No"]
    result = vqa_metrics(predictions, labels)
    assert result.n_unparsed == 2
    assert result.accuracy == 0.5  # not 0.75, which reading "" as "yes" would give
    # Scored as the opposite of the label: a missed "yes" (FN) and a false "yes" (FP).
    assert result.f1 == pytest.approx(f1_score([1, 0, 1, 0], [0, 1, 1, 0]))
    assert result.auroc_hard == pytest.approx(balanced_accuracy_score([1, 0, 1, 0], [0, 1, 1, 0]))


def test_auroc_from_probabilities_matches_sklearn_and_differs_from_hard():
    labels = ["Yes.", "No", "Yes.", "No", "Yes.", "No"]
    predictions = ["Yes", "Yes", "No", "No", "Yes", "No"]
    probability = [0.9, 0.6, 0.45, 0.2, 0.7, 0.5]
    result = vqa_metrics(predictions, labels, probability)
    y_true = [1, 0, 1, 0, 1, 0]
    assert result.auroc_prob == pytest.approx(roc_auc_score(y_true, probability))
    assert result.auroc_prob == pytest.approx(7 / 9)  # 7 of the 9 (yes, no) pairs ranked right
    assert result.auroc_hard == pytest.approx(balanced_accuracy_score(y_true, [1, 1, 0, 0, 1, 0]))
    assert result.n_missing_probability == 0


def test_missing_probability_is_scored_as_its_wrong_extreme():
    labels = ["Yes.", "No", "Yes.", "No"]
    result = vqa_metrics(["Yes", "No", "Yes", "No"], labels, [None, 0.1, 0.8, float("nan")])
    assert result.n_missing_probability == 2
    assert result.auroc_prob == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.0, 0.1, 0.8, 1.0]))
    assert vqa_metrics(["Yes"], ["Yes."], None).auroc_prob is None


def test_single_class_labels_leave_auroc_undefined():
    result = vqa_metrics(["No", "No"], ["No", "No"], [0.2, 0.3])
    assert result.accuracy == 1.0
    assert result.f1 == 0.0  # no positive label nor prediction
    assert result.auroc_hard is None and result.auroc_prob is None and result.average is None


def test_vqa_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        vqa_metrics(["Yes"], ["Yes.", "No"])
    with pytest.raises(ValueError, match="length"):
        vqa_metrics(["Yes", "No"], ["Yes.", "No"], [0.5])
    with pytest.raises(ValueError, match="no examples"):
        vqa_metrics([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vqa_metrics(["Yes", "No"], ["Yes.", "No"], [1.5, 0.1])


# ------------------------------------------------------------------------------ yes probability


def test_yes_probability_normalises_yes_against_no_over_all_spellings():
    first = {
        "Yes": math.log(0.3),
        "▁yes": math.log(0.1),
        "Ġyes": math.log(0.05),
        " No": math.log(0.15),
        "no.": math.log(0.05),
        "The": math.log(0.2),
        "Y": math.log(0.1),  # a prefix, not the word
    }
    later = {"no": 0.0}  # only the first generated position counts
    assert yes_probability_from_logprobs([first, later]) == pytest.approx(0.45 / (0.45 + 0.2))


def test_yes_probability_edge_cases():
    assert yes_probability_from_logprobs([]) is None
    assert yes_probability_from_logprobs([{"The": -0.1, "A": -2.0}]) is None
    assert yes_probability_from_logprobs([{"YES": -3.0, "The": -0.1}]) == 1.0
    assert yes_probability_from_logprobs([{"no": -3.0}]) == 0.0
    # Very negative log-probabilities: the ratio, not an underflow to 0/0.
    assert yes_probability_from_logprobs([{"yes": -1000.0, "no": -1000.0 - math.log(3)}]) == pytest.approx(
        0.75
    )


def test_top_logprobs_from_openai_accepts_generator_objects_and_json():
    content = [
        TokenLogprob(
            token="Yes",
            logprob=math.log(0.5),
            top_logprobs=[
                TopLogprob(token="Yes", logprob=math.log(0.5)),
                TopLogprob(token="No", logprob=math.log(0.2)),
                TopLogprob(token="No", logprob=math.log(0.1)),  # a second id decoding alike
            ],
        ),
        # JSON, and a sampled token outside its listed alternatives.
        {"token": ".", "logprob": math.log(0.4), "top_logprobs": [{"token": ",", "logprob": math.log(0.5)}]},
    ]
    positions = top_logprobs_from_openai(content)
    assert positions[0].keys() == {"Yes", "No"}
    assert math.exp(positions[0]["No"]) == pytest.approx(0.3)
    assert positions[1] == pytest.approx({",": math.log(0.5), ".": math.log(0.4)})
    assert yes_probability_from_logprobs(positions) == pytest.approx(0.5 / 0.8)


# --------------------------------------------------------------------------------------------- reports


def test_report_tokens_lowercase_split_and_drop_punctuation():
    text = "The patient's heart (left) is NORMAL... No effusion; 1.5 cm x-ray, 1,000 and/or don't."
    assert report_tokens(text) == [
        "the", "patient", "'s", "heart", "left", "is", "normal", "no", "effusion",
        "1.5", "cm", "x-ray", "1,000", "and/or", "do", "n't",
    ]  # fmt: skip
    assert report_tokens("  ") == []


@needs_java
def test_report_tokens_agree_with_pycocoevalcap_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [*PREDICTIONS, *REFERENCES, "There's a 3cm nodule in the R/L lobe! Is it stable? Don't know: 5%."]
    coco = PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in enumerate(texts)})
    for i, text in enumerate(texts):
        assert report_tokens(text) == coco[i][0].split(), text


def test_bleu_hand_computed():
    # 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1; equal lengths (no brevity penalty).
    bleu = corpus_bleu(["A b c d."], ["a b c e"])
    assert bleu[0] == pytest.approx(3 / 4)
    assert bleu[1] == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    assert bleu[2] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert bleu[3] == pytest.approx(0.0, abs=1e-3)
    assert corpus_bleu(["x y z"], ["a b c"]) == pytest.approx([0.0] * 4, abs=1e-6)
    assert corpus_bleu(PREDICTIONS, PREDICTIONS) == pytest.approx([1.0] * 4)


def test_bleu_matches_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu

    expected, _ = Bleu(4).compute_score(_coco_inputs(REFERENCES), _coco_inputs(PREDICTIONS), verbose=0)
    assert corpus_bleu(PREDICTIONS, REFERENCES) == pytest.approx(expected, rel=1e-12)


def test_bleu_is_corpus_level_and_agrees_with_nltk_corpus_bleu():
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    ours = corpus_bleu(PREDICTIONS, REFERENCES)
    hypotheses = [report_tokens(text) for text in PREDICTIONS]
    references = [[report_tokens(text)] for text in REFERENCES]
    for n in range(1, 5):
        expected = nltk_corpus_bleu(references, hypotheses, weights=(1 / n,) * n)
        assert ours[n - 1] == pytest.approx(expected, rel=1e-6)
    # Corpus-level: not the mean of per-example scores.
    per_example = [corpus_bleu([p], [r])[3] for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert ours[3] != pytest.approx(sum(per_example) / len(per_example), rel=1e-3)


def test_rouge_l_hand_computed_and_matches_rouge_score_called_directly():
    from rouge_score.rouge_scorer import RougeScorer

    assert rouge_l(["A b c d."], ["a b c e"]) == pytest.approx(0.75)  # LCS 3 of 4 and 4
    assert rouge_l(["x y"], ["a b"]) == 0.0
    scorer = RougeScorer(["rougeL"])
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(sum(expected) / len(expected), rel=1e-12)


@needs_java
@pytest.mark.slow
def test_meteor_matches_pycocoevalcap_called_directly(meteor: MeteorScorer):
    from pycocoevalcap.meteor.meteor import Meteor

    # The scorer's own pycocoevalcap Meteor, called directly on inputs built here: a second Java
    # process would cost the paraphrase-table load (seconds) again.
    reference_impl = meteor._meteor
    assert isinstance(reference_impl, Meteor)
    expected, per_example = reference_impl.compute_score(_coco_inputs(REFERENCES), _coco_inputs(PREDICTIONS))
    assert meteor.score(PREDICTIONS, REFERENCES) == pytest.approx(expected, rel=1e-9)
    assert 0.0 < expected < 1.0
    # METEOR's corpus aggregate pools the statistics: it is not the mean of the sentence scores.
    assert expected != pytest.approx(sum(per_example) / len(per_example), rel=1e-6)


@needs_java
@pytest.mark.slow
def test_meteor_hand_cases(meteor: MeteorScorer):
    assert meteor.score(["x y z"], ["a b c"]) == 0.0
    assert meteor.score([""], ["heart size is normal"]) == 0.0
    # Identical text: only the (one-chunk) fragmentation penalty remains.
    assert meteor.score(["Heart size is normal."], ["heart size is normal"]) > 0.99


@needs_java
@pytest.mark.slow
def test_report_metrics_combines_the_three(meteor: MeteorScorer):
    result = report_metrics(PREDICTIONS, REFERENCES, meteor=meteor)
    bleu = corpus_bleu(PREDICTIONS, REFERENCES)
    assert result == ReportMetrics(
        n=6,
        bleu1=bleu[0],
        bleu2=bleu[1],
        bleu3=bleu[2],
        bleu4=bleu[3],
        bleu_mean=pytest.approx(sum(bleu) / 4),
        rouge_l=rouge_l(PREDICTIONS, REFERENCES),
        meteor=meteor.score(PREDICTIONS, REFERENCES),
    )
    assert result.bleu1 > result.bleu2 > result.bleu3 > result.bleu4 > 0
    assert result.to_dict()["average"] == pytest.approx(
        (result.bleu_mean + result.rouge_l + result.meteor) / 3
    )
    perfect = report_metrics(REFERENCES, REFERENCES, meteor=meteor)
    assert (perfect.bleu_mean, perfect.rouge_l) == pytest.approx((1.0, 1.0))
    assert perfect.meteor > 0.95


def test_report_metrics_without_meteor_needs_no_java(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    result = report_metrics(PREDICTIONS, REFERENCES, meteor=False)
    assert result.meteor is None and result.average is None
    assert result.bleu_mean > 0
    with pytest.raises(MeteorUnavailable, match="default-jre-headless"):
        report_metrics(PREDICTIONS, REFERENCES)


@needs_java
def test_closed_meteor_scorer_refuses_to_score():
    scorer = MeteorScorer()
    scorer.close()
    scorer.close()  # idempotent
    with pytest.raises(MeteorUnavailable, match="closed"):
        scorer.score(["a"], ["a"])


# ------------------------------------------------------------------------------------------ by domain


def test_group_indices_orders_paper_domains_first():
    keys = ["pathology", "other", "radiology", "pathology", "alpha"]
    assert group_indices(keys) == {"radiology": [2], "pathology": [0, 3], "alpha": [4], "other": [1]}


def test_vqa_metrics_by_domain_equals_metrics_on_each_subset():
    domains = ["radiology", "ophthalmology", "radiology", "ophthalmology", "radiology"]
    predictions = ["Yes", "No", "No", None, "Yes"]
    labels = ["Yes.", "No", "Yes.", "Yes.", "No"]
    probability = [0.8, 0.3, 0.4, None, 0.6]
    result = vqa_metrics_by_domain(domains, predictions, labels, probability)
    assert list(result) == ["radiology", "ophthalmology"]
    assert result["radiology"] == vqa_metrics(["Yes", "No", "Yes"], ["Yes.", "Yes.", "No"], [0.8, 0.4, 0.6])
    assert result["ophthalmology"] == vqa_metrics(["No", None], ["No", "Yes."], [0.3, None])
    with pytest.raises(ValueError, match="length"):
        vqa_metrics_by_domain(domains[:2], predictions, labels)


@needs_java
@pytest.mark.slow
def test_report_metrics_by_domain_is_corpus_level_per_domain(meteor: MeteorScorer):
    domains = ["radiology", "radiology", "ophthalmology", "pathology", "radiology", "ophthalmology"]
    result = report_metrics_by_domain(domains, PREDICTIONS, REFERENCES, meteor=meteor)
    assert list(result) == ["radiology", "ophthalmology", "pathology"]
    radiology = [0, 1, 4]
    expected = report_metrics(
        [PREDICTIONS[i] for i in radiology], [REFERENCES[i] for i in radiology], meteor=meteor
    )
    assert result["radiology"] == expected
    assert result["pathology"].n == 1
    without = report_metrics_by_domain(domains, PREDICTIONS, REFERENCES, meteor=False)
    assert without["radiology"].bleu_mean == expected.bleu_mean and without["radiology"].meteor is None


@pytest.mark.parametrize(
    ("module", "call"),
    [
        ("rouge_score", lambda: rouge_l(["a"], ["a"])),
        ("pycocoevalcap", lambda: corpus_bleu(["a"], ["a"])),
    ],
)
def test_a_missing_evaluation_package_names_the_extra_to_install(
    module: str, call: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in sys.modules if name == module or name.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    with pytest.raises(EvalExtraMissing, match=r"pip install 'mmed-rag\[eval\]'"):
        call()
