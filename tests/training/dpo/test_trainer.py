"""``MMedRAGDPOTrainer`` and the two stages on a tiny LLaVA: LoRA on the language model only, the rejected
side scored with its own image, held-out reward margin up, stage 2 continuing stage 1 against the original
model, resume, and the ``mmedrag dpo`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from training.dpo.cli import dpo_cli
from training.dpo.config import PAPER_SETTINGS, MMedRAGDPOConfig, load_config
from training.dpo.data import build_preference_dataset, read_pairs
from training.dpo.defaults import LANGUAGE_MODEL_LINEAR
from training.dpo.trainer import SUMMARY, MMedRAGDPOTrainer, load_policy, run_dpo

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def build_trainer(config: MMedRAGDPOConfig, pair_file: Path) -> MMedRAGDPOTrainer:
    model, processor, peft_config = load_policy(config)
    dataset = build_preference_dataset(read_pairs([pair_file]))
    return MMedRAGDPOTrainer(
        model, args=config, train_dataset=dataset, processing_class=processor, peft_config=peft_config
    )


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def stage1(pair_world, tiny_settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Stage 1 through the command line, as a user runs it: (artifacts folder, summary)."""
    out = tmp_path_factory.mktemp("stage1")
    settings = tiny_settings(pair_world, out)
    config_file = out / "dpo.yaml"
    config_file.write_text(
        "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items() if key != "max_steps")
    )
    app = typer.Typer()
    app.command()(dpo_cli)
    result = CliRunner().invoke(app, ["--stage", "1", "--config", str(config_file), "--max-steps", "12"])
    assert result.exit_code == 0, result.output
    assert "held-out after" in result.output
    return out, json.loads((out / "adapters" / "stage1" / SUMMARY).read_text())


def test_lora_targets_only_the_language_model_linear_layers(
    pair_world, tiny_settings, tmp_path: Path
) -> None:
    config = MMedRAGDPOConfig(**tiny_settings(pair_world, tmp_path))
    trainer = build_trainer(config, pair_world.pairs / "pairs_stage1.jsonl")
    adapted = {name for name, module in trainer.model.named_modules() if hasattr(module, "lora_A")}
    layers = trainer.model.get_base_model().config.text_config.num_hidden_layers
    assert len(adapted) == layers * len(LINEAR_NAMES)
    for name in adapted:
        assert ".language_model.layers." in name and name.rsplit(".", 1)[1] in LINEAR_NAMES, name
        assert "vision_tower" not in name and "multi_modal_projector" not in name
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    # The pattern alone: the CLIP tower's q_proj and the projector never match.
    assert re.fullmatch(LANGUAGE_MODEL_LINEAR, "model.language_model.layers.3.mlp.down_proj")
    assert not re.fullmatch(LANGUAGE_MODEL_LINEAR, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(LANGUAGE_MODEL_LINEAR, "model.multi_modal_projector.linear_1")
    assert not re.fullmatch(LANGUAGE_MODEL_LINEAR, "lm_head")


def test_rejected_side_is_scored_with_its_own_image(
    pair_world, tiny_settings, make_pair, save_jsonl, tmp_path: Path
) -> None:
    """Identical chosen and rejected texts: only the image differs, so only it can change the log-prob."""
    config = MMedRAGDPOConfig(**tiny_settings(pair_world, tmp_path))
    same_text = make_pair(
        0, "stage1", pair_world.pairs, rejected="Yes, there is a small left pleural effusion."
    )
    same_both = {**same_text, "id": "same", "rejected_image": None}
    trainer = build_trainer(config, save_jsonl(tmp_path / "pairs.jsonl", [same_text]))

    def logps(record: dict) -> tuple[float, float]:
        row = build_preference_dataset(read_pairs([save_jsonl(tmp_path / "one.jsonl", [record])]))[0]
        batch = trainer._prepare_inputs(trainer.data_collator([row]))
        trainer._metrics["eval"].clear()
        trainer.model.eval()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        metrics = trainer._metrics["eval"]
        return metrics["logps/chosen"][0], metrics["logps/rejected"][0]

    # Through the trainer's own data loader too (TRL drops columns it does not know; not this one).
    batch = next(iter(trainer.get_train_dataloader()))
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])

    chosen, rejected = logps(same_text)
    assert abs(chosen - rejected) > 1e-3  # the noise image changes the score of the same words
    chosen, rejected = logps(same_both)
    assert chosen == pytest.approx(rejected, abs=1e-5)  # same words, same image: same score


def test_training_moves_only_the_adapter(pair_world, tiny_settings, tmp_path: Path) -> None:
    config = MMedRAGDPOConfig(**tiny_settings(pair_world, tmp_path, max_steps=4))
    trainer = build_trainer(config, pair_world.pairs / "pairs_stage1.jsonl")
    lora_before, base_before = lora_tensors(trainer.model), base_tensors(trainer.model)
    trainer.train()
    lora_after, base_after = lora_tensors(trainer.model), base_tensors(trainer.model)
    changed = [
        name
        for name in lora_before
        if "lora_B" in name and not torch.equal(lora_before[name], lora_after[name])
    ]
    assert len(changed) == len([name for name in lora_before if "lora_B" in name])
    for name, tensor in base_before.items():
        torch.testing.assert_close(base_after[name], tensor, rtol=0, atol=0, msg=name)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"rewards/margins", "rewards/accuracies", "loss"} <= logged[0].keys()


