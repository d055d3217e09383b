"""``mmedrag pairs``: build the RAG-PT preference sets from the base model's four runs."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from services.common.artifacts import GENERATOR_DIR
from services.common.noise import DEFAULT_NOISE_SEED, DEFAULT_NOISE_STEP, DIFFUSION_STEPS
from training.dpo.defaults import BASE_DIR
from training.pairs.noise import NoiseKind
from training.pairs.rules import DEFAULT_CM_RATIO
from training.pairs.runner import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, DEFAULT_MAX_NEW_TOKENS, TASKS


def default_base_model(artifacts: Path) -> Path:
    """The model pairs are built from must be the one DPO trains: ``<artifacts>/base`` (written by SFT),
    falling back to the served generator folder when no base model exists (tiny artifacts)."""
    base = artifacts / BASE_DIR
    return base if base.is_dir() else artifacts / GENERATOR_DIR


class TaskChoice(StrEnum):
    vqa = "vqa"
    report = "report"
    both = "both"


class BackendChoice(StrEnum):
    inprocess = "inprocess"
    http = "http"


def pairs_cli(
    data: Annotated[Path, typer.Option("--data", help="MedSynth folder (its preference split is run).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the pair files, noise images and summary.")],
    artifacts: Annotated[
        Path,
        typer.Option(
            "--artifacts",
            envvar="MMEDRAG_ARTIFACTS",
            help="Artifacts folder (generator/, retrievers/<domain>).",
        ),
    ] = Path("artifacts"),
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Base model folder (the one DPO will train); default <artifacts>/base, or "
            "<artifacts>/generator when there is no base folder.",
        ),
    ] = None,
    task: Annotated[TaskChoice, typer.Option("--task", help="Which task's items to run.")] = TaskChoice.both,
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Domain to run (repeatable); default: all in --data.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Which split of --data to run.")] = "preference",
    noise: Annotated[
        NoiseKind,
        typer.Option("--noise", help="Noise image: pure Gaussian (release code) or diffusion (paper)."),
    ] = NoiseKind.diffusion,
    noise_step: Annotated[
        int,
        typer.Option(
            "--noise-step",
            min=0,
            max=DIFFUSION_STEPS,
            help=f"Diffusion step t of the noise (linear β, {DIFFUSION_STEPS} steps).",
        ),
    ] = DEFAULT_NOISE_STEP,
    noise_seed: Annotated[
        int, typer.Option("--noise-seed", help="Seed of the noise images.")
    ] = DEFAULT_NOISE_SEED,
    cm_ratio: Annotated[
        float, typer.Option("--cm-ratio", min=0.0, help="Keep D_cm at ratio × (|D_oa1| + |D_oa2|) pairs.")
    ] = DEFAULT_CM_RATIO,
    no_cm_balancing: Annotated[
        bool, typer.Option("--no-cm-balancing", help="Keep D_cm whole (ignore --cm-ratio).")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Generations per batch (in-process).")
    ] = DEFAULT_BATCH_SIZE,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens.")
    ] = DEFAULT_MAX_NEW_TOKENS,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Items per domain and task (smoke runs).")
    ] = None,
    backend: Annotated[
        BackendChoice,
        typer.Option(
            "--backend", help="inprocess: transformers here; http: --generator-url (+ --retriever-url)."
        ),
    ] = BackendChoice.inprocess,
    generator_url: Annotated[
        str | None,
        typer.Option(
            "--generator-url", help="OpenAI-compatible server (our generator or vLLM), http backend."
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Model name on that server; default: ask it.")
    ] = None,
    retriever_url: Annotated[
        str | None,
        typer.Option("--retriever-url", help="Retriever service; default: the retrievers in --artifacts."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="HTTP requests in flight at once.")
    ] = DEFAULT_CONCURRENCY,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads (default: torch's).")
    ] = None,
) -> None:
    """Run the base model four ways (real/noise image x with/without the top-1 report) and build
    stage-1, D_cm, D_oa1 and D_oa2 preference pairs."""
    from training.pairs.build import PairsConfig, build_pairs, format_summary
    from training.pairs.runner import HttpGenerator, HttpRetriever, InProcessGenerator, InProcessRetriever

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if backend is BackendChoice.http and not generator_url:
        raise typer.BadParameter("--backend http needs --generator-url", param_hint="--generator-url")
    if generator_url and backend is BackendChoice.inprocess:
        raise typer.BadParameter("--generator-url is for --backend http", param_hint="--generator-url")

    config = PairsConfig(
        data=data,
        out=out,
        tasks=TASKS if task is TaskChoice.both else (task.value,),  # type: ignore[arg-type]
        domains=tuple(domains) if domains else None,
        split=split,
        noise=noise,
        noise_step=noise_step,
        noise_seed=noise_seed,
        cm_ratio=None if no_cm_balancing else cm_ratio,
        limit=limit,
    )
    if backend is BackendChoice.http:
        assert generator_url is not None
        generator = HttpGenerator(
            generator_url, model=served_model_name, max_new_tokens=max_new_tokens, concurrency=concurrency
        )
    else:
        generator = InProcessGenerator(
            model or default_base_model(artifacts), batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    retriever = (
        HttpRetriever(retriever_url, concurrency=concurrency)
        if retriever_url
        else InProcessRetriever(artifacts, data)
    )
    result = build_pairs(config, generator, retriever, progress=True)
    typer.echo(format_summary(result.summary))
    typer.echo(f"wrote {result.out}")
