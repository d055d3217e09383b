"""Structured logs: one JSON object per line, the request id on every line of a request, no payloads."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from services.common.app import REQUEST_ID_HEADER, build_service_app
from services.common.logging import (
    AUDIT_LOGGER,
    JSONFormatter,
    RequestContextFilter,
    configure_logging,
    fingerprint,
    make_handler,
    redact,
    request_id_var,
)

test_logger = logging.getLogger("mmedrag.test")


class Captured:
    """JSON lines written by a handler on the root logger."""

    def __init__(self, stream: io.StringIO):
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    stream = io.StringIO()
    handler = make_handler("svc", "json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _record(message: str, *args: Any, name: str = "x", **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_has_the_fields_and_the_extra_ones() -> None:
    record = _record("loaded %s in %.1fs", "model", 1.25, request_id="rid-1", k=3, domain="radiology")
    RequestContextFilter("retriever").filter(record)
    line = json.loads(JSONFormatter().format(record))
    assert line["ts"].endswith("+00:00") and "T" in line["ts"]
    assert {k: line[k] for k in ("level", "logger", "service", "request_id", "message")} == {
        "level": "info",
        "logger": "x",
        "service": "retriever",
        "request_id": "rid-1",
        "message": "loaded model in 1.2s",
    }
    assert line["k"] == 3 and line["domain"] == "radiology"
    assert "args" not in line and "msg" not in line and "pathname" not in line


def test_request_id_comes_from_the_context_variable() -> None:
    token = request_id_var.set("ctx-42")
    try:
        record = _record("hello")
        RequestContextFilter("router").filter(record)
    finally:
        request_id_var.reset(token)
    assert json.loads(JSONFormatter().format(record))["request_id"] == "ctx-42"
    outside = _record("hello")
    RequestContextFilter("router").filter(outside)
    assert json.loads(JSONFormatter().format(outside))["request_id"] is None


def test_exceptions_are_one_json_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=__import__("sys").exc_info()
        )
    line = json.loads(JSONFormatter("svc").format(record))
    assert "ValueError: boom" in line["exception"] and line["level"] == "error"


def test_secrets_and_payloads_are_masked() -> None:
    data_url = "data:image/png;base64," + "A" * 400
    text = redact(f"Authorization: Bearer s3cr3t-token key mmr_abcdefghijklmnop url {data_url}")
    assert "s3cr3t" not in text and "Bearer [redacted]" in text
    assert "mmr_abcdefghijklmnop" not in text and "mmr_[redacted]" in text
    assert "AAAA" not in text and "data:image/png;base64,[422 chars]" in text
    assert redact("send 'Authorization: Bearer <key>'") == "send 'Authorization: Bearer <key>'"
    assert fingerprint(b"abc") == fingerprint("abc") and len(fingerprint(b"abc")) == 16


def test_uvicorn_access_lines_get_structured_fields() -> None:
    record = _record(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", "/vqa", "1.1", 200, name="uvicorn.access"
    )
    line = json.loads(JSONFormatter("router").format(record))
    assert (line["client"], line["method"], line["path"], line["status"]) == (
        "127.0.0.1:5000",
        "POST",
        "/vqa",
        200,
    )


def test_text_format_carries_the_same_fields() -> None:
    stream = io.StringIO()
    handler = make_handler("classifier", "text", stream)
    handler.handle(_record("ready in %ds", 3, request_id="abc", k=2))
    line = stream.getvalue()
    assert " classifier INFO x [abc] ready in 3s k=2" in line


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    uvicorn_saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
        for n in ("uvicorn", "uvicorn.access", "uvicorn.error")
    }
    audit_level = logging.getLogger(AUDIT_LOGGER).level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (handlers, propagate) in uvicorn_saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.getLogger(AUDIT_LOGGER).setLevel(audit_level)


def test_configure_logging_routes_everything_through_one_handler(restore_logging: None) -> None:
    stream = io.StringIO()
    logging.getLogger("uvicorn.access").addHandler(logging.StreamHandler(io.StringIO()))
    configure_logging("generator", "warning", "json", stream=stream)
    root = logging.getLogger()
    assert len(root.handlers) == 1 and root.level == logging.WARNING
    assert not logging.getLogger("uvicorn.access").handlers and logging.getLogger("uvicorn.access").propagate
    logging.getLogger("mmedrag.test").info("dropped at warning level")
    logging.getLogger(AUDIT_LOGGER).info("audit", extra={"status": 200})  # audit survives the level
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["service"], line["status"]) for line in lines] == [
        (AUDIT_LOGGER, "generator", 200)
    ]
    with pytest.raises(ValueError, match="json"):
        configure_logging("generator", "info", "xml")  # type: ignore[arg-type]


def _app_that_logs() -> Any:
    async def readiness() -> dict[str, Any]:
        return {"ready": True}

    app = build_service_app(name="svc", title="svc", version="0", readiness=readiness)

    def in_a_worker_thread() -> None:
        test_logger.info("from a worker thread")

    @app.get("/work")
    async def work() -> dict[str, bool]:
        test_logger.info("handler starts", extra={"step": 1})
        await anyio.to_thread.run_sync(in_a_worker_thread)
        test_logger.warning("handler ends")
        return {"ok": True}

    return app


async def test_every_line_of_a_request_carries_its_request_id(captured: Captured) -> None:
    app = _app_that_logs()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
        given = await client.get("/work", headers={REQUEST_ID_HEADER: "req-given-1"})
        generated = await client.get("/work")
    assert given.headers[REQUEST_ID_HEADER] == "req-given-1"
    new_id = generated.headers[REQUEST_ID_HEADER]
    assert len(new_id) == 32
    lines = [line for line in captured.lines() if line["logger"] == "mmedrag.test"]
    assert [line["message"] for line in lines] == [
        "handler starts",
        "from a worker thread",
        "handler ends",
    ] * 2
    assert [line["request_id"] for line in lines] == ["req-given-1"] * 3 + [new_id] * 3
    assert lines[0]["step"] == 1 and lines[0]["service"] == "svc"
    assert request_id_var.get() is None, "the request id does not leak out of the request"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_uvicorn_access_log_is_json_with_the_request_id(restore_logging: None) -> None:
    """Under a real uvicorn (as ``serve`` runs it) the access line is JSON and carries the request id."""
    stream = io.StringIO()
    configure_logging("svc", "info", "json", stream=stream)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(_app_that_logs(), host="127.0.0.1", port=port, log_config=None, log_level="info")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/work", headers={REQUEST_ID_HEADER: "rid-uvicorn"})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert response.status_code == 200
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert len(access) == 1
    assert (
        access[0]["request_id"] == "rid-uvicorn"
        and access[0]["path"] == "/work"
        and access[0]["status"] == 200
    )
    assert {line["request_id"] for line in lines if line["logger"] == "mmedrag.test"} == {"rid-uvicorn"}
    assert any(line["logger"] == "uvicorn.error" for line in lines), "uvicorn's own lines are JSON too"


@pytest.mark.parametrize("given", ["x" * 129, "has space", 'quote"d', "{json}"])
async def test_an_odd_request_id_is_replaced_not_echoed(given: str) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_app_that_logs()), base_url="http://s"
    ) as client:
        response = await client.get("/healthz", headers={REQUEST_ID_HEADER: given})
    assert response.headers[REQUEST_ID_HEADER] != given and len(response.headers[REQUEST_ID_HEADER]) == 32
