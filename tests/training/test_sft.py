"""``mmedrag sft``: training text = serving text, answer-only loss, learning, serving, data hygiene."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.common.images import encode_png, to_data_url
from services.common.prompts import build_chat_messages, build_prompt, render_conversation
from training.artifacts.generator import build_tokenizer
from training.data.medsynth.generate import SynthConfig, synthesize
from training.data.medsynth.reader import read_findings
from training.sft import (
    IGNORE_INDEX,
    METRICS_FILE,
    TRAIN_SPLIT,
    CorpusEntry,
    ReferenceSampler,
    SFTConfig,
    build_processor,
    config_help,
    encode_example,
    load_train_data,
    train_sft,
    truncate_report,
    vqa_answer,
)

TINY = {
    "image_size": 32,
    "vision_hidden_size": 32,
    "vision_layers": 1,
    "text_hidden_size": 64,
    "text_layers": 1,
    "vision_pretrain_steps": 5,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "log_every": 1,
    "num_threads": 1,
    "progress": False,
}


@pytest.fixture(scope="module")
def medsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("medsynth")
    synthesize(SynthConfig(out=out, per_domain=16, image_size=64, seed=0))
    return out


@pytest.fixture(scope="module")
def trained(medsynth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SFTConfig, dict]:
    config = SFTConfig(data=medsynth, out=tmp_path_factory.mktemp("sft") / "base", max_steps=16, **TINY)
    result = train_sft(config)
    return config, result.metrics


def test_training_text_is_the_served_conversation_and_only_the_answer_is_labelled(medsynth: Path) -> None:
    tokenizer = build_tokenizer(["FINDINGS: Small left pleural effusion. IMPRESSION: Effusion."])
    processor = build_processor(tokenizer, 32)
    image = Image.new("RGB", (32, 32), (90, 90, 90))
    cases = [
        ("vqa", ["No pleural effusion."], "Is there a pleural effusion?", "Yes."),
        ("vqa", [], "Is the heart enlarged?", "No."),
        ("report", ["Normal study.", "Small effusion."], None, "FINDINGS: Small left pleural effusion."),
    ]
    for task, references, question, answer in cases:
        prompt = build_prompt(task, "radiology", references, question)
        ids, labels = encode_example(tokenizer, prompt, answer, num_image_tokens=4)
        # What the processor makes of the exact served text (the chat template renders render_conversation).
        served = processor(text=[render_conversation(prompt, answer)], images=[image], return_tensors="pt")
        assert ids == served["input_ids"][0].tolist()
        assert len(labels) == len(ids)
        answer_ids = [token for token in labels if token != IGNORE_INDEX]
        first = labels.index(answer_ids[0])
        assert all(token == IGNORE_INDEX for token in labels[:first])
        assert labels[first:] == ids[first:]
        assert tokenizer.decode(answer_ids) == f" {answer}</s>"
        assert answer_ids[-1] == tokenizer.eos_token_id
        # The unlabelled part is exactly the generation prompt the services send.
        messages = build_chat_messages(prompt, "data:image/png;base64,AAAA")
        generation_prompt = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        context = processor(text=[generation_prompt], images=[image], return_tensors="pt")["input_ids"][0]
        assert ids[:first] == context.tolist()


def test_answers_are_yes_no_and_reports_are_cut_at_sentences() -> None:
    assert [vqa_answer(t) for t in ("Yes.", "No", "yes", "No.")] == ["Yes.", "No.", "Yes.", "No."]
    report = "One two three. Four five six. Seven eight nine ten."
    assert truncate_report(report, 6) == "One two three. Four five six."
    assert truncate_report(report, 5) == "One two three."
    assert truncate_report(report, 1) == "One two three."  # the first sentence is always kept
    assert truncate_report(report, 100) == report


def test_only_retriever_train_items_are_used(medsynth: Path, trained: tuple[SFTConfig, dict]) -> None:
    truth = read_findings(medsynth)
    train_ids = {m.id for m in truth if m.split == TRAIN_SPLIT}
    held_out = {m.id for m in truth if m.split != TRAIN_SPLIT}
    held_out_images = {Path(m.image).name for m in truth if m.split != TRAIN_SPLIT}
    assert held_out
    items, corpus, _ = load_train_data(
        medsynth, ("radiology", "ophthalmology", "pathology"), ("vqa", "report"), max_report_words=64
    )
    assert {item.task for item in items} == {"vqa", "report"}
    for item in items:
        image_id = item.id if item.task == "report" else item.id.rsplit("-q", 1)[0]
        assert image_id in train_ids and image_id not in held_out
        assert item.image not in held_out_images
    assert all(entry.image not in held_out_images for entries in corpus.values() for entry in entries)
    _, metrics = trained
    assert metrics["data"]["split"] == TRAIN_SPLIT
    assert metrics["data"]["images"] == len(train_ids)


def test_reference_sampling_respects_the_agreement_rate() -> None:
    corpus = {
        "radiology": [
            CorpusEntry(
                f"img{i}.png", frozenset({"effusion"} if i % 3 == 0 else {"nodule"} if i % 3 else ()), f"r{i}"
            )
            for i in range(30)
        ]
    }
    text_findings = {e.text: e.findings for e in corpus["radiology"]}
    for rate in (0.0, 0.7, 1.0):
        sampler = ReferenceSampler(corpus, agreement_rate=rate, own_report_rate=0.5, max_references=3)
        rng = random.Random(0)
        draws = [sampler.sample("radiology", f"img{i % 30}.png", rng) for i in range(3000)]
        agreeing = sum(d.agrees for d in draws) / len(draws)
        assert abs(agreeing - rate) < 0.03
        for i, draw in enumerate(draws):
            own = sampler.findings("radiology", f"img{i % 30}.png")
            assert (text_findings[draw.texts[0]] == own) is draw.agrees
            assert 1 <= len(draw.texts) <= 3
    own_texts = [
        d.texts[0] == f"r{i % 30}"
        for i, d in enumerate(
            [
                ReferenceSampler(corpus, agreement_rate=1.0, own_report_rate=0.25, max_references=1).sample(
                    "radiology", f"img{i % 30}.png", rng
                )
                for i in range(2000)
            ]
        )
    ]
    assert abs(sum(own_texts) / len(own_texts) - 0.25) < 0.04


def test_a_few_steps_lower_the_loss_and_change_the_weights(trained: tuple[SFTConfig, dict]) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config, metrics = trained
    losses = [point["loss"] for point in metrics["loss_curve"]]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    torch.manual_seed(config.seed)
    initial = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(config.out)).state_dict()
    saved = LlavaForConditionalGeneration.from_pretrained(config.out, local_files_only=True).state_dict()
    assert saved.keys() == initial.keys()
    changed = [name for name, value in saved.items() if not torch.equal(value, initial[name])]
    assert any("language_model" in name for name in changed)
    assert any("vision_tower" in name for name in changed)
    assert any("multi_modal_projector" in name for name in changed)
    written = json.loads((config.out / METRICS_FILE).read_text())
    assert written["settings"]["seed"] == config.seed and written["steps"] == 16


def test_training_is_deterministic_for_a_seed(medsynth: Path, tmp_path: Path) -> None:
    weights = []
    for name in ("a", "b"):
        config = SFTConfig(data=medsynth, out=tmp_path / name, max_steps=3, limit=4, **TINY)
        train_sft(config)
        weights.append(load_file(str(config.out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


async def test_the_folder_is_served_by_the_generator_service(trained: tuple[SFTConfig, dict]) -> None:
    from services.generator.app import build_app
    from services.generator.service import GeneratorService
    from services.generator.settings import GeneratorSettings

    config, _ = trained
    assert (config.out / "chat_template.jinja").is_file()
    service = GeneratorService(config.out, served_model_name="base", max_tokens_ceiling=16, torch_threads=1)
    service.load()
    app = build_app(GeneratorSettings(model_dir=config.out), service=service)
    url = to_data_url(encode_png(Image.new("RGB", (48, 48), (120, 40, 40))))
    prompt = build_prompt("vqa", "radiology", [], "Is there a pleural effusion?")
    body = {"model": "base", "messages": build_chat_messages(prompt, url), "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert isinstance(answer, str)


def test_every_setting_is_documented() -> None:
    assert all(text for text in config_help().values())
    with pytest.raises(ValueError):
        SFTConfig(data=Path("."), out=Path("."), agreement_rate=1.5)


def test_the_folder_loads_for_pairs_and_the_command_mounts(
    trained: tuple[SFTConfig, dict], medsynth: Path
) -> None:
    import typer
    from typer.testing import CliRunner

    from training.pairs.runner import GenerationRequest, InProcessGenerator, load_items
    from training.sft import sft_cli

    config, _ = trained
    item = load_items(medsynth, "radiology", "vqa", split="test", limit=1)[0]
    generator = InProcessGenerator(config.out, max_new_tokens=4, threads=1)
    answers = generator.generate(
        [GenerationRequest(item.path, item.prompt()), GenerationRequest(item.path, item.prompt(["Normal."]))]
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    app = typer.Typer()
    app.command("sft")(sft_cli)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["sft", "--help"])
    assert result.exit_code == 0 and "--agreement-rate" in result.output
