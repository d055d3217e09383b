"""Decoding baselines on the tiny LLaVA of ``tiny_artifacts``: each method against a hand computation.

The tiny model has random weights, so its answers are gibberish, but they are deterministic: every test
compares one code path with another (``model.generate``, forward passes done by hand, one-at-a-time
decoding) token for token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.prompts import build_prompt, render_conversation
from training.evaluate.decoding import (
    DECODINGS,
    DOLA_RELATIVE_TOP,
    TOP_LOGPROBS,
    DecodedAnswer,
    DecodingConfig,
    DoLaLogitsProcessor,
    decode_batch,
    dola_candidate_layers,
    dola_contrast,
    noised_pixel_values,
    vcd_contrast,
)

MAX_NEW_TOKENS = 6
# Large enough that the noised-image branch dominates the random model's nearly flat logits.
STRONG_ALPHA = 50.0


@dataclass
class Tiny:
    model: Any
    processor: Any
    texts: list[str]
    images: list[Image.Image]
    kwargs: dict[str, Any]

    def decode(self, config: DecodingConfig, rows: slice | list[int] = slice(None), **extra: Any):
        indices = range(len(self.texts))[rows] if isinstance(rows, slice) else rows
        return decode_batch(
            self.model,
            self.processor,
            [self.texts[i] for i in indices],
            [self.images[i] for i in indices],
            config=config,
            **{**self.kwargs, **extra},
        )

    def inputs(self, row: int, image: Image.Image | None = None) -> dict[str, torch.Tensor]:
        return dict(
            self.processor(
                text=[self.texts[row]], images=[image or self.images[row]], return_tensors="pt", padding=True
            )
        )

    def token_text(self, token: int) -> str:
        return self.processor.tokenizer.decode([token], skip_special_tokens=False)

    def answer_text(self, ids: list[int]) -> str:
        end = next((i for i, t in enumerate(ids) if t in self.kwargs["eos_ids"]), len(ids))
        return self.processor.tokenizer.decode(ids[:end], skip_special_tokens=True)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def tiny(tiny_artifacts: Path) -> Iterator[Tiny]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = tiny_artifacts / "generator"
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    ).eval()
    questions = [
        ((), "Is there a pleural effusion?"),
        (("No pleural effusion. The lungs are clear.",), "Is the heart enlarged?"),
        ((), "Is there a nodule in the right upper lobe of the lung, or a mass?"),
    ]
    texts = [render_conversation(build_prompt("vqa", "radiology", refs, q)) for refs, q in questions]
    # prompts of different lengths (left padding) and images of different sizes (the processor resizes)
    images = [_image(1, (64, 64)), _image(2, (80, 48)), _image(3, (64, 64))]
    tokenizer = processor.tokenizer
    kwargs = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_ids": {tokenizer.eos_token_id},
        "pad_id": tokenizer.pad_token_id,
        "suppress_ids": [processor.image_token_id],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; restored for the rest of the session
    yield Tiny(model, processor, texts, images, kwargs)
    torch.set_num_threads(threads)


def _texts(answers: list[DecodedAnswer]) -> list[str]:
    return [answer.text for answer in answers]


def _best(answer: DecodedAnswer) -> str:
    return max(answer.first_token_logprobs, key=answer.first_token_logprobs.__getitem__)


def _by_text(tiny: Tiny, logprobs: torch.Tensor) -> dict[str, float]:
    """By hand: the top log-probabilities of a position by token text, a text's ids summed in probability."""
    values, indices = torch.topk(logprobs, TOP_LOGPROBS)
    probability: dict[str, float] = {}
    for value, index in zip(values.tolist(), indices.tolist(), strict=True):
        if value > -math.inf:
            text = tiny.token_text(index)
            probability[text] = probability.get(text, 0.0) + math.exp(value)
    return {text: math.log(p) for text, p in probability.items()}


def _assert_logprobs(got: dict[str, float], expected: dict[str, float], tol: float = 1e-4) -> None:
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[key], expected[key], abs_tol=tol) for key in got), (got, expected)


