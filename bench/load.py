"""A bounded load run against the stack: N concurrent clients for M seconds, then a report.

    python bench/load.py --clients 16 --seconds 300 [--url URL | --artifacts DIR] [--out bench/results]

Without ``--url`` the script starts the embedded stack itself (the four services as local processes on
loopback, exactly as ``mmedrag up`` does) on tiny artifacts it builds into a temporary folder (or on
``--artifacts DIR``), with authentication on and a key generated for the run, and stops it at the end.
With ``--url`` it loads a stack that is already running (``--api-key`` if it needs one).

Each client is a loop on its own connection: it posts a MedSynth image with one of its questions to
``/vqa`` (a share of ``/report`` requests with ``--report-share``), waits for the answer, and posts the
next, until the time is up; requests still running then may finish within ``--timeout``. The run always
ends by itself.

Reported: throughput (answered requests per second, and 200s per second), latency p50/p95/p99 of the
successful requests once warmed up (after ``--warmup`` of the run), error counts by status and error
code, and the resident memory (RSS) of each service process, sampled every second: after warm-up against
the end of the run, as growth in percent (a leak shows as steady growth over a long run, not as the
first allocations). With ``--url``, RSS is measured for local processes started as
``python -m services.<name>``; for a remote stack those columns stay empty.

Results go to ``<out>/load.json`` (everything, the RSS samples included) and ``<out>/load.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # a sibling module (bench/ is not a package)
from _workload import medsynth_vqa_samples

HOST = "127.0.0.1"
SERVICES = ("router", "classifier", "retriever", "generator")
IMAGES_PER_DOMAIN = 8
READY_TIMEOUT_S = 300.0


def emit(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Item:
    """One request's payload: a MedSynth image, its domain and a yes/no question about it."""

    image: bytes
    filename: str
    domain: str
    question: str


def load_items(medsynth: Path, per_domain: int = IMAGES_PER_DOMAIN) -> list[Item]:
    """Test-split VQA items of each domain, through the project's own loaders (one question per image)."""
    return [
        Item(sample.image.read_bytes(), sample.image.name, sample.domain, sample.question)
        for sample in medsynth_vqa_samples(medsynth, per_domain)
    ]


def medsynth_folder(artifacts: Path | None, scratch: Path) -> Path:
    """The MedSynth data shipped in the artifacts folder, or a small set synthesised for the run."""
    if artifacts is not None and (artifacts / "medsynth" / "radiology" / "test_vqa.jsonl").is_file():
        return artifacts / "medsynth"
    from training.data.medsynth.generate import SynthConfig, synthesize

    out = scratch / "medsynth"
    emit(f"synthesising MedSynth images for the run into {out} ...")
    synthesize(SynthConfig(out=out, seed=0, per_domain=IMAGES_PER_DOMAIN * 4, image_size=224), progress=False)
    return out


# ------------------------------------------------------------------------------------------ the stack


@dataclass
class LocalStack:
    """The embedded stack started by this script (``services.launcher``), and the key to call it with."""

    url: str
    api_key: str | None
    pids: dict[str, int]
    stop: Any


def start_stack(artifacts: Path, logs: Path, *, auth: bool) -> LocalStack:
    from services.launcher import Stack, free_base_port, plan, service_environment
    from services.router.auth import hash_key, new_key

    port = free_base_port(HOST)
    env = service_environment(artifacts, HOST, port)
    key = new_key() if auth else None
    if key is not None:
        env["MMEDRAG_ROUTER_AUTH_ENABLED"] = "true"
        env["MMEDRAG_ROUTER_API_KEYS"] = f"load:{hash_key(key)}"
    else:
        env["MMEDRAG_ROUTER_AUTH_ENABLED"] = "false"
    stack = Stack()
    try:
        for service in plan(port):
            stack.start(service, HOST, artifacts, env, logs)
        stack.wait_ready(HOST, logs, timeout_s=READY_TIMEOUT_S)
    except BaseException:
        stack.stop()
        raise
    pids = {service.name: child.pid for service, child, _ in stack.children}
    return LocalStack(f"http://{HOST}:{port}", key, pids, stack.stop)


def find_service_pids(url: str) -> dict[str, int]:
    """For ``--url`` on this machine: the ``python -m services.<name> --port P`` processes of that stack.

    The launcher's layout is assumed (router on the URL's port, the three services on the next ones).
    """
    port = httpx.URL(url).port or 80
    ports = {str(p) for p in range(port, port + 4)}
    found: dict[str, int] = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        given = cmdline[cmdline.index("--port") + 1] if "--port" in cmdline[:-1] else None
        for name in SERVICES:
            if f"services.{name}" in cmdline and given in ports and name not in found:
                found[name] = process.info["pid"]
    return found


