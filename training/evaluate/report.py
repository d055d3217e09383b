"""What an evaluation writes: the metrics JSON, a Markdown report and PNG plots, from per-item results.

Everything here works on the per-item records as plain dicts (the lines of ``results.jsonl``,
``training.evaluate.run.ItemResult.model_dump(mode="json")``), so the metrics can always be recomputed
from the file alone.

**Scoring** (``summarise_run``), with ``training.evaluate.metrics``:

- VQA: accuracy, F1 ("yes" positive), AUROC from the hard answers, and a real ROC AUC from P(yes) when
  the backend gives one (in-process). A failed item (``error`` set) is unparsed: scored as the wrong
  answer.
- Reports: BLEU-1..4 (corpus) and their mean, ROUGE-L, METEOR (when enabled; it needs Java). A failed item
  counts as an empty report.
- ``headline``: the number the paper's ablation tables show, the mean of the three metrics of the task
  (``VQAMetrics.average`` / ``ReportMetrics.average``); when one is undefined (AUROC with one label class,
  METEOR not computed) the mean of the available ones, flagged with ``*`` in the tables.

Besides the metrics each run gets the distribution of ``k`` (reports kept), latency percentiles of the
items' ``total`` time (over HTTP the client's wall time per request), the errors by (HTTP status, code)
and, when the classifier routed the images, its routing accuracy against the true domains.

Plots (matplotlib ``Figure`` objects on the Agg canvas: no display, no global pyplot state):
``runs_<task>.png`` (each run's metrics: the ablation bars), ``domains_<task>.png`` (headline per domain
and run), ``k_distribution.png``, ``latency.png`` and, when measured, ``misalignment.png``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data.records import DOMAINS
from training.evaluate.extras import import_eval_module

RESULTS_FILE = "results.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
OVERALL = "overall"
VQA_COLUMNS = (("accuracy", "acc"), ("f1", "F1"), ("auroc_hard", "AUROC"))
REPORT_COLUMNS = (("bleu_mean", "BLEU"), ("rouge_l", "ROUGE-L"), ("meteor", "METEOR"))
LATENCY_KEYS = ("client_total", "total")  # the first one present is an item's latency


def task_columns(task: str) -> tuple[tuple[str, str], ...]:
    """(metric key, column title) of the task's three headline metrics."""
    return VQA_COLUMNS if task == "vqa" else REPORT_COLUMNS


def headline(task: str, metrics: Mapping[str, Any]) -> tuple[float | None, bool]:
    """The mean of the task's three metrics, and whether it is partial (a metric was undefined)."""
    if metrics.get("average") is not None:
        return float(metrics["average"]), False
    values = [metrics.get(key) for key, _ in task_columns(task)]
    present = [float(v) for v in values if v is not None]
    return (sum(present) / len(present), True) if present else (None, True)


# --------------------------------------------------------------------------------------------------
# Scoring


def _failed(row: Mapping[str, Any]) -> bool:
    return row.get("error") is not None


def _task_metrics(
    task: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    meteor: Any,
    yes_probability: bool,
) -> dict[str, Any]:
    """Overall and per-domain metrics of one run's rows."""
    from training.evaluate import metrics as m

    domains = [row["domain"] for row in rows]
    truths = [row["truth"] for row in rows]
    if task == "vqa":
        predictions = [None if _failed(row) else row.get("prediction") for row in rows]
        probabilities = [row.get("yes_probability") for row in rows] if yes_probability else None
        overall = m.vqa_metrics(predictions, truths, probabilities)
        by_domain = m.vqa_metrics_by_domain(domains, predictions, truths, probabilities)
    else:
        texts = ["" if _failed(row) else (row.get("answer") or "") for row in rows]
        overall = m.report_metrics(texts, truths, meteor=meteor)
        by_domain = m.report_metrics_by_domain(domains, texts, truths, meteor=meteor)
    return {"overall": overall.to_dict(), "by_domain": {d: v.to_dict() for d, v in by_domain.items()}}


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(array, 50)), 2),
        "p95": round(float(np.percentile(array, 95)), 2),
        "mean": round(float(array.mean()), 2),
        "max": round(float(array.max()), 2),
    }


def latency_ms(row: Mapping[str, Any]) -> float | None:
    """An item's latency: the client's wall time (HTTP) or the item's total (in-process)."""
    timings = row.get("timings_ms") or {}
    for key in LATENCY_KEYS:
        if key in timings:
            return float(timings[key])
    return None