# --------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"name": "opera"}, "decoding must be one of"),
        ({"name": "Greedy"}, "decoding must be one of"),
        ({"name": "beam", "num_beams": 0}, "num_beams"),
        ({"name": "vcd", "vcd_alpha": -0.5}, "vcd_alpha"),
        ({"name": "vcd", "vcd_beta": 1.5}, "vcd_beta"),
        ({"name": "vcd", "vcd_noise_step": 1001}, "vcd_noise_step"),
        ({"name": "dola", "dola_layers": "middle"}, "dola_layers"),
        ({"name": "dola", "dola_layers": "0,-2"}, "dola_layers"),
    ],
)
def test_invalid_config_raises(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DecodingConfig(**fields)


def test_every_decoding_is_a_valid_config() -> None:
    assert [DecodingConfig(name).name for name in DECODINGS] == ["greedy", "beam", "vcd", "dola"]
    assert DecodingConfig("dola", dola_layers="0, 2").dola_layers == "0, 2"


def test_call_errors(tiny: Tiny) -> None:
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        decode_batch(
            tiny.model,
            tiny.processor,
            tiny.texts[:2],
            tiny.images[:1],
            config=DecodingConfig(),
            **tiny.kwargs,
        )
    assert decode_batch(tiny.model, tiny.processor, [], [], config=DecodingConfig(), **tiny.kwargs) == []
    tiny.processor.tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="pad on the left"):
            tiny.decode(DecodingConfig(), [0])
    finally:
        tiny.processor.tokenizer.padding_side = "left"


# --------------------------------------------------------------------------------------------------
# Greedy and beam


def test_greedy_equals_model_generate(tiny: Tiny) -> None:
    from transformers import GenerationConfig

    inputs = tiny.processor(text=tiny.texts, images=tiny.images, return_tensors="pt", padding=True)
    config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=sorted(tiny.kwargs["eos_ids"]),
        pad_token_id=tiny.kwargs["pad_id"],
        suppress_tokens=tiny.kwargs["suppress_ids"],
    )
    with torch.inference_mode():
        sequences = tiny.model.generate(**inputs, generation_config=config)
    width = inputs["input_ids"].shape[1]
    expected = [tiny.answer_text(row) for row in sequences[:, width:].tolist()]
    answers = tiny.decode(DecodingConfig("greedy"))
    assert _texts(answers) == expected
    assert all(answer.text for answer in answers)


def test_greedy_first_token_logprobs_are_the_models(tiny: Tiny) -> None:
    [answer] = tiny.decode(DecodingConfig("greedy"), [1])
    with torch.inference_mode():
        logits = tiny.model(**tiny.inputs(1)).logits[0, -1]
    got = answer.first_token_logprobs
    _assert_logprobs(got, _by_text(tiny, torch.log_softmax(logits, dim=-1)))
    assert 0 < len(got) <= TOP_LOGPROBS and all(value <= 0 for value in got.values())


def test_beam_with_one_beam_equals_greedy(tiny: Tiny) -> None:
    greedy = tiny.decode(DecodingConfig("greedy"))
    beam = tiny.decode(DecodingConfig("beam", num_beams=1))
    assert beam == greedy


def test_beam_search_equals_model_generate_and_keeps_first_position_logprobs(tiny: Tiny) -> None:
    inputs = tiny.processor(text=tiny.texts[:2], images=tiny.images[:2], return_tensors="pt", padding=True)
    with torch.inference_mode():
        sequences = tiny.model.generate(
            **inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=3,
            eos_token_id=sorted(tiny.kwargs["eos_ids"]),
            pad_token_id=tiny.kwargs["pad_id"],
            suppress_tokens=tiny.kwargs["suppress_ids"],
        )
    width = inputs["input_ids"].shape[1]
    beam = tiny.decode(DecodingConfig("beam", num_beams=3), [0, 1])
    assert _texts(beam) == [tiny.answer_text(row) for row in sequences[:, width:].tolist()]
    # the first position's distribution is the model's, whatever the beams then choose
    greedy = tiny.decode(DecodingConfig("greedy"), [0, 1])
    for b, g in zip(beam, greedy, strict=True):
        assert b.first_token_logprobs.keys() == g.first_token_logprobs.keys()
        assert all(
            math.isclose(b.first_token_logprobs[k], v, abs_tol=1e-5)
            for k, v in g.first_token_logprobs.items()
        )


