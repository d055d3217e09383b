"""Training throughput: retriever, SFT and DPO steps, and pair construction at several generation batch sizes.

    python bench/train.py [--out bench/results] [--threads 2] [--steps 20] [--batch-sizes 1,8,16]

Builds what it needs in a temporary folder (``--work DIR`` keeps it): a small MedSynth
(``training.data.medsynth.generate.synthesize``, ``--per-domain`` images per domain at 64 px) and tiny
artifacts (``training.artifacts.tiny.build_tiny_artifacts``: the generator and the retrievers that pair
construction uses), then runs each trainer the way its command does, for a few steps:

1. retriever: ``RetrieverTrainer`` (``mmedrag retriever``), the default ``retriever-small`` model, radiology,
   batch 32 (the paper's), ``--steps`` optimiser steps;
2. SFT: ``train_sft`` (``mmedrag sft``), its default tiny LLaVA, batch 16, no vision pretraining phase,
   ``--steps`` steps;
3. pair construction: ``build_pairs`` (``mmedrag pairs``) on the preference split with
   ``InProcessGenerator(batch_size=B)`` for each ``B`` of ``--batch-sizes``, greedy, ``--max-new-tokens``; the
   same items, retriever and noise settings every time. Each batch size runs ``--rounds`` times, in
   alternating order (1, 8, 16, 16, 8, 1 ...), pooled, so a machine that gets busier or quieter during the
   run weighs on every batch size alike;
4. DPO: ``run_dpo`` (``mmedrag dpo --stage 1``) on the SFT model, LoRA, batch 2, ``--steps`` steps, on pairs
   made from the pair run's items (the ground truth chosen, a generated answer rejected, scored with the
   noise image), so the step count does not depend on how many pairs a random model happens to give.

Step times come from where the trainers already mark a step: their progress bars (retriever, SFT; replaced
for the run by a recorder) and a ``TrainerCallback`` (DPO, TRL's trainer). ``step_ms_p50`` is the median
time between consecutive steps, so the first step (warm-up) and the evaluation between retriever epochs do
not count; ``steps_per_s`` = 1000 / ``step_ms_p50``; ``examples_per_s`` = that times the batch size (DPO:
pairs, each a chosen and a rejected sequence). Pair construction is timed end to end (noise images,
retrieval, generation, writing): ``pairs_per_s`` over the whole ``build_pairs`` call, and
``generations_per_s`` over its generation phase alone.

Target (a ratio within this run): pair construction with batched generation (``mmedrag pairs``'s default
batch of 8) at least 3x the pairs per second of the one-at-a-time path (batch 1). Results go to
``<out>/train.json`` and ``<out>/train.md``; the script exits 1 when the target fails.

Threads: ``--threads`` (default 2) torch threads for every phase. ``OMP_WAIT_POLICY`` is set to ``PASSIVE``
unless already set: on a machine whose cores other jobs keep busy, OpenMP's default spinning made batch-1
generation with 2 threads about 40x slower here, which would measure contention instead of batching.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # a sibling module (bench/ is not a package)

PAIRS_TARGET = 3.0  # pair construction, default batch (8) / batch 1
DEFAULT_BATCH = 8  # training.pairs.runner.DEFAULT_BATCH_SIZE, what `mmedrag pairs` uses
RETRIEVER_BATCH = 32
SFT_BATCH = 16
DPO_BATCH = 2
IMAGE_SIZE = 64
DOMAIN = "radiology"


def emit(text: str = "") -> None:
    print(text, flush=True)  # a command-line report


# ------------------------------------------------------------------------------------------ step clock


class StepClock:
    """Stands in for ``tqdm`` inside the trainers: records when each progress update happens.

    The trainers call ``bar.update(1)`` after every optimiser step (and the pair runner after every
    generated batch); the recorded times, per bar description, are the step times. Nothing is drawn.
    """

    updates: ClassVar[dict[str, list[tuple[float, int]]]] = defaultdict(list)

    def __init__(self, iterable: Iterable[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        self.iterable = iterable
        self.desc = str(kwargs.get("desc") or "")

    def __iter__(self) -> Iterator[Any]:
        yield from self.iterable or ()

    def __enter__(self) -> StepClock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        StepClock.updates[self.desc].append((time.perf_counter(), n))

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None

    @classmethod
    def take(cls, desc: str) -> list[tuple[float, int]]:
        return cls.updates.pop(desc, [])


@contextmanager
def step_clock() -> Iterator[type[StepClock]]:
    """The trainers' progress bars replaced by ``StepClock`` (module attributes and ``tqdm.auto``)."""
    import tqdm.auto

    import training.pairs.runner
    import training.retriever.trainer

    StepClock.updates.clear()
    with ExitStack() as stack:
        for module in (tqdm.auto, training.pairs.runner, training.retriever.trainer):
            stack.enter_context(mock.patch.object(module, "tqdm", StepClock))
        yield StepClock


