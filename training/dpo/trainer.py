"""RAG-based preference tuning on TRL's ``DPOTrainer``: what TRL 1.13 does not express, and one stage's run.

TRL's vision DPO builds each batch as ``[chosen rows; rejected rows]`` and runs one concatenated forward, but
its collator (``DataCollatorForVisionPreference``) gives both halves the *same* images
(``images = [...] * 2``). MMed-RAG scores the rejected answer of stage 1 and D_cm with a noise image, so
``DataCollatorForPairedImagePreference`` replaces the rejected half's ``pixel_values`` with the rejected
images' own. Everything else is TRL's: the sigmoid loss on summed log-probs with ``beta``, the metrics
(loss, ``rewards/margins``, ``rewards/accuracies``), checkpoints and resume.

Reference model: with ``ref_model=None`` and a PEFT model TRL disables the adapters for the reference
forward. When the model already carries an adapter (stage 2 continues stage 1) TRL instead freezes a copy
of it under the name ``"ref"``; ``MMedRAGDPOTrainer`` removes that copy, so the reference stays the original
model with adapters disabled in both stages, as the paper specifies.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import set_seed
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from training.dpo.config import MMedRAGDPOConfig
from training.dpo.data import (
    IMAGES,
    REJECTED_IMAGES,
    PairError,
    PreferencePair,
    build_preference_dataset,
    count_pairs,
    read_pairs,
    select_stage,
    split_held_out,
    stage_pair_files,
)
from training.dpo.defaults import NO_STAGE1_ADAPTER

logger = logging.getLogger(__name__)

SUMMARY = "dpo_summary.json"
REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a pre-trained adapter


@dataclass
class DataCollatorForPairedImagePreference(DataCollatorForVisionPreference):
    """TRL's vision preference collator, except that each rejected row is paired with its own image.

    Each example holds ``images`` (one image: the chosen side's) and optionally ``rejected_images`` (one
    image: the rejected side's; missing or None means the same image). The output is TRL's — ``input_ids``,
    ``attention_mask``, ``completion_mask``, ``pixel_values`` with the first half of the rows for the chosen
    answers and the second half for the rejected ones — with the second half of ``pixel_values`` computed
    from the rejected images by the processor's own image processor.

    The prompt also gets the tokenizer's BOS when the tokenizer adds one by default: TRL tokenizes prompts
    with ``add_special_tokens=False`` (its chat templates write BOS themselves), while our prompt text is the
    bare vicuna_v1 conversation and serving tokenizes it with the BOS.
    """

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        probe = tokenizer("a")["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
        self.prompt_prefix = tokenizer.bos_token if adds_bos else ""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [dict(example) for example in examples]  # TRL's collator edits the examples it is given
        rejected_images = []
        for example in examples:
            chosen = example.get(IMAGES)
            if chosen is None or len(chosen) != 1:
                raise ValueError("each preference example needs exactly one chosen image in 'images'")
            rejected = example.pop(REJECTED_IMAGES, None) or chosen
            if len(rejected) != 1:
                raise ValueError("each preference example needs exactly one image in 'rejected_images'")
            rejected_images.append(rejected[0])
            if self.prompt_prefix and not example["prompt"].startswith(self.prompt_prefix):
                example["prompt"] = self.prompt_prefix + example["prompt"]
        output = super().torch_call(examples)
        pixel_values = output["pixel_values"]
        half = len(examples)
        rejected_pixels = self.processor.image_processor(images=rejected_images, return_tensors="pt")[
            "pixel_values"
        ].to(pixel_values.dtype)
        if pixel_values.shape[0] != 2 * half or rejected_pixels.shape != pixel_values[half:].shape:
            raise ValueError(
                f"expected one image per row (pixel_values {tuple(pixel_values.shape)} for {half} pairs, "
                f"rejected {tuple(rejected_pixels.shape)}): this collator supports fixed-size single-image "
                "processors such as LLaVA's"
            )
        output["pixel_values"] = torch.cat((pixel_values[:half], rejected_pixels), dim=0)
        return output


class MMedRAGDPOTrainer(DPOTrainer):
    """``DPOTrainer`` for MMed-RAG: the rejected side may carry its own image, and the reference is the
    policy with adapters disabled even when training continues an existing adapter.

    Example::

        trainer = MMedRAGDPOTrainer(model, args=config, train_dataset=train, processing_class=processor,
                                    peft_config=lora_config(config))
        trainer.train()

    Args:
        model: the LLaVA model, or a ``PeftModel`` whose trainable adapter is continued (stage 2).
        args: the run's ``MMedRAGDPOConfig`` (or any ``DPOConfig``).
        train_dataset / eval_dataset: ``build_preference_dataset`` output (``prompt``, ``chosen``,
            ``rejected``, ``images``, ``rejected_images``).
        processing_class: the model folder's ``LlavaProcessor``.
        peft_config: LoRA config of a new adapter (stage 1); None when ``model`` already has one.
        data_collator: defaults to ``DataCollatorForPairedImagePreference``.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "mmed-rag"]

    def __init__(
        self,
        model: Any,
        *,
        args: MMedRAGDPOConfig,
        train_dataset: Any,
        processing_class: Any,
        eval_dataset: Any = None,
        peft_config: Any = None,
        data_collator: Any = None,
        callbacks: list[Any] | None = None,
    ):
        if data_collator is None:
            data_collator = DataCollatorForPairedImagePreference(
                processor=processing_class, max_length=args.max_length
            )
        super().__init__(
            model=model,
            ref_model=None,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        # TRL froze a copy of a pre-trained adapter as the reference; MMed-RAG's reference is the original
        # model (adapters disabled), which TRL uses whenever no "ref" adapter exists.
        policy = self.accelerator.unwrap_model(self.model)
        peft_configs = getattr(policy, "peft_config", {})
        if REFERENCE_ADAPTER in peft_configs:
            policy.delete_adapter(REFERENCE_ADAPTER)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._is_vision_dataset and REJECTED_IMAGES not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, REJECTED_IMAGES]


