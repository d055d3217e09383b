"""``mmedrag dpo --stage 1|2``: the command-line face of one RAG-PT stage.

Option help comes from ``MMedRAGDPOConfig`` (one documented source). ``--config FILE`` (YAML or JSON) may set
any TRL / ``TrainingArguments`` field; options given on the command line win over the file. The integrator
mounts ``dpo_cli`` as ``mmedrag dpo``. Heavy imports happen when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from training.dpo.defaults import HELP


def field_help(name: str) -> str:
    return HELP[name]


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: pairs, held-out reward margin before/after, where the adapter went."""
    before, after = summary["held_out"]["before"], summary["held_out"]["after"]

    def cells(values: dict[str, float]) -> str:
        if not values:
            return "n/a"
        return "  ".join(
            f"{key} {values[key]:+.4f}" for key in ("loss", "margin", "accuracy") if key in values
        )

    train_sets = summary["pairs"]["train"]["set"]
    held = sum(summary["pairs"]["held_out"]["set"].values())
    lines = [
        f"stage {summary['stage']}: {sum(train_sets.values())} training pairs "
        f"({', '.join(f'{k} {v}' for k, v in sorted(train_sets.items()))}), {held} held out",
        f"held-out before  {cells(before)}",
        f"held-out after   {cells(after)}",
        f"{summary['train']['steps']} steps in {summary['wall_seconds']} s; adapter in {summary['adapter']}",
    ]
    return "\n".join(lines)


def dpo_cli(
    stage: Annotated[int, typer.Option("--stage", help=field_help("stage"))],
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="YAML or JSON file of settings (any MMedRAGDPOConfig / TRL field)."),
    ] = None,
    artifacts: Annotated[Path | None, typer.Option("--artifacts", help=field_help("artifacts"))] = None,
    model: Annotated[Path | None, typer.Option("--model", help=field_help("model_dir"))] = None,
    pairs: Annotated[Path | None, typer.Option("--pairs", help=field_help("pairs_dir"))] = None,
    pair_file: Annotated[
        list[Path] | None, typer.Option("--pair-file", help=field_help("pair_files") + " Repeatable.")
    ] = None,
    eval_pair_file: Annotated[
        list[Path] | None,
        typer.Option("--eval-pair-file", help=field_help("eval_pair_files") + " Repeatable."),
    ] = None,
    eval_fraction: Annotated[
        float | None, typer.Option("--eval-fraction", help=field_help("eval_fraction"))
    ] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root", help=field_help("image_root"))] = None,
    out: Annotated[Path | None, typer.Option("--out", help=field_help("adapter_dir"))] = None,
    stage1_adapter: Annotated[
        Path | None, typer.Option("--stage1-adapter", help=field_help("stage1_adapter"))
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--checkpoints", help=field_help("output_dir")),
    ] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help=field_help("learning_rate"))] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help=field_help("num_train_epochs"))] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help=field_help("max_steps"))] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=field_help("per_device_train_batch_size"))
    ] = None,
    beta: Annotated[float | None, typer.Option("--beta", help=field_help("beta"))] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help=field_help("lora_r"))] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help=field_help("lora_alpha"))] = None,
    lora_dropout: Annotated[
        float | None, typer.Option("--lora-dropout", help=field_help("lora_dropout"))
    ] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help=field_help("max_length"))] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help=field_help("bf16"))] = None,
    seed: Annotated[int | None, typer.Option("--seed", help=field_help("seed"))] = None,
    logging_steps: Annotated[
        int | None, typer.Option("--logging-steps", help=field_help("logging_steps"))
    ] = None,
    save_steps: Annotated[int | None, typer.Option("--save-steps", help=field_help("save_steps"))] = None,
    resume: Annotated[bool, typer.Option("--resume", help=field_help("resume"))] = False,
    num_threads: Annotated[int | None, typer.Option("--num-threads", help=field_help("num_threads"))] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """RAG-based preference tuning: DPO with LoRA on the language model (stage 1, then stage 2)."""
    from training.dpo.config import load_config
    from training.dpo.trainer import run_dpo

    def text(value: Path | None) -> str | None:
        return None if value is None else str(value)

    config = load_config(
        config_file,
        stage=stage,
        artifacts=text(artifacts),
        model_dir=text(model),
        pairs_dir=text(pairs),
        pair_files=[str(p) for p in pair_file] if pair_file else None,
        eval_pair_files=[str(p) for p in eval_pair_file] if eval_pair_file else None,
        eval_fraction=eval_fraction,
        image_root=text(image_root),
        adapter_dir=text(out),
        stage1_adapter=text(stage1_adapter),
        output_dir=text(output_dir),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        beta=beta,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        bf16=bf16,
        seed=seed,
        logging_steps=logging_steps,
        save_steps=save_steps,
        resume=resume or None,
        num_threads=num_threads,
        disable_tqdm=None if progress else True,
    )
    summary = run_dpo(config)
    typer.echo(format_summary(summary))