def summarise_run(
    task: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    meteor: Any = False,
    yes_probability: bool = False,
) -> dict[str, Any]:
    """Metrics, k distribution, latency, errors and routing of one run (rows of one task and run).

    ``meteor``: as ``report_metrics`` (a shared ``MeteorScorer``, True or False). ``yes_probability``:
    score P(yes) too (the backend gives it; a missing one counts as ``n_missing_probability``).
    """
    if not rows:
        raise ValueError("a run needs at least one item")
    first = rows[0]
    ok = [row for row in rows if not _failed(row)]
    errors = Counter((row["error"].get("status"), row["error"].get("code")) for row in rows if _failed(row))
    scored = _task_metrics(task, rows, meteor=meteor, yes_probability=yes_probability)
    headlines = {OVERALL: headline(task, scored["overall"])[0]} | {
        d: headline(task, v)[0] for d, v in scored["by_domain"].items()
    }
    ks = [int(row.get("k") or 0) for row in ok]
    k_by_domain: dict[str, list[int]] = {}
    for row in ok:
        k_by_domain.setdefault(row["domain"], []).append(int(row.get("k") or 0))
    routed = [row for row in ok if row.get("domain_source") == "classifier"]
    latencies = [value for value in (latency_ms(row) for row in ok) if value is not None]
    return {
        "run": first["run"],
        "task": task,
        "variant": first["variant"],
        "model": first["model"],
        "decoding": first.get("decoding", "greedy"),
        "n": len(rows),
        "n_ok": len(ok),
        "n_errors": len(rows) - len(ok),
        "errors": [
            {"status": status, "code": code, "count": count}
            for (status, code), count in sorted(errors.items(), key=lambda e: (-e[1], str(e[0])))
        ],
        "metrics": scored,
        "headline": headlines,
        "k": {
            "mean": round(sum(ks) / len(ks), 3) if ks else None,
            "histogram": {str(k): n for k, n in sorted(Counter(ks).items())},
            "by_domain_mean": {d: round(sum(v) / len(v), 3) for d, v in k_by_domain.items()},
        },
        "latency_ms": _percentiles(latencies),
        "routing": {
            "n": len(routed),
            "accuracy": (
                round(sum(row.get("routed_domain") == row["domain"] for row in routed) / len(routed), 4)
                if routed
                else None
            ),
        },
    }


def group_runs(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Rows by (task, run), in first-seen order."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["run"]), []).append(row)
    return groups


def summarise_runs(
    rows: Sequence[Mapping[str, Any]], *, meteor: bool = False, yes_probability: bool = False
) -> list[dict[str, Any]]:
    """``summarise_run`` for every (task, run) of the rows; one METEOR process serves them all."""
    from training.evaluate.metrics import MeteorScorer

    groups = group_runs(rows)
    needs_meteor = meteor and any(task == "report" for task, _ in groups)
    scorer = MeteorScorer() if needs_meteor else None
    try:
        return [
            summarise_run(task, group, meteor=scorer or False, yes_probability=yes_probability)
            for (task, _), group in groups.items()
        ]
    finally:
        if scorer is not None:
            scorer.close()


# --------------------------------------------------------------------------------------------------
# Markdown


def percent(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _domains_of(summary: Mapping[str, Any]) -> list[str]:
    return list(summary["metrics"]["by_domain"])


def metric_cells(task: str, metrics: Mapping[str, Any]) -> list[str]:
    """The three metrics and the headline (``*`` when partial), in %."""
    value, partial = headline(task, metrics)
    cells = [percent(metrics.get(key)) for key, _ in task_columns(task)]
    return [*cells, percent(value) + ("*" if partial and value is not None else "")]


def run_table(task: str, summaries: Sequence[Mapping[str, Any]], *, label: str = "run") -> str:
    """One line per run and domain (then overall): n, the three metrics, their mean, k, errors."""
    titles = [title for _, title in task_columns(task)]
    extra = ["AUROC(P)"] if task == "vqa" else []
    header = [label, "domain", "n", *titles, "avg", *extra, "k mean", "errors"]
    rows = []
    for summary in summaries:
        scopes = [*_domains_of(summary), OVERALL]
        for scope in scopes:
            metrics = summary["metrics"]["overall" if scope == OVERALL else "by_domain"]
            metrics = metrics if scope == OVERALL else metrics[scope]
            k_mean = summary["k"]["mean"] if scope == OVERALL else summary["k"]["by_domain_mean"].get(scope)
            cells = [summary["run"], scope, str(metrics["n"]), *metric_cells(task, metrics)]
            if task == "vqa":
                cells.append(percent(metrics.get("auroc_prob")))
            cells += [
                "–" if k_mean is None else f"{k_mean:.2f}",
                str(summary["n_errors"]) if scope == OVERALL else "",
            ]
            rows.append(cells)
    return md_table(header, rows)


def latency_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            s["task"],
            s["run"],
            *(
                "–" if s["latency_ms"][key] is None else f"{s['latency_ms'][key]:.0f}"
                for key in ("p50", "p95", "mean", "max")
            ),
            percent(s["routing"]["accuracy"]),
        ]
        for s in summaries
    ]
    return md_table(["task", "run", "p50 ms", "p95 ms", "mean ms", "max ms", "routing acc"], rows)


