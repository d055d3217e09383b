"""What the router itself costs per request, and what decoding an upload once saves.

    python bench/orchestration.py [--artifacts DIR] [--requests 100] [--out bench/results]

Builds tiny artifacts into a temporary folder (``mmedrag artifacts tiny``; ``--artifacts`` reuses one),
starts the embedded stack on loopback (``services.launcher``, default settings) and measures:

1. Router overhead: ``--requests`` sequential ``/vqa`` calls (one client, so nothing queues), each as
   end-to-end time seen by the client minus the sum of the stage times the router reports (decode,
   classify, retrieve, generate). What is left is the router's own work and the HTTP hop to it: form
   parsing, validation, auth and limits, prompt building, the JSON answer. For scale: a bare HTTP round
   trip to the router (``GET /healthz``), and the router's server-side mean from its ``/metrics``.
2. Decode once, on a 10 MB-class upload (a 12-bit radiograph-like image in a 16-bit PNG, about
   3072x2458): before, the router re-encoded the full-size decoded image and sent it to the classifier,
   the retriever and the generator; now it sends one normalised PNG (longest side 512). Measured: the
   router's preparation time, the bytes sent downstream, and each dependency's answer time, for both
   images, against the running services; then ``/vqa`` end to end with that upload.

Target (p50 of one run): router overhead <= 5 ms per request. Results go to ``<out>/orchestration.json``
and ``<out>/orchestration.md``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # sibling modules (bench/ is not a package)
from serve import (
    Item,
    RunningStack,
    add_details,
    build_artifacts,
    emit,
    load_items,
    percentile,
    running_stack,
)

STAGES = ("decode", "classify", "retrieve", "generate")
OVERHEAD_TARGET_MS = 5.0
MAX_TOKENS = "4"  # the generator's time is a stage; short answers keep the run quick
BIG_SIZE = (3072, 2458)
REPEATS = 3


# ------------------------------------------------------------------------------------------ overhead


def router_vqa_seconds(router: str) -> tuple[float, float]:
    """(count, sum) of the router's own latency histogram for ``/vqa``."""
    text = httpx.get(f"{router}/metrics", timeout=10).text
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "mmedrag_http_request_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("route") != "/vqa":
                continue
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total


def measure_overhead(router: str, items: Sequence[Item], requests: int) -> list[dict[str, Any]]:
    e2e: list[float] = []
    overhead: list[float] = []
    in_pipeline: list[float] = []
    stages: list[float] = []
    with httpx.Client(base_url=router, timeout=120) as client:
        for i in range(5):  # warm-up: connections, lazy paths
            item = items[i % len(items)]
            client.post(
                "/vqa", files={"image": (item.filename, item.upload)}, data={"question": item.question}
            )
        before = router_vqa_seconds(router)
        for i in range(requests):
            item = items[i % len(items)]
            started = time.perf_counter()
            response = client.post(
                "/vqa",
                files={"image": (item.filename, item.upload)},
                data={"question": item.question, "max_tokens": MAX_TOKENS},
            )
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise SystemExit(f"/vqa answered {response.status_code}: {response.text[:300]}")
            timings = response.json()["timings_ms"]
            staged = sum(timings[stage] for stage in STAGES)
            e2e.append(elapsed)
            stages.append(staged)
            overhead.append(elapsed - staged)
            in_pipeline.append(timings["total"] - staged)
        after = router_vqa_seconds(router)
        floor = []
        for _ in range(requests):
            started = time.perf_counter()
            client.get("/healthz")
            floor.append((time.perf_counter() - started) * 1000)
    server_mean = (after[1] - before[1]) / max(after[0] - before[0], 1) * 1000

    def row(what: str, values: Sequence[float] | None, mean: float | None = None) -> dict[str, Any]:
        return {
            "measure": what,
            "p50_ms": percentile(values, 50) if values else None,
            "p95_ms": percentile(values, 95) if values else None,
            "mean_ms": statistics.fmean(values) if values else mean,
        }

    return [
        row("end to end (client)", e2e),
        row("sum of stages (decode+classify+retrieve+generate)", stages),
        row("router overhead = end to end - stages", overhead),
        row("  of which inside the pipeline, between stages", in_pipeline),
        row("  for scale: bare HTTP round trip (GET /healthz)", floor),
        row(
            "  for scale: router's own latency - stages (server side, /metrics)",
            None,
            server_mean - statistics.fmean(stages),
        ),
    ]


# ------------------------------------------------------------------------------------------ decode once


