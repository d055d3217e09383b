"""Serving throughput and latency, batching on vs off, in one run on tiny artifacts.

    python bench/serve.py [--artifacts DIR] [--out bench/results] [--levels 1,4,16,64]

The script builds tiny artifacts into a temporary folder (what ``mmedrag artifacts tiny --out DIR`` does;
``--artifacts`` reuses a folder), then starts the embedded stack twice on loopback, side by side (the four
services as processes, as ``mmedrag up`` runs them, one torch thread each; the second on a copy of the
artifacts, since the embedded store admits one process): one with the default batching settings, one with
batching off (``MMEDRAG_CLASSIFIER_MAX_BATCH=1``, ``MMEDRAG_RETRIEVER_BATCH_SIZE=1``,
``MMEDRAG_GENERATOR_MAX_BATCH=1``). At each concurrency level the two are measured alternately (on, off,
off, on; pooled per mode), so a machine that gets busier or quieter during the run weighs on both alike:

1. ``/vqa`` (closed loop: every client sends its next request when the last is answered): throughput,
   latency p50/p95/p99 seen by the client, the median of each stage the router reports (``timings_ms``:
   decode, classify, retrieve, generate), and the generator's mean batch size (when it exports it);
2. classifier + retriever alone, as the router calls them (``/classify`` then ``/retrieve`` with the
   normalised image): pairs per second, and each service's mean batch size read from ``/metrics``.

Then, in-process and without HTTP, the same two models behind their batchers (16 threads), to show what
batching does to the model path alone. Targets are ratios within this run (these machines are shared and
noisy): classifier + retriever throughput at 16 clients, batching on vs off, at least 3x.

Results go to ``<out>/serve.json`` and ``<out>/serve.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # a sibling module (bench/ is not a package)
from _workload import medsynth_vqa_samples

HOST = "127.0.0.1"
LEVELS = (1, 4, 16, 64)
UNBATCHED_ENV = {
    "MMEDRAG_CLASSIFIER_MAX_BATCH": "1",
    "MMEDRAG_RETRIEVER_BATCH_SIZE": "1",
    "MMEDRAG_GENERATOR_MAX_BATCH": "1",
}
# The router refuses what is over its in-flight limit (503); the benchmark measures queueing instead.
BENCH_ENV = {"MMEDRAG_ROUTER_MAX_IN_FLIGHT": "512", "MMEDRAG_ROUTER_AUTH_ENABLED": "false"}
SERVICES_TARGET = 3.0  # classifier + retriever throughput at 16 clients, batching on / off
TARGET_LEVEL = 16
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0


def emit(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Item:
    """One request: a MedSynth test image (as uploaded and as the router forwards it) and a question."""

    upload: bytes
    normalised: bytes
    filename: str
    domain: str
    question: str


def build_artifacts(out: Path) -> Path:
    """``mmedrag artifacts tiny --out OUT``: every model tiny and random, the MedSynth indexes real."""
    from training.artifacts.tiny import build_tiny_artifacts

    emit(f"building tiny artifacts in {out} ...")
    build_tiny_artifacts(out, seed=0, progress=False)
    return out


def load_items(artifacts: Path, per_domain: int = 8) -> list[Item]:
    """Test-split VQA images of each domain (one question per image), through the project's loaders."""
    from services.common.images import decode_image, normalise

    items = []
    for sample in medsynth_vqa_samples(artifacts / "medsynth", per_domain):
        upload = sample.image.read_bytes()
        items.append(
            Item(
                upload=upload,
                normalised=normalise(decode_image(upload).image),
                filename=sample.image.name,
                domain=sample.domain,
                question=sample.question,
            )
        )
    return items


# ------------------------------------------------------------------------------------------ the stack


@dataclass(frozen=True)
class RunningStack:
    """Each service's base URL, and the headers an internal service wants (its internal token)."""

    urls: dict[str, str]
    internal_headers: dict[str, str]


