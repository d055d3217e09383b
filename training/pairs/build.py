"""Build the preference sets from the four runs and write them (``mmedrag pairs``).

Outputs in ``<out>``:

- ``pairs_<set>.jsonl`` for set in stage1, cm, oa1, oa2, and ``pairs_all.jsonl`` (their concatenation):
  the shared pair format ``mmedrag dpo`` reads, one object per line::

      {"id", "set", "domain", "task", "image", "image_root", "rejected_image", "prompt", "chosen",
       "rejected", "references", "provenance"}

  ``image`` is relative to ``image_root`` (the absolute ``<data>/<domain>/images`` folder). The noise
  images live under ``<out>/noise/<domain>/``, so ``rejected_image`` is an **absolute** path (null when the
  rejected side uses the real image): ``Path(image_root) / rejected_image`` (or ``os.path.join``) resolves
  both cases. ``prompt`` is the user text of ``build_prompt`` (no vicuna wrapper, no ``<image>``);
  ``references`` the retrieved report(s) in it ([] for stage1). ``provenance`` holds ``model``,
  ``retriever``, ``outcomes`` (the four runs as judged for this set), ``noise`` (+ ``noise_step`` and
  ``noise_source`` for diffusion), ``compared``, ``chosen_run`` / ``rejected_run``, the four ``answers``,
  ``item_id`` and, for reports, each run's ``bleu``.
- ``alignment_stage1.json`` and ``alignment_stage2.json`` (cm ∪ oa1 ∪ oa2): the MMed-RAG alignment JSON
  (``training.data.formats`` "alignment"): human turn ``"<image>\\n" + prompt`` (LLaVA's convention),
  ``rejected_noised`` 0/1, a per-record ``image_root``, and the extra fields ``set``, ``task``, ``domain``,
  ``references`` and ``rejected_image`` (absolute noise path, when noised).
- ``noise/<domain>/<image>.png``: the noise images (``training.pairs.noise``).
- ``runs.jsonl``: every item's four answers and outcomes (``rules.rate_outcomes``), for audits and the
  misalignment rates.
- ``summary.json``: pair counts per set × domain (and per task), D_cm before balancing, accuracy of each
  run per domain (VQA; reports: mean BLEU), copy-reference and over-reliance rates, timings.

Pairs whose chosen or rejected text is blank (an empty generation) are dropped and counted
(``dropped_blank``): a blank answer is no preference. D_cm is balanced per (task, domain).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.noise import DEFAULT_NOISE_SEED, DEFAULT_NOISE_STEP
from services.common.prompts import IMAGE_TOKEN, Task
from training.data.records import DOMAINS, PreferencePair
from training.pairs.noise import (
    NoiseImage,
    NoiseKind,
    write_noise_images,
)
from training.pairs.rules import (
    DEFAULT_CM_RATIO,
    DEFAULT_CM_SEED,
    RUNS,
    SETS,
    STAGE2_SETS,
    Outcomes,
    PairDecision,
    RunTexts,
    decide,
    misalignment_rates,
    rate_outcomes,
    report_scores,
)
from training.pairs.runner import (
    TASKS,
    Generator,
    PairItem,
    Retriever,
    load_items,
    retrieve_references,
    run_four,
    split_files,
)

PAIRS_FILE = "pairs_{}.jsonl"
ALIGNMENT_STAGE1 = "alignment_stage1.json"
ALIGNMENT_STAGE2 = "alignment_stage2.json"
RUNS_FILE = "runs.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class PairsConfig:
    """What ``build_pairs`` does (every field is a ``mmedrag pairs`` option)."""

    data: Path  # MedSynth folder
    out: Path
    tasks: tuple[Task, ...] = TASKS
    domains: tuple[str, ...] | None = None  # None: every domain with files of the split
    split: str = "preference"
    noise: NoiseKind = NoiseKind.diffusion
    noise_step: int = DEFAULT_NOISE_STEP
    noise_seed: int = DEFAULT_NOISE_SEED
    cm_ratio: float | None = DEFAULT_CM_RATIO  # None: keep D_cm whole (no balancing)
    cm_seed: int = DEFAULT_CM_SEED
    limit: int | None = None  # items per domain and task

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise", NoiseKind(self.noise))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data=str(self.data), out=str(self.out), noise=self.noise.value)
        return data


@dataclass
class PairsResult:
    """What was written, for callers and the command line."""

    out: Path
    summary: dict[str, Any]
    pairs: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Records


def _provenance(
    item: PairItem,
    decision: PairDecision,
    answers: RunTexts,
    *,
    model: str,
    retriever: str | None,
    noise: NoiseImage,
    bleu: Mapping[str, float] | None,
) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "model": model,
        "retriever": retriever,
        "outcomes": decision.outcomes.as_dict(),
        "noise": noise.kind.value,
        "item_id": item.id,
        "compared": list(decision.compared),
        "chosen_run": decision.chosen_run,
        "rejected_run": decision.rejected_run,
        "answers": answers.as_dict(),
    }
    if noise.step is not None:
        provenance["noise_step"] = noise.step
        provenance["noise_source"] = noise.source
    if bleu is not None:
        provenance["bleu"] = dict(bleu)
    if item.task == "vqa":
        provenance["truth"] = item.truth
    return provenance


def pair_record(
    item: PairItem,
    decision: PairDecision,
    answers: RunTexts,
    *,
    reference: str,
    noise: NoiseImage,
    model: str,
    retriever: str | None,
    bleu: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One line of the shared pair format."""
    references = [reference] if decision.uses_retrieval else []
    return {
        "id": f"{item.task}-{item.id}-{decision.set}",
        "set": decision.set,
        "domain": item.domain,
        "task": item.task,
        "image": item.image,
        "image_root": str(item.image_root),
        "rejected_image": str(noise.path.resolve()) if decision.rejected_noised else None,
        "prompt": item.prompt(references),
        "chosen": decision.chosen,
        "rejected": decision.rejected,
        "references": references,
        "provenance": _provenance(
            item, decision, answers, model=model, retriever=retriever, noise=noise, bleu=bleu
        ),
    }