# ------------------------------------------------------------------------------------------ memory


@dataclass
class MemorySampler:
    """Samples each process's RSS once a second in a thread (not starved by the clients' event loop)."""

    pids: dict[str, int]
    interval_s: float = 1.0
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, t0: float) -> None:
        processes = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                processes[name] = psutil.Process(pid)
        self.samples = {name: [] for name in processes}

        def run() -> None:
            while True:
                now = time.monotonic() - t0
                for name, process in processes.items():
                    with contextlib.suppress(psutil.Error):
                        self.samples[name].append((round(now, 2), process.memory_info().rss))
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def rows(self, warm_at_s: float) -> list[dict[str, Any]]:
        rows = []
        for name, samples in self.samples.items():
            if not samples:
                continue
            after = [rss for t, rss in samples if t >= warm_at_s] or [samples[-1][1]]
            warm, end, peak = after[0], samples[-1][1], max(rss for _, rss in samples)
            rows.append(
                {
                    "service": name,
                    "pid": self.pids[name],
                    "rss_start_mib": _mib(samples[0][1]),
                    "rss_warm_mib": _mib(warm),
                    "rss_end_mib": _mib(end),
                    "rss_peak_mib": _mib(peak),
                    "growth_pct": round(100.0 * (end - warm) / warm, 2) if warm else None,
                }
            )
        return rows


def _mib(n: int) -> float:
    return round(n / (1024 * 1024), 1)


# ------------------------------------------------------------------------------------------ clients


@dataclass(frozen=True)
class Outcome:
    route: str
    started_s: float  # since the run began
    latency_ms: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    code: str | None  # the error envelope's code, or the exception's name


async def client_loop(
    index: int,
    base_url: str,
    items: Sequence[Item],
    *,
    headers: dict[str, str],
    t0: float,
    stop_at: float,
    timeout_s: float,
    report_share: float,
    report_max_tokens: int,
    outcomes: list[Outcome],
) -> None:
    """One client: one request at a time on its own connection, until ``stop_at``."""
    rng = random.Random(index)
    order = itertools.cycle(rng.sample(range(len(items)), len(items)))
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as client:
        while time.monotonic() < stop_at:
            item = items[next(order)]
            route = "/report" if rng.random() < report_share else "/vqa"
            form = (
                {"question": item.question}
                if route == "/vqa"
                else {"max_tokens": str(report_max_tokens), "retrieval": "fixed", "k_max": "3"}
            )
            started = time.monotonic()
            status, code = 0, None
            try:
                response = await client.post(route, files={"image": (item.filename, item.image)}, data=form)
                status = response.status_code
                if status != 200:
                    code = _error_code(response)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            outcomes.append(Outcome(route, started - t0, (time.monotonic() - started) * 1000.0, status, code))
            if status == 0:
                await asyncio.sleep(0.2)  # the stack is unreachable: do not spin


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


async def run_clients(
    base_url: str, items: Sequence[Item], args: argparse.Namespace, headers: dict[str, str], t0: float
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    stop_at = t0 + args.seconds
    tasks = [
        asyncio.create_task(
            client_loop(
                i,
                base_url,
                items,
                headers=headers,
                t0=t0,
                stop_at=stop_at,
                timeout_s=args.timeout,
                report_share=args.report_share,
                report_max_tokens=args.report_max_tokens,
                outcomes=outcomes,
            )
        )
        for i in range(args.clients)
    ]
    # Bounded: the last requests get --timeout to finish, then whatever is left is cancelled.
    _, pending = await asyncio.wait(tasks, timeout=args.seconds + args.timeout + 5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return outcomes


# ------------------------------------------------------------------------------------------ report


def _percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    values = np.asarray(latencies, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "p99_ms": round(float(p99), 1),
        "mean_ms": round(float(values.mean()), 1),
    }


def summarise(outcomes: Sequence[Outcome], seconds: float, warm_at_s: float) -> list[dict[str, Any]]:
    """One row per route and one for all: counts, throughput, steady-state latency, errors."""
    rows = []
    routes = sorted({o.route for o in outcomes})
    for route in [*routes, "all"]:
        chosen = [o for o in outcomes if route in ("all", o.route)]
        ok = [o for o in chosen if o.status == 200]
        steady = [o.latency_ms for o in ok if o.started_s >= warm_at_s]
        errors = Counter(o.status for o in chosen if o.status != 200)
        rows.append(
            {
                "route": route,
                "requests": len(chosen),
                "ok": len(ok),
                "errors": sum(errors.values()),
                "req_per_s": round(len(chosen) / seconds, 2),
                "ok_per_s": round(len(ok) / seconds, 2),
                **_percentiles(steady),
                "by_status": ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(errors.items())) or "-",
            }
        )
    return rows


def error_rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    counts = Counter((o.status, o.code) for o in outcomes if o.status != 200)
    return [
        {"status": status or "no answer", "code": code, "count": count}
        for (status, code), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0]))
    ]


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/load.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients (default 16).")
    parser.add_argument("--seconds", type=float, default=300.0, help="Length of the run (default 300).")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="Load a running stack at this router URL instead of starting one.")
    target.add_argument(
        "--artifacts", type=Path, help="Start the stack on this artifacts folder (default: build tiny ones)."
    )
    parser.add_argument("--api-key", help="API key for --url (default: $MMEDRAG_API_KEY).")
    parser.add_argument(
        "--no-auth", action="store_true", help="Start the stack with authentication off (loopback only)."
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="Per-request client timeout, seconds.")
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="Share of the run before 'warm' RSS and latency (0.1)."
    )
    parser.add_argument("--report-share", type=float, default=0.1, help="Share of /report requests (0.1).")
    parser.add_argument("--report-max-tokens", type=int, default=32, help="max_tokens of /report requests.")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="Where load.json/.md go.")
    parser.add_argument("--keep-logs", action="store_true", help="Keep the services' logs (path printed).")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.timeout <= 0:
        parser.error("--clients, --seconds and --timeout must be positive")
    if not 0 <= args.warmup < 1:
        parser.error("--warmup must be in [0, 1)")
    if not 0 <= args.report_share <= 1:
        parser.error("--report-share must be in [0, 1]")
    return args


