"""``RetrieverTrainer``: contrastive fine-tuning of one domain's CLIP-style dual encoder.

Loss: open_clip's own ``ClipLoss`` (symmetric InfoNCE over in-batch negatives, the paper's CLIP loss).
Optimiser: AdamW with weight decay on weight matrices only (biases, norms, embeddings of rank < 2 and the
logit scale get none, as open_clip's trainer does); linear warm-up over ``warmup_fraction`` of all steps,
then cosine decay to zero (``transformers.get_cosine_schedule_with_warmup``); the logit scale is clamped
to ln(100) after each step, as in CLIP.

After every epoch the validation pairs are scored (Recall@1/5/10 image→text and text→image over the
distinct validation texts, ``metrics.py``), ``<out>/checkpoint.pt`` is written (model, optimiser,
scheduler, epoch) and, when the epoch beats the best so far on ``select_metric`` (ties broken by the mean
of all six recalls; a later epoch must be strictly better), the artifact folder is rewritten with that
epoch's weights. The folder is always in the format the services load:

    open_clip_config.json, open_clip_model.safetensors   the model (save_clip_model)
    text_tower/        Hugging Face text towers only: their config and tokenizer files
    retriever.json     the sidecar (write_retriever_sidecar)
    metrics.json       per-epoch losses and recalls, best epoch, settings, data checksum

BatchNorm statistics (ResNet image towers) are recomputed over all training images before each
evaluation ("precise BN"), so the kept model does not depend on the composition of the last batches.

Runs are reproducible: shuffling and augmentation are seeded per epoch from ``seed``, so a run resumed
from its checkpoint ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from training.data.records import DOMAINS
from training.retriever.config import PAPER_SETTINGS, SHARED_DOMAIN, RetrieverTrainingConfig, warmup_steps
from training.retriever.data import (
    Pair,
    PairDataset,
    context_limit_share,
    distinct_text_batches,
    files_sha256,
    load_pairs,
    medsynth_pairs,
)
from training.retriever.metrics import distinct_texts, paired_recalls
from training.retriever.model import BuiltModel, build_model, load_model_config, portable_model_cfg

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CHECKPOINT_FORMAT = 1
MAX_LOGIT_SCALE = math.log(100.0)
# Settings that may change between an interrupted run and its resumption (they do not change the result).
# Paths may change too: the data's checksum is compared instead.
_RESUMABLE_CHANGES = frozenset(
    {"resume", "keep_checkpoint", "progress", "num_threads", "eval_batch_size"}
    | {"out", "data_dir", "train_file", "val_file", "image_root"}
)
_RECALL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))


@dataclass
class EpochResult:
    """What one epoch did; ``on_epoch_end`` receives it."""

    epoch: int  # 1-based
    global_step: int
    train_loss: float
    val_loss: float
    recalls: dict[str, float]
    lr: float  # learning rate after the epoch's last step
    logit_scale: float
    seconds: float
    is_best: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "train_loss": round(self.train_loss, 6),
            "val_loss": round(self.val_loss, 6),
            **{key: round(value, 6) for key, value in self.recalls.items()},
            "lr": self.lr,
            "logit_scale": round(self.logit_scale, 4),
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _State:
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_val: dict[str, Any] = field(default_factory=dict)
    best_epoch: int | None = None
    best_key: tuple[float, float] | None = None
    step_losses: list[float] = field(default_factory=list)


def _selection_key(metric: str, val_loss: float, recalls: dict[str, float]) -> tuple[float, float]:
    mean_recall = float(np.mean([recalls[key] for key in _RECALL_KEYS]))
    primary = -val_loss if metric == "loss" else recalls[metric]
    return (primary, mean_recall)


class RetrieverTrainer:
    """Train one domain's retriever and write its artifact folder.

    Args:
        config: the run's settings (``RetrieverTrainingConfig``).
        on_epoch_end: called after each epoch (and its checkpoint) with an ``EpochResult``; an exception
            it raises stops the run, leaving a checkpoint to ``resume`` from.

    Example::

        config = RetrieverTrainingConfig(domain="pathology", data_dir=Path("medsynth"),
                                         out=Path("artifacts/retrievers/pathology"))
        metrics = RetrieverTrainer(config).train()
        print(metrics["best_epoch"], metrics["best"]["mean_r5"])
    """

    def __init__(
        self, config: RetrieverTrainingConfig, *, on_epoch_end: Callable[[EpochResult], None] | None = None
    ):
        self.config = config
        self.on_epoch_end = on_epoch_end

    # ---------------------------------------------------------------------------------------- data

    def _pairs(self) -> tuple[list[Pair], list[Pair], list[Path]]:
        config = self.config
        if config.data_dir is not None:
            from training.data.medsynth.release import RETRIEVER_SPLITS

            domains = DOMAINS if config.domain == SHARED_DOMAIN else (config.domain,)
            files, train, val = [], [], []
            for domain in domains:
                folder = config.data_dir / domain
                files += [
                    folder / RETRIEVER_SPLITS["retriever_train"],
                    folder / RETRIEVER_SPLITS["retriever_val"],
                ]
                train += medsynth_pairs(config.data_dir, domain, "retriever_train")
                val += medsynth_pairs(config.data_dir, domain, "retriever_val")
            return train, val, files
        assert config.train_file and config.val_file and config.data_format and config.image_root
        kwargs = {"domain": config.domain, "dataset": config.dataset}
        train = load_pairs(config.train_file, config.data_format, config.image_root, **kwargs)
        val = load_pairs(config.val_file, config.data_format, config.image_root, **kwargs)
        return train, val, [config.train_file, config.val_file]

    # ------------------------------------------------------------------------------------ training

    def train(self) -> dict[str, Any]:
        """Run (or resume) the training; return the contents of ``metrics.json``."""
        config = self.config
        previous_threads = torch.get_num_threads()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        try:
            # Seeded per epoch inside; forking keeps the caller's global RNG untouched.
            with torch.random.fork_rng(devices=[]):
                return self._train()
        finally:
            torch.set_num_threads(previous_threads)

    def _train(self) -> dict[str, Any]:
        config = self.config
        started = time.perf_counter()
        # Data
        train_pairs, val_pairs, data_files = self._pairs()
        data_sha256 = files_sha256(data_files)
        # Model
        model_cfg = load_model_config(
            config.model, text_model=config.text_model, image_size=config.image_size
        )
        built = build_model(model_cfg, seed=config.seed, text_pretrained=config.text_pretrained)
        model = built.model
        image_size = int(model_cfg["vision_cfg"].get("image_size", 224))
        train_set = PairDataset(
            train_pairs,
            built.train_transform if config.augment else built.eval_transform,
            built.tokenizer,
            cache_side=image_size,
        )
        val_set = PairDataset(val_pairs, built.eval_transform, built.tokenizer, cache_side=image_size)
        # Schedule
        batch_size = min(config.batch_size, len(train_set))
        if batch_size < 2:
            raise ValueError(f"{len(train_set)} training pair(s): the contrastive loss needs at least 2")
        steps_per_epoch = len(train_set) // batch_size
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        optimizer = adamw(model, config.lr, config.weight_decay)
        scheduler, warmup = build_scheduler(optimizer, total_steps, config.warmup_fraction)
        loss_fn = ClipLoss(cache_labels=True)

        out = config.out
        out.mkdir(parents=True, exist_ok=True)
        state = _State()
        run_info = {
            "model_cfg": model_cfg,
            "data_sha256": data_sha256,
            "total_steps": total_steps,
            "config": config.to_dict(),
        }
        if config.resume and (out / CHECKPOINT).is_file():
            state = self._restore(out / CHECKPOINT, run_info, model, optimizer, scheduler)
            logger.info("resumed %s from epoch %d (step %d)", config.domain, state.epoch, state.global_step)
        else:
            if (out / CHECKPOINT).is_file():
                logger.warning("%s exists: starting afresh (pass --resume to continue it)", out / CHECKPOINT)
            state.initial_val = self._evaluate(model, built, val_set, loss_fn)
        pad_id = getattr(getattr(built.tokenizer, "tokenizer", None), "pad_token_id", None) or 0
        summary = {
            "domain": config.domain,
            "model": config.model,
            "text_model": str(built.text_folder) if built.text_folder else None,
            "text_weights_loaded": built.text_weights_loaded,
            "parameters": sum(p.numel() for p in model.parameters()),
            "settings": config.to_dict(),
            "paper_settings": PAPER_SETTINGS,
            "data": {
                "files": [str(path) for path in data_files],
                "sha256": data_sha256,
                "train_pairs": len(train_pairs),
                "val_pairs": len(val_pairs),
                "distinct_train_texts": len(distinct_texts([p.text for p in train_pairs])),
                "distinct_val_texts": len(distinct_texts([p.text for p in val_pairs])),
                "context_length": int(built.tokenizer.context_length),
                "texts_at_context_limit": round(context_limit_share(train_set.tokens, pad_id), 4),
            },
            "schedule": {
                "batch_size": batch_size,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "warmup_steps": warmup,
                "warmup_fraction": config.warmup_fraction,
            },
            "select_metric": config.select_metric,
            "loss": "open_clip.loss.ClipLoss (symmetric InfoNCE)",
        }

        model.train()
        bar = tqdm(
            total=total_steps,
            initial=state.global_step,
            desc=f"retriever {config.domain}",
            unit="step",
            disable=not config.progress,
        )
        try:
            for epoch in range(state.epoch + 1, config.epochs + 1):
                if state.global_step >= total_steps:
                    break
                epoch_started = time.perf_counter()
                losses = self._train_epoch(
                    model,
                    train_set,
                    loss_fn,
                    optimizer,
                    scheduler,
                    epoch,
                    batch_size,
                    state,
                    total_steps,
                    bar,
                )
                _precise_batchnorm(model, train_set, built.eval_transform, self.config.eval_batch_size)
                evaluation = self._evaluate(model, built, val_set, loss_fn)
                recalls = {key: value for key, value in evaluation.items() if key != "val_loss"}
                result = EpochResult(
                    epoch=epoch,
                    global_step=state.global_step,
                    train_loss=float(np.mean(losses)) if losses else float("nan"),
                    val_loss=evaluation["val_loss"],
                    recalls=recalls,
                    lr=float(scheduler.get_last_lr()[0]),
                    logit_scale=float(_unwrap(model).logit_scale.detach().exp()),
                    seconds=time.perf_counter() - epoch_started,
                )
                key = _selection_key(config.select_metric, result.val_loss, recalls)
                if state.best_key is None or key > state.best_key:
                    result.is_best = True
                    state.best_key, state.best_epoch = key, epoch
                    self._write_artifact(model, built, summary, state, result)
                state.epoch = epoch
                state.history.append(result.as_dict())
                self._write_metrics(summary, state, completed=False, started=started)
                self._save_checkpoint(out / CHECKPOINT, run_info, model, optimizer, scheduler, state)
                bar.set_postfix(loss=f"{result.train_loss:.3f}", val_r5=f"{recalls['mean_r5']:.3f}")
                logger.info("epoch %s", result.as_dict())
                if self.on_epoch_end is not None:
                    self.on_epoch_end(result)
        finally:
            bar.close()
        if state.best_epoch is None:
            raise RuntimeError("no epoch was trained: raise epochs or max_steps")
        metrics = self._write_metrics(summary, state, completed=True, started=started)
        if not config.keep_checkpoint:
            (out / CHECKPOINT).unlink(missing_ok=True)
        return metrics

    def _train_epoch(
        self,
        model: torch.nn.Module,
        train_set: PairDataset,
        loss_fn: ClipLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        epoch: int,
        batch_size: int,
        state: _State,
        total_steps: int,
        bar: Any,
    ) -> list[float]:
        config = self.config
        # Shuffling and augmentation depend only on (seed, epoch): resuming reproduces them.
        torch.manual_seed(config.seed * 100_003 + epoch)
        shuffle = torch.Generator().manual_seed(config.seed * 7919 + epoch)
        if config.distinct_text_batches:
            batches = distinct_text_batches([pair.text for pair in train_set.pairs], batch_size, shuffle)
        else:
            order = torch.randperm(len(train_set), generator=shuffle).tolist()
            batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(len(order) // batch_size)]
        model.train()
        losses = []
        for batch in batches:
            if state.global_step >= total_steps:
                break
            items = [train_set[i] for i in batch]
            images = torch.stack([image for image, _ in items])
            tokens = torch.stack([token for _, token in items])
            image_features, text_features, logit_scale = _features(model, images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                _unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            state.global_step += 1
            losses.append(float(loss.detach()))
            state.step_losses.append(losses[-1])
            bar.update(1)
        return losses

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def _evaluate(
        self, model: torch.nn.Module, built: BuiltModel, val_set: PairDataset, loss_fn: ClipLoss
    ) -> dict[str, float]:
        """Validation recalls and the contrastive loss over the whole validation set as one batch."""
        was_training = model.training
        model.eval()
        size = self.config.eval_batch_size
        texts = [pair.text for pair in val_set.pairs]
        image_parts = []
        for start in range(0, len(val_set), size):
            batch = torch.stack([val_set[i][0] for i in range(start, min(start + size, len(val_set)))])
            image_parts.append(model.encode_image(batch, normalize=True))
        image_features = torch.cat(image_parts)
        text_parts = []
        for start in range(0, len(val_set), size):
            text_parts.append(model.encode_text(val_set.tokens[start : start + size], normalize=True))
        text_features = torch.cat(text_parts)  # one row per pair (repeats included), for the loss
        column = {text: texts.index(text) for text in distinct_texts(texts)}
        gallery = text_features[list(column.values())]
        recalls = paired_recalls(image_features.numpy(), gallery.numpy(), texts)
        val_loss = float(loss_fn(image_features, text_features, _unwrap(model).logit_scale.exp()))
        model.train(was_training)
        return {**recalls, "val_loss": val_loss}

    # ------------------------------------------------------------------------------------- outputs

    def _write_artifact(
        self, model: torch.nn.Module, built: BuiltModel, summary: dict, state: _State, result: EpochResult
    ) -> None:
        from training.artifacts.clip import save_clip_model
        from training.artifacts.retriever import write_retriever_sidecar

        config = self.config
        portable = portable_model_cfg(built.model_cfg, config.out)
        save_clip_model(config.out, _unwrap(model), portable, preprocess_cfg=built.preprocess_cfg)
        if config.domain == SHARED_DOMAIN:
            # The shared retriever is an evaluation baseline: no retriever.json, so no service loads it.
            return
        write_retriever_sidecar(
            config.out,
            config.domain,
            config.gamma,
            k_max_default=config.k_max_default,
            extra={
                "trained_by": "mmedrag train retriever",
                "model": config.model,
                "epoch": result.epoch,
                "val_recalls": {key: round(value, 6) for key, value in result.recalls.items()},
                "data_sha256": summary["data"]["sha256"],
            },
        )

    def _write_metrics(
        self, summary: dict, state: _State, *, completed: bool, started: float
    ) -> dict[str, Any]:
        best = next((row for row in state.history if row["epoch"] == state.best_epoch), None)
        metrics = {
            **summary,
            "initial_val": {key: round(value, 6) for key, value in state.initial_val.items()},
            "epochs": state.history,
            "best_epoch": state.best_epoch,
            "best": best,
            "first_step_loss": state.step_losses[0] if state.step_losses else None,
            "last_step_loss": state.step_losses[-1] if state.step_losses else None,
            "completed": completed,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads(),
        }
        path = self.config.out / METRICS
        path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        return metrics

    # --------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(
        self,
        path: Path,
        run_info: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: _State,
    ) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            **run_info,
            "epoch": state.epoch,
            "global_step": state.global_step,
            "history": state.history,
            "initial_val": state.initial_val,
            "best_epoch": state.best_epoch,
            "best_key": list(state.best_key) if state.best_key else None,
            "step_losses": state.step_losses,
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        temporary = path.with_name(path.name + ".tmp")
        torch.save(payload, temporary)
        temporary.replace(path)  # never a half-written checkpoint

    def _restore(
        self,
        path: Path,
        run_info: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> _State:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {payload.get('format')!r}")
        changed = [
            key
            for key, value in run_info["config"].items()
            if key not in _RESUMABLE_CHANGES and payload["config"].get(key) != value
        ]
        for key in ("model_cfg", "data_sha256", "total_steps"):
            if payload[key] != run_info[key]:
                changed.append(key)
        if changed:
            raise ValueError(
                f"{path} was written by a run with other settings ({', '.join(changed)}); resume with the "
                "same settings, or start afresh without --resume (the checkpoint is then replaced)"
            )
        _unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        return _State(
            epoch=int(payload["epoch"]),
            global_step=int(payload["global_step"]),
            history=list(payload["history"]),
            initial_val=dict(payload["initial_val"]),
            best_epoch=payload["best_epoch"],
            best_key=tuple(payload["best_key"]) if payload["best_key"] else None,  # type: ignore[arg-type]
            step_losses=list(payload["step_losses"]),
        )


# ------------------------------------------------------------------------------------------ helpers


def _unwrap(model: torch.nn.Module) -> Any:
    return getattr(model, "module", model)


def _features(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised features and the (exponentiated) logit scale, whatever output form the model uses."""
    inner = _unwrap(model)
    image_features = inner.encode_image(images, normalize=True)
    text_features = inner.encode_text(tokens, normalize=True)
    return image_features, text_features, inner.logit_scale.exp()


@torch.no_grad()
def _precise_batchnorm(
    model: torch.nn.Module, train_set: PairDataset, transform: Callable[..., torch.Tensor], batch_size: int
) -> None:
    """Recompute BatchNorm running statistics as plain averages over batches of all training images.

    ResNet towers (open_clip's ModifiedResNet) use BatchNorm; its running statistics would otherwise
    be a moving average of the last few batches, so the served model would depend on which texts
    happened to share the final batches (validation recall swung by 0.1 between epochs at a learning
    rate near zero). Images go through the inference transform, as served.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    model.train()
    encode_image = _unwrap(model).encode_image
    for start in range(0, len(train_set), batch_size):
        images = train_set.images[start : start + batch_size]
        encode_image(torch.stack([transform(image) for image in images]))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to 0.

    Returns the scheduler (stepped once per optimiser step) and its warm-up step count.
    """
    from transformers import get_cosine_schedule_with_warmup

    warmup = warmup_steps(total_steps, warmup_fraction)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps), warmup


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norm gains, rank<2 tensors and the logit scale."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or "logit_scale" in name or name.endswith(".bias") or ".ln" in name
        (no_decay if exempt else decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
