"""The paper's ablation and misalignment tables over several seeds: mean ± standard deviation.

    python bench/ablation.py ARTIFACTS [ARTIFACTS ...] [--limit N] [--task both] [--out bench/results]

Each ARTIFACTS folder is one seed's complete build (``mmedrag bootstrap --seed s --out DIR``; bootstrapping
three seeds here would take hours, so the folders are built beforehand and passed in). For each folder the
script runs ``mmedrag eval ablation`` in-process (``training.evaluate.ablation.run_ablation``) on its
MedSynth test split (``--data DIR``, default ``<ARTIFACTS>/medsynth``), keeping every run's own outputs
under ``--work`` (default ``bench/results/ablation-runs/<i>-<folder name>``); ``--reuse`` reads a run's
``ablation.json`` instead of running it again. Then, per task, row and domain (and overall), it reports
the mean and the sample standard deviation (n - 1) across seeds of the three metrics and of their mean
(VQA: accuracy, F1, AUROC; reports: BLEU, ROUGE-L, METEOR), and of the copy-reference and over-reliance
rates of the base and aligned models. Values are percentages. A row skipped in some folder (no shared
retriever) averages over the folders that have it (``seeds`` says how many).

Results: ``<out>/ablation.json`` and ``<out>/ablation.md`` (``bench/_common.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # a sibling module (bench/ is not a package)

from training.data.records import DOMAINS
from training.evaluate.ablation import ABLATION_JSON, ROWS, AblationConfig, run_ablation
from training.evaluate.report import headline, task_columns
from training.evaluate.run import RetrievalOptions, task_tuple

OVERALL = "overall"
SHORT = {"accuracy": "acc", "f1": "f1", "auroc_hard": "auroc", "bleu_mean": "bleu", "rouge_l": "rouge_l"}


TITLES = {"vqa": "Closed VQA", "report": "Report generation"}


def table_columns(task: str) -> list[str]:
    """Columns of a task's table: the row, the domain, seeds, then each metric's mean and sd."""
    names = ["avg"] + [SHORT.get(key, title.lower()) for key, title in task_columns(task)]
    return ["row", "domain", "seeds", *(column for name in names for column in (name, f"{name}_sd"))]


def say(text: str = "") -> None:
    print(text, flush=True)


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (None with fewer than two values) of the defined values, in %."""
    present = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None, 0
    mean = sum(present) / len(present)
    if len(present) < 2:
        return mean, None, len(present)
    variance = sum((v - mean) ** 2 for v in present) / (len(present) - 1)
    return mean, math.sqrt(variance), len(present)


def summary_of(payload: Mapping[str, Any], task: str, key: str) -> Mapping[str, Any] | None:
    return next((s for s in payload["runs"] if s["task"] == task and s["run"] == key), None)