@contextlib.contextmanager
def running_stack(artifacts: Path, logs: Path, extra_env: dict[str, str]) -> Iterator[RunningStack]:
    """The embedded stack (``services.launcher``) with extra environment, stopped on exit."""
    from services.common.app import internal_auth_headers
    from services.launcher import Stack, free_base_port, plan, service_environment

    port = free_base_port(HOST)
    env = {**service_environment(artifacts, HOST, port), **BENCH_ENV, **extra_env}
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack()
    try:
        for service in plan(port):
            stack.start(service, HOST, artifacts, env, logs)
        stack.wait_ready(HOST, logs, timeout_s=READY_TIMEOUT_S)
        urls = {service.name: f"http://{HOST}:{service.port}" for service in plan(port)}
        yield RunningStack(urls, internal_auth_headers(env.get("MMEDRAG_INTERNAL_TOKEN")))
    finally:
        stack.stop()


def batch_counters(url: str) -> tuple[float, float] | None:
    """(batches, items) summed over a service's batchers, from its ``/metrics``; None if not exported."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != "mmedrag_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count, found = count + sample.value, True
            elif sample.name.endswith("_sum"):
                total += sample.value
    return (count, total) if found else None


# ------------------------------------------------------------------------------------------ clients


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class Run:
    """One closed-loop run: client latencies (ms) and results of the successes, errors, wall time (s)."""

    latencies: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def add(self, other: Run) -> None:
        self.latencies += other.latencies
        self.results += other.results
        self.errors += other.errors
        self.seconds += other.seconds

    def summary(self, rate_name: str) -> dict[str, Any]:
        return {
            "requests": len(self.latencies) + self.errors,
            "errors": self.errors,
            rate_name: len(self.latencies) / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(self.latencies, 50),
            "p95_ms": percentile(self.latencies, 95),
            "p99_ms": percentile(self.latencies, 99),
        }


async def closed_loop(concurrency: int, total: int, one: Any) -> Run:
    """``concurrency`` clients send ``total`` requests (``await one(i)``), each waiting for its answer."""
    next_index = iter(range(total))
    run = Run()

    async def client() -> None:
        for i in next_index:
            started = time.perf_counter()
            try:
                result = await one(i)
            except (httpx.HTTPError, AssertionError) as exc:
                run.errors += 1
                if run.errors <= 3:
                    emit(f"  error: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            run.latencies.append((time.perf_counter() - started) * 1000)
            run.results.append(result)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


def requests_for(concurrency: int, scale: float) -> int:
    """Requests per half-run (each level runs twice per mode): enough for a p99 at high concurrency."""
    return max(8, round(max(16, 2 * concurrency) * scale))


async def vqa_run(stack: RunningStack, items: Sequence[Item], concurrency: int, total: int) -> Run:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(
        base_url=stack.urls["router"], timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:

        async def one(i: int) -> dict[str, float]:
            item = items[i % len(items)]
            response = await client.post(
                "/vqa", files={"image": (item.filename, item.upload)}, data={"question": item.question}
            )
            assert response.status_code == 200, f"{response.status_code} {response.text[:200]}"
            return response.json()["timings_ms"]

        return await closed_loop(concurrency, total, one)


async def services_run(stack: RunningStack, items: Sequence[Item], concurrency: int, total: int) -> Run:
    """Classifier then retriever, as the router calls them, for one normalised image per request."""
    urls = stack.urls
    limits = httpx.Limits(max_connections=2 * concurrency + 4, max_keepalive_connections=2 * concurrency + 4)
    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT_S, limits=limits, headers=stack.internal_headers
    ) as client:

        async def one(i: int) -> None:
            item = items[i % len(items)]
            files = {"image": ("image.png", item.normalised, "image/png")}
            classified = await client.post(f"{urls['classifier']}/classify", files=files)
            assert classified.status_code == 200, classified.text[:200]
            retrieved = await client.post(
                f"{urls['retriever']}/retrieve",
                files=files,
                data={"domain": classified.json()["label"], "k_max": "10", "strategy": "adaptive"},
            )
            assert retrieved.status_code == 200, retrieved.text[:200]

        return await closed_loop(concurrency, total, one)


def interleaved(
    stacks: dict[str, RunningStack],
    run: Any,
    level: int,
    total: int,
    counted: Sequence[str],
) -> dict[str, tuple[Run, dict[str, float | None]]]:
    """Each mode twice, in the order on, off, off, on, so that a machine getting busier or quieter
    during the level weighs on both modes alike; pooled per mode, with the mean batch size of each
    service in ``counted`` over the mode's runs."""
    pooled = {mode: Run() for mode in stacks}
    batches: dict[str, dict[str, list[tuple[float, float] | None]]] = {mode: {} for mode in stacks}
    for mode in ("on", "off", "off", "on"):
        stack = stacks[mode]
        before = {name: batch_counters(stack.urls[name]) for name in counted}
        pooled[mode].add(asyncio.run(run(stack, level, total)))
        for name in counted:
            after = batch_counters(stack.urls[name])
            batches[mode].setdefault(name, []).append(
                None
                if before[name] is None or after is None
                else (after[0] - before[name][0], after[1] - before[name][1])
            )
    result = {}
    for mode, runs in pooled.items():
        if runs.errors and not runs.latencies:
            raise SystemExit(f"every request failed (batching {mode}, concurrency {level}); see the logs")
        means: dict[str, float | None] = {}
        for name, deltas in batches[mode].items():
            known = [d for d in deltas if d is not None and d[0] > 0]
            means[name] = sum(d[1] for d in known) / sum(d[0] for d in known) if known else None
        result[mode] = (runs, means)
    return result


