"""Pair files → TRL rows → batches: training reads the served text, the rejected side its own image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from services.common.prompts import render_conversation
from training.dpo.data import (
    PairError,
    build_preference_dataset,
    count_pairs,
    read_pairs,
    select_stage,
    split_held_out,
    stage_pair_files,
)
from training.dpo.trainer import DataCollatorForPairedImagePreference


@pytest.fixture(scope="module")
def processor(pair_world):
    return AutoProcessor.from_pretrained(pair_world.base, local_files_only=True)


def test_pairs_resolve_images_and_stage_sets(pair_world, tmp_path: Path) -> None:
    stage1 = read_pairs(stage_pair_files(pair_world.pairs, 1))
    stage2 = read_pairs(stage_pair_files(pair_world.pairs, 2))
    assert {p.set for p in stage1} == {"stage1"} and {p.set for p in stage2} == {"cm", "oa1", "oa2"}
    everything = read_pairs([pair_world.pairs / "pairs_all.jsonl"])
    assert [p.id for p in select_stage(everything, 2)] == [p.id for p in stage2]

    noised = next(p for p in stage2 if p.set == "cm")
    aligned = next(p for p in stage2 if p.set == "oa1")
    assert noised.rejected_image_path() == pair_world.pairs / "noise/16.png"
    assert aligned.rejected_image_path() == aligned.image_path() == pair_world.pairs / "images/20.png"
    # A moved pair folder: --image-root replaces the root written in the file.
    assert noised.image_path(tmp_path) == tmp_path / "images/16.png"
    assert count_pairs(stage2)["set"] == {"cm": 4, "oa1": 4, "oa2": 4}
    assert count_pairs(stage2)["rejected_noise_image"] == {"yes": 4}


def test_bad_pair_files_name_the_line_and_the_missing_image(
    pair_world, make_pair, save_jsonl, tmp_path: Path
) -> None:
    bad = tmp_path / "pairs_stage1.jsonl"
    bad.write_text(json.dumps(make_pair(0, "stage1", pair_world.pairs)) + '\n{"id": 1}\n')
    with pytest.raises(PairError, match=r"pairs_stage1.jsonl:2"):
        read_pairs([bad])
    with pytest.raises(PairError, match="pair file not found"):
        read_pairs([tmp_path / "missing.jsonl"])
    moved = save_jsonl(tmp_path / "moved.jsonl", [make_pair(0, "stage1", tmp_path)])
    with pytest.raises(PairError, match="--image-root"):
        build_preference_dataset(read_pairs([moved]))


def test_held_out_split_is_stable_and_disjoint(pair_world) -> None:
    pairs = read_pairs([pair_world.pairs / "pairs_all.jsonl"])
    train, held = split_held_out(pairs, 0.25)
    again_train, again_held = split_held_out(list(reversed(pairs)), 0.25)
    assert {p.id for p in held} == {p.id for p in again_held} and held
    assert {p.id for p in train} == {p.id for p in again_train}
    assert not {p.id for p in train} & {p.id for p in held}
    assert len(train) + len(held) == len(pairs)
    assert split_held_out(pairs, 0.0) == (pairs, [])


def test_rows_are_the_served_conversation(pair_world) -> None:
    pairs = read_pairs([pair_world.pairs / "pairs_cm.jsonl"])
    row = build_preference_dataset(pairs)[0]
    pair = pairs[0]
    assert row["prompt"] + row["chosen"] == render_conversation(pair.prompt, pair.chosen)
    assert row["prompt"] + row["rejected"] == render_conversation(pair.prompt, pair.rejected)
    assert row["prompt"].endswith("ASSISTANT:") and row["chosen"] == f" {pair.chosen}</s>"
    [chosen_image], [rejected_image] = row["images"], row["rejected_images"]
    assert isinstance(chosen_image, Image.Image) and isinstance(rejected_image, Image.Image)
    assert chosen_image.tobytes() != rejected_image.tobytes()  # the noise image


def test_batch_tokens_equal_serving_tokens_and_rejected_rows_get_their_own_pixels(
    pair_world, processor
) -> None:
    pair = read_pairs([pair_world.pairs / "pairs_stage1.jsonl"])[0]
    row = build_preference_dataset([pair])[0]
    batch = DataCollatorForPairedImagePreference(processor=processor)([row])

    real = Image.open(pair.image_path())
    noise = Image.open(pair.rejected_image_path())
    served_chosen = processor(
        text=[render_conversation(pair.prompt, pair.chosen)], images=[real], return_tensors="pt"
    )
    served_rejected = processor(
        text=[render_conversation(pair.prompt, pair.rejected)], images=[noise], return_tensors="pt"
    )
    chosen_ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    rejected_ids = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    # Same ids as the generator service feeds the model (BOS included), answer and </s> appended.
    assert chosen_ids.tolist() == served_chosen["input_ids"][0].tolist()
    assert rejected_ids.tolist() == served_rejected["input_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"][0], served_chosen["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1], served_rejected["pixel_values"][0])
    # Only the answer (and its </s>) is scored.
    completion = batch["input_ids"][0][batch["completion_mask"][0].bool()]
    assert processor.tokenizer.decode(completion) == f" {pair.chosen}</s>"


def test_without_a_rejected_image_the_batch_is_trls(pair_world, processor) -> None:
    pairs = read_pairs([pair_world.pairs / "pairs_oa1.jsonl"])[:2]
    rows = [dict(row) for row in build_preference_dataset(pairs)]
    ours = DataCollatorForPairedImagePreference(processor=processor)([dict(row) for row in rows])
    for row in rows:
        row.pop("rejected_images")
        row["prompt"] = processor.tokenizer.bos_token + row["prompt"]
    trls = DataCollatorForVisionPreference(processor=processor)(rows)
    assert ours.keys() == trls.keys()
    for key in trls:
        assert torch.equal(ours[key], trls[key]), key


def test_generated_answers_train_the_text_sft_trained(
    pair_world, make_pair, save_jsonl, tmp_path: Path
) -> None:
    """Generated answers start with their first token's space (" No." as decode returns it); the template
    adds one itself, so the trained completion must be " No.</s>", never "  No.</s>"."""
    record = make_pair(0, "stage1", pair_world.pairs, chosen=" No.", rejected=" Yes.\n")
    [pair] = read_pairs([save_jsonl(tmp_path / "pairs_stage1.jsonl", [record])])
    row = build_preference_dataset([pair])[0]
    assert row["chosen"] == " No.</s>" and row["rejected"] == " Yes.</s>"
    assert row["prompt"] + row["chosen"] == render_conversation(pair.prompt, "No.")
