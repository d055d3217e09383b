"""Property-based tests of the router against its own OpenAPI schema (schemathesis).

Schemathesis generates requests from ``/openapi.json`` (valid and invalid ones, a bounded number per
operation, derandomised so CI runs are repeatable) and sends them to the router app in-process, built on
the HTTP-level fakes of ``tests/router_fakes.py``. Two checks: no 5xx, and every response matches the
schema declared for its status.

Two adjustments keep the fuzzing meaningful, both explained where they are made:

- ``/vqa`` and ``/report`` are multipart uploads, but FastAPI publishes a form *model* holding an
  ``UploadFile`` as ``application/x-www-form-urlencoded``; the test re-declares them as multipart so the
  generated files reach the image gate (``test_upload_routes_declare_multipart`` pins the schema bug).
- Schemathesis cannot draw a decodable image, so about half of the generated uploads are swapped for a
  small real PNG (chosen by a hash of the generated case, hence deterministic): the 200 path and the
  ``RAGResponse`` schema get checked too, with generated values in every other field.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from image_factories import make_png
from router_fakes import FakeStack, build_router_app
from schemathesis.checks import not_a_server_error, response_schema_conformance

UPLOAD_ROUTES = ("/vqa", "/report")
FORM_URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"


def _declare_uploads_as_multipart(spec: dict[str, Any]) -> None:
    """Move the upload routes' body schema to multipart (a no-op once the router declares it itself)."""
    for path in UPLOAD_ROUTES:
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        if MULTIPART not in content and FORM_URLENCODED in content:
            content[MULTIPART] = content.pop(FORM_URLENCODED)


@pytest.fixture(scope="module")
def router_schema() -> schemathesis.BaseSchema:
    app = build_router_app(FakeStack())  # its fake corpus has reports for every domain a request may ask
    _declare_uploads_as_multipart(app.openapi())  # FastAPI serves this cached dict at /openapi.json
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("router_schema")


def _as_sent(case: schemathesis.Case) -> None:
    """Make a generated multipart body one a real client could send, with a decodable image half the time.

    A form cannot carry JSON null: a client leaves the field out, so fields generated as null are dropped.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    for name in [name for name, value in body.items() if value is None]:
        del body[name]
    image = body.get("image")
    if isinstance(image, (str, bytes)):
        raw = image.encode() if isinstance(image, str) else image
        if hashlib.sha256(raw + repr(sorted(body)).encode()).digest()[0] % 2:
            body["image"] = make_png()


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_router_answers_every_generated_request_within_its_schema(case: schemathesis.Case) -> None:
    _as_sent(case)
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])


def test_upload_routes_declare_multipart() -> None:
    """``/vqa`` and ``/report`` take a file: their schema must say multipart/form-data.

    With ``application/x-www-form-urlencoded`` (what FastAPI derives from ``Annotated[VQAForm, Form()]``;
    ``Form(media_type="multipart/form-data")`` fixes it), clients generated from the schema send the image
    as a text field and always get 400 "'image': Value error, Expected UploadFile".
    """
    spec = build_router_app(FakeStack()).openapi()
    for path in UPLOAD_ROUTES:
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert list(content) == [MULTIPART], f"{path} declares {list(content)}"


@pytest.mark.parametrize(
    ("path", "method", "status", "media_type"),
    [
        ("/preview", "post", "401", "application/json"),  # it requires the API key like /vqa
        ("/readyz", "get", "503", "application/json"),  # not ready: the body says which dependency
        ("/metrics", "get", "200", "text/plain"),  # Prometheus text format, not JSON
    ],
)
def test_schema_declares_what_the_router_answers(
    path: str, method: str, status: str, media_type: str
) -> None:
    """Responses the router really sends are declared (schemathesis' status-code and content-type checks)."""
    operation = build_router_app(FakeStack()).openapi()["paths"][path][method]
    assert status in operation["responses"], f"{method.upper()} {path} does not declare {status}"
    assert media_type in operation["responses"][status].get("content", {}), operation["responses"][status]


async def test_the_undeclared_answers_really_happen() -> None:
    """The control for the test above: each of those answers is sent today."""
    stack = FakeStack()
    app = build_router_app(stack, auth_enabled=True, api_keys="ci:" + "0" * 64)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        preview = await client.post("/preview", files={"image": ("x.png", make_png(), "image/png")})
        metrics = await client.get("/metrics")
        stack.fail["retriever"] = lambda: httpx.Response(503)
        readyz = await client.get("/readyz")
    assert preview.status_code == 401
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert readyz.status_code == 503