def error_lines(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        f"- {s['task']} / {s['run']}: {e['count']} × status {e['status'] or 'none'} "
        f"({e['code'] or 'no code'})"
        for s in summaries
        for e in s["errors"]
    ]


def misalignment_table(misalignment: Mapping[str, Mapping[str, Any]]) -> str:
    """Copy-reference and over-reliance rates per model and domain (``training.sft.evaluate_base`` output)."""
    rows = []
    for label, result in misalignment.items():
        scopes = [*result.get("per_domain", {}).items(), (OVERALL, result["all"])]
        for scope, rates in scopes:
            rows.append(
                [
                    label,
                    scope,
                    str(rates["items"]),
                    percent(rates["copy_reference"]),
                    percent(rates["over_reliance"]),
                    percent(rates["accuracy"]["clean"]),
                    percent(rates["accuracy"]["clean_ref"]),
                ]
            )
    header = ["model", "domain", "items", "copy-reference", "over-reliance", "acc clean", "acc +ref"]
    return md_table(header, rows)


MISALIGNMENT_NOTE = (
    "copy-reference = share of items answered right with a noise image plus the top-1 retrieved report; "
    "over-reliance = share of items right without retrieval that turn wrong with it (VQA, four greedy runs: "
    "`training.sft.evaluate_base`)."
)


