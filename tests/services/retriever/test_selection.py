"""The context-selection rules: the paper's log-ratio cliff, the repository's ratio rule, fixed, off."""

from __future__ import annotations

import math

import pytest

from services.retriever.selection import (
    DEFAULT_GAMMA,
    STRATEGIES,
    SelectionParams,
    select_contexts,
    select_fixed,
    select_paper,
    select_ratio,
)

# --------------------------------------------------------------------------------------------------
# Paper rule: u_i = log(S_i / S_{i+1}) > gamma


def test_paper_cuts_at_first_cliff():
    scores = [0.90, 0.88, 0.50, 0.49, 0.10]
    assert math.log(0.88 / 0.50) > 0.1 > math.log(0.90 / 0.88)
    assert select_paper(scores, gamma=0.1) == 2


def test_paper_first_cliff_wins_over_a_later_bigger_one():
    assert select_paper([0.8, 0.6, 0.59, 0.1], gamma=0.2) == 1


def test_paper_cliff_exactly_at_gamma_does_not_fire():
    gamma = math.log(0.8 / 0.4)  # = log 2
    assert select_paper([0.8, 0.4, 0.39], gamma=gamma, k_min=0) == 3
    assert select_paper([0.8, 0.4, 0.39], gamma=gamma - 1e-9, k_min=0) == 1


def test_paper_ties_never_fire_for_nonnegative_gamma():
    assert select_paper([0.5, 0.5, 0.5, 0.5], gamma=0.0) == 4
    assert select_paper([0.5, 0.5, 0.5, 0.2], gamma=0.0) == 3


def test_paper_all_equal_keeps_all_up_to_k_max():
    assert select_paper([0.3] * 10, gamma=0.05) == 10
    assert select_paper([0.3] * 10, gamma=0.05, k_max=6) == 6


def test_paper_gamma_zero_with_strictly_decreasing_scores_cuts_at_one():
    assert select_paper([0.9, 0.8, 0.7, 0.6], gamma=0.0) == 1


def test_paper_large_gamma_keeps_all():
    scores = [0.9, 0.5, 0.2, 0.01]
    assert select_paper(scores, gamma=100.0) == 4
    assert select_paper(scores, gamma=100.0, k_max=3) == 3


def test_paper_single_hit_and_empty():
    assert select_paper([0.42], gamma=0.05) == 1
    assert select_paper([], gamma=0.05) == 0
    assert select_paper([], gamma=0.05, k_min=3) == 0


def test_paper_next_score_not_positive_is_a_cliff():
    # 0.3 -> 0.0 and 0.3 -> -0.2: the log ratio is +inf, cut after the positive one.
    assert select_paper([0.4, 0.3, 0.0, -0.1], gamma=1000.0) == 2
    assert select_paper([0.4, 0.3, -0.2], gamma=1000.0) == 2


def test_paper_non_positive_first_score_keeps_only_k_min():
    assert select_paper([0.0, -0.1, -0.2], gamma=0.05, k_min=0) == 0
    assert select_paper([-0.1, -0.2, -0.3], gamma=0.05) == 1  # k_min = 1 forces the best one in
    assert select_paper([-0.1, -0.2, -0.3], gamma=0.05, k_min=2) == 2


def test_paper_k_min_overrides_an_early_cliff_and_k_max_caps():
    scores = [0.9, 0.3, 0.29, 0.28, 0.27]
    assert select_paper(scores, gamma=0.1) == 1
    assert select_paper(scores, gamma=0.1, k_min=3) == 3
    assert select_paper(scores, gamma=0.1, k_min=10) == 5  # k_min beyond n: all there are
    assert select_paper([0.5] * 8, gamma=0.1, k_min=2, k_max=4) == 4
    assert select_paper([0.5] * 8, gamma=0.1, k_max=0, k_min=0) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": math.nan}, "gamma"),
        ({"gamma": 0.1, "k_min": -1}, "k_min"),
        ({"gamma": 0.1, "k_max": -1}, "k_max"),
        ({"gamma": 0.1, "k_min": 5, "k_max": 2}, "k_min"),
    ],
)
def test_paper_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_paper([0.5, 0.4], **kwargs)


def test_unsorted_or_non_finite_scores_are_rejected_by_every_rule():
    for rule in (
        lambda s: select_paper(s, gamma=0.1),
        lambda s: select_ratio(s),
        lambda s: select_fixed(s, k=1),
        lambda s: select_contexts(s, "off"),
    ):
        with pytest.raises(ValueError, match="descending"):
            rule([0.2, 0.5, 0.1])
        with pytest.raises(ValueError, match="finite"):
            rule([0.5, math.nan])


# --------------------------------------------------------------------------------------------------
# Ratio rule: S_1 / S_i < threshold


def test_ratio_keeps_prefix_below_threshold():
    # 0.9/0.7 = 1.29, 0.9/0.6 = 1.5 (not < 1.5), 0.9/0.5 = 1.8
    assert select_ratio([0.9, 0.7, 0.6, 0.5], threshold=1.5) == 2
    assert select_ratio([0.9, 0.7, 0.6, 0.5], threshold=2.0) == 4


def test_ratio_caps_at_k_max_and_honours_k_min():
    assert select_ratio([0.5] * 10, k_max=6) == 6
    assert select_ratio([0.9, 0.1, 0.05], threshold=1.5, k_min=2) == 2


def test_ratio_ignores_non_positive_scores():
    # The repository's rule would keep -0.3 after -0.2 (ratio 0.67 < 1.5); here they are no evidence.
    assert select_ratio([0.5, 0.45, 0.0, -0.1]) == 2
    assert select_ratio([-0.2, -0.3], k_min=0) == 0
    assert select_ratio([-0.2, -0.3]) == 1
    assert select_ratio([0.0, 0.0], k_min=0) == 0


def test_ratio_single_and_empty():
    assert select_ratio([0.3]) == 1
    assert select_ratio([]) == 0


@pytest.mark.parametrize("threshold", [1.0, 0.5, math.inf])
def test_ratio_rejects_threshold_not_above_one(threshold):
    with pytest.raises(ValueError, match="threshold"):
        select_ratio([0.5], threshold=threshold)


# --------------------------------------------------------------------------------------------------
# Fixed, off and the named dispatcher


def test_fixed():
    assert select_fixed([0.9, 0.1, -0.5], k=2) == 2
    assert select_fixed([0.9], k=5) == 1
    assert select_fixed([0.9], k=0) == 0
    with pytest.raises(ValueError, match="k must be"):
        select_fixed([0.9], k=-1)


def test_select_contexts_dispatches_by_name():
    scores = [0.9, 0.88, 0.5, 0.49, 0.48]
    assert STRATEGIES == ("adaptive", "ratio", "fixed", "off")
    assert select_contexts(scores) == select_paper(scores, gamma=DEFAULT_GAMMA) == 2
    assert select_contexts(scores, "adaptive", SelectionParams(gamma=10.0, k_max=4)) == 4
    assert select_contexts(scores, "ratio", SelectionParams(ratio_threshold=1.5)) == 2
    assert select_contexts(scores, "ratio", SelectionParams(ratio_threshold=2.0)) == 5
    assert select_contexts(scores, "fixed", SelectionParams(k_max=3)) == 3
    assert select_contexts(scores, "fixed") == 5
    assert select_contexts(scores, "off") == 0
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select_contexts(scores, "bogus")  # type: ignore[arg-type]