def big_upload(artifacts: Path) -> bytes:
    """A 10 MB-class upload: a MedSynth radiograph enlarged to ~7.5 MP, 12-bit with detector-like noise,
    stored as a 16-bit greyscale PNG."""
    source = Image.open(artifacts / "examples" / "radiology.png").convert("L")
    large = np.asarray(source.resize(BIG_SIZE, Image.Resampling.BICUBIC), dtype=np.float64) * (4095 / 255)
    noisy = large + np.random.default_rng(0).normal(0.0, 40.0, large.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 4095).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def median_ms(call: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def downstream_ms(stack: RunningStack, png: bytes, client: httpx.Client) -> dict[str, float]:
    """Each dependency's answer time for one image, called as the router calls it."""
    from services.common.images import to_data_url
    from services.common.prompts import build_chat_messages, build_prompt

    urls, files = stack.urls, {"image": ("image.png", png, "image/png")}

    def ok(response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            raise SystemExit(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")
        return response

    classify, _ = median_ms(lambda: ok(client.post(f"{urls['classifier']}/classify", files=files)))
    form = {"domain": "radiology", "k_max": "10", "strategy": "adaptive"}
    retrieve, _ = median_ms(lambda: ok(client.post(f"{urls['retriever']}/retrieve", files=files, data=form)))
    body = {
        "model": "mmedrag-llava",
        "messages": build_chat_messages(
            build_prompt("vqa", "radiology", [], "Is there an effusion?"), to_data_url(png)
        ),
        "max_tokens": int(MAX_TOKENS),
        "temperature": 0,
    }
    generate, _ = median_ms(lambda: ok(client.post(f"{urls['generator']}/v1/chat/completions", json=body)))
    return {"classify_ms": classify, "retrieve_ms": retrieve, "generate_ms": generate}


def measure_decode_once(stack: RunningStack, artifacts: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from services.common.images import decode_image, encode_png, normalise, to_data_url

    upload = big_upload(artifacts)
    decode, decoded = median_ms(lambda: decode_image(upload))
    encode_full, full = median_ms(lambda: encode_png(decoded.image))
    encode_small, small = median_ms(lambda: normalise(decoded.image))
    rows = []
    with httpx.Client(timeout=300, headers=stack.internal_headers) as client:
        for path, png, prepare in (
            ("before: full-size PNG to each service", full, encode_full),
            ("after: one normalised PNG (decode once)", small, encode_small),
        ):
            image = Image.open(io.BytesIO(png))
            sent = 2 * len(png) + len(to_data_url(png))  # classifier, retriever, generator (base64)
            times = downstream_ms(stack, png, client)
            rows.append(
                {
                    "path": path,
                    "image_sent": f"{image.width}x{image.height} {image.mode}",
                    "router_prepare_ms": decode + prepare,
                    "bytes_downstream": sent,
                    **times,
                    "total_ms": decode + prepare + sum(times.values()),
                }
            )
    before, after = rows
    rows.append(
        {
            "path": "saved per request",
            "router_prepare_ms": before["router_prepare_ms"] - after["router_prepare_ms"],
            "bytes_downstream": before["bytes_downstream"] - after["bytes_downstream"],
            **{k: before[k] - after[k] for k in ("classify_ms", "retrieve_ms", "generate_ms", "total_ms")},
        }
    )
    with httpx.Client(base_url=stack.urls["router"], timeout=300) as client:
        files = {"image": ("radiograph.png", upload, "image/png")}
        data = {"question": "Is there a pleural effusion?", "max_tokens": MAX_TOKENS}
        e2e, response = median_ms(lambda: client.post("/vqa", files=files, data=data))
    if response.status_code != 200:
        raise SystemExit(f"/vqa with the large upload answered {response.status_code}: {response.text[:300]}")
    upload_info = {
        "upload_bytes": len(upload),
        "upload_size": f"{BIG_SIZE[0]}x{BIG_SIZE[1]} 16-bit grey PNG",
        "vqa_end_to_end_ms": e2e,
        "vqa_timings_ms": response.json()["timings_ms"],
    }
    return rows, upload_info


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, help="Use this artifacts folder instead of building one.")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="Where results are written.")
    parser.add_argument("--requests", type=int, default=100, help="Sequential /vqa requests measured.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmedrag-bench-") as scratch:
        artifacts = args.artifacts or build_artifacts(Path(scratch) / "artifacts")
        items = load_items(artifacts)
        emit("starting the stack ...")
        with running_stack(artifacts, Path(scratch) / "logs", {}) as stack:
            emit(f"router overhead over {args.requests} sequential /vqa requests ...")
            overhead_rows = measure_overhead(stack.urls["router"], items, args.requests)
            emit("decode once on a 10 MB-class upload ...")
            decode_rows, upload_info = measure_decode_once(stack, artifacts)

    overhead_p50 = overhead_rows[2]["p50_ms"]
    saved = decode_rows[-1]
    targets = [
        {
            "goal": "router orchestration overhead per request (p50)",
            "measured": f"{overhead_p50:.2f} ms",
            "target": f"<= {OVERHEAD_TARGET_MS:g} ms",
            "result": "PASS" if overhead_p50 <= OVERHEAD_TARGET_MS else "FAIL",
        },
        {
            "goal": f"decode once, {upload_info['upload_bytes'] / 1e6:.1f} MB upload: bytes sent downstream",
            "measured": f"{decode_rows[1]['bytes_downstream'] / 1e6:.2f} MB instead of "
            f"{decode_rows[0]['bytes_downstream'] / 1e6:.2f} MB",
            "target": "(no target)",
            "result": "",
        },
        {
            "goal": "decode once: time saved per request (router + the three services)",
            "measured": f"{saved['total_ms']:.0f} ms",
            "target": "(no target)",
            "result": "",
        },
    ]
    large = (
        f"/vqa end to end with that upload now: {upload_info['vqa_end_to_end_ms']:.0f} ms "
        f"(router stages: {upload_info['vqa_timings_ms']})"
    )
    tables = [
        ("router overhead (sequential /vqa, one client)", markdown_table(overhead_rows)),
        (
            f"decode once: {upload_info['upload_size']} upload of {upload_info['upload_bytes'] / 1e6:.1f} MB",
            markdown_table(decode_rows) + "\n\n" + large,
        ),
        ("targets", markdown_table(targets)),
    ]
    for title, table in tables:
        emit(f"\n{title}\n\n{table}")
    json_path, md_path = write_results(
        "orchestration",
        targets,
        args.out,
        meta={"requests": args.requests, "max_tokens": int(MAX_TOKENS)},
        notes=[f"## {title}\n\n{table}\n" for title, table in tables[:-1]],
    )
    add_details(
        json_path, {"overhead": overhead_rows, "decode_once": decode_rows, "large_upload": upload_info}
    )
    emit(f"\nresults: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
