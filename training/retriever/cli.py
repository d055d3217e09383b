"""``mmedrag train retriever``: the command-line face of ``RetrieverTrainer``.

Option help and defaults come from ``RetrieverTrainingConfig`` (one documented source); the integrator
mounts ``retriever_cli`` as ``mmedrag train retriever``. Heavy imports happen when the command runs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from services.common.artifacts import RETRIEVERS_DIR
from training.retriever.config import SHARED_DOMAIN, RetrieverTrainingConfig

_FIELDS = {item.name: item for item in dataclasses.fields(RetrieverTrainingConfig)}


def _help(name: str) -> str:
    return _FIELDS[name].metadata["help"]


def _default(name: str) -> Any:
    return _FIELDS[name].default


def default_out(domain: str) -> Path:
    """``<MMEDRAG_ARTIFACTS or ./artifacts>/retrievers/<domain>``: where the services look for it (the
    shared ablation retriever goes to ``<artifacts>/shared-retriever``, where no service looks)."""
    root = Path(os.environ.get("MMEDRAG_ARTIFACTS") or "artifacts")
    return root / "shared-retriever" if domain == SHARED_DOMAIN else root / RETRIEVERS_DIR / domain


def format_summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: the kept epoch's validation recalls and the run's shape."""
    best = metrics["best"] or {}
    initial = metrics.get("initial_val") or {}

    def row(name: str, values: dict[str, Any]) -> str:
        cells = "  ".join(
            f"{values.get(f'{d}_r{k}', float('nan')):>6.3f}" for d in ("i2t", "t2i") for k in (1, 5, 10)
        )
        return f"{name:<18}{cells}"

    header = f"{'validation':<18}" + "  ".join(f"{f'{d}@{k}':>6}" for d in ("i2t", "t2i") for k in (1, 5, 10))
    lines = [header]
    if initial:
        lines.append(row("untrained", initial))
    lines.append(row(f"epoch {metrics['best_epoch']} (kept)", best))
    schedule = metrics["schedule"]
    lines.append(
        f"{metrics['data']['train_pairs']} pairs, {schedule['total_steps']} steps "
        f"({schedule['warmup_steps']} warm-up), {metrics['wall_seconds']} s"
    )
    return "\n".join(lines)


def retriever_cli(
    domain: Annotated[str, typer.Option("--domain", help=_help("domain"))],
    data: Annotated[Path | None, typer.Option("--data", help=_help("data_dir"))] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help=_help("out") + " Default: <MMEDRAG_ARTIFACTS or artifacts>/retrievers/<domain>."
        ),
    ] = None,
    train_file: Annotated[Path | None, typer.Option("--train-file", help=_help("train_file"))] = None,
    val_file: Annotated[Path | None, typer.Option("--val-file", help=_help("val_file"))] = None,
    data_format: Annotated[str | None, typer.Option("--format", help=_help("data_format"))] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root", help=_help("image_root"))] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help=_help("dataset"))] = None,
    model: Annotated[str, typer.Option("--model", help=_help("model"))] = _default("model"),
    text_model: Annotated[str | None, typer.Option("--text-model", help=_help("text_model"))] = None,
    text_pretrained: Annotated[
        bool, typer.Option("--text-pretrained/--no-text-pretrained", help=_help("text_pretrained"))
    ] = _default("text_pretrained"),
    image_size: Annotated[int | None, typer.Option("--image-size", help=_help("image_size"))] = None,
    epochs: Annotated[int, typer.Option("--epochs", help=_help("epochs"))] = _default("epochs"),
    batch_size: Annotated[int, typer.Option("--batch-size", help=_help("batch_size"))] = _default(
        "batch_size"
    ),
    lr: Annotated[float, typer.Option("--lr", help=_help("lr"))] = _default("lr"),
    weight_decay: Annotated[float, typer.Option("--weight-decay", help=_help("weight_decay"))] = _default(
        "weight_decay"
    ),
    warmup_fraction: Annotated[
        float, typer.Option("--warmup-fraction", help=_help("warmup_fraction"))
    ] = _default("warmup_fraction"),
    max_steps: Annotated[int | None, typer.Option("--max-steps", help=_help("max_steps"))] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help=_help("augment"))] = _default(
        "augment"
    ),
    distinct_text_batches: Annotated[
        bool,
        typer.Option(
            "--distinct-text-batches/--no-distinct-text-batches", help=_help("distinct_text_batches")
        ),
    ] = _default("distinct_text_batches"),
    select_metric: Annotated[str, typer.Option("--select-metric", help=_help("select_metric"))] = _default(
        "select_metric"
    ),
    seed: Annotated[int, typer.Option("--seed", help=_help("seed"))] = _default("seed"),
    resume: Annotated[bool, typer.Option("--resume", help=_help("resume"))] = False,
    keep_checkpoint: Annotated[
        bool, typer.Option("--keep-checkpoint", help=_help("keep_checkpoint"))
    ] = False,
    num_threads: Annotated[int | None, typer.Option("--num-threads", help=_help("num_threads"))] = _default(
        "num_threads"
    ),
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help=_help("progress"))] = True,
) -> None:
    """Fine-tune a domain's CLIP-style retriever (open_clip, symmetric InfoNCE) on its image-report pairs."""
    from training.retriever.trainer import METRICS, RetrieverTrainer

    config = RetrieverTrainingConfig(
        domain=domain,
        out=out if out is not None else default_out(domain),
        data_dir=data,
        train_file=train_file,
        val_file=val_file,
        data_format=data_format,
        image_root=image_root,
        dataset=dataset,
        model=model,
        text_model=text_model,
        text_pretrained=text_pretrained,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        max_steps=max_steps,
        augment=augment,
        distinct_text_batches=distinct_text_batches,
        select_metric=select_metric,  # type: ignore[arg-type]  # checked in __post_init__
        seed=seed,
        resume=resume,
        keep_checkpoint=keep_checkpoint,
        num_threads=num_threads,
        progress=progress,
    )
    metrics = RetrieverTrainer(config).train()
    typer.echo(format_summary(metrics))
    typer.echo(f"wrote {config.out} (metrics: {config.out / METRICS}); next: mmedrag index --domain {domain}")
