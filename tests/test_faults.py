"""Fault injection on the real stack: four service processes on loopback, tiny artifacts, real HTTP.

Each test breaks one dependency the way production breaks it (a killed process, a frozen process killed
with a request inside it, a generator that answers too slowly, one that is gone) and checks what a client
sees: the status, the error envelope, ``/readyz``, that nothing hangs, and that the router recovers once
the dependency is back. One stack per module; every test first restarts whatever an earlier test left
dead, so each can also run alone (``-k``).

The generator stand-in has no slowness knob, so the slow and missing generator cases use a second router
process pointed at a small OpenAI-compatible server run in this process (``FakeGenerator``), with a
one-second generator deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from image_factories import make_png
from ports import HOST, free_base_port
from router_fakes import FakeStack, build_router

from services.launcher import ServiceProcess, Stack, plan, service_environment

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 240.0
FAKE_MODEL = "fake-llava"
GENERATOR_DEADLINE_S = 1.0
SLOW_GENERATOR_S = 6.0


# ------------------------------------------------------------------------------------------ helpers


def _wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s:.0f}s")


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _rx_queued(port: int) -> bool:
    """True when a TCP socket on ``port`` holds received bytes nobody has read (Linux /proc/net/tcp).

    Elsewhere there is no such view: after a second the request has had ample time to get there.
    """
    table = Path("/proc/net/tcp")
    if not table.is_file():
        time.sleep(1.0)
        return True
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        rx_queue = int(fields[4].split(":")[1], 16)
        if local_port == port and rx_queue > 0:
            return True
    return False


class RunningStack:
    """The launcher's ``Stack`` plus what the tests need: kill one service, bring it back."""

    def __init__(self, artifacts: Path, logs: Path):
        self.artifacts, self.logs = artifacts, logs
        self.port = free_base_port()
        self.url = f"http://{HOST}:{self.port}"
        self.env = service_environment(artifacts, HOST, self.port)
        self.services = {service.name: service for service in plan(self.port)}
        self.stack = Stack()

    def start(self) -> None:
        for service in self.services.values():
            self.stack.start(service, HOST, self.artifacts, self.env, self.logs)
        self.stack.wait_ready(HOST, self.logs, timeout_s=READY_TIMEOUT_S)

    def process(self, name: str) -> subprocess.Popen:
        return [child for service, child, _ in self.stack.children if service.name == name][-1]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        child = self.process(name)
        child.send_signal(sig)
        if sig == signal.SIGKILL:
            child.wait(timeout=30)

    def ensure_up(self) -> None:
        """Restart every service that is not running, then wait until the router says it is ready."""
        for name, service in self.services.items():
            if self.process(name).poll() is not None:
                self.stack.start(service, HOST, self.artifacts, self.env, self.logs)
        for service in self.services.values():
            url = f"http://{HOST}:{service.port}{service.ready_path}"
            _wait_until(lambda url=url: _answers_200(url), READY_TIMEOUT_S, f"{url} ready")

    def stop(self) -> None:
        for _, child, _ in self.stack.children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGCONT)  # a frozen child would ignore SIGTERM until killed
        self.stack.stop()


