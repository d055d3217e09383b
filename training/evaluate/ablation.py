"""``mmedrag eval ablation``: the paper's ablation and misalignment tables, measured on our stack.

On the test split of a MedSynth folder, per domain and overall, for closed VQA (accuracy, F1, AUROC) and
report generation (BLEU mean of 1..4, ROUGE-L, METEOR), the rows of the paper's ablation (MMed-RAG,
Table 4) plus the not-domain-aware retriever:

========================== ================================== ===============================
row                        model                              retrieval
========================== ================================== ===============================
``base``                   base (``<artifacts>/base``)        none
``base+domain-fixed``      base                               domain retriever, fixed k
``base+adaptive``          base                               domain retriever, adaptive rule
``aligned+adaptive``       aligned (``<artifacts>/generator``) domain retriever, adaptive rule
``base+shared-adaptive``   base                               one shared retriever, adaptive
========================== ================================== ===============================

The rows run in-process through ``training.evaluate.run.InProcessBackend`` (classifier → retriever
service → generator, as served), so each image is classified and retrieved once per variant and every
model is loaded once. The shared-retriever row needs ``<artifacts>/shared-retriever`` (``mmedrag train
retriever --domain all``); without it the row is skipped and the tables say so. Without
``<artifacts>/base`` (tiny artifacts) the base model is the generator folder: the RAG-PT row then equals
the adaptive row, and a note says so.

The misalignment table gives the copy-reference and over-reliance rates of the base and the aligned
model on the VQA test items (``training.sft.evaluate_base``: real / noise image × with / without the top-1
report of the domain retriever, greedy).

One run is one seed. Mean and spread over seeds come from ``bench/ablation.py``, which runs this on one
artifacts folder per seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from services.common.artifacts import GENERATOR_DIR
from services.common.prompts import Task
from training.evaluate.run import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FIXED_K,
    SHARED_RETRIEVER_DIR,
    TASKS,
    TEST_SPLIT,
    DomainSource,
    DomainSourceChoice,
    InProcessBackend,
    ItemResult,
    RetrievalOptions,
    RunSpec,
    TaskChoice,
    Variant,
    available_domains,
    load_test_items,
    meteor_enabled,
    misalignment_rates,
    run_items,
    task_tuple,
)

ABLATION_JSON = "ablation.json"
ABLATION_MARKDOWN = "ablation.md"
ModelRole = Literal["base", "aligned"]


@dataclass(frozen=True)
class AblationRow:
    """One row of the ablation table."""

    key: str
    label: str
    model: ModelRole
    variant: Variant


ROWS: tuple[AblationRow, ...] = (
    AblationRow("base", "base model, no retrieval", "base", "no-retrieval"),
    AblationRow("base+domain-fixed", "+ domain-aware retrieval (fixed k)", "base", "fixed-k"),
    AblationRow("base+adaptive", "+ adaptive selection", "base", "adaptive"),
    AblationRow("aligned+adaptive", "+ RAG-PT (aligned model)", "aligned", "adaptive"),
    AblationRow(
        "base+shared-adaptive", "shared retriever (not domain-aware), adaptive", "base", "shared-retriever"
    ),
)
MODEL_LABELS: dict[ModelRole, str] = {"base": "base", "aligned": "aligned (RAG-PT)"}


@dataclass
class AblationConfig:
    """Everything ``run_ablation`` needs.

    Args:
        data: MedSynth folder (its test split; its retriever_train split is the shared retriever's corpus).
        artifacts: artifacts folder (classifier, retrievers, index, base, generator, shared-retriever).
        out: output folder.
        tasks: ``vqa`` and/or ``report``.
        domains: domains to evaluate (None: every domain of ``data``).
        limit: items per domain and task (None: all).
        base_model / aligned_model: model folders (None: ``<artifacts>/base`` else the generator folder /
            ``<artifacts>/generator``).
        shared_retriever: the shared retriever's folder (None: ``<artifacts>/shared-retriever``).
        options: fixed k, k_max and gamma of the retrieval rows.
        meteor: compute METEOR (None: when Java is available).
        misalignment: also the misalignment table (VQA).
    """

    data: Path
    artifacts: Path
    out: Path
    tasks: tuple[Task, ...] = TASKS
    domains: tuple[str, ...] | None = None
    split: str = TEST_SPLIT
    limit: int | None = None
    base_model: Path | None = None
    aligned_model: Path | None = None
    shared_retriever: Path | None = None
    options: RetrievalOptions = field(default_factory=RetrievalOptions)
    domain_source: DomainSource = "classifier"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: dict[str, int] | None = None
    meteor: bool | None = None
    misalignment: bool = True
    threads: int | None = None


@dataclass
class AblationOutcome:
    records: list[ItemResult]
    payload: dict[str, Any]
    paths: dict[str, Path]


def model_folders(config: AblationConfig) -> tuple[Path, Path, list[str]]:
    """The base and aligned model folders, and notes on fallbacks."""
    from training.pairs.cli import default_base_model

    artifacts = Path(config.artifacts)
    notes = []
    base = Path(config.base_model) if config.base_model else default_base_model(artifacts)
    aligned = Path(config.aligned_model) if config.aligned_model else artifacts / GENERATOR_DIR
    for folder in (base, aligned):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: no model folder (config.json missing); build the artifacts with `mmedrag "
                "bootstrap` (or `mmedrag artifacts tiny` for a smoke run)"
            )
    if base.resolve() == aligned.resolve():
        notes.append(
            f"base and aligned model are the same folder ({base}): there is no separate base model (no "
            f"{artifacts / 'base'}), so the RAG-PT row repeats the adaptive row"
        )
    return base, aligned, notes


def run_ablation(config: AblationConfig, *, progress: bool = False) -> AblationOutcome:
    """Every row on every task and domain, the misalignment table, and the outputs in ``config.out``."""
    from training.evaluate import report

    started = time.perf_counter()
    base, aligned, notes = model_folders(config)
    folders: dict[ModelRole, Path] = {"base": base, "aligned": aligned}
    shared = Path(config.shared_retriever or Path(config.artifacts) / SHARED_RETRIEVER_DIR)
    skipped: dict[str, str] = {}
    if not shared.is_dir():
        skipped["base+shared-adaptive"] = (
            f"no shared retriever at {shared} (train one with `mmedrag train retriever --domain all`)"
        )
    rows = [row for row in ROWS if row.key not in skipped]
    runs = tuple(RunSpec(row.key, row.variant, str(folders[row.model])) for row in rows)
    items = {
        task: load_test_items(config.data, task, config.domains, split=config.split, limit=config.limit)
        for task in config.tasks
    }
    domains = config.domains or available_domains(config.data, config.tasks, config.split)
    with InProcessBackend(
        config.artifacts,
        config.data,
        options=config.options,
        shared_retriever=shared,
        domain_source=config.domain_source,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        threads=config.threads,
    ) as backend:
        records = run_items(backend, items, runs, progress=progress)
        misalignment: dict[str, Any] | None = None
        if config.misalignment and "vqa" in config.tasks:
            measured: dict[Path, dict[str, Any]] = {}
            misalignment = {}
            for role, folder in folders.items():
                key = folder.resolve()
                if key not in measured:  # one folder for both roles (no base model): measured once
                    measured[key] = misalignment_rates(
                        backend,
                        str(folder),
                        config.data,
                        domains=domains,
                        split=config.split,
                        limit=config.limit,
                        progress=progress,
                    )
                misalignment[MODEL_LABELS[role]] = measured[key]
    rows_json = [record.model_dump(mode="json") for record in records]
    report.write_results_file(config.out, rows_json)
    with_meteor = meteor_enabled(config.meteor)
    summaries = report.summarise_runs(rows_json, meteor=with_meteor, yes_probability=True)
    if "report" in config.tasks and not with_meteor:
        notes.append("METEOR not computed (no Java runtime, or --no-meteor): report averages omit it")
    payload = {
        "kind": "ablation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": str(config.data),
        "artifacts": str(config.artifacts),
        "split": config.split,
        "limit": config.limit,
        "tasks": list(config.tasks),
        "domains": list(domains),
        "models": {"base": str(base), "aligned": str(aligned)},
        "settings": {
            "fixed_k": config.options.fixed_k,
            "k_max": config.options.k_max,
            "gamma": config.options.gamma,
            "domain_source": config.domain_source,
            "max_new_tokens": config.max_new_tokens,
            "shared_retriever": str(shared),
        },
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "model": row.model,
                "variant": row.variant,
                "skipped": skipped.get(row.key),
            }
            for row in ROWS
        ],
        "runs": summaries,
        "misalignment": misalignment,
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    paths = write_ablation(config.out, rows_json, payload)
    return AblationOutcome(records, payload, paths)


# --------------------------------------------------------------------------------------------------
# Outputs


def summary_of(payload: dict[str, Any], task: str, key: str) -> dict[str, Any] | None:
    """The run summary of a row on a task (None when skipped)."""
    return next((s for s in payload["runs"] if s["task"] == task and s["run"] == key), None)


def render_ablation_markdown(payload: dict[str, Any]) -> str:
    """The ablation tables (headline per domain and overall, then every metric) and the misalignment table."""
    from training.evaluate.report import (
        MISALIGNMENT_NOTE,
        OVERALL,
        error_lines,
        md_table,
        misalignment_table,
        percent,
        run_table,
    )

    domains = [*payload["domains"], OVERALL]
    limit = payload["limit"]
    lines = [
        "# MMed-RAG ablation",
        "",
        f"- data: `{payload['data']}` (split {payload['split']}, "
        + ("all items" if limit is None else f"{limit} items per domain")
        + ")",
        f"- artifacts: `{payload['artifacts']}`; base `{payload['models']['base']}`, aligned "
        f"`{payload['models']['aligned']}`",
        f"- fixed k = {payload['settings']['fixed_k']}; adaptive k_max = "
        f"{payload['settings']['k_max'] or 'the retriever default'}, gamma = "
        f"{payload['settings']['gamma'] if payload['settings']['gamma'] is not None else 'calibrated'}",
        "",
    ]
    for task in payload["tasks"]:
        what = "accuracy, F1, AUROC" if task == "vqa" else "BLEU, ROUGE-L, METEOR"
        title = "Closed VQA" if task == "vqa" else "Report generation"
        table_rows = []
        for row in payload["rows"]:
            summary = summary_of(payload, task, row["key"])
            if summary is None:
                table_rows.append([row["label"], *(["skipped"] + ["–"] * (len(domains) - 1))])
                continue
            table_rows.append([row["label"], *(percent(summary["headline"].get(d)) for d in domains)])
        summaries = [s for s in payload["runs"] if s["task"] == task]
        lines += [
            f"## {title}: mean of {what} (%)",
            "",
            md_table(["row", *domains], table_rows),
            "Every metric:",
            "",
            run_table(task, summaries, label="row"),
        ]
    if payload.get("misalignment"):
        lines += [
            "## Misalignment (VQA)",
            "",
            misalignment_table(payload["misalignment"]),
            MISALIGNMENT_NOTE,
            "",
        ]
    notes = [f"- {row['key']}: skipped ({row['skipped']})" for row in payload["rows"] if row["skipped"]]
    notes += error_lines(payload["runs"])
    notes += [f"- {note}" for note in payload.get("notes", [])]
    notes.append(
        "- metrics in %; `*` = mean of the available metrics (AUROC undefined with one label class, or "
        "METEOR not computed); one seed: see bench/ablation.py for mean ± std over seeds"
    )
    lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def write_ablation(out: Path, rows: list[dict[str, Any]], payload: dict[str, Any]) -> dict[str, Path]:
    """``ablation.json``, ``ablation.md`` and ``plots/*.png`` next to ``results.jsonl`` in ``out``."""
    from training.evaluate.report import write_summary_outputs

    paths = write_summary_outputs(
        out,
        rows,
        payload,
        json_name=ABLATION_JSON,
        markdown_name=ABLATION_MARKDOWN,
        markdown=render_ablation_markdown(payload),
    )
    paths["ablation"] = paths.pop("json")
    return paths


# --------------------------------------------------------------------------------------------------
# Command line


def ablation_cli(
    data: Annotated[Path, typer.Option("--data", help="MedSynth folder (its test split is evaluated).")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for ablation.json, ablation.md, results, plots.")
    ],
    artifacts: Annotated[
        Path, typer.Option("--artifacts", envvar="MMEDRAG_ARTIFACTS", help="Artifacts folder.")
    ] = Path("artifacts"),
    task: Annotated[TaskChoice, typer.Option("--task", help="vqa, report, or both.")] = TaskChoice.both,
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Domain (repeatable); default: all in --data.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Items per domain and task.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data to evaluate.")] = TEST_SPLIT,
    base_model: Annotated[
        Path | None,
        typer.Option("--base-model", help="Base model folder; default <artifacts>/base, else the generator."),
    ] = None,
    aligned_model: Annotated[
        Path | None,
        typer.Option("--aligned-model", help="RAG-PT model folder; default <artifacts>/generator."),
    ] = None,
    shared_retriever: Annotated[
        Path | None,
        typer.Option(
            "--shared-retriever",
            help="Shared retriever folder; default <artifacts>/shared-retriever (row skipped if absent).",
        ),
    ] = None,
    fixed_k: Annotated[
        int, typer.Option("--fixed-k", min=1, help="Reports kept by the fixed-k row.")
    ] = DEFAULT_FIXED_K,
    k_max: Annotated[
        int | None,
        typer.Option("--k-max", min=1, help="Candidates of the adaptive rule; default: the retriever's."),
    ] = None,
    gamma: Annotated[
        float | None,
        typer.Option("--gamma", min=0.0, help="Adaptive threshold; default: calibrated per domain."),
    ] = None,
    domain_source: Annotated[
        DomainSourceChoice,
        typer.Option("--domain-source", help="classifier (as served) or truth (each item's own domain)."),
    ] = DomainSourceChoice.classifier,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Generations per batch.")
    ] = DEFAULT_BATCH_SIZE,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Longest answer; default 32 (VQA) and 256 (report)."),
    ] = None,
    meteor: Annotated[
        bool | None,
        typer.Option("--meteor/--no-meteor", help="Compute METEOR (needs Java); default: if Java is found."),
    ] = None,
    misalignment: Annotated[
        bool, typer.Option("--misalignment/--no-misalignment", help="Also the misalignment table (VQA).")
    ] = True,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch threads.")] = None,
) -> None:
    """The paper's ablation (base; + domain retrieval, fixed k; + adaptive selection; + RAG-PT; shared
    retriever) per domain for VQA and reports, and the misalignment table, in-process on the artifacts."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    tasks = task_tuple(task)
    config = AblationConfig(
        data=data,
        artifacts=artifacts,
        out=out,
        tasks=tasks,
        domains=tuple(domains) if domains else None,
        split=split,
        limit=limit,
        base_model=base_model,
        aligned_model=aligned_model,
        shared_retriever=shared_retriever,
        options=RetrievalOptions(fixed_k=fixed_k, k_max=k_max, gamma=gamma),
        domain_source=domain_source.value,  # type: ignore[arg-type]
        batch_size=batch_size,
        max_new_tokens={t: max_new_tokens for t in tasks} if max_new_tokens else None,
        meteor=meteor,
        misalignment=misalignment,
        threads=threads,
    )
    outcome = run_ablation(config, progress=True)
    typer.echo(render_ablation_markdown(outcome.payload))
    typer.echo(f"wrote {outcome.paths['ablation']}, {outcome.paths['markdown']} and plots in {out / 'plots'}")
