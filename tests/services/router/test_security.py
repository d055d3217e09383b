"""Authentication, back-pressure and degraded retrieval on the public router."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from image_factories import make_png
from router_fakes import FakeStack, build_router

from services.router.app import build_app
from services.router.auth import APIKeyStore, hash_key, new_key, parse_entries
from services.router.limits import RateLimited, RateLimiter
from services.router.settings import RouterSettings

KEY = "mmr_test-key-1234567890"
OTHER = "mmr_other-key-0987654321"


def _keys() -> str:
    return f"alice:{hash_key(KEY)},bob:{hash_key(OTHER)}"


async def _vqa(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post(
        "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": "Q?"}, headers=headers
    )


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (None, 401, "missing_api_key"),
        ({"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        ({"X-API-Key": "wrong"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEY}"}, 200, None),
        ({"X-API-Key": OTHER}, 200, None),
    ],
)
async def test_api_key_is_required_on_the_public_routes(headers, status: int, code: str | None) -> None:
    async with build_router(FakeStack(), auth_enabled=True, api_keys=_keys()) as client:
        response = await _vqa(client, headers)
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code and "API key" in response.json()["error"]["message"]


async def test_health_and_page_stay_open_while_preview_needs_a_key() -> None:
    async with build_router(FakeStack(), auth_enabled=True, api_keys=_keys()) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/")).status_code == 200
        preview = await client.post("/preview", files={"image": ("x.png", make_png(), "image/png")})
    assert preview.status_code == 401


def test_keys_file_and_inline_keys_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team keys\ncarol:{hash_key('c-key')}\n")
    store = APIKeyStore.from_settings(_keys(), path)
    assert (
        store.identify(KEY) == "alice" and store.identify("c-key") == "carol" and store.identify("x") is None
    )


@pytest.mark.parametrize("text", ["alice", "alice:1234", f":{hash_key(KEY)}"])
def test_malformed_key_entries_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="expected 'id:sha256hex'"):
        parse_entries(text, source="MMEDRAG_ROUTER_API_KEYS")


def test_new_keys_are_random_and_prefixed() -> None:
    first, second = new_key(), new_key()
    assert first != second and first.startswith("mmr_") and len(first) > 40


def test_auth_on_without_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match=r"no API keys are configured.*mmedrag keys create"):
        build_app(RouterSettings(auth_enabled=True))


async def test_rate_limit_answers_429_with_retry_after() -> None:
    async with build_router(FakeStack(), rate_limit_per_minute=60, rate_limit_burst=2) as client:
        statuses = [(await _vqa(client)).status_code for _ in range(3)]
        limited = await _vqa(client)
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limited"


def test_rate_limit_refills_over_time() -> None:
    limiter = RateLimiter(per_minute=60, burst=1)
    limiter.check("k", now=0.0)
    with pytest.raises(RateLimited):
        limiter.check("k", now=0.5)
    limiter.check("k", now=1.6)
    limiter.check("other", now=1.6)


async def test_saturated_router_answers_503_with_retry_after() -> None:
    stack = FakeStack()
    async with build_router(stack, max_in_flight=1) as client:
        client._transport.app.state.in_flight.in_flight = 1  # one request is already being served
        response = await _vqa(client)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1" and response.json()["error"]["code"] == "overloaded"
    assert not stack.generator_bodies


async def test_retriever_down_degrades_when_allowed() -> None:
    stack = FakeStack()
    stack.fail["retriever"] = lambda: httpx.Response(503)
    async with build_router(stack, retrieval_failure="degrade") as client:
        response = await _vqa(client)
    assert response.status_code == 200
    body = response.json()
    assert body["evidence"] == [] and body["retrieval"]["k"] == 0
    assert any(w.startswith("degraded: retrieval unavailable") for w in body["warnings"])
    assert "reference report" not in stack.generator_bodies[0]["messages"][0]["content"][1]["text"]


async def test_retriever_down_is_503_retrieval_unavailable_by_default() -> None:
    stack = FakeStack()
    stack.fail["retriever"] = lambda: httpx.Response(503)
    async with build_router(stack) as client:
        response = await _vqa(client)
    assert response.status_code == 503 and response.json()["error"]["code"] == "retrieval_unavailable"


async def test_classifier_down_still_serves_a_client_given_domain() -> None:
    stack = FakeStack()
    stack.fail["classifier"] = lambda: httpx.Response(503)
    async with build_router(stack) as client:
        without_domain = await _vqa(client)
        with_domain = await client.post(
            "/vqa",
            files={"image": ("x.png", make_png(), "image/png")},
            data={"question": "Q?", "domain": "radiology"},
        )
    assert without_domain.status_code == 503 and with_domain.status_code == 200


@pytest.mark.parametrize("route", ["/vqa", "/report", "/preview"])
async def test_the_key_is_checked_before_the_form_is_read(route: str) -> None:
    """A caller without a key gets 401 even for a body the form parser would refuse (and the form is never
    read: the stack sees nothing)."""
    stack = FakeStack()
    body = b'--b\r\nContent-Disposition: form-data; name="question"\r\n\r\nIs there \xff?\r\n--b--\r\n'
    headers = {"content-type": "multipart/form-data; boundary=b"}
    async with build_router(stack, auth_enabled=True, api_keys=_keys()) as client:
        refused = await client.post(route, content=body, headers=headers)
        allowed = await client.post(route, content=body, headers={**headers, "X-API-Key": KEY})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key", refused.text
    assert allowed.status_code == 400 and allowed.json()["error"]["param"] == "question", allowed.text
    assert stack.classifier_calls == 0
