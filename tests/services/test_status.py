"""``mmedrag status``: service states from real apps (in-process and on loopback) and the artifacts table."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ports import HOST, free_base_port
from router_fakes import FakeStack, build_router_app
from typer.testing import CliRunner

from services.common.app import build_service_app
from services.status import (
    ServiceStatus,
    check_services,
    read_artifacts,
    render_artifacts,
    render_services,
    service_targets,
    status_cli,
)

BASE = "http://127.0.0.1:9000"


def _internal_app(name: str, ready: bool = True, **details: Any) -> FastAPI:
    async def readiness() -> dict[str, Any]:
        return {"ready": ready, **details}

    return build_service_app(name=name, title=name, version="0", readiness=readiness)


def _generator_app(loading: bool = False) -> FastAPI:
    """vLLM's health contract: 200 once loaded, 503 while loading."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "loading" if loading else "ok"}, status_code=503 if loading else 200)

    return app


class _ByPort(httpx.AsyncBaseTransport):
    """Sends each request to the app listening on its port; an unknown port refuses the connection."""

    def __init__(self, apps: dict[int, httpx.AsyncBaseTransport]):
        self.apps = apps

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.apps.get(request.url.port)
        if transport is None:
            raise httpx.ConnectError("connection refused", request=request)
        return await transport.handle_async_request(request)


def _stack(stack: FakeStack | None = None, **replace: httpx.AsyncBaseTransport | None) -> _ByPort:
    apps: dict[str, httpx.AsyncBaseTransport | None] = {
        "router": httpx.ASGITransport(app=build_router_app(stack or FakeStack())),
        "classifier": httpx.ASGITransport(app=_internal_app("classifier", model="clf-tiny")),
        "retriever": httpx.ASGITransport(app=_internal_app("retriever", domains={"radiology": {}})),
        "generator": httpx.ASGITransport(app=_generator_app()),
    }
    apps.update(replace)
    ports = {"router": 9000, "classifier": 9001, "retriever": 9002, "generator": 9003}
    return _ByPort({ports[name]: t for name, t in apps.items() if t is not None})


