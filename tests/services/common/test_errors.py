"""The error envelope's catch-all: a 500 without a stack trace, whose request id is in the headers too."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from services.common.app import build_service_app


async def _ready() -> dict[str, Any]:
    return {"ready": True}


def _crashing_app() -> Any:
    app = build_service_app(name="crashy", title="t", version="0", readiness=_ready)

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("secret internals")

    return app


@pytest.mark.parametrize("given", [None, "caller-id-42"])
async def test_500_carries_the_request_id_header_that_the_body_quotes(given: str | None) -> None:
    transport = httpx.ASGITransport(app=_crashing_app(), raise_app_exceptions=False)
    headers = {"X-Request-ID": given} if given else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.get("/boom", headers=headers)
    assert response.status_code == 500
    request_id = response.headers["X-Request-ID"]
    assert request_id == given if given else len(request_id) == 32
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    assert error["message"] == f"internal error; quote request id {request_id} when reporting it"
    assert "secret internals" not in response.text


async def test_other_errors_keep_a_single_request_id_header() -> None:
    """The middleware stamps the header on handled errors; the 500 handler does not add a second one."""
    transport = httpx.ASGITransport(app=_crashing_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.get("/nowhere", headers={"X-Request-ID": "abc"})
    assert response.status_code == 404
    assert response.headers.get_list("X-Request-ID") == ["abc"]