@contextlib.contextmanager
def scratch_folder(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="mmedrag-load-"))
    try:
        yield folder
    finally:
        if keep:
            emit(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_folder(args.keep_logs) as scratch:
        stack: LocalStack | None = None
        artifacts = args.artifacts.resolve() if args.artifacts else None
        try:
            if args.url:
                base_url, api_key = args.url.rstrip("/"), args.api_key or os.environ.get("MMEDRAG_API_KEY")
                pids = find_service_pids(base_url)
            else:
                if artifacts is None:
                    from training.artifacts.tiny import build_tiny_artifacts

                    artifacts = scratch / "artifacts"
                    emit(f"building tiny artifacts into {artifacts} ...")
                    build_tiny_artifacts(artifacts, seed=0, progress=False)
                logs = scratch / "logs"
                logs.mkdir()
                emit("starting the stack ...")
                stack = start_stack(artifacts, logs, auth=not args.no_auth)
                base_url, api_key, pids = stack.url, stack.api_key, stack.pids
                emit(f"stack ready at {base_url} (auth {'on' if api_key else 'off'}); logs in {logs}")
            items = load_items(medsynth_folder(artifacts, scratch))
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

            emit(f"{args.clients} clients for {args.seconds:g}s against {base_url} ({len(items)} images) ...")
            t0 = time.monotonic()
            sampler = MemorySampler(pids)
            sampler.start(t0)
            try:
                outcomes = asyncio.run(run_clients(base_url, items, args, headers, t0))
            finally:
                sampler.stop()
            elapsed = time.monotonic() - t0
        finally:
            if stack is not None:
                stack.stop()

        warm_at = args.seconds * args.warmup
        rows = summarise(outcomes, args.seconds, warm_at)
        memory = sampler.rows(warm_at)
        errors = error_rows(outcomes)
        notes = [
            f"Latency percentiles: successful requests started after the warm-up ({warm_at:g}s).",
            "",
            "## Errors by status and code",
            "",
            markdown_table(errors) if errors else "none",
            "",
            f"## Resident memory (RSS, MiB): warm = first sample after {warm_at:g}s",
            "",
            markdown_table(memory) if memory else "no local service processes found",
        ]
        meta = {
            "url": base_url,
            "clients": args.clients,
            "seconds": args.seconds,
            "elapsed_s": round(elapsed, 1),
            "images": len(items),
            "report_share": args.report_share,
            "auth": bool(api_key),
        }
        json_path, md_path = write_results("load", rows, args.out, meta=meta, notes=notes)
        # The detail (RSS every second) goes to the JSON only, not into the markdown's meta line.
        document = json.loads(json_path.read_text(encoding="utf-8"))
        document.update(memory=memory, errors=errors, rss_samples=sampler.samples)
        json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    emit()
    emit(markdown_table(rows))
    emit()
    emit("\n".join(notes))
    emit()
    emit(f"wrote {json_path} and {md_path}")
    return 0 if any(o.status == 200 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