def alignment_pair(record: Mapping[str, Any]) -> PreferencePair:
    """A shared-format pair as an MMed-RAG alignment record."""
    metadata: dict[str, Any] = {
        "image_root": record["image_root"],
        "set": record["set"],
        "task": record["task"],
        "domain": record["domain"],
        "references": record["references"],
    }
    if record["rejected_image"] is not None:
        metadata["rejected_image"] = record["rejected_image"]
    return PreferencePair(
        id=record["id"],
        image=record["image"],
        prompt=f"{IMAGE_TOKEN}\n{record['prompt']}",
        chosen=record["chosen"],
        rejected=record["rejected"],
        rejected_noised=record["rejected_image"] is not None,
        domain=record["domain"],
        metadata=metadata,
    )


def balance_records(
    records: Sequence[Mapping[str, Any]], *, ratio: float | None, seed: int
) -> tuple[list[Mapping[str, Any]], dict[tuple[str, str], int]]:
    """D_cm balanced per (task, domain) (``ratio`` None: kept whole); returns the kept records (input
    order) and the D_cm sizes before balancing."""
    from training.pairs.rules import balance_cm

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["domain"])].append(record)
    kept_ids: set[str] = set()
    before: dict[tuple[str, str], int] = {}
    for key, group in groups.items():
        by_set = {name: [r for r in group if r["set"] == name] for name in SETS}
        before[key] = len(by_set["cm"])
        cm = by_set["cm"]
        if ratio is not None:
            cm = balance_cm(cm, len(by_set["oa1"]), len(by_set["oa2"]), ratio=ratio, seed=seed)
        kept_ids.update(r["id"] for r in group if r["set"] != "cm")
        kept_ids.update(r["id"] for r in cm)
    return [r for r in records if r["id"] in kept_ids], before


# --------------------------------------------------------------------------------------------------
# Summary