# --------------------------------------------------------------------------------------------------
# VCD


def test_noised_pixel_values(tiny: Tiny) -> None:
    image_processor = tiny.processor.image_processor
    pixels = tiny.processor(text=tiny.texts, images=tiny.images, return_tensors="pt", padding=True)[
        "pixel_values"
    ]
    # step 0 is the clean image (up to the [0, 1] clip and float round trip)
    same = noised_pixel_values(pixels, image_processor, step=0, seed=0)
    assert torch.allclose(same, pixels, atol=1e-5)
    noised = noised_pixel_values(pixels, image_processor, step=500, seed=0)
    assert noised.shape == pixels.shape and noised.dtype == pixels.dtype
    assert (noised - pixels).abs().mean() > 0.3
    # deterministic, a function of (seed, image): a row's noise does not depend on its batch mates
    assert torch.equal(noised, noised_pixel_values(pixels, image_processor, step=500, seed=0))
    assert torch.equal(noised[1:2], noised_pixel_values(pixels[1:2], image_processor, step=500, seed=0))
    assert not torch.equal(noised, noised_pixel_values(pixels, image_processor, step=500, seed=1))
    # still inside the normalised range of real pixels in [0, 1]
    mean = torch.tensor(image_processor.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, -1, 1, 1)
    unit = noised * std + mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_vcd_contrast_rule() -> None:
    clean = torch.tensor([[2.0, 1.0, math.log(0.05) + 2.0, -math.inf]])
    noised = torch.tensor([[3.0, 0.0, -5.0, 0.0]])
    scores = vcd_contrast(clean, noised, alpha=1.0, beta=0.1)
    # token 2 has p = 0.05 * p_max < 0.1 * p_max: cut; the suppressed token stays -inf
    assert scores[0, 0] == 2 * 2.0 - 3.0 and scores[0, 1] == 2 * 1.0 - 0.0
    assert scores[0, 2] == -math.inf and scores[0, 3] == -math.inf
    assert torch.equal(vcd_contrast(clean, noised, alpha=0.0, beta=0.0)[:, :3], clean[:, :3])
    only_best = vcd_contrast(clean, noised, alpha=5.0, beta=1.0)
    assert torch.isfinite(only_best).tolist() == [[True, False, False, False]]


def test_vcd_with_alpha_zero_equals_greedy(tiny: Tiny) -> None:
    greedy = tiny.decode(DecodingConfig("greedy"))
    for beta in (0.0, 0.1):
        vcd = tiny.decode(DecodingConfig("vcd", vcd_alpha=0.0, vcd_beta=beta))
        assert _texts(vcd) == _texts(greedy)


def test_vcd_with_beta_one_keeps_only_the_clean_argmax(tiny: Tiny) -> None:
    greedy = tiny.decode(DecodingConfig("greedy"))
    vcd = tiny.decode(DecodingConfig("vcd", vcd_alpha=STRONG_ALPHA, vcd_beta=1.0))
    assert _texts(vcd) == _texts(greedy)
    for answer in vcd:  # one token left: probability 1
        assert list(answer.first_token_logprobs.values()) == [0.0]


