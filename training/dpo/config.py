"""``MMedRAGDPOConfig``: TRL's ``DPOConfig`` plus the few settings MMed-RAG's two-stage RAG-PT needs.

Every TRL / ``TrainingArguments`` field works as usual (``--config`` files may set any of them); this class
adds the stage, the pair files, the LoRA shape and the folders, and changes some defaults.

The paper's recipe (MMed-RAG appendix; LLaVA-Med-7B on 8 GPUs) versus our defaults:

=========================  ===========================  =================================================
setting                    paper                        default here (small model, CPU)
=========================  ===========================  =================================================
LoRA r / alpha / dropout   128 / 256 / 0.05             16 / 32 / 0.05
LoRA targets               every linear layer of the    the same (pattern ``lora_target_modules``; never
                           language model               the vision tower nor the projector)
learning_rate              1e-7 (stage-2 VQA: 2e-7)     1e-4 (a 1e-7 step moves a small, freshly
                                                        initialised LoRA nowhere in a few hundred steps)
num_train_epochs           3                            3
lr_scheduler_type          cosine                       cosine
warm-up                    3 %                          3 % (``warmup_steps=0.03``, a fraction)
beta                       0.1                          0.1
loss                       sigmoid, summed log-probs    sigmoid, summed log-probs, plus the chosen
                                                        side's NLL (TRL ``loss_type=["sigmoid", "sft"]``,
                                                        weights 1, 1; see below)
per-device batch           1-2                          2
bf16                       yes (DeepSpeed ZeRO-3)       no (CPU autocast to bf16 is slow and lossy)
max_length                 1024                         1024
gradient checkpointing     yes                          no (tiny activations; it only costs time)
=========================  ===========================  =================================================

**Why the NLL term.** Pure sigmoid DPO at these learning rates collapses the small MedSynth base model's
yes/no threshold: measured on MedSynth test (seed 0, adaptive retrieval), it answered "no" to every question
(VQA mean of accuracy, F1, AUROC 56.5 → 33.3; its P(yes) still ranks, AUROC from P(yes) 60.9) and its reports
fell from 34.7 to 29.2 (mean of BLEU, ROUGE-L, METEOR). The stage-1 pairs are mostly "chosen No, rejected
Yes" (283 of 339 VQA pairs), and DPO pushes the chosen side's likelihood down with the rejected one's.
Adding the chosen side's NLL (the "RPO" recipe) keeps it up: VQA 56.8, reports 34.4 (docs/results).
``loss_type="sigmoid"`` (a config file line, or ``PAPER_SETTINGS``) restores the paper's loss.

``PAPER_SETTINGS`` holds the paper's values as keyword arguments (``load_config(**PAPER_SETTINGS)``).
The reference model is always the policy with its adapters disabled, so in stage 2 it is still the
original model, not the stage-1 policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trl import DPOConfig

from training.dpo.defaults import (
    ADAPTERS_DIR,
    BASE_DIR,
    CHECKPOINTS_DIR,
    HELP,
    LANGUAGE_MODEL_LINEAR,
    PAIRS_DIR,
    PAPER_SETTINGS,
    artifacts_root,
)

__all__ = ["PAPER_SETTINGS", "MMedRAGDPOConfig", "field_help", "load_config"]


def _help(name: str) -> dict[str, str]:
    # argparse (HfArgumentParser) formats help with %, so a literal % is written %%.
    return {"help": HELP[name].replace("%", "%%")}


@dataclass
class MMedRAGDPOConfig(DPOConfig):
    r"""Configuration of one RAG-PT stage (``mmedrag dpo --stage 1|2``).

    Parameters:
        > MMed-RAG

        stage (`int`, defaults to `1`):
            1 trains a fresh LoRA adapter on the stage-1 pairs; 2 continues the stage-1 adapter on
            D_cm ∪ D_oa1 ∪ D_oa2.
        artifacts (`str`, *optional*):
            Artifacts folder the default paths below live in. Default: `$MMEDRAG_ARTIFACTS` or `artifacts`.
        model_dir (`str`, *optional*):
            Hugging Face LLaVA folder of the base model. Default: `<artifacts>/base`.
        pairs_dir (`str`, *optional*):
            Folder of `pairs_<set>.jsonl` from `mmedrag pairs`. Default: `<artifacts>/pairs`.
        pair_files (`list[str]`, *optional*):
            Pair files instead of the stage's files in `pairs_dir`; only the stage's sets are kept.
        eval_pair_files (`list[str]`, *optional*):
            Held-out pair files; without them `eval_fraction` of the pairs is held out.
        eval_fraction (`float`, defaults to `0.1`):
            Share of pairs held out (by a hash of the id) to measure the reward margin before and after.
        image_root (`str`, *optional*):
            Folder the pairs' image paths are relative to, replacing their own `image_root`.
        adapter_dir (`str`, *optional*):
            Where the trained adapter is saved. Default: `<artifacts>/adapters/stage<stage>`.
        stage1_adapter (`str`, *optional*):
            Stage 2: the adapter to continue. Default: `<artifacts>/adapters/stage1`; `"none"` starts a
            new adapter (when the base model gave no stage-1 pairs).
        lora_r, lora_alpha, lora_dropout (defaults `16`, `32`, `0.05`; paper 128, 256, 0.05):
            LoRA shape of a new (stage-1) adapter; stage 2 keeps the stage-1 adapter's shape.
        lora_target_modules (`str`):
            Regular expression over full module names selecting the LoRA targets: the language model's
            linear layers only.
        resume (`bool`, defaults to `False`):
            Continue from the last checkpoint in `output_dir` if there is one.
        num_threads (`int`, *optional*):
            CPU threads for torch (None: torch's default).

    Defaults that differ from `DPOConfig` (paper values in the module docstring): `learning_rate=1e-4`,
    `num_train_epochs=3`, `lr_scheduler_type="cosine"`, `warmup_steps=0.03`, `per_device_train_batch_size=2`,
    `per_device_eval_batch_size=2`, `bf16=False`, `gradient_checkpointing=False`, `logging_steps=10`,
    `save_steps=100`, `save_total_limit=2`, `output_dir=<artifacts>/adapters/checkpoints/stage<stage>`.
    `loss_type=["sigmoid", "sft"]` (DPO plus the chosen side's NLL, each weighted 1 as TRL does when
    `loss_weights` is unset; the paper: sigmoid only).
    `beta` (0.1) and `max_length` (1024) keep TRL's defaults, which are the paper's.
    """

    # ------------------------------------------------------------------------------------------ MMed-RAG
    stage: int = field(default=1, metadata=_help("stage"))
    artifacts: str | None = field(default=None, metadata=_help("artifacts"))
    model_dir: str | None = field(default=None, metadata=_help("model_dir"))
    pairs_dir: str | None = field(default=None, metadata=_help("pairs_dir"))
    pair_files: list[str] | None = field(default=None, metadata=_help("pair_files"))
    eval_pair_files: list[str] | None = field(default=None, metadata=_help("eval_pair_files"))
    eval_fraction: float = field(default=0.1, metadata=_help("eval_fraction"))
    image_root: str | None = field(default=None, metadata=_help("image_root"))
    adapter_dir: str | None = field(default=None, metadata=_help("adapter_dir"))
    stage1_adapter: str | None = field(default=None, metadata=_help("stage1_adapter"))
    lora_r: int = field(default=16, metadata=_help("lora_r"))
    lora_alpha: int = field(default=32, metadata=_help("lora_alpha"))
    lora_dropout: float = field(default=0.05, metadata=_help("lora_dropout"))
    lora_target_modules: str = field(default=LANGUAGE_MODEL_LINEAR, metadata=_help("lora_target_modules"))
    resume: bool = field(default=False, metadata=_help("resume"))
    num_threads: int | None = field(default=None, metadata=_help("num_threads"))

    # ------------------------------------------------------------------------ defaults that differ
    output_dir: str | None = field(default=None, metadata=_help("output_dir"))
    learning_rate: float = field(default=1e-4, metadata=_help("learning_rate"))
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "sft"], metadata=_help("loss_type"))
    loss_weights: list[float] | None = field(default=None, metadata=_help("loss_weights"))
    num_train_epochs: float = field(default=3.0, metadata=_help("num_train_epochs"))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("lr_scheduler_type"))
    warmup_steps: float = field(default=0.03, metadata=_help("warmup_steps"))
    per_device_train_batch_size: int = field(default=2, metadata=_help("per_device_train_batch_size"))
    per_device_eval_batch_size: int = field(default=2, metadata=_help("per_device_eval_batch_size"))
    bf16: bool | None = field(default=False, metadata=_help("bf16"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("gradient_checkpointing"))
    logging_steps: float = field(default=10, metadata=_help("logging_steps"))
    save_steps: float = field(default=100, metadata=_help("save_steps"))
    save_total_limit: int | None = field(default=2, metadata=_help("save_total_limit"))

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {self.stage}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        root = Path(self.artifacts) if self.artifacts else artifacts_root()
        self.artifacts = str(root)
        self.model_dir = self.model_dir or str(root / BASE_DIR)
        self.pairs_dir = self.pairs_dir or str(root / PAIRS_DIR)
        self.adapter_dir = self.adapter_dir or str(root / ADAPTERS_DIR / f"stage{self.stage}")
        self.stage1_adapter = self.stage1_adapter or str(root / ADAPTERS_DIR / "stage1")
        self.output_dir = self.output_dir or str(root / ADAPTERS_DIR / CHECKPOINTS_DIR / f"stage{self.stage}")
        super().__post_init__()

    def mmed_rag_settings(self) -> dict[str, Any]:
        """The settings a run summary records (JSON-safe)."""
        keys = (
            "stage", "model_dir", "pairs_dir", "pair_files", "eval_pair_files", "eval_fraction", "image_root",
            "adapter_dir", "stage1_adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
            "learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "beta",
            "loss_type", "loss_weights", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_length", "bf16", "seed", "output_dir",
        )  # fmt: skip
        return json.loads(json.dumps({key: getattr(self, key) for key in keys}, default=str))


def field_help(name: str) -> str:
    """The help text of a config field, as the command line shows it."""
    for item in fields(MMedRAGDPOConfig):
        if item.name == name:
            return str(item.metadata.get("help", "")).replace("%%", "%")
    raise KeyError(name)


def load_config(path: Path | None = None, **overrides: Any) -> MMedRAGDPOConfig:
    """Settings from a YAML or JSON file (any ``MMedRAGDPOConfig`` / TRL field), then ``overrides``
    (None values are ignored, so unset command-line options keep the file's value)."""
    from transformers import HfArgumentParser

    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: DPO config file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a DPO config file holds one mapping of setting names to values")
    values.update({key: value for key, value in overrides.items() if value is not None})
    (config,) = HfArgumentParser(MMedRAGDPOConfig).parse_dict(values, allow_extra_keys=False)
    return config
