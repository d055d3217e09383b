"""What the router's grounding check costs: ``/vqa`` with ``grounding_check`` off vs on, in one run.

    python bench/grounding.py [--artifacts DIR] [--levels 1,4] [--scale 2] [--out bench/results]

Builds tiny artifacts into a temporary folder (``mmedrag artifacts tiny``; ``--artifacts`` reuses one) and
starts the embedded stack on loopback with its default settings (``services.launcher``, as ``bench/serve.py``
does, whose helpers this script uses). With ``grounding_check=true`` the router answers the question three
times (the image with its retrieved reports, a noise image with the same prompt, the image without the
reports) and sends the three generations at once, so the generator can batch them
(``services.router.service.RAGPipeline._with_grounding``); the other stages run once either way.

At each concurrency level (closed loop: every client sends its next request when the last is answered)
the two modes are measured alternately (off, on, on, off; pooled per mode), so a machine that gets busier
or quieter during the run weighs on both alike. Columns: throughput, client latency p50/p95/p99, the
median of each stage the router reports (``timings_ms``), and the generator's mean batch size from its
``/metrics``. The ratios table divides "on" by "off": latency p50, generate-stage p50, throughput.
Expected: the generate stage about 1-3x (three generations, batched), the other stages unchanged.

Results go to ``<out>/grounding.json`` and ``<out>/grounding.md``. No target: the figures size the option.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # sibling modules (bench/ is not a package)
from serve import (
    REQUEST_TIMEOUT_S,
    Item,
    Run,
    RunningStack,
    add_details,
    batch_counters,
    build_artifacts,
    closed_loop,
    emit,
    load_items,
    percentile,
    requests_for,
    running_stack,
)

LEVELS = (1, 4)
STAGES = ("decode", "classify", "retrieve", "generate")
MODES = {"off": "false", "on": "true"}


async def vqa_run(
    stack: RunningStack,
    items: Sequence[Item],
    concurrency: int,
    total: int,
    grounding: str,
    max_tokens: int | None,
) -> Run:
    """``total`` /vqa requests from ``concurrency`` clients; each result is the response's stage timings."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    form = {"grounding_check": grounding}
    if max_tokens is not None:
        form["max_tokens"] = str(max_tokens)
    async with httpx.AsyncClient(
        base_url=stack.urls["router"], timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:

        async def one(i: int) -> dict[str, float]:
            item = items[i % len(items)]
            response = await client.post(
                "/vqa",
                files={"image": (item.filename, item.upload)},
                data={"question": item.question, **form},
            )
            assert response.status_code == 200, f"{response.status_code} {response.text[:200]}"
            body = response.json()
            assert (body["grounding"] is not None) == (grounding == "true"), (
                "grounding block missing or extra"
            )
            return body["timings_ms"]

        return await closed_loop(concurrency, total, one)


def measure(
    stack: RunningStack, items: Sequence[Item], levels: Sequence[int], scale: float, max_tokens: int | None
) -> list[dict[str, Any]]:
    """Both modes at each level, alternating (off, on, on, off), pooled per mode."""
    for grounding in MODES.values():  # warm-up: connections, lazy paths, the noise image code
        asyncio.run(vqa_run(stack, items, 4, 8, grounding, max_tokens))
    rows: list[dict[str, Any]] = []
    for level in levels:
        total = requests_for(level, scale)
        pooled = {mode: Run() for mode in MODES}
        batches: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        for mode in ("off", "on", "on", "off"):
            before = batch_counters(stack.urls["generator"])
            pooled[mode].add(asyncio.run(vqa_run(stack, items, level, total, MODES[mode], max_tokens)))
            after = batch_counters(stack.urls["generator"])
            if before is not None and after is not None:
                batches[mode].append((after[0] - before[0], after[1] - before[1]))
        for mode, run in pooled.items():
            if run.errors and not run.latencies:
                raise SystemExit(
                    f"every request failed (grounding {mode}, concurrency {level}); see the logs"
                )
            row = {"grounding_check": mode, "concurrency": level, **run.summary("throughput_rps")}
            for stage in STAGES:
                row[f"{stage}_p50_ms"] = percentile([t[stage] for t in run.results if stage in t], 50)
            counted = [b for b in batches[mode] if b[0] > 0]
            row["generator_mean_batch"] = (
                sum(b[1] for b in counted) / sum(b[0] for b in counted) if counted else None
            )
            rows.append(row)
            emit(
                f"  c={level} grounding {mode}: {row['throughput_rps']:.1f} req/s, "
                f"p50 {row['p50_ms']:.0f} ms, generate p50 {row['generate_p50_ms']:.0f} ms"
            )
    return rows


def ratios(rows: Sequence[dict[str, Any]], levels: Sequence[int]) -> list[dict[str, Any]]:
    """On / off at each level."""
    out = []
    for level in levels:
        on, off = (
            next(r for r in rows if r["concurrency"] == level and r["grounding_check"] == mode)
            for mode in ("on", "off")
        )
        out.append(
            {
                "concurrency": level,
                "latency_p50_on_vs_off": on["p50_ms"] / off["p50_ms"],
                "latency_p95_on_vs_off": on["p95_ms"] / off["p95_ms"],
                "generate_p50_on_vs_off": on["generate_p50_ms"] / off["generate_p50_ms"],
                "throughput_on_vs_off": on["throughput_rps"] / off["throughput_rps"],
                "extra_ms_p50": on["p50_ms"] - off["p50_ms"],
            }
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, help="Use this artifacts folder instead of building one.")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="Where results are written.")
    parser.add_argument(
        "--levels", default=",".join(map(str, LEVELS)), help="Concurrency levels, comma-separated."
    )
    parser.add_argument(
        "--scale", type=float, default=2.0, help="Multiply the number of requests per level (1: 16 per half)."
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="max_tokens of each /vqa (default: the router's)."
    )
    args = parser.parse_args(argv)
    args.levels = tuple(int(v) for v in args.levels.split(","))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="mmedrag-bench-") as scratch:
        artifacts = args.artifacts or build_artifacts(Path(scratch) / "artifacts")
        items = load_items(artifacts)
        emit("starting the stack ...")
        with running_stack(artifacts, Path(scratch) / "logs", {}) as stack:
            rows = measure(stack, items, args.levels, args.scale, args.max_tokens)

    ratio_rows = ratios(rows, args.levels)
    columns = [
        "grounding_check",
        "concurrency",
        "requests",
        "errors",
        "throughput_rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        *(f"{stage}_p50_ms" for stage in STAGES),
        "generator_mean_batch",
    ]
    tables = [
        ("/vqa, grounding_check off vs on", markdown_table(rows, columns)),
        ("on / off", markdown_table(ratio_rows)),
    ]
    for title, table in tables:
        emit(f"\n{title}\n\n{table}")
    json_path, md_path = write_results(
        "grounding",
        ratio_rows,  # the headline; the full table follows in the markdown, every row is in the JSON
        args.out,
        meta={"levels": list(args.levels), "scale": args.scale, "max_tokens": args.max_tokens or "default"},
        notes=[f"## {tables[0][0]}\n\n{tables[0][1]}\n"],
    )
    add_details(json_path, {"rows": rows})
    emit(f"\nresults: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
