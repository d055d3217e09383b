"""The tiny LLaVA folder: complete, loadable offline, deterministic, and consistent about image tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from services.common.artifacts import sha256_file
from services.common.prompts import (
    CHAT_TEMPLATE,
    build_chat_messages,
    build_report_prompt,
    render_conversation,
)
from training.artifacts.generator import build_tiny_generator

CORPUS = ("The cardiac silhouette is enlarged. Small bilateral pleural effusions.",)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_generator(tmp_path_factory.mktemp("gen") / "generator", corpus=CORPUS, seed=0)


def test_folder_has_every_file_transformers_and_vllm_read(folder: Path) -> None:
    names = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    } <= names
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["max_position_embeddings"] >= 2048
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("</s>")
    assert generation["pad_token_id"] == tokenizer.convert_tokens_to_ids("<pad>")
    assert sum(path.stat().st_size for path in folder.iterdir()) < 5 * 1024 * 1024


def test_same_seed_gives_byte_identical_files_and_another_seed_other_weights(
    folder: Path, tmp_path: Path
) -> None:
    again = build_tiny_generator(tmp_path / "again", corpus=CORPUS, seed=0)
    for path in folder.iterdir():
        assert sha256_file(path) == sha256_file(again / path.name), path.name
    other = build_tiny_generator(tmp_path / "other", corpus=CORPUS, seed=1)
    assert sha256_file(other / "model.safetensors") != sha256_file(folder / "model.safetensors")
    assert sha256_file(other / "tokenizer.json") == sha256_file(folder / "tokenizer.json")


def test_building_leaves_the_callers_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_generator(tmp_path / "g", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = (
        "Findings: 2.5 cm opacity (right lower lobe); no pneumothorax. Cup-to-disc ratio 0.6 -- "
        '"stable" vs. prior [yes, no]? 100% necrosis & 3 mitoses/10 HPF.\nImpression: normal.'
    )
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("</s>")
    pieces = tokenizer.encode("a<image>\nb</s>", add_special_tokens=False)
    assert pieces.count(image_id) == 1 and pieces.count(eos_id) == 1
    assert (
        len({image_id, eos_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}) == 5
    )


def test_corpus_words_become_tokens(tmp_path: Path) -> None:
    word = "xanthogranulomatous"
    plain = build_tiny_generator(tmp_path / "plain")
    taught = build_tiny_generator(tmp_path / "taught", corpus=[f"{word} change. A {word} lesion."] * 3)
    count = [
        len(AutoTokenizer.from_pretrained(f, local_files_only=True).encode(word, add_special_tokens=False))
        for f in (plain, taught)
    ]
    assert count[1] < count[0]


def test_reloads_and_image_tokens_match_the_features_in_a_forward_pass(folder: Path) -> None:
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    prompt = build_report_prompt("radiology")
    text = processor.apply_chat_template(
        build_chat_messages(prompt, "data:image/png;base64,"), add_generation_prompt=True, tokenize=False
    )
    assert text == render_conversation(prompt)
    inputs = processor(text=[text], images=[Image.new("RGB", (97, 61), (90, 40, 40))], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.inference_mode():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    assert image_tokens == features[0].shape[0] == (64 // 16) ** 2 == model.config.image_seq_length
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


def test_image_size_sets_the_number_of_image_tokens(tmp_path: Path) -> None:
    folder = build_tiny_generator(tmp_path / "g", image_size=96)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    inputs = processor(text=["<image>\nhi"], images=[Image.new("RGB", (96, 96))], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 36
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_tiny_generator(tmp_path / "bad", image_size=100)
