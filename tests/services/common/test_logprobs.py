"""The one top-log-probability rule the generator service, pair construction and evaluation share."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.logprobs import logsumexp, merge_by_text, top_logprobs_by_text, top_token_logprobs
from training.evaluate.metrics import top_logprobs_from_openai, yes_probability_from_logprobs


def test_top_token_logprobs_are_the_log_softmax_of_the_raw_logits_likeliest_first() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    expected = torch.log_softmax(logits, dim=-1)
    top = top_token_logprobs(logits, 3)
    assert [index for index, _ in top] == [1, 3, 2]
    for index, value in top:
        assert value == pytest.approx(float(expected[index]))
    assert len(top_token_logprobs(logits, 10)) == 4  # k larger than the vocabulary
    assert top_token_logprobs(logits, 0) == []


def test_masked_ids_are_left_out() -> None:
    logits = torch.tensor([1.0, -math.inf, 0.0, -math.inf])
    assert [index for index, _ in top_token_logprobs(logits, 4)] == [0, 2]


def test_two_ids_that_decode_alike_keep_the_sum_of_their_probabilities() -> None:
    logits = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)])
    texts = {0: "Yes", 1: "No", 2: "Yes"}
    by_text = top_logprobs_by_text(logits, 3, texts.__getitem__)
    assert list(by_text) == ["Yes", "No"]
    assert math.exp(by_text["Yes"]) == pytest.approx(0.7)
    assert math.exp(by_text["No"]) == pytest.approx(0.3)
    assert yes_probability_from_logprobs([by_text]) == pytest.approx(0.7)


def test_the_service_list_and_the_in_process_mapping_give_the_same_numbers() -> None:
    """The generator service lists every id (as vLLM); the evaluator merges them as in-process."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    texts = {0: " yes", 1: "No", 2: " yes", 3: "maybe"}
    listed = [{"token": texts[i], "logprob": v} for i, v in top_token_logprobs(logits, 4)]
    content = [{"token": " yes", "logprob": listed[0]["logprob"], "top_logprobs": listed}]
    assert top_logprobs_from_openai(content)[0] == pytest.approx(
        top_logprobs_by_text(logits, 4, texts.__getitem__)
    )


def test_logsumexp_is_stable_and_defined_for_nothing() -> None:
    assert logsumexp([]) == -math.inf
    assert logsumexp([-math.inf, -math.inf]) == -math.inf
    assert logsumexp([-1000.0, -1000.0]) == pytest.approx(-1000.0 + math.log(2))
    assert merge_by_text([]) == {}
