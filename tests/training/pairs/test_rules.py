"""The pair table, the report BLEU rule, D_cm balancing and the misalignment rates, on hand-made outcomes."""

from __future__ import annotations

import itertools

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from training.pairs.rules import (
    GROUND_TRUTH,
    PAIR_TABLE,
    RUNS,
    Outcomes,
    RunTexts,
    balance_cm,
    bleu_right,
    cm_target,
    copy_reference_rate,
    decide,
    decide_report,
    decide_vqa,
    misalignment_rates,
    over_reliance_rate,
    report_bleu,
    report_outcomes,
    vqa_outcomes,
)

# The facts file's table, written out independently of PAIR_TABLE:
# set -> (chosen run, rejected run, prompt kind, rejected image)
TABLE = {
    "stage1": ("clean", "noised", "no_retrieval", "noise"),
    "cm": ("clean_ref", "noised_ref", "retrieval", "noise"),
    "oa2": ("clean", "clean_ref", "retrieval", "real"),
    "oa1": ("clean_ref", "clean", "retrieval", "real"),
}


def expected_sets(o: dict[str, bool]) -> set[str]:
    sets = set()
    if o["clean"] and not o["noised"]:
        sets.add("stage1")
    if o["clean_ref"] and o["noised_ref"]:
        sets.add("cm")
    if o["clean"] and not o["clean_ref"]:
        sets.add("oa2")
    if not o["clean"] and o["clean_ref"]:
        sets.add("oa1")
    return sets


COMBINATIONS = [dict(zip(RUNS, values, strict=True)) for values in itertools.product([True, False], repeat=4)]


def vqa_answers(outcomes: dict[str, bool], truth: str) -> RunTexts:
    """A distinct text per run that parses to the label when the run is meant to be right."""
    right = "Yes" if truth.startswith("Yes") else "No"
    wrong = "No" if right == "Yes" else "Yes"
    return RunTexts(**{run: f"{right if ok else wrong}, says {run}." for run, ok in outcomes.items()})


@pytest.mark.parametrize("truth", ["Yes.", "No"])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "".join("R" if v else "w" for v in c.values()))
def test_every_outcome_combination_lands_in_exactly_the_table_sets(
    combo: dict[str, bool], truth: str
) -> None:
    answers = vqa_answers(combo, truth)
    assert vqa_outcomes(answers, truth).as_dict() == combo
    decisions = decide_vqa(answers, truth)
    assert {d.set for d in decisions} == expected_sets(combo)
    assert len(decisions) == len({d.set for d in decisions})  # at most one pair per set
    for decision in decisions:
        chosen, rejected, prompt, image = TABLE[decision.set]
        assert decision.chosen == answers[chosen]  # type: ignore[index]
        assert decision.rejected == answers[rejected]  # type: ignore[index]
        assert (decision.chosen_run, decision.rejected_run) == (chosen, rejected)
        assert decision.prompt == prompt
        assert decision.uses_retrieval == (prompt == "retrieval")
        assert decision.rejected_image == image
        assert decision.rejected_noised == (image == "noise")
        assert decision.outcomes.as_dict() == combo


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "".join("R" if v else "w" for v in c.values()))
def test_report_pairs_choose_the_ground_truth(combo: dict[str, bool]) -> None:
    """Outcomes of the report task come from BLEU; with hand-made scores every table row is reachable
    where the pairwise rule allows it, and the chosen side is always the ground truth."""
    truth = "the lungs are clear and there is no effusion"
    for rule in PAIR_TABLE:
        a, b = rule.compared
        if not combo[a] and not combo[b]:
            continue  # of two runs compared by BLEU at least one is right
        # scores that make the compared runs right/wrong as the combination says
        scores = {run: 0.5 for run in RUNS}
        scores[a] = 0.9 if combo[a] and not combo[b] else 0.5
        scores[b] = 0.9 if combo[b] and not combo[a] else 0.5
        judged = report_outcomes(scores, rule.compared)  # type: ignore[arg-type]
        assert (judged[a], judged[b]) == (combo[a], combo[b])
        assert rule.holds(judged) == (rule.name in expected_sets(combo))
    # the decisions themselves, through real BLEU: the clean run copies the truth, the others do not
    texts = RunTexts(clean=truth, noised="heart", clean_ref="heart", noised_ref="heart")
    decisions = decide_report(texts, truth)
    assert {d.set for d in decisions} == {"stage1", "oa2", "cm"}
    assert all(d.chosen == truth and d.chosen_run == GROUND_TRUTH for d in decisions)
    assert {d.set: d.rejected for d in decisions} == {"stage1": "heart", "oa2": "heart", "cm": "heart"}


def nltk_bleu(hypothesis: str, truth: str) -> float:
    return sentence_bleu(
        [truth.lower().split()], hypothesis.lower().split(), smoothing_function=SmoothingFunction().method7
    )


TRUTH = "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal."
NEAR = "the lungs are clear. no pleural effusion. heart size is normal."
FAR = "Large right pleural effusion with cardiomegaly."


