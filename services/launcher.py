"""``mmedrag up``: the embedded default — the four services as local processes on loopback.

Each service runs as its own process (``python -m services.<name>``), exactly as in a deployment, with
its log in ``<log_dir>/<name>.log``. The launcher waits until every service is ready, prints how to call
the router, and stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from services.common.artifacts import MANIFEST, ArtifactError

READY_TIMEOUT_S = 180.0
INTERNAL_TOKEN_FILE = "internal-token"  # in the log folder, mode 0600


@dataclass(frozen=True)
class ServiceProcess:
    name: str
    port: int
    ready_path: str


def _ephemeral_floor() -> int:
    """The first port the kernel hands out to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port(host: str = "127.0.0.1") -> int:
    """A port p such that p..p+3 are all free on ``host``: room for ``plan(p)`` (tests and benchmarks that
    start a stack of their own). Drawn below the ephemeral range, so that an outgoing connection opened in
    the meantime cannot take it before the services bind it."""
    import random
    import socket

    floor = _ephemeral_floor()
    low, high = (10000, floor - 4) if floor - 4 > 10000 else (floor, 65531)
    for _ in range(200):
        base = random.randint(low, high)
        sockets: list[socket.socket] = []
        try:
            for offset in range(4):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no four consecutive free ports on {host}")


def plan(port: int) -> list[ServiceProcess]:
    """Internal services on the ports after the router's; the generator answers vLLM's /health."""
    return [
        ServiceProcess("classifier", port + 1, "/readyz"),
        ServiceProcess("retriever", port + 2, "/readyz"),
        ServiceProcess("generator", port + 3, "/health"),
        ServiceProcess("router", port, "/readyz"),
    ]


def service_environment(
    artifacts: Path, host: str, port: int, log_format: str | None = None
) -> dict[str, str]:
    """Environment every child gets: the artifacts folder, where the router finds the others, a fresh
    internal token (unless the operator set one) and the log format."""
    env = dict(os.environ)
    env["MMEDRAG_ARTIFACTS"] = str(artifacts)
    # One random secret per run, shared by the four processes only: the internal services refuse calls
    # that do not carry it, so other local users and programs cannot call them past the router.
    if not env.get("MMEDRAG_INTERNAL_TOKEN"):
        env["MMEDRAG_INTERNAL_TOKEN"] = secrets.token_urlsafe(32)
    if log_format is not None:
        env["MMEDRAG_LOG_FORMAT"] = log_format
    env.setdefault("MMEDRAG_LOG_FORMAT", "json")
    env["MMEDRAG_ROUTER_CLASSIFIER_URL"] = f"http://{host}:{port + 1}"
    env["MMEDRAG_ROUTER_RETRIEVER_URL"] = f"http://{host}:{port + 2}"
    env["MMEDRAG_ROUTER_GENERATOR_URL"] = f"http://{host}:{port + 3}/v1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if is_loopback(host):
        # The embedded default runs open on loopback (and says so); anywhere else keys are required.
        env.setdefault("MMEDRAG_ROUTER_AUTH_ENABLED", "false")
    # Four processes share a laptop-class CPU: one torch thread each is much faster for small models than
    # torch's default of one thread per core in every process (measured ~40x for the tiny generator).
    for service in ("CLASSIFIER", "RETRIEVER", "GENERATOR"):
        env.setdefault(f"MMEDRAG_{service}_TORCH_THREADS", "1")
    return env


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def auth_notice(env: dict[str, str], host: str) -> str:
    enabled = env.get("MMEDRAG_ROUTER_AUTH_ENABLED", "true").lower() not in {"false", "0", "no", "off"}
    if enabled:
        return "  auth:     API key required (Authorization: Bearer <key>)"
    return f"  auth:     OFF — open to anyone who can reach {host} (loopback only by default)"


def curl_example(artifacts: Path, base_url: str) -> str:
    """A ready-to-paste request with an example image shipped in the artifacts folder."""
    examples_file = artifacts / "examples" / "examples.json"
    if examples_file.is_file():
        example = json.loads(examples_file.read_text())["radiology"]
        image, question = artifacts / example["image"], example["question"]
    else:
        image, question = Path("path/to/chest.png"), "Is there a pleural effusion?"
    return f"curl -s -F image=@{image} -F 'question={question}' {base_url}/vqa"


class Stack:
    """The running children; ``stop`` terminates them all (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self) -> None:
        self.children: list[tuple[ServiceProcess, subprocess.Popen, TextIO]] = []

    def start(
        self, service: ServiceProcess, host: str, artifacts: Path, env: dict[str, str], log_dir: Path
    ) -> None:
        log = (log_dir / f"{service.name}.log").open("a", encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            f"services.{service.name}",
            "--host",
            host,
            "--port",
            str(service.port),
            "--artifacts",
            str(artifacts),
        ]
        child = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children.append((service, child, log))

    def wait_ready(self, host: str, log_dir: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        for service, child, _ in self.children:
            url = f"http://{host}:{service.port}{service.ready_path}"
            while True:
                if child.poll() is not None:
                    tail = _tail(log_dir / f"{service.name}.log")
                    raise RuntimeError(
                        f"{service.name} exited with status {child.returncode}; its log ends:\n{tail}"
                    )
                try:
                    if httpx.get(url, timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{service.name} not ready after {timeout_s:.0f}s; see {log_dir / service.name}.log"
                    )
                time.sleep(0.25)

    def stop(self, grace_s: float = 10.0) -> None:
        for _, child, _ in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, child, log in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            log.close()


def _tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run_stack(
    artifacts: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_dir: Path = Path("logs"),
    log_format: str | None = None,
) -> int:
    """Start, wait, print, and block until a signal; returns the exit status.

    ``log_format``: "json" (default) or "text" for every service's log; unset keeps MMEDRAG_LOG_FORMAT.
    """
    artifacts = artifacts.resolve()
    if not (artifacts / MANIFEST).is_file():
        raise ArtifactError(artifacts / MANIFEST, "no artifacts manifest", root=artifacts)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = service_environment(artifacts, host, port, log_format)
    # Tools that call the internal services directly (``mmedrag pairs --backend http``) read it from here.
    token_file = log_dir / INTERNAL_TOKEN_FILE
    token_file.write_text(env["MMEDRAG_INTERNAL_TOKEN"] + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    stack = Stack()

    def _stop_on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        for service in plan(port):
            stack.start(service, host, artifacts, env, log_dir)
        stack.wait_ready(host, log_dir)
        base_url = f"http://{host}:{port}"
        print(f"MMed-RAG Serve is ready at {base_url}", flush=True)
        print(f"  API docs: {base_url}/docs", flush=True)
        print(f"  logs:     {log_dir.resolve()}/<service>.log", flush=True)
        print(f"  internal: token in {token_file.resolve()} (MMEDRAG_INTERNAL_TOKEN)", flush=True)
        print(auth_notice(env, host), flush=True)
        print(f"  try:      {curl_example(artifacts, base_url)}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            for service, child, _ in stack.children:
                if child.poll() is not None:
                    print(
                        f"{service.name} stopped unexpectedly (status {child.returncode}); stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping…", flush=True)
        return 0
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