# ---------------------------------------------------------------------------------------------- one stage


def lora_config(config: MMedRAGDPOConfig):
    """A new adapter on the language model's linear layers (``config.lora_target_modules``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        bias="none",
    )


def load_stage_pairs(config: MMedRAGDPOConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs of the stage (``pair_files`` or ``pairs_dir``), held out by file or by hash."""
    files = (
        [Path(p) for p in config.pair_files]
        if config.pair_files
        else stage_pair_files(Path(config.pairs_dir), config.stage)
    )
    pairs = select_stage(read_pairs(files), config.stage)
    if not pairs:
        raise PairError(f"no stage-{config.stage} pairs in {', '.join(map(str, files))}")
    if config.eval_pair_files:
        held = select_stage(read_pairs(Path(p) for p in config.eval_pair_files), config.stage)
        return pairs, held
    return split_held_out(pairs, config.eval_fraction)


def load_policy(config: MMedRAGDPOConfig) -> tuple[Any, Any, Any]:
    """(model, processor, peft_config): the base model with a new LoRA config (stage 1), or the base model
    with the stage-1 adapter loaded trainable and no new config (stage 2)."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(config.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: base model folder not found; train one with `mmedrag sft`, convert LLaVA-Med with "
            "`mmedrag convert-llava-med`, or pass --model"
        )
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    base = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    if config.stage == 1 or config.stage1_adapter == NO_STAGE1_ADAPTER:
        return base, processor, lora_config(config)
    adapter = Path(config.stage1_adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: stage-1 adapter not found; run `mmedrag dpo --stage 1` first")
    return PeftModel.from_pretrained(base, adapter, is_trainable=True), processor, None


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def _margins(metrics: dict[str, float]) -> dict[str, float]:
    keys = {"eval_loss": "loss", "eval_rewards/margins": "margin", "eval_rewards/accuracies": "accuracy"}
    return {short: float(metrics[key]) for key, short in keys.items() if key in metrics}


def run_dpo(config: MMedRAGDPOConfig, *, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train one stage and save its adapter to ``config.adapter_dir``; return (and save) the run summary.

    The summary holds the pair counts, the held-out loss / reward margin / reward accuracy before and
    after training, the logged training metrics and the wall time.
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    started = time.perf_counter()
    train_pairs, held_pairs = load_stage_pairs(config)
    image_root = Path(config.image_root) if config.image_root else None
    train_dataset = build_preference_dataset(train_pairs, image_root)
    eval_dataset = build_preference_dataset(held_pairs, image_root) if held_pairs else None
    # Seeded before the adapter is created, so its initialisation (and a resumed run) is reproducible.
    set_seed(config.seed)
    model, processor, peft_config = load_policy(config)
    trainer = MMedRAGDPOTrainer(
        model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    checkpoint = _last_checkpoint(Path(config.output_dir)) if config.resume else None
    if config.resume and checkpoint is None:
        logger.warning(
            "no checkpoint in %s: stage %d starts from the beginning", config.output_dir, config.stage
        )
    before = _margins(trainer.evaluate()) if eval_dataset is not None and checkpoint is None else {}
    result = trainer.train(resume_from_checkpoint=checkpoint)
    after = _margins(trainer.evaluate()) if eval_dataset is not None else {}

    adapter_dir = Path(config.adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(adapter_dir)
    summary = {
        "stage": config.stage,
        "adapter": str(adapter_dir),
        "pairs": {"train": count_pairs(train_pairs), "held_out": count_pairs(held_pairs)},
        "held_out": {"before": before, "after": after},
        "train": {"steps": result.global_step, "loss": result.training_loss, "resumed_from": checkpoint},
        "log": [entry for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "settings": config.mmed_rag_settings(),
    }
    (adapter_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