def measure(
    stacks: dict[str, RunningStack], items: Sequence[Item], levels: Sequence[int], scale: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """/vqa and classifier + retriever at each level, batching on and off interleaved."""
    for stack in stacks.values():  # warm-up: connections, lazy paths
        asyncio.run(vqa_run(stack, items, 4, 8))
        asyncio.run(services_run(stack, items, 4, 16))
    vqa_rows: list[dict[str, Any]] = []
    service_rows: list[dict[str, Any]] = []
    for level in levels:
        total = requests_for(level, scale)
        measured = interleaved(
            stacks, lambda st, c, n: vqa_run(st, items, c, n), level, total, ("generator",)
        )
        for mode, (runs, means) in measured.items():
            row = {"batching": mode, "concurrency": level, **runs.summary("throughput_rps")}
            for stage in ("decode", "classify", "retrieve", "generate"):
                row[f"{stage}_p50_ms"] = percentile([t[stage] for t in runs.results if stage in t], 50)
            row["generator_mean_batch"] = means["generator"]
            vqa_rows.append(row)
            rate, p50 = row["throughput_rps"], row["p50_ms"]
            emit(f"  /vqa c={level} batching {mode}: {rate:.1f} req/s, p50 {p50:.0f} ms")
    for level in levels:
        total = 2 * requests_for(level, scale)
        measured = interleaved(
            stacks, lambda st, c, n: services_run(st, items, c, n), level, total, ("classifier", "retriever")
        )
        for mode, (runs, means) in measured.items():
            row = {"batching": mode, "concurrency": level, **runs.summary("throughput_pairs_s")}
            row.update({f"{name}_mean_batch": value for name, value in means.items()})
            service_rows.append(row)
            emit(f"  classify+retrieve c={level} batching {mode}: {row['throughput_pairs_s']:.1f} pairs/s")
    return vqa_rows, service_rows


# ------------------------------------------------------------------------------------------ in-process


def model_path(artifacts: Path, items: Sequence[Item], threads: int = 16, per_thread: int = 40) -> list[dict]:
    """The classifier and a retriever tower behind their batchers, no HTTP: ``threads`` callers at once."""
    import torch

    from services.classifier.service import DomainClassifier
    from services.common.batching import ImageBatcher
    from services.common.clip import ClipModel
    from services.common.images import decode_image

    torch.set_num_threads(1)  # as each service runs under the launcher
    images = [decode_image(item.normalised).image for item in items]
    encoder = ClipModel.load(artifacts / "retrievers" / "radiology", root=artifacts)
    rows = []
    for mode, max_batch in (("on", 16), ("off", 1)):
        classifier = DomainClassifier(max_batch=max_batch)
        classifier.load(artifacts)
        retriever = ImageBatcher(encoder.encode_images, max_batch=max_batch, name="radiology")

        def caller(index: int, classifier=classifier, retriever=retriever) -> None:
            for i in range(per_thread):
                image = images[(index + i) % len(images)]
                classifier.classify([image])
                retriever.submit_blocking([image])

        workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - started
        classifier.batcher.close()
        retriever.close()
        rows.append({"batching": mode, "callers": threads, "pairs_per_s": threads * per_thread / seconds})
    return rows


# ------------------------------------------------------------------------------------------ main


def add_details(json_path: Path, details: dict[str, Any]) -> None:
    """Every measured row, next to the headline rows ``write_results`` stored."""
    document = json.loads(json_path.read_text(encoding="utf-8"))
    document["details"] = details
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, help="Use this artifacts folder instead of building one.")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="Where results are written.")
    parser.add_argument(
        "--levels", default=",".join(map(str, LEVELS)), help="Concurrency levels, comma-separated."
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="Multiply the number of requests per level (0.25: quick)."
    )
    args = parser.parse_args(argv)
    args.levels = tuple(int(v) for v in args.levels.split(","))
    if TARGET_LEVEL not in args.levels:
        parser.error(f"--levels must include {TARGET_LEVEL} (the target is measured there)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="mmedrag-bench-") as scratch:
        artifacts = args.artifacts or build_artifacts(Path(scratch) / "artifacts")
        items = load_items(artifacts)
        # Both stacks run side by side (each on its own copy: the embedded store admits one process),
        # so the two modes can be measured alternately.
        copy = Path(scratch) / "artifacts-unbatched"
        shutil.copytree(artifacts, copy)
        logs = Path(scratch) / "logs"
        emit("starting two stacks: batching on (defaults) and off ...")
        with (
            running_stack(artifacts, logs / "on", {}) as batched,
            running_stack(copy, logs / "off", UNBATCHED_ENV) as unbatched,
        ):
            vqa_rows, service_rows = measure(
                {"on": batched, "off": unbatched}, items, args.levels, args.scale
            )
        emit("model path in-process ...")
        model_rows = model_path(artifacts, items)

    def at(rows: list[dict], mode: str, key: str) -> float:
        return next(r[key] for r in rows if r["batching"] == mode and r["concurrency"] == TARGET_LEVEL)

    services_ratio = at(service_rows, "on", "throughput_pairs_s") / at(
        service_rows, "off", "throughput_pairs_s"
    )
    vqa_ratio = at(vqa_rows, "on", "throughput_rps") / at(vqa_rows, "off", "throughput_rps")
    model_ratio = model_rows[0]["pairs_per_s"] / model_rows[1]["pairs_per_s"]
    targets = [
        {
            "goal": f"classifier + retriever throughput at {TARGET_LEVEL} clients, batching on / off",
            "measured": round(services_ratio, 2),
            "target": f">= {SERVICES_TARGET:g}x",
            "result": "PASS" if services_ratio >= SERVICES_TARGET else "FAIL",
        },
        {
            "goal": f"/vqa throughput at {TARGET_LEVEL} clients, batching on / off",
            "measured": round(vqa_ratio, 2),
            "target": "(no target)",
            "result": "",
        },
        {
            "goal": "classifier + retriever model path in-process (16 threads), on / off",
            "measured": round(model_ratio, 2),
            "target": "(no target)",
            "result": "",
        },
    ]
    vqa_columns = [
        "batching",
        "concurrency",
        "requests",
        "errors",
        "throughput_rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "decode_p50_ms",
        "classify_p50_ms",
        "retrieve_p50_ms",
        "generate_p50_ms",
        "generator_mean_batch",
    ]
    tables = [
        ("/vqa through the router", markdown_table(vqa_rows, vqa_columns)),
        ("classifier + retriever over HTTP (as the router calls them)", markdown_table(service_rows)),
        ("model path in-process (no HTTP)", markdown_table(model_rows)),
        ("targets", markdown_table(targets)),
    ]
    for title, table in tables:
        emit(f"\n{title}\n\n{table}")
    json_path, md_path = write_results(
        "serve",
        targets,  # the headline; the tables follow in the markdown, every row is in the JSON
        args.out,
        meta={"levels": list(args.levels), "scale": args.scale, "unbatched": UNBATCHED_ENV},
        notes=[f"## {title}\n\n{table}\n" for title, table in tables[:-1]],
    )
    add_details(json_path, {"vqa": vqa_rows, "services": service_rows, "model_path": model_rows})
    emit(f"\nresults: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