def _vcd_by_hand(
    tiny: Tiny, row: int, *, alpha: float, beta: float, steps: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy VCD with two full forward passes per step (no cache); the ids and the first step's scores."""
    clean_inputs = tiny.inputs(row)
    noised = noised_pixel_values(
        clean_inputs["pixel_values"], tiny.processor.image_processor, step=500, seed=0
    )
    ids = clean_inputs["input_ids"]
    suppress = tiny.kwargs["suppress_ids"]
    generated: list[int] = []
    first = None
    with torch.inference_mode():
        for _ in range(steps):
            clean = tiny.model(input_ids=ids, pixel_values=clean_inputs["pixel_values"]).logits[0, -1]
            other = tiny.model(input_ids=ids, pixel_values=noised).logits[0, -1]
            clean[suppress] = -math.inf
            scores = (1 + alpha) * clean - alpha * other
            keep = torch.softmax(clean, -1) >= beta * torch.softmax(clean, -1).max()
            scores[~keep] = -math.inf
            first = scores if first is None else first
            token = int(scores.argmax())
            generated.append(token)
            if token in tiny.kwargs["eos_ids"]:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated, first


def test_vcd_with_alpha_follows_the_hand_computed_contrast(tiny: Tiny) -> None:
    config = DecodingConfig("vcd", vcd_alpha=STRONG_ALPHA, vcd_beta=0.0)
    vcd = tiny.decode(config)
    greedy = tiny.decode(DecodingConfig("greedy"))
    for row in range(len(tiny.texts)):
        ids, first = _vcd_by_hand(tiny, row, alpha=STRONG_ALPHA, beta=0.0, steps=MAX_NEW_TOKENS)
        # the KV-cached noised branch inside generate gives what full recomputation gives
        assert vcd[row].text == tiny.answer_text(ids)
        _assert_logprobs(vcd[row].first_token_logprobs, _by_text(tiny, torch.log_softmax(first, -1)), 1e-3)
    # the contrast changes the answers of this model (the case the hand computation must reproduce)
    assert _texts(vcd) != _texts(greedy)
    assert any(_best(v) != _best(g) for v, g in zip(vcd, greedy, strict=True))


def test_vcd_plausibility_cut_by_hand(tiny: Tiny) -> None:
    beta = 0.9
    [answer] = tiny.decode(DecodingConfig("vcd", vcd_alpha=STRONG_ALPHA, vcd_beta=beta), [2])
    ids, first = _vcd_by_hand(tiny, 2, alpha=STRONG_ALPHA, beta=beta, steps=MAX_NEW_TOKENS)
    assert answer.text == tiny.answer_text(ids)
    assert int(torch.isfinite(first).sum()) < TOP_LOGPROBS  # the cut leaves fewer than the top-k
    _assert_logprobs(answer.first_token_logprobs, _by_text(tiny, torch.log_softmax(first, -1)), 1e-3)


# --------------------------------------------------------------------------------------------------
# DoLa


def test_dola_candidate_layers() -> None:
    assert dola_candidate_layers(32, "high") == list(range(16, 32, 2))
    assert dola_candidate_layers(32, "low") == list(range(0, 16, 2))
    assert dola_candidate_layers(48, "high") == list(range(28, 48, 2))
    assert dola_candidate_layers(48, "low") == list(range(0, 20, 2))
    assert dola_candidate_layers(32, "low", tied_embeddings=True) == list(range(2, 16, 2))
    assert dola_candidate_layers(2, "high") == [1]
    assert dola_candidate_layers(2, "low") == [0]
    assert dola_candidate_layers(2, "low", tied_embeddings=True) == [1]
    assert dola_candidate_layers(4, "3,1,1") == [1, 3]
    with pytest.raises(ValueError, match="below the model's 2 layers"):
        dola_candidate_layers(2, "0,2")


def test_dola_contrast_chooses_the_premature_layer_per_row() -> None:
    final = torch.zeros((2, 3))  # uniform: the plausibility cut keeps every token
    candidates = torch.tensor(
        [
            [[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]],  # layer a: far from row 0, near row 1
            [[0.1, 0.0, 0.0], [0.0, 0.0, 2.0]],  # layer b: near row 0, far from row 1
        ]
    )
    scores = dola_contrast(final, candidates)
    log_final = torch.log_softmax(final, -1)
    assert torch.allclose(scores[0], log_final[0] - torch.log_softmax(candidates[0, 0], -1))
    assert torch.allclose(scores[1], log_final[1] - torch.log_softmax(candidates[1, 1], -1))
    # a row alone gets what it gets in the batch
    assert torch.allclose(dola_contrast(final[1:], candidates[:, 1:]), scores[1:])
    # plausibility: tokens with p < 0.1 * max p are out
    peaked = dola_contrast(torch.tensor([[3.0, 0.0, -10.0]]), candidates[:, :1])
    assert torch.isfinite(peaked).tolist() == [[True, False, False]]


def test_dola_follows_the_hand_computed_contrast(tiny: Tiny) -> None:
    model = tiny.model
    decoder = model.get_decoder()
    for layers in ("high", "low", "0,1"):
        [answer] = tiny.decode(DecodingConfig("dola", dola_layers=layers), [0])
        candidates = dola_candidate_layers(len(decoder.layers), layers)
        with torch.inference_mode():
            outputs = model(**tiny.inputs(0), output_hidden_states=True)
        final = outputs.logits[0, -1].clone()
        final[tiny.kwargs["suppress_ids"]] = -math.inf
        log_final = torch.log_softmax(final, -1)
        p_final = log_final.exp()
        best_divergence, base = -1.0, None
        for layer in candidates:
            with torch.inference_mode():
                early = model.lm_head(decoder.norm(outputs.hidden_states[layer][0, -1]))
            log_early = torch.log_softmax(early, -1)
            p_early = log_early.exp()
            middle = 0.5 * (p_final + p_early)
            kl_final = (p_final * (log_final - middle.log())).nan_to_num().sum()
            kl_early = (p_early * (log_early - middle.log())).sum()
            divergence = float(0.5 * (kl_final + kl_early))
            if divergence > best_divergence:
                best_divergence, base = divergence, log_early
        keep = p_final >= DOLA_RELATIVE_TOP * p_final.max()
        scores = torch.where(keep, log_final - base, torch.tensor(-math.inf))
        expected = torch.log_softmax(scores, -1)
        assert len(answer.first_token_logprobs) <= int(keep.sum())
        _assert_logprobs(answer.first_token_logprobs, _by_text(tiny, expected))
    # the hooks are gone after decoding
    assert all(not layer._forward_pre_hooks for layer in decoder.layers)


def test_dola_processor_needs_its_with_block(tiny: Tiny) -> None:
    processor = DoLaLogitsProcessor(tiny.model, "high")
    with pytest.raises(RuntimeError, match="with"):
        processor(torch.zeros((1, 3), dtype=torch.long), torch.zeros((1, 10)))


def test_dola_differs_from_greedy(tiny: Tiny) -> None:
    assert _texts(tiny.decode(DecodingConfig("dola"))) != _texts(tiny.decode(DecodingConfig("greedy")))


# --------------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize(
    "config",
    [
        DecodingConfig("greedy"),
        DecodingConfig("vcd", vcd_alpha=STRONG_ALPHA, vcd_beta=0.0),
        DecodingConfig("vcd"),
        DecodingConfig("dola"),
        DecodingConfig("dola", dola_layers="0,1"),
        DecodingConfig("beam", num_beams=2),
    ],
    ids=["greedy", "vcd-strong", "vcd-default", "dola-high", "dola-two-candidates", "beam"],
)
def test_batch_equals_one_at_a_time(tiny: Tiny, config: DecodingConfig) -> None:
    batch = tiny.decode(config)
    single = [tiny.decode(config, [row])[0] for row in range(len(tiny.texts))]
    assert _texts(batch) == _texts(single)
    for b, s in zip(batch, single, strict=True):
        assert b.first_token_logprobs.keys() == s.first_token_logprobs.keys()
        assert all(
            math.isclose(b.first_token_logprobs[k], v, abs_tol=1e-4)
            for k, v in s.first_token_logprobs.items()
        )


def test_seed_pins_vcd_noise(tiny: Tiny) -> None:
    config = DecodingConfig("vcd", vcd_alpha=STRONG_ALPHA, vcd_beta=0.0)
    first = tiny.decode(config, seed=7)
    assert first == tiny.decode(config, seed=7)
    assert [a.first_token_logprobs for a in first] != [
        a.first_token_logprobs for a in tiny.decode(config, seed=8)
    ]