def _rate(values: Iterable[bool]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarise(
    items: Sequence[PairItem],
    answers: Sequence[RunTexts],
    records: Sequence[Mapping[str, Any]],
    cm_before: Mapping[tuple[str, str], int],
) -> dict[str, Any]:
    """Counts per set and domain, per-run accuracies (VQA) / mean BLEU (reports), misalignment rates."""
    counts: dict[str, dict[str, int]] = {name: {} for name in SETS}
    by_task: dict[str, dict[str, dict[str, int]]] = {}
    tally = Counter((r["set"], r["task"], r["domain"]) for r in records)
    for (name, task, domain), n in sorted(tally.items()):
        counts[name][domain] = counts[name].get(domain, 0) + n
        by_task.setdefault(task, {}).setdefault(name, {})[domain] = n
    for name in SETS:
        counts[name]["total"] = sum(counts[name].values())

    grouped: dict[tuple[str, str], list[tuple[PairItem, RunTexts]]] = defaultdict(list)
    for item, texts in zip(items, answers, strict=True):
        grouped[(item.task, item.domain)].append((item, texts))
    accuracy: dict[str, dict[str, dict[str, float | None]]] = {}
    bleu: dict[str, dict[str, dict[str, float | None]]] = {}
    rates: dict[str, dict[str, dict[str, Any]]] = {}
    outcomes_by_task: dict[str, list[Outcomes]] = defaultdict(list)
    for (task, domain), group in sorted(grouped.items()):
        outcomes = [rate_outcomes(task, texts, item.truth) for item, texts in group]  # type: ignore[arg-type]
        outcomes_by_task[task].extend(outcomes)
        rates.setdefault(task, {})[domain] = misalignment_rates(outcomes).as_dict()
        if task == "vqa":
            accuracy.setdefault(task, {})[domain] = {run: _rate(o[run] for o in outcomes) for run in RUNS}
        else:
            scores = [report_scores(texts, item.truth) for item, texts in group]
            bleu.setdefault(task, {})[domain] = {run: _mean(s[run] for s in scores) for run in RUNS}
    for task, outcomes in outcomes_by_task.items():
        rates[task]["all"] = misalignment_rates(outcomes).as_dict()
    return {
        "items": {task: dict(Counter(item.domain for item in items if item.task == task)) for task in TASKS},
        "counts": counts,
        "counts_by_task": by_task,
        "cm_before_balancing": {
            task: {domain: n for (t, domain), n in sorted(cm_before.items()) if t == task} for task in TASKS
        },
        "vqa_accuracy": accuracy.get("vqa", {}),
        "report_bleu": bleu.get("report", {}),
        "misalignment": rates,
        "misalignment_note": (
            "copy_reference: share of items right with the noise image + reference (noised_ref); "
            "over_reliance: share of clean-right items wrong with retrieval (clean_ref). Reports judge "
            "runs by BLEU: noised_ref vs clean_ref, clean vs clean_ref."
        ),
    }


# --------------------------------------------------------------------------------------------------
# Writing


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_pairs(out: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """The shared-format JSONL files and the two alignment JSON files; returns their paths by name."""
    from training.data.formats import get_format

    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in (*SETS, "all"):
        path = out / PAIRS_FILE.format(name)
        _write_jsonl(path, [r for r in records if name == "all" or r["set"] == name])
        paths[name] = path
    alignment = get_format("alignment")
    for filename, sets in ((ALIGNMENT_STAGE1, ("stage1",)), (ALIGNMENT_STAGE2, STAGE2_SETS)):
        path = out / filename
        alignment.dump([alignment_pair(r) for r in records if r["set"] in sets], path)
        paths[filename] = path
    return paths


# --------------------------------------------------------------------------------------------------
# The whole step


def available_domains(data: Path, split: str, tasks: Sequence[Task]) -> tuple[str, ...]:
    domains = tuple(d for d in DOMAINS if any(split_files(data, d, split)[task].is_file() for task in tasks))
    if not domains:
        raise FileNotFoundError(
            f"{data}: no domain has {split} files (is it a MedSynth folder? make one with "
            "`mmedrag data synth`)"
        )
    return domains


def build_pairs(
    config: PairsConfig, generator: Generator, retriever: Retriever, *, progress: bool = False
) -> PairsResult:
    """Run the four conditions on the split, build stage1 / D_cm / D_oa1 / D_oa2, write everything."""
    started = time.perf_counter()
    data, out = Path(config.data), Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    domains = config.domains or available_domains(data, config.split, config.tasks)

    items: list[PairItem] = []
    pool: dict[str, dict[str, Path]] = {}  # every image of the split, the diffusion sources
    for domain in domains:
        for task in config.tasks:
            everything = load_items(data, domain, task, split=config.split)
            pool.setdefault(domain, {}).update({item.image: item.path for item in everything})
            items.extend(everything if config.limit is None else everything[: config.limit])
    if not items:
        raise ValueError(f"{data}: no items in the {config.split} split of {', '.join(domains)}")

    needed: dict[str, dict[str, Path]] = defaultdict(dict)
    for item in items:
        needed[item.domain][item.image] = item.path
    noise = write_noise_images(
        needed,
        out,
        kind=config.noise,
        step=config.noise_step,
        seed=config.noise_seed,
        pool=pool,
        progress=progress,
    )
    references = retrieve_references(items, retriever, progress=progress)

    generation_started = time.perf_counter()
    answers = run_four(
        items, {key: image.path for key, image in noise.items()}, references, generator, progress=progress
    )
    generation_seconds = time.perf_counter() - generation_started

    records: list[dict[str, Any]] = []
    runs_rows: list[dict[str, Any]] = []
    dropped = 0
    for item, texts in zip(items, answers, strict=True):
        key = (item.domain, item.image)
        bleu = report_scores(texts, item.truth) if item.task == "report" else None
        for decision in decide(item.task, texts, item.truth):
            if not decision.chosen.strip() or not decision.rejected.strip():
                dropped += 1
                continue
            records.append(
                pair_record(
                    item,
                    decision,
                    texts,
                    reference=references[key],
                    noise=noise[key],
                    model=generator.name,
                    retriever=retriever.name(item.domain),
                    bleu=bleu,
                )
            )
        runs_rows.append(
            {
                "id": item.id,
                "domain": item.domain,
                "task": item.task,
                "image": item.image,
                "truth": item.truth,
                "reference": references[key],
                "noise_image": str(noise[key].path.resolve()),
                "answers": texts.as_dict(),
                "outcomes": rate_outcomes(item.task, texts, item.truth).as_dict(),
                **({"bleu": bleu} if bleu is not None else {}),
            }
        )
    records, cm_before = balance_records(records, ratio=config.cm_ratio, seed=config.cm_seed)
    paths = write_pairs(out, records)
    _write_jsonl(out / RUNS_FILE, runs_rows)

    summary = summarise(items, answers, records, cm_before)
    generations = len(items) * len(RUNS)
    summary.update(
        config=config.to_json(),
        model=generator.name,
        retriever={domain: retriever.name(domain) for domain in domains},
        dropped_blank=dropped,
        generations=generations,
        generation_seconds=round(generation_seconds, 3),
        generations_per_second=round(generations / generation_seconds, 3) if generation_seconds else None,
        wall_seconds=round(time.perf_counter() - started, 3),
        files={name: path.name for name, path in paths.items()},
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return PairsResult(out=out, summary=summary, pairs=records)


def format_summary(summary: Mapping[str, Any]) -> str:
    """A short text table of the counts and rates, for the command line."""
    domains = sorted({d for name in SETS for d in summary["counts"][name] if d != "total"})
    lines = ["set      " + " ".join(f"{d:>14}" for d in domains) + f" {'total':>8}"]
    for name in SETS:
        row = summary["counts"][name]
        lines.append(
            f"{name:<8} " + " ".join(f"{row.get(d, 0):>14}" for d in domains) + f" {row['total']:>8}"
        )
    for task, by_domain in summary["misalignment"].items():
        overall = by_domain.get("all", {})

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        lines.append(
            f"{task}: copy-reference {pct(overall.get('copy_reference'))}, "
            f"over-reliance {pct(overall.get('over_reliance'))} ({overall.get('items', 0)} items)"
        )
    lines.append(
        f"{summary['generations']} generations in {summary['generation_seconds']:.1f}s; "
        f"dropped {summary['dropped_blank']} blank pairs; wall {summary['wall_seconds']:.1f}s"
    )
    return "\n".join(lines)