def test_report_bleu_is_nltk_sentence_bleu_method7_on_lowercased_words() -> None:
    for text in (TRUTH, NEAR, FAR, "the"):
        assert report_bleu(text, TRUTH) == pytest.approx(nltk_bleu(text, TRUTH))
    assert report_bleu("", TRUTH) == 0.0
    assert report_bleu(TRUTH.upper(), TRUTH) == pytest.approx(report_bleu(TRUTH, TRUTH))
    assert report_bleu(NEAR, TRUTH) > report_bleu(FAR, TRUTH)


def test_report_rule_compares_the_two_runs_of_each_set() -> None:
    """Right = BLEU at least the mean of the two compared runs: the better run, or both on a tie."""
    assert bleu_right(0.4, 0.2) and not bleu_right(0.2, 0.4)
    assert bleu_right(0.3, 0.3)

    # stage1 compares clean vs noised; cm clean_ref vs noised_ref; oa clean vs clean_ref
    texts = RunTexts(clean=NEAR, noised=FAR, clean_ref=FAR, noised_ref=FAR)
    bleu = {run: nltk_bleu(texts[run], TRUTH) for run in RUNS}
    assert bleu["clean"] > bleu["noised"]
    sets = {d.set: d for d in decide("report", texts, TRUTH)}
    # clean beats noised (stage1) and clean_ref (oa2); clean_ref and noised_ref tie (cm, the copy signal)
    assert set(sets) == {"stage1", "oa2", "cm"}
    assert sets["stage1"].compared == ("clean", "noised")
    assert sets["cm"].compared == ("clean_ref", "noised_ref")
    assert sets["oa2"].compared == ("clean", "clean_ref")
    assert all(d.chosen == TRUTH for d in sets.values())
    assert sets["stage1"].rejected == FAR

    # retrieval helps: clean_ref beats clean (oa1); noised_ref worse than clean_ref (no cm)
    texts = RunTexts(clean=FAR, noised=FAR, clean_ref=NEAR, noised_ref="heart")
    assert {d.set for d in decide("report", texts, TRUTH)} == {"oa1"}
    [oa1] = decide("report", texts, TRUTH)
    assert (oa1.chosen, oa1.rejected, oa1.rejected_image) == (TRUTH, FAR, "real")
    # in the oa sets the runs not compared are judged against their image partner
    scores = {run: nltk_bleu(texts[run], TRUTH) for run in RUNS}
    outcomes = report_outcomes(scores, ("clean", "clean_ref"))
    assert outcomes.as_dict() == {"clean": False, "noised": True, "clean_ref": True, "noised_ref": False}


def test_vqa_correctness_uses_the_yes_no_parser_on_both_sides() -> None:
    texts = RunTexts(
        clean="Yes, there is.", noised="There is not an effusion.", clean_ref="no", noised_ref=""
    )
    assert vqa_outcomes(texts, "Yes.").as_dict() == {
        "clean": True,
        "noised": False,
        "clean_ref": False,
        "noised_ref": True,  # an empty text parses to "yes"
    }
    assert vqa_outcomes(texts, "No").as_dict() == {
        "clean": False,
        "noised": True,
        "clean_ref": True,
        "noised_ref": False,
    }
    with pytest.raises(ValueError, match="task"):
        decide("caption", texts, "Yes.")  # type: ignore[arg-type]


def test_cm_balancing_sizes_and_seed() -> None:
    cm = [f"cm{i}" for i in range(40)]
    assert cm_target(7, 5) == 6 and cm_target(7, 5, 0.8) == 9 and cm_target(3, 0) == 1
    kept = balance_cm(cm, 7, 5)
    assert len(kept) == 6
    assert kept == sorted(kept, key=cm.index)  # original order
    assert set(kept) <= set(cm)
    assert balance_cm(cm, 7, 5) == kept  # seed 42 by default: deterministic
    assert balance_cm(cm, 7, 5, seed=42) == kept
    assert balance_cm(cm, 7, 5, seed=7) != kept
    assert len(balance_cm(cm, 7, 5, ratio=0.8)) == 9
    assert balance_cm(cm[:3], 7, 5) == cm[:3]  # fewer than the target: all kept
    assert balance_cm(cm, 0, 0) == []
    with pytest.raises(ValueError):
        cm_target(1, 1, -0.5)


def outcomes(*rows: str) -> list[Outcomes]:
    """Rows like "RwRR": clean, noised, clean_ref, noised_ref (R right, w wrong)."""
    return [Outcomes(*(c == "R" for c in row)) for row in rows]


def test_misalignment_rates_on_hand_made_outcomes() -> None:
    rows = outcomes("RRRR", "RRwR", "RwwR", "wwRR", "wwRw", "RRRw", "wwww", "wRww")
    # noised_ref right in 4 of 8 items
    assert copy_reference_rate(rows) == pytest.approx(4 / 8)
    # clean right in 4 items (RRRR, RRwR, RwwR, RRRw); 2 of them wrong with retrieval
    assert over_reliance_rate(rows) == pytest.approx(2 / 4)
    rates = misalignment_rates(rows)
    assert rates.as_dict() == {"copy_reference": 0.5, "over_reliance": 0.5, "items": 8, "clean_correct": 4}
    assert copy_reference_rate([]) is None
    assert over_reliance_rate(outcomes("wRRR", "wwww")) is None
    assert misalignment_rates([]).items == 0