def render_eval_markdown(metrics: Mapping[str, Any]) -> str:
    """The report of ``mmedrag eval``: settings, one table per task, latency, errors, notes."""
    backend = metrics["backend"]
    source = backend.get("url") or backend.get("artifacts")
    limit = metrics.get("limit")
    scope = "all items" if limit is None else f"{limit} items per domain"
    lines = [
        "# MMed-RAG evaluation",
        "",
        f"- data: `{metrics['data']}` (split {metrics['split']}, {scope})",
        f"- backend: {backend['mode']} (`{source}`), domain from {backend.get('domain_source')}",
        f"- settings: `{json.dumps(metrics.get('settings', {}), sort_keys=True)}`",
        "",
    ]
    for task in metrics["tasks"]:
        summaries = [s for s in metrics["runs"] if s["task"] == task]
        title = "Closed VQA" if task == "vqa" else "Report generation"
        lines += [f"## {title}", "", run_table(task, summaries)]
    lines += ["## Latency and routing", "", latency_table(metrics["runs"])]
    if metrics.get("misalignment"):
        lines += ["## Misalignment", "", misalignment_table(metrics["misalignment"]), MISALIGNMENT_NOTE, ""]
    notes = [*error_lines(metrics["runs"]), *(f"- {note}" for note in metrics.get("notes", []))]
    notes.append(
        "- metrics in %; avg = mean of the three metrics (the paper's ablation number), `*` = mean of the "
        "available ones; AUROC(P) = ROC AUC of P(yes) at the first token (in-process only); failed items "
        "count as wrong (VQA) or empty (report)"
    )
    lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 8.0, height: float = 4.5) -> Any:
    figure = import_eval_module("matplotlib.figure")

    return figure.Figure(figsize=(width, height), layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def _bars(axes: Any, groups: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (None: no bar)."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else 100 * v for v in values]
        axes.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    axes.set_xticks(x, list(groups))
    axes.set_ylabel("%")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small", ncols=2)


def plot_run_metrics(task: str, summaries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Each run's three metrics and their mean, overall (the ablation bars)."""
    figure = _figure()
    axes = figure.subplots()
    columns = [*task_columns(task), ("headline", "avg")]
    series = {}
    for summary in summaries:
        overall = summary["metrics"]["overall"]
        series[summary["run"]] = [
            headline(task, overall)[0] if key == "headline" else overall.get(key) for key, _ in columns
        ]
    _bars(axes, [title for _, title in columns], series)
    axes.set_title(f"{'VQA' if task == 'vqa' else 'Report'}: metrics by run (overall)")
    return _save(figure, path)


def plot_domain_metrics(task: str, summaries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The headline metric of each run per domain and overall."""
    figure = _figure()
    axes = figure.subplots()
    seen = {d for s in summaries for d in s["headline"] if d != OVERALL}
    groups = [d for d in DOMAINS if d in seen] + sorted(seen - set(DOMAINS)) + [OVERALL]
    series = {s["run"]: [s["headline"].get(g) for g in groups] for s in summaries}
    _bars(axes, groups, series)
    axes.set_title(f"{'VQA' if task == 'vqa' else 'Report'}: mean of the three metrics by domain")
    return _save(figure, path)


def plot_k_distribution(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """How many reports each retrieval run kept (share of its items per k)."""
    figure = _figure()
    axes = figure.subplots()
    groups: dict[str, list[int]] = {}
    for row in rows:
        if not _failed(row) and row.get("variant") != "no-retrieval":
            groups.setdefault(f"{row['task']}/{row['run']}", []).append(int(row.get("k") or 0))
    top = max((max(ks) for ks in groups.values()), default=0)
    x = np.arange(top + 1)
    width = 0.8 / max(1, len(groups))
    for i, (name, ks) in enumerate(groups.items()):
        counts = np.bincount(ks, minlength=top + 1) / len(ks)
        axes.bar(x + (i - (len(groups) - 1) / 2) * width, counts, width, label=name)
    axes.set_xticks(x)
    axes.set_xlabel("k (reports kept)")
    axes.set_ylabel("share of items")
    axes.set_title("Retrieved reports kept per item")
    if groups:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no retrieval run", ha="center", va="center", transform=axes.transAxes)
    return _save(figure, path)


def plot_latency(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Histogram of the items' latencies, per run."""
    figure = _figure()
    axes = figure.subplots()
    groups: dict[str, list[float]] = {}
    for row in rows:
        value = None if _failed(row) else latency_ms(row)
        if value is not None:
            groups.setdefault(f"{row['task']}/{row['run']}", []).append(value)
    values = [v for vs in groups.values() for v in vs]
    if values:
        bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 4)))
        for name, vs in groups.items():
            axes.hist(vs, bins=bins, alpha=0.5, label=name)
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no answered item", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("latency per item (ms)")
    axes.set_ylabel("items")
    axes.set_title("Latency")
    return _save(figure, path)


def plot_misalignment(misalignment: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Copy-reference and over-reliance rates of each model (overall)."""
    figure = _figure(6.0, 4.0)
    axes = figure.subplots()
    series = {
        label: [result["all"]["copy_reference"], result["all"]["over_reliance"]]
        for label, result in misalignment.items()
    }
    _bars(axes, ["copy-reference", "over-reliance"], series)
    axes.set_title("Misalignment rates (lower is better)")
    return _save(figure, path)


def write_plots(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    summaries: Sequence[Mapping[str, Any]],
    misalignment: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Every plot of an evaluation into ``out``; returns them by name."""
    out = Path(out)
    paths: dict[str, Path] = {}
    for task in dict.fromkeys(s["task"] for s in summaries):
        chosen = [s for s in summaries if s["task"] == task]
        paths[f"runs_{task}"] = plot_run_metrics(task, chosen, out / f"runs_{task}.png")
        paths[f"domains_{task}"] = plot_domain_metrics(task, chosen, out / f"domains_{task}.png")
    paths["k_distribution"] = plot_k_distribution(rows, out / "k_distribution.png")
    paths["latency"] = plot_latency(rows, out / "latency.png")
    if misalignment:
        paths["misalignment"] = plot_misalignment(misalignment, out / "misalignment.png")
    return paths


# --------------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_results_file(out: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``results.jsonl``, written as soon as the generations are done: they are the costly part, and must be
    on disk before anything later (METEOR's Java, the plots) can fail."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_jsonl(out / RESULTS_FILE, rows)


def write_summary_outputs(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    document: Mapping[str, Any],
    *,
    json_name: str,
    markdown_name: str,
    markdown: str,
) -> dict[str, Path]:
    """Next to ``results.jsonl`` (``write_results_file``): the summary JSON, its markdown and the plots."""
    out = Path(out)
    paths = {"results": out / RESULTS_FILE, "json": write_json(out / json_name, document)}
    (out / markdown_name).write_text(markdown, encoding="utf-8")
    paths["markdown"] = out / markdown_name
    plots = write_plots(out / PLOTS_DIR, rows, document["runs"], document.get("misalignment"))
    paths.update({f"plot:{name}": path for name, path in plots.items()})
    return paths


def write_eval_outputs(
    out: Path, rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]
) -> dict[str, Path]:
    """``metrics.json``, ``report.md`` and ``plots/*.png`` next to ``results.jsonl`` in ``out``."""
    paths = write_summary_outputs(
        out,
        rows,
        metrics,
        json_name=METRICS_FILE,
        markdown_name=REPORT_FILE,
        markdown=render_eval_markdown(metrics),
    )
    paths["metrics"], paths["report"] = paths.pop("json"), paths.pop("markdown")
    return paths