def _by_name(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {s.name: s for s in statuses}


# ------------------------------------------------------------------------------------------ targets


def test_targets_follow_the_launcher_layout() -> None:
    targets = service_targets("http://127.0.0.1:9000/")
    assert [(t.name, t.url) for t in targets] == [
        ("router", "http://127.0.0.1:9000"),
        ("classifier", "http://127.0.0.1:9001"),
        ("retriever", "http://127.0.0.1:9002"),
        ("generator", "http://127.0.0.1:9003"),
    ]
    assert [(t.health_path, t.ready_path) for t in targets][-1] == (None, "/health")
    assert targets[0].health_path == "/healthz" and targets[0].ready_path == "/readyz"


def test_targets_take_overrides_and_vllm_style_generator_urls() -> None:
    targets = service_targets(
        "http://[::1]:8000", retriever="http://retriever.svc:80/", generator="http://vllm.svc:8000/v1/"
    )
    urls = {t.name: t.url for t in targets}
    assert urls == {
        "router": "http://[::1]:8000",
        "classifier": "http://[::1]:8001",
        "retriever": "http://retriever.svc:80",
        "generator": "http://vllm.svc:8000",
    }


# ------------------------------------------------------------------------------------------ services


async def test_every_service_ready() -> None:
    statuses = _by_name(await check_services(service_targets(BASE), transport=_stack()))
    assert all(s.alive and s.ready for s in statuses.values())
    assert statuses["router"].detail == "classifier ok, retriever ok, generator ok"
    assert statuses["classifier"].detail == "model clf-tiny"
    assert statuses["retriever"].detail == "domains radiology"
    assert "ready" in render_services(list(statuses.values())).splitlines()[2]


async def test_a_loading_generator_is_alive_but_not_ready() -> None:
    transport = _stack(generator=httpx.ASGITransport(app=_generator_app(loading=True)))
    generator = _by_name(await check_services(service_targets(BASE), transport=transport))["generator"]
    assert (generator.alive, generator.ready, generator.detail) == (True, False, "loading")


async def test_the_router_names_its_failed_dependency() -> None:
    stack = FakeStack()
    stack.fail["generator"] = lambda: httpx.Response(503, json={"error": "down"})
    router = _by_name(await check_services(service_targets(BASE), transport=_stack(stack)))["router"]
    assert router.alive and not router.ready
    assert router.detail == "classifier ok, retriever ok, generator DOWN"


async def test_unreachable_and_hung_services() -> None:
    def hung(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    transport = _stack(classifier=None, retriever=httpx.MockTransport(hung), generator=None)
    statuses = _by_name(await check_services(service_targets(BASE), timeout_s=0.5, transport=transport))
    assert not statuses["classifier"].alive and "not reachable" in statuses["classifier"].detail
    assert statuses["retriever"].detail == "no answer within 0.5 s"
    assert not statuses["generator"].alive  # no liveness path: no answer at all means down
    table = render_services(list(statuses.values()))
    assert table.count("not ready") == 3  # the router too: its own dependencies are down


async def test_a_service_answering_something_else() -> None:
    def teapot(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if request.url.path == "/healthz" else 500, text="<html>oops</html>")

    transport = _stack(classifier=httpx.MockTransport(teapot))
    classifier = _by_name(await check_services(service_targets(BASE), transport=transport))["classifier"]
    assert classifier.alive and not classifier.ready and classifier.detail == "/readyz answered 500"


# ------------------------------------------------------------------------------------------ artifacts


def _write_artifacts(root: Path) -> dict[str, str]:
    files = {
        "classifier/head.safetensors": b"head weights",
        "classifier/open_clip_model.safetensors": b"clip weights",
        "retrievers/radiology/open_clip_model.safetensors": b"radiology retriever",
    }
    digests = {}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    manifest = {
        "version": 1,
        "kind": "tiny",
        "built_by": "mmedrag artifacts tiny",
        "seed": 7,
        "parts": {
            "classifier": {
                "path": "classifier",
                "weights": {
                    "head.safetensors": digests["classifier/head.safetensors"],
                    "open_clip_model.safetensors": digests["classifier/open_clip_model.safetensors"],
                },
            },
            "retrievers": {
                "radiology": {
                    "path": "retrievers/radiology",
                    "weights": {
                        "open_clip_model.safetensors": digests[
                            "retrievers/radiology/open_clip_model.safetensors"
                        ]
                    },
                }
            },
            "index": {"path": "index", "collections": ["mmedrag_radiology"]},
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return digests


def test_artifacts_from_the_manifest(tmp_path: Path) -> None:
    digests = _write_artifacts(tmp_path)
    summary = read_artifacts(tmp_path)
    assert summary.problem is None
    assert summary.facts == {
        "kind": "tiny",
        "seed": "7",
        "version": "1",
        "built_by": "mmedrag artifacts tiny",
    }
    assert [p.name for p in summary.parts] == ["classifier", "retrievers/radiology", "index"]
    assert summary.parts[2].facts == [("collections", "mmedrag_radiology")]
    text = render_artifacts(summary)
    assert "kind tiny · seed 7" in text
    assert f"sha256 {digests['classifier/head.safetensors'][:12]}" in text
    assert digests["classifier/head.safetensors"][:13] not in text
    assert "collections: mmedrag_radiology" in text


def test_verify_finds_changed_and_missing_weights(tmp_path: Path) -> None:
    _write_artifacts(tmp_path)
    assert read_artifacts(tmp_path, verify=True).verified_ok
    (tmp_path / "classifier/head.safetensors").write_bytes(b"tampered")
    (tmp_path / "retrievers/radiology/open_clip_model.safetensors").unlink()
    summary = read_artifacts(tmp_path, verify=True)
    verdicts = {(p.name, f.name): f.verified for p in summary.parts for f in p.files}
    assert verdicts == {
        ("classifier", "head.safetensors"): "mismatch",
        ("classifier", "open_clip_model.safetensors"): "ok",
        ("retrievers/radiology", "open_clip_model.safetensors"): "missing",
    }
    assert not summary.verified_ok


def test_missing_or_broken_manifest_says_how_to_build_one(tmp_path: Path) -> None:
    missing = read_artifacts(tmp_path / "nowhere")
    assert "mmedrag artifacts tiny" in missing.problem and "manifest.json" in render_artifacts(missing)
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    assert "not valid JSON" in read_artifacts(tmp_path).problem


# ------------------------------------------------------------------------------------------ command


@contextmanager
def _serving(app: FastAPI, port: int) -> Iterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _refusing_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_stack() -> Iterator[str]:
    """Four real HTTP servers on loopback, laid out as `mmedrag up` does."""
    port = free_base_port()
    apps = [
        build_router_app(FakeStack()),
        _internal_app("classifier", model="clf-tiny"),
        _internal_app("retriever", domains=["radiology"]),
        _generator_app(),
    ]
    with ExitStack() as servers:
        for offset, app in enumerate(apps):
            servers.enter_context(_serving(app, port + offset))
        yield f"http://{HOST}:{port}"


def _cli() -> typer.Typer:
    """The command mounted as the integrator mounts it in `mmedrag`."""
    app = typer.Typer(add_completion=False)

    @app.callback()
    def _root() -> None:
        """mmedrag"""

    app.command("status")(status_cli)
    return app


def test_command_exits_0_when_all_ready(live_stack: str, tmp_path: Path) -> None:
    _write_artifacts(tmp_path)
    result = CliRunner().invoke(
        _cli(), ["status", "--url", live_stack, "--artifacts", str(tmp_path), "--verify"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Services"
    assert lines[1].split() == ["SERVICE", "URL", "ALIVE", "READY", "DETAIL"]
    assert [line.split()[:4] for line in lines[2:6]] == [
        [name, url, "ok", "ready"]
        for name, url in zip(
            ("router", "classifier", "retriever", "generator"),
            [t.url for t in service_targets(live_stack)],
            strict=True,
        )
    ]
    assert f"Artifacts  {tmp_path}  (manifest.json)" in result.output
    assert result.output.rstrip().endswith("All 4 services are ready.")


def test_command_exits_1_when_a_service_is_down(live_stack: str, tmp_path: Path) -> None:
    down = f"http://{HOST}:{_refusing_port()}/v1"
    args = ["status", "--url", live_stack, "--generator-url", down, "--artifacts", str(tmp_path), "--json"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ready"] is False
    generator = report["services"][3]
    assert generator["name"] == "generator" and generator["url"] == down.removesuffix("/v1")
    assert (generator["alive"], generator["ready"]) == (False, False)
    assert report["services"][0]["ready"] is True  # the router's own generator is the fake one
    assert "manifest.json" in report["artifacts"]["problem"]