def aggregate(payloads: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (task, ablation row, domain): mean and sd over the payloads of each metric."""
    rows = []
    for task in tasks:
        for row in ROWS:
            summaries = [s for s in (summary_of(p, task, row.key) for p in payloads) if s is not None]
            scopes = [d for d in DOMAINS if any(d in s["metrics"]["by_domain"] for s in summaries)]
            for scope in [*scopes, OVERALL]:
                per_seed = [
                    s["metrics"]["overall"] if scope == OVERALL else s["metrics"]["by_domain"].get(scope)
                    for s in summaries
                ]
                per_seed = [metrics for metrics in per_seed if metrics is not None]
                if not per_seed:  # the row was skipped in every folder
                    continue
                out: dict[str, Any] = {"task": task, "row": row.key, "domain": scope, "seeds": len(per_seed)}
                mean, sd, _ = mean_sd([headline(task, metrics)[0] for metrics in per_seed])
                out.update({"avg": mean, "avg_sd": sd})
                for key, title in task_columns(task):
                    name = SHORT.get(key, title.lower())
                    mean, sd, _ = mean_sd([metrics.get(key) for metrics in per_seed])
                    out.update({name: mean, f"{name}_sd": sd})
                rows.append(out)
    return rows


def aggregate_misalignment(payloads: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy-reference and over-reliance rates, mean and sd over seeds, per model and domain."""
    measured = [p["misalignment"] for p in payloads if p.get("misalignment")]
    rows = []
    for label in dict.fromkeys(label for m in measured for label in m):
        results = [m[label] for m in measured if label in m]
        for scope in [*DOMAINS, OVERALL]:
            rates = [r["all"] if scope == OVERALL else r["per_domain"].get(scope) for r in results]
            rates = [r for r in rates if r is not None]
            if not rates:
                continue
            copy_mean, copy_sd, n = mean_sd([r["copy_reference"] for r in rates])
            over_mean, over_sd, _ = mean_sd([r["over_reliance"] for r in rates])
            rows.append(
                {
                    "model": label,
                    "domain": scope,
                    "seeds": n,
                    "copy_reference": copy_mean,
                    "copy_reference_sd": copy_sd,
                    "over_reliance": over_mean,
                    "over_reliance_sd": over_sd,
                }
            )
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path, help="one artifacts folder per seed")
    parser.add_argument(
        "--data", type=Path, default=None, help="MedSynth folder (default <ARTIFACTS>/medsynth)"
    )
    parser.add_argument("--task", choices=("vqa", "report", "both"), default="both")
    parser.add_argument("--limit", type=int, default=None, help="items per domain and task (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (VQA), 256 (report)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (no Java needed)")
    parser.add_argument(
        "--work", type=Path, default=None, help="per-seed outputs (default <out>/ablation-runs)"
    )
    parser.add_argument("--reuse", action="store_true", help="read existing per-seed ablation.json files")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from training.evaluate.run import TaskChoice

    tasks = task_tuple(TaskChoice(args.task))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    work = args.work or args.out / "ablation-runs"
    payloads = []
    for index, artifacts in enumerate(args.artifacts):
        run_dir = work / f"{index}-{artifacts.resolve().name}"
        existing = run_dir / ABLATION_JSON
        if args.reuse and existing.is_file():
            payloads.append(json.loads(existing.read_text(encoding="utf-8")))
            say(f"reused {existing}")
            continue
        config = AblationConfig(
            data=args.data or artifacts / "medsynth",
            artifacts=artifacts,
            out=run_dir,
            tasks=tasks,
            limit=args.limit,
            options=RetrievalOptions(),
            batch_size=args.batch_size,
            max_new_tokens={t: args.max_new_tokens for t in tasks} if args.max_new_tokens else None,
            meteor=False if args.no_meteor else None,
            threads=args.threads,
        )
        payloads.append(run_ablation(config, progress=True).payload)
        say(f"seed folder {artifacts}: {run_dir / ABLATION_JSON}")
    rows = aggregate(payloads, tasks)
    misalignment = aggregate_misalignment(payloads)
    tables = {
        task: markdown_table([r for r in rows if r["task"] == task], table_columns(task)) for task in tasks
    }
    first, *others = tasks
    notes = [
        "Mean ± sample standard deviation (n - 1) over the artifacts folders (one per seed), in %; "
        "avg = mean of the task's three metrics (VQA: acc, F1, AUROC; report: BLEU, ROUGE-L, METEOR; "
        "of the defined ones when AUROC has one label class or METEOR was skipped).",
    ]
    for task in others:
        notes += ["", f"## {TITLES[task]}", "", tables[task]]
    notes += [
        "",
        "## Misalignment (VQA)",
        "",
        markdown_table(misalignment) if misalignment else "(not measured)",
        "",
    ]
    for payload in payloads:
        notes += [f"- {payload['artifacts']}: {note}" for note in payload.get("notes", [])]
        notes += [
            f"- {payload['artifacts']}: {r['key']} skipped ({r['skipped']})"
            for r in payload["rows"]
            if r["skipped"]
        ]
    meta = {
        "seeds": len(payloads),
        "artifacts": [str(p["artifacts"]) for p in payloads],
        "limit": args.limit,
        "tasks": list(tasks),
        "table": TITLES[first],
    }
    first_rows = [r for r in rows if r["task"] == first]
    json_path, md_path = write_results(
        "ablation", first_rows, args.out, meta=meta, notes=notes, columns=table_columns(first)
    )
    document = json.loads(json_path.read_text(encoding="utf-8"))
    document["rows"] = rows  # every task's rows (the markdown shows the first task's as its main table)
    document["misalignment"] = misalignment
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    for task in tasks:
        say(f"{TITLES[task]}\n{tables[task]}\n")
    say(markdown_table(misalignment) if misalignment else "misalignment not measured")
    say(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
