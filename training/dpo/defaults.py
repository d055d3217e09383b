"""Names, the paper's values and the help text of the DPO settings, importable without TRL.

``MMedRAGDPOConfig`` (``config.py``) subclasses TRL's ``DPOConfig``, whose import costs seconds; the command
line reads its option help from here so that ``mmedrag --help`` stays fast. ``config.py`` uses the same
texts as its field metadata: one source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Folders inside the artifacts folder (DESIGN.md §4).
BASE_DIR = "base"  # the model DPO starts from (SFT output or a converted LLaVA-Med); export never writes it
PAIRS_DIR = "pairs"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
# stage1_adapter value that makes stage 2 start a new adapter (a base model without stage-1 pairs)
NO_STAGE1_ADAPTER = "none"

# Every linear layer of the language model (attention and MLP projections), matched on the full module
# name with re.fullmatch. The CLIP vision tower also has q_proj/k_proj/v_proj, so the pattern is anchored
# on "language_model."; the projector (multi_modal_projector.linear_1/2) and lm_head never match.
LANGUAGE_MODEL_LINEAR = (
    r"(.*\.)?language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)

# The paper's recipe (MMed-RAG appendix, LLaVA-Med-7B, DeepSpeed ZeRO-3) as config keyword arguments.
PAPER_SETTINGS: dict[str, Any] = {
    "loss_type": ["sigmoid"],
    "lora_r": 128,
    "lora_alpha": 256,
    "lora_dropout": 0.05,
    "learning_rate": 1e-7,  # stage-2 VQA: 2e-7
    "num_train_epochs": 3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "beta": 0.1,
    "per_device_train_batch_size": 1,
    "bf16": True,
    "max_length": 1024,
    "gradient_checkpointing": True,
}

HELP: dict[str, str] = {
    "stage": "1: train a new LoRA adapter on the stage-1 pairs; 2: continue the stage-1 adapter on "
    "D_cm + D_oa1 + D_oa2 (the reference stays the original model: adapters disabled).",
    "artifacts": "Artifacts folder of the default paths. Default: $MMEDRAG_ARTIFACTS or artifacts.",
    "model_dir": "Hugging Face LLaVA folder of the base model. Default: <artifacts>/base.",
    "pairs_dir": "Folder of pairs_<set>.jsonl written by `mmedrag pairs`. Default: <artifacts>/pairs.",
    "pair_files": "Pair files instead of the stage's files in pairs_dir (only the stage's sets are used).",
    "eval_pair_files": "Held-out pair files for the reward margin; default: hold out eval_fraction.",
    "eval_fraction": "Share of the pairs held out (by id hash) when no eval pair files are given.",
    "image_root": "Folder the pairs' image paths are relative to (overrides their image_root).",
    "adapter_dir": "Where the trained LoRA adapter is saved. Default: <artifacts>/adapters/stage<N>.",
    "stage1_adapter": "Stage 2: the stage-1 adapter to continue. Default: <artifacts>/adapters/stage1. "
    f"'{NO_STAGE1_ADAPTER}': start a new adapter (when stage 1 had no pairs to train on).",
    "lora_r": "LoRA rank of a new adapter (paper: 128).",
    "lora_alpha": "LoRA alpha of a new adapter (paper: 256).",
    "lora_dropout": "LoRA dropout of a new adapter (paper: 0.05).",
    "lora_target_modules": "Regular expression (full module names) of the LoRA targets: the language "
    "model's linear layers, never the vision tower or the projector.",
    "resume": "Continue from the last checkpoint in the checkpoint folder, if any.",
    "num_threads": "CPU threads for torch (default: torch's own choice).",
    "output_dir": "Checkpoint folder. Default: <artifacts>/adapters/checkpoints/stage<N>.",
    "learning_rate": "Peak learning rate (paper: 1e-7, stage-2 VQA 2e-7, for LLaVA-Med-7B).",
    "loss_type": "TRL loss types, combined with loss_weights (default sigmoid DPO + the chosen side's NLL; "
    "paper: sigmoid).",
    "loss_weights": "Weights of the loss types (default: 1 each).",
    "num_train_epochs": "Epochs over the stage's pairs (paper: 3).",
    "max_steps": "Stop after this many optimizer steps (overrides the epochs).",
    "lr_scheduler_type": "Learning-rate schedule (paper: cosine).",
    "warmup_steps": "Warm-up: steps, or a fraction of all steps if below 1 (paper: 0.03).",
    "per_device_train_batch_size": "Pairs per device and step (paper: 1-2).",
    "per_device_eval_batch_size": "Pairs per evaluation batch.",
    "beta": "DPO beta: how far the policy may move from the reference (paper: 0.1).",
    "max_length": "Longest prompt + answer in tokens, image tokens included (paper: 1024).",
    "bf16": "bf16 mixed precision (paper: yes, on GPUs; off by default on CPU).",
    "gradient_checkpointing": "Recompute activations in the backward pass (paper: yes).",
    "logging_steps": "Log loss, reward margin and reward accuracy every N steps.",
    "save_steps": "Save a resumable checkpoint every N steps.",
    "save_total_limit": "Checkpoints kept in the checkpoint folder.",
    "seed": "Seed of the data order and the LoRA initialisation.",
}


def artifacts_root() -> Path:
    """``$MMEDRAG_ARTIFACTS`` or ``./artifacts``: where the services look for artifacts."""
    return Path(os.environ.get("MMEDRAG_ARTIFACTS") or "artifacts")