def step_row(phase: str, intervals_s: Sequence[float], batch: int, what: str, **extra: Any) -> dict[str, Any]:
    """A table row from the durations of the measured steps (seconds)."""
    if not intervals_s:
        raise SystemExit(f"{phase}: no step was timed (raise --steps)")
    p50 = statistics.median(intervals_s) * 1000
    return {
        "phase": phase,
        "steps_timed": len(intervals_s),
        "batch": batch,
        "step_ms_p50": p50,
        "step_ms_p90": float(_quantile(intervals_s, 0.9)) * 1000,
        "steps_per_s": 1000 / p50,
        "examples_per_s": 1000 / p50 * batch,
        "examples": what,
        **extra,
    }


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def between(updates: Sequence[tuple[float, int]]) -> list[float]:
    """Times between consecutive updates: each is one step (the first, from the bar's start, is not)."""
    return [later[0] - earlier[0] for earlier, later in pairwise(updates)]


# ------------------------------------------------------------------------------------------ data


def build_inputs(work: Path, per_domain: int, seed: int) -> tuple[Path, Path]:
    """(MedSynth folder, tiny artifacts folder)."""
    from training.artifacts.tiny import build_tiny_artifacts
    from training.data.medsynth.generate import SynthConfig, synthesize

    data, artifacts = work / "medsynth", work / "artifacts"
    started = time.perf_counter()
    synthesize(
        SynthConfig(out=data, seed=seed, per_domain=per_domain, image_size=IMAGE_SIZE, workers=1),
        progress=False,
    )
    emit(f"  MedSynth ({per_domain} images per domain) in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    build_tiny_artifacts(artifacts, seed=seed, progress=False)
    emit(f"  tiny artifacts in {time.perf_counter() - started:.1f} s")
    return data, artifacts


# ------------------------------------------------------------------------------------------ phases


def bench_retriever(data: Path, work: Path, steps: int, threads: int, seed: int) -> dict[str, Any]:
    from training.retriever.config import RetrieverTrainingConfig
    from training.retriever.trainer import RetrieverTrainer

    config = RetrieverTrainingConfig(
        domain=DOMAIN,
        data_dir=data,
        out=work / "retriever",
        batch_size=RETRIEVER_BATCH,
        epochs=10_000,  # max_steps ends the run
        max_steps=steps,
        seed=seed,
        num_threads=threads,
        progress=False,
    )
    with step_clock() as clock:
        metrics = RetrieverTrainer(config).train()
    schedule = metrics["schedule"]
    updates = clock.take(f"retriever {DOMAIN}")
    # Interval i runs from the end of step i + 1 to the end of step i + 2; after an epoch's last step it
    # also holds the evaluation and the checkpoint, so those are left out.
    per_epoch = schedule["steps_per_epoch"]
    steps_only = [d for i, d in enumerate(between(updates)) if (i + 1) % per_epoch != 0]
    return step_row(
        "retriever (contrastive, retriever-small)",
        steps_only,
        schedule["batch_size"],
        "image-report pairs",
        total_steps=schedule["total_steps"],
        wall_s=metrics["wall_seconds"],
    )


def bench_sft(data: Path, work: Path, steps: int, threads: int, seed: int) -> tuple[dict[str, Any], Path]:
    from training.sft import SFTConfig, train_sft

    config = SFTConfig(
        data=data,
        out=work / "base",
        batch_size=SFT_BATCH,
        epochs=10_000,
        max_steps=steps,
        vision_pretrain_steps=0,
        seed=seed,
        num_threads=threads,
        progress=False,
    )
    with step_clock() as clock:
        result = train_sft(config)
    updates = clock.take("sft")
    row = step_row(
        "SFT (tiny LLaVA, full fine-tuning)",
        between(updates),
        SFT_BATCH,
        "prompt-answer examples",
        total_steps=result.metrics["steps"],
        wall_s=result.metrics["wall_seconds"],
    )
    return row, result.out


def bench_pairs(
    data: Path,
    artifacts: Path,
    work: Path,
    batch_sizes: Sequence[int],
    rounds: int,
    max_new_tokens: int,
    limit: int | None,
    threads: int,
) -> tuple[list[dict[str, Any]], Path]:
    """``build_pairs`` at each generation batch size, alternating order, pooled per batch size."""
    from training.pairs.build import PairsConfig, build_pairs
    from training.pairs.runner import InProcessGenerator, InProcessRetriever

    retriever = InProcessRetriever(artifacts, data)
    for domain in ("radiology", "ophthalmology", "pathology"):
        retriever.name(domain)  # loads the encoder and its corpus once, outside the timed runs
    generators = {
        size: InProcessGenerator(
            artifacts / "generator", batch_size=size, max_new_tokens=max_new_tokens, threads=threads
        )
        for size in batch_sizes
    }
    pooled: dict[int, dict[str, float]] = {size: defaultdict(float) for size in batch_sizes}
    answers: dict[int, list[str]] = {}
    last_out = work / "pairs"
    order = list(batch_sizes)
    for round_index in range(rounds):
        for size in order if round_index % 2 == 0 else reversed(order):
            out = work / f"pairs-b{size}-r{round_index}"
            config = PairsConfig(data=data, out=out, limit=limit)
            with step_clock():
                started = time.perf_counter()
                result = build_pairs(config, generators[size], retriever)
                wall = time.perf_counter() - started
            summary = result.summary
            runs = [
                json.loads(line) for line in (out / "runs.jsonl").read_text(encoding="utf-8").splitlines()
            ]
            answers.setdefault(size, [json.dumps(r["answers"], sort_keys=True) for r in runs])
            totals = pooled[size]
            totals["wall_s"] += wall
            totals["generation_s"] += summary["generation_seconds"]
            totals["pairs"] += len(result.pairs)
            totals["items"] += len(runs)
            totals["generations"] += summary["generations"]
            emit(f"  pairs batch {size} (round {round_index + 1}): {wall:.1f} s, {len(result.pairs)} pairs")
            last_out = out
    rows = []
    for size in batch_sizes:
        t = pooled[size]
        rows.append(
            {
                "batch_size": size,
                "runs": rounds,
                "items": int(t["items"] / rounds),
                "generations": int(t["generations"] / rounds),
                "pairs": int(t["pairs"] / rounds),
                "wall_s": t["wall_s"] / rounds,
                "generation_s": t["generation_s"] / rounds,
                "pairs_per_s": t["pairs"] / t["wall_s"],
                "items_per_s": t["items"] / t["wall_s"],
                "generations_per_s": t["generations"] / t["generation_s"],
                "same_answers_as_first": answers[size] == answers[batch_sizes[0]],
            }
        )
    base = rows[0]
    for row in rows:
        # The same items give the same answers and pairs at every batch size (greedy; checked by
        # same_answers_as_first), so the pairs-per-second ratio is the ratio of wall times.
        row["speedup_vs_first"] = base["wall_s"] / row["wall_s"]
        row["generation_speedup_vs_first"] = row["generations_per_s"] / base["generations_per_s"]
    return rows, last_out


def write_dpo_pairs(data: Path, pairs_out: Path, path: Path, limit: int | None) -> int:
    """Stage-1 style pairs from a pair run: ground truth chosen, a generated answer rejected (scored with the
    item's noise image). Only the texts and images matter for throughput."""
    from training.pairs.build import PairsConfig
    from training.pairs.runner import load_items

    config = PairsConfig(data=data, out=pairs_out, limit=limit)
    runs = {
        row["id"]: row
        for row in map(json.loads, (pairs_out / "runs.jsonl").read_text(encoding="utf-8").splitlines())
    }
    records = []
    for domain in ("radiology", "ophthalmology", "pathology"):
        for task in config.tasks:
            for item in load_items(data, domain, task)[: config.limit]:
                run = runs.get(item.id)
                if run is None:
                    continue
                generated = [
                    a for a in run["answers"].values() if a.strip() and a.strip() != item.truth.strip()
                ]
                records.append(
                    {
                        "id": item.id,
                        "set": "stage1",
                        "domain": domain,
                        "task": task,
                        "image": item.image,
                        "image_root": str(item.image_root),
                        "rejected_image": run["noise_image"],
                        "prompt": item.prompt(),
                        "chosen": item.truth,
                        "rejected": generated[0] if generated else "I cannot tell.",
                    }
                )
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return len(records)


def bench_dpo(
    model_dir: Path, pair_file: Path, work: Path, steps: int, threads: int, seed: int
) -> dict[str, Any]:
    from transformers import TrainerCallback

    from training.dpo.config import MMedRAGDPOConfig
    from training.dpo.trainer import run_dpo

    class StepTimes(TrainerCallback):
        """Wall time of every optimiser step (TRL's trainer calls these around each one)."""

        def __init__(self) -> None:
            self.started = 0.0
            self.durations: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.durations.append(time.perf_counter() - self.started)

    config = MMedRAGDPOConfig(
        stage=1,
        artifacts=str(work),
        model_dir=str(model_dir),
        pair_files=[str(pair_file)],
        eval_fraction=0.0,
        adapter_dir=str(work / "adapters" / "stage1"),
        output_dir=str(work / "adapters" / "checkpoints"),
        per_device_train_batch_size=DPO_BATCH,
        max_steps=steps,
        warmup_steps=0,
        logging_steps=max(1, steps),
        save_steps=1_000_000,
        seed=seed,
        num_threads=threads,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        report_to="none",
    )
    times = StepTimes()
    summary = run_dpo(config, callbacks=[times])
    return step_row(
        "DPO stage 1 (LoRA on the SFT model, TRL)",
        times.durations[1:],  # the first step pays for lazy set-up
        DPO_BATCH,
        "preference pairs",
        total_steps=summary["train"]["steps"],
        wall_s=summary["wall_seconds"],
    )


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="Where results are written.")
    parser.add_argument("--work", type=Path, help="Build and keep everything here (default: a temp folder).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every phase.")
    parser.add_argument("--steps", type=int, default=20, help="Optimiser steps of each trainer.")
    parser.add_argument(
        "--per-domain",
        type=int,
        default=256,
        help="MedSynth images per domain (256: 4 retriever steps per epoch).",
    )
    parser.add_argument(
        "--batch-sizes",
        default="1,8,16",
        help="Generation batch sizes of pair construction (first: baseline).",
    )
    parser.add_argument("--rounds", type=int, default=2, help="Runs of pair construction per batch size.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest generated answer.")
    parser.add_argument(
        "--pairs-limit", type=int, default=16, help="Preference items per domain and task (0: all)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip", default="", help="Comma-separated phases to skip: retriever, sft, dpo (pairs always run)."
    )
    args = parser.parse_args(argv)
    args.batch_sizes = tuple(int(v) for v in args.batch_sizes.split(","))
    args.pairs_limit = args.pairs_limit or None
    args.skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    if args.batch_sizes[0] != 1 or DEFAULT_BATCH not in args.batch_sizes:
        parser.error(
            f"--batch-sizes must start with 1 and include {DEFAULT_BATCH} (the target compares them)"
        )
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first step is not timed)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Before torch loads OpenMP (nothing above imports torch): see the module docstring.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmedrag-bench-train-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        emit(f"building inputs in {work} ...")
        data, artifacts = build_inputs(work, args.per_domain, args.seed)
        step_rows: list[dict[str, Any]] = []
        if "retriever" not in args.skip:
            emit(f"retriever training, {args.steps} steps ...")
            step_rows.append(bench_retriever(data, work, args.steps, args.threads, args.seed))
        emit("pair construction ...")
        pair_rows, pairs_out = bench_pairs(
            data,
            artifacts,
            work,
            args.batch_sizes,
            args.rounds,
            args.max_new_tokens,
            args.pairs_limit,
            args.threads,
        )
        if "sft" not in args.skip:
            emit(f"SFT, {args.steps} steps ...")
            sft_row, base = bench_sft(data, work, args.steps, args.threads, args.seed)
            step_rows.append(sft_row)
            if "dpo" not in args.skip:
                pair_file = work / "dpo_pairs.jsonl"
                count = write_dpo_pairs(data, pairs_out, pair_file, args.pairs_limit)
                emit(f"DPO, {args.steps} steps on {count} pairs ...")
                step_rows.append(bench_dpo(base, pair_file, work, args.steps, args.threads, args.seed))
        torch.set_num_threads(args.threads)  # the trainers restore or change it

    by_size = {row["batch_size"]: row for row in pair_rows}
    ratio = by_size[DEFAULT_BATCH]["speedup_vs_first"]
    targets = [
        {
            "goal": f"pair construction, generation batch {DEFAULT_BATCH} (default) / batch 1, pairs per s",
            "measured": round(ratio, 2),
            "target": f">= {PAIRS_TARGET:g}x",
            "result": "PASS" if ratio >= PAIRS_TARGET else "FAIL",
        }
    ]
    for size in args.batch_sizes[1:]:
        if size != DEFAULT_BATCH:
            targets.append(
                {
                    "goal": f"pair construction, generation batch {size} / batch 1, pairs per s",
                    "measured": round(by_size[size]["speedup_vs_first"], 2),
                    "target": "(no target)",
                    "result": "",
                }
            )
    step_columns = [
        "phase",
        "batch",
        "steps_timed",
        "step_ms_p50",
        "step_ms_p90",
        "steps_per_s",
        "examples_per_s",
        "examples",
        "wall_s",
    ]
    pair_columns = [
        "batch_size",
        "runs",
        "items",
        "generations",
        "pairs",
        "wall_s",
        "generation_s",
        "pairs_per_s",
        "generations_per_s",
        "speedup_vs_first",
        "generation_speedup_vs_first",
        "same_answers_as_first",
    ]
    tables = [
        ("training steps", markdown_table(step_rows, step_columns)),
        (
            "pair construction (build_pairs end to end; speedup_vs_first: pairs per s relative to batch 1)",
            markdown_table(pair_rows, pair_columns),
        ),
        ("targets", markdown_table(targets)),
    ]
    for title, table in tables:
        emit(f"\n{title}\n\n{table}")
    meta = {
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "steps": args.steps,
        "per_domain": args.per_domain,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    json_path, md_path = write_results(
        "train",
        targets,
        args.out,
        meta=meta,
        notes=[f"## {title}\n\n{table}\n" for title, table in tables[:-1]],
    )
    document = json.loads(json_path.read_text(encoding="utf-8"))
    document["details"] = {"steps": step_rows, "pairs": pair_rows}
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    emit(f"\nresults: {json_path} and {md_path}")
    return 0 if ratio >= PAIRS_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