def test_stage1_raises_the_held_out_reward_margin(stage1: tuple[Path, dict]) -> None:
    out, summary = stage1
    before, after = summary["held_out"]["before"], summary["held_out"]["after"]
    assert before["margin"] == pytest.approx(0.0, abs=1e-6)  # a new adapter starts as the reference
    assert after["margin"] > 0.1 and after["accuracy"] == 1.0
    assert after["loss"] < before["loss"]
    assert summary["pairs"]["train"]["set"] == {"stage1": 16}
    assert summary["pairs"]["held_out"]["set"] == {"stage1": 6}  # only the stage's sets are held out
    assert summary["train"]["steps"] == 12
    assert (out / "adapters" / "stage1" / "adapter_config.json").is_file()


def test_stage2_continues_stage1_against_the_original_model(
    stage1: tuple[Path, dict], pair_world, tiny_settings
) -> None:
    out, _ = stage1
    config = MMedRAGDPOConfig(**tiny_settings(pair_world, out, stage=2, max_steps=6))
    model, processor, peft_config = load_policy(config)
    assert peft_config is None
    trainer = MMedRAGDPOTrainer(
        model,
        args=config,
        train_dataset=build_preference_dataset(read_pairs([pair_world.pairs / "pairs_all.jsonl"])[16:]),
        eval_dataset=build_preference_dataset(read_pairs([pair_world.held_out])[6:]),
        processing_class=processor,
    )
    # The adapter at the start of stage 2 is the end of stage 1, and it is the one being trained.
    stage1_weights = adapter_weights(out / "adapters" / "stage1")
    start = {name.replace(".default", ""): p for name, p in lora_tensors(trainer.model).items()}
    assert start.keys() == stage1_weights.keys()
    for name, tensor in stage1_weights.items():
        torch.testing.assert_close(start[name], tensor, rtol=0, atol=0)
    # The reference is the original model (adapters off), not a frozen copy of stage 1: TRL's "ref" copy is
    # gone, and before any stage-2 step the rewards are already non-zero (stage 1 moved away from the base).
    assert list(trainer.model.peft_config) == ["default"]
    before = trainer.evaluate()
    assert abs(before["eval_rewards/chosen"]) > 1e-3
    assert before["eval_rewards/margins"] > 0.0  # stage 1's preference carries to the retrieval prompts

    summary = run_dpo(config)
    assert summary["pairs"]["train"]["set"] == {"cm": 4, "oa1": 4, "oa2": 4}
    assert summary["pairs"]["held_out"]["set"] == {"cm": 2, "oa1": 2, "oa2": 2}
    assert summary["held_out"]["after"]["margin"] > summary["held_out"]["before"]["margin"]
    stage2_weights = adapter_weights(out / "adapters" / "stage2")
    assert stage2_weights.keys() == stage1_weights.keys()
    assert any(not torch.equal(stage2_weights[k], stage1_weights[k]) for k in stage1_weights)


class StopAt(TrainerCallback):
    """Ends training after ``step`` steps, as an interrupted run would (the checkpoint is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_continues_exactly_where_the_run_stopped(pair_world, tiny_settings, tmp_path: Path) -> None:
    settings = {"max_steps": 4, "save_steps": 2, "eval_pair_files": None, "eval_fraction": 0.0}
    whole = run_dpo(MMedRAGDPOConfig(**tiny_settings(pair_world, tmp_path / "whole", **settings)))
    interrupted = MMedRAGDPOConfig(**tiny_settings(pair_world, tmp_path / "resumed", **settings))
    first = run_dpo(interrupted, callbacks=[StopAt(2)])
    assert first["train"]["steps"] == 2
    resumed = run_dpo(
        MMedRAGDPOConfig(**tiny_settings(pair_world, tmp_path / "resumed", resume=True, **settings))
    )
    assert resumed["train"]["resumed_from"].endswith("checkpoint-2")
    assert resumed["train"]["steps"] == whole["train"]["steps"] == 4
    expected = adapter_weights(Path(whole["adapter"]))
    for name, tensor in adapter_weights(Path(resumed["adapter"])).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7)


def test_config_documents_the_paper_and_reads_files(tmp_path: Path) -> None:
    config = MMedRAGDPOConfig(artifacts=str(tmp_path), stage=2)
    assert config.beta == 0.1 and config.max_length == 1024
    assert config.loss_type == ["sigmoid", "sft"]  # DPO + the chosen side's NLL, weighted 1 each
    assert MMedRAGDPOConfig(artifacts=str(tmp_path), loss_type="sigmoid").loss_type == ["sigmoid"]
    assert PAPER_SETTINGS["loss_type"] == ["sigmoid"]  # the paper's recipe restores the paper's loss
    assert (
        config.lr_scheduler_type == "cosine" and config.warmup_steps == 0.03 and config.num_train_epochs == 3
    )
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert config.adapter_dir == str(tmp_path / "adapters" / "stage2")
    assert config.stage1_adapter == str(tmp_path / "adapters" / "stage1")
    assert config.model_dir == str(tmp_path / "base") and config.pairs_dir == str(tmp_path / "pairs")
    assert "128" in MMedRAGDPOConfig.__dataclass_fields__["lora_r"].metadata["help"]

    (tmp_path / "paper.json").write_text(json.dumps({**PAPER_SETTINGS, "bf16": False}))
    paper = load_config(tmp_path / "paper.json", stage=1, artifacts=str(tmp_path), learning_rate=2e-7)
    assert (paper.lora_r, paper.lora_alpha, paper.per_device_train_batch_size) == (128, 256, 1)
    assert paper.learning_rate == 2e-7  # the command line wins over the file
    (tmp_path / "typo.yaml").write_text("lora_rank: 4\n")
    with pytest.raises(ValueError, match="lora_rank"):
        load_config(tmp_path / "typo.yaml", artifacts=str(tmp_path))
    with pytest.raises(ValueError, match="stage"):
        MMedRAGDPOConfig(artifacts=str(tmp_path), stage=3)