@pytest.fixture(scope="module")
def stack(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = RunningStack(tiny_artifacts, tmp_path_factory.mktemp("fault-logs"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def example(tiny_artifacts: Path) -> tuple[bytes, str]:
    item = json.loads((tiny_artifacts / "examples" / "examples.json").read_text())["radiology"]
    return (tiny_artifacts / item["image"]).read_bytes(), item["question"]


def _vqa(base_url: str, example: tuple[bytes, str], timeout_s: float = 60.0) -> httpx.Response:
    image, question = example
    return httpx.post(
        f"{base_url}/vqa",
        files={"image": ("chest.png", image, "image/png")},
        data={"question": question},
        timeout=timeout_s,
    )


def _assert_error(response: httpx.Response, status: int, code: str, needle: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert needle.lower() in error["message"].lower(), error
    assert "Traceback" not in response.text


def _readyz(base_url: str) -> httpx.Response:
    return httpx.get(f"{base_url}/readyz", timeout=10.0)


# ------------------------------------------------------------------------------------------ retriever


def test_killed_retriever_gives_503_and_not_ready_then_recovers(
    stack: RunningStack, example: tuple[bytes, str]
) -> None:
    stack.ensure_up()
    assert _vqa(stack.url, example).status_code == 200

    stack.kill("retriever")
    down = _vqa(stack.url, example)
    _assert_error(down, 503, "retrieval_unavailable", "retrieval is unavailable")
    assert "retriever" in down.json()["error"]["message"]
    ready = _readyz(stack.url)
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    dependencies = ready.json()["dependencies"]
    assert dependencies["retriever"] is False
    assert dependencies["classifier"] is True and dependencies["generator"] is True
    assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200, "the router itself stays alive"

    stack.ensure_up()
    _wait_until(lambda: _readyz(stack.url).status_code == 200, 60, "router /readyz 200")
    again = _vqa(stack.url, example)
    assert again.status_code == 200, again.text
    assert again.json()["evidence"], "retrieval is back: evidence again"


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_killed_with_a_request_inside_gives_clean_503(
    stack: RunningStack, example: tuple[bytes, str]
) -> None:
    """Freeze the classifier, let a request reach it, kill it: a prompt 503, not a 500 and not a hang."""
    stack.ensure_up()
    classifier_port = stack.services["classifier"].port
    stack.kill("classifier", signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    def call() -> None:
        started = time.monotonic()
        outcome["response"] = _vqa(stack.url, example, timeout_s=60)
        outcome["seconds"] = time.monotonic() - started

    caller = threading.Thread(target=call)
    caller.start()
    try:
        # The router has sent the upload: it waits, unread, in the frozen classifier's socket.
        _wait_until(lambda: _rx_queued(classifier_port), 20, "request bytes queued at the classifier")
    finally:
        stack.kill("classifier", signal.SIGKILL)
    caller.join(timeout=60)
    assert not caller.is_alive(), "the request hung after the classifier died"

    response = outcome["response"]
    _assert_error(response, 503, "classifier_unavailable", "classifier")
    assert response.headers.get("X-Request-ID")
    assert outcome["seconds"] < 30, "answered by the failure, not by a deadline"
    assert _readyz(stack.url).json()["dependencies"]["classifier"] is False

    # A request that names its domain never needs the classifier: it is served while the classifier is down.
    image, question = example
    by_domain = httpx.post(
        f"{stack.url}/vqa",
        files={"image": ("chest.png", image, "image/png")},
        data={"question": question, "domain": "radiology"},
        timeout=60,
    )
    assert by_domain.status_code == 200, by_domain.text
    assert by_domain.json()["domain"]["source"] == "client"

    stack.ensure_up()
    _wait_until(lambda: _readyz(stack.url).status_code == 200, 60, "router /readyz 200")
    assert _vqa(stack.url, example).status_code == 200


# ------------------------------------------------------------------------------------------ generator


class FakeGenerator:
    """An OpenAI-compatible server that answers after ``delay_s``; can be stopped and started again."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://{HOST}:{port}/v1"
        self.delay_s = 0.0
        self.api_key: str | None = None  # when set, other keys get 401 (vLLM --api-key)
        self.completions = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            card = {"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "tests"}
            return {"object": "list", "data": [card]}

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> dict[str, Any] | JSONResponse:
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "Unauthorized", "type": "x", "code": 401}}, 401)
            body = await request.json()
            self.completions += 1
            await asyncio.sleep(self.delay_s)
            message = {"role": "assistant", "content": "Yes."}
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        return app

    def start(self) -> None:
        config = uvicorn.Config(
            self.app(), host=HOST, port=self.port, log_level="warning", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        _wait_until(lambda: self._server is not None and self._server.started, 30, "fake generator up", 0.02)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self._server = self._thread = None


@pytest.fixture(scope="module")
def fake_generator() -> Iterator[FakeGenerator]:
    fake = FakeGenerator(_free_port())
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def router_on_fake(
    stack: RunningStack, fake_generator: FakeGenerator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second router process: the real classifier and retriever, the fake generator, a 1 s deadline."""
    port = _free_port()
    env = dict(
        stack.env,
        MMEDRAG_ROUTER_GENERATOR_URL=fake_generator.url,
        MMEDRAG_ROUTER_GENERATOR_MODEL=FAKE_MODEL,
        MMEDRAG_ROUTER_GENERATOR_TIMEOUT_S=str(GENERATOR_DEADLINE_S),
    )
    second = Stack()
    logs = tmp_path_factory.mktemp("router-on-fake")
    second.start(ServiceProcess("router", port, "/readyz"), HOST, stack.artifacts, env, logs)
    try:
        stack.ensure_up()
        second.wait_ready(HOST, logs, timeout_s=READY_TIMEOUT_S)
        yield f"http://{HOST}:{port}"
    finally:
        second.stop()


def test_slow_generator_gives_504_at_the_deadline_then_recovers(
    stack: RunningStack, fake_generator: FakeGenerator, router_on_fake: str, example: tuple[bytes, str]
) -> None:
    stack.ensure_up()
    fake_generator.delay_s = SLOW_GENERATOR_S
    try:
        started = time.monotonic()
        slow = _vqa(router_on_fake, example)
        seconds = time.monotonic() - started
    finally:
        fake_generator.delay_s = 0.0
    _assert_error(slow, 504, "dependency_timeout", "generator did not answer")
    assert slow.json()["error"]["type"] == "timeout"
    assert seconds < SLOW_GENERATOR_S - 1, f"the router waited {seconds:.1f}s, past its 1 s deadline"

    fast = _vqa(router_on_fake, example)
    assert fast.status_code == 200, fast.text
    assert fast.json()["model"] == FAKE_MODEL


def test_generator_gone_gives_503_and_not_ready_then_recovers(
    stack: RunningStack, fake_generator: FakeGenerator, router_on_fake: str, example: tuple[bytes, str]
) -> None:
    stack.ensure_up()
    fake_generator.stop()
    try:
        down = _vqa(router_on_fake, example)
        _assert_error(down, 503, "generator_unavailable", "cannot reach the generator")
        ready = _readyz(router_on_fake)
        assert ready.status_code == 503 and ready.json()["dependencies"]["generator"] is False
    finally:
        fake_generator.start()
    _wait_until(lambda: _readyz(router_on_fake).status_code == 200, 30, "router /readyz 200")
    assert _vqa(router_on_fake, example).status_code == 200


def test_generator_refusing_the_routers_key_is_503_not_401(
    stack: RunningStack, fake_generator: FakeGenerator, router_on_fake: str, example: tuple[bytes, str]
) -> None:
    """vLLM started with another ``--api-key`` answers 401 to the router: the router is misconfigured.

    The client's own key is fine, so passing the 401 on would send it hunting for a problem it does not
    have; the router must answer 503 (a dependency it cannot use) and name the generator.
    """
    stack.ensure_up()
    fake_generator.api_key = "the-key-vllm-was-started-with"
    try:
        response = _vqa(router_on_fake, example)
    finally:
        fake_generator.api_key = None
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "service_unavailable"
    assert "generator" in response.json()["error"]["message"]


def test_killed_generator_process_gives_503(stack: RunningStack, example: tuple[bytes, str]) -> None:
    """The real generator process dies: 503 ``generator_unavailable`` and ``/readyz`` names it."""
    stack.ensure_up()
    stack.kill("generator")  # the next test to need it restarts it (ensure_up)
    _assert_error(_vqa(stack.url, example), 503, "generator_unavailable", "generator")
    ready = _readyz(stack.url)
    assert ready.status_code == 503 and ready.json()["dependencies"]["generator"] is False
    assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize(
    ("dependency", "status"),
    [
        ("classifier", 401),  # internal token mismatch
        ("classifier", 403),
        ("retriever", 401),
        ("retriever", 403),
        ("generator", 401),  # vLLM --api-key mismatch
        ("generator", 403),
        ("generator", 404),  # MMEDRAG_ROUTER_GENERATOR_MODEL names a model vLLM does not serve
    ],
)
async def test_a_dependency_refusing_the_router_itself_is_503(dependency: str, status: int) -> None:
    """A 401/403 (or the generator's 404 for an unknown model) is about the router's configuration, not
    the user's request: the client gets 503 naming the dependency, never the dependency's own status."""
    stack = FakeStack()
    body = {"error": {"message": "refused", "type": "authentication_error", "code": "invalid_token"}}
    stack.fail[dependency] = lambda: httpx.Response(status, json=body)
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": "Q?"}
        )
    assert response.status_code == 503, response.text
    assert dependency in response.json()["error"]["message"]
