"""The router in-process, its dependencies faked at the HTTP layer (the wire formats stay real)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from image_factories import make_dicom, make_jpeg, make_noise_image, make_png, make_png_declaring, truncate
from router_fakes import CORPUS, RESPONSE_FIELDS, FakeStack, build_router

from services.common.prompts import build_vqa_prompt, render_conversation


@pytest.fixture
def stack() -> FakeStack:
    return FakeStack()


async def _vqa(client: httpx.AsyncClient, image: bytes, **form: Any) -> httpx.Response:
    form.setdefault("question", "Is there a pleural effusion?")
    return await client.post(
        "/vqa", files={"image": ("x.png", image, "image/png")}, data={k: str(v) for k, v in form.items()}
    )


@pytest.mark.parametrize("image", [make_png(), make_jpeg(), make_dicom()], ids=["png", "jpeg", "dicom"])
async def test_vqa_returns_every_field(stack: FakeStack, image: bytes) -> None:
    async with build_router(stack) as client:
        response = await _vqa(client, image)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RESPONSE_FIELDS
    assert body["answer"] == "yes" and body["text"] == stack.answer
    assert body["domain"] == {
        "label": "radiology",
        "probabilities": pytest.approx(body["domain"]["probabilities"]),
        "source": "classifier",
    }
    assert [e["kept"] for e in body["evidence"]] == [True, False, False]
    assert body["retrieval"] == {"mode": "adaptive", "k_max": 10, "k": 1, "gamma": 0.05}
    assert set(body["timings_ms"]) == {"decode", "classify", "retrieve", "generate", "total"}
    assert response.headers["X-Request-ID"] == body["request_id"]
    assert "Research use only" in body["disclaimer"]


async def test_generator_receives_the_shared_prompt_and_a_data_url(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        await _vqa(client, make_png())
    content = stack.generator_bodies[0]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    expected = build_vqa_prompt("Is there a pleural effusion?", "radiology", ["No pleural effusion."])
    assert content[1]["text"] == expected
    assert render_conversation(content[1]["text"]).endswith("ASSISTANT:")


async def test_client_domain_skips_the_classifier(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        response = await _vqa(client, make_png(), domain="pathology")
    assert response.status_code == 200
    assert stack.classifier_calls == 0
    assert response.json()["domain"]["source"] == "client"
    assert stack.retriever_forms[0]["domain"] == "pathology"
    assert all(e["text"] in CORPUS["pathology"] for e in response.json()["evidence"])


async def test_retrieval_off_uses_the_plain_template(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        response = await _vqa(client, make_png(), retrieval="off")
    assert response.json()["evidence"] == [] and response.json()["retrieval"]["k"] == 0
    assert not stack.retriever_forms
    text = stack.generator_bodies[0]["messages"][0]["content"][1]["text"]
    assert text == build_vqa_prompt("Is there a pleural effusion?", "radiology")
    assert "reference report" not in text


async def test_report_returns_the_text(stack: FakeStack) -> None:
    stack.answer = "FINDINGS: The lungs are clear."
    async with build_router(stack) as client:
        response = await client.post(
            "/report",
            files={"image": ("x.png", make_png(), "image/png")},
            data={"retrieval": "fixed", "k_max": "2"},
        )
    assert response.status_code == 200
    body = response.json()
    assert body["answer"] == "FINDINGS: The lungs are clear."
    assert body["retrieval"]["k"] == 2 and stack.retriever_forms[0]["k_max"] == "2"


async def test_low_confidence_warns_or_refuses(stack: FakeStack) -> None:
    stack.classifier_confidence = 0.4
    async with build_router(stack) as client:
        warned = await _vqa(client, make_png())
    assert warned.status_code == 200 and "does not look like any known domain" in warned.json()["warnings"][0]
    async with build_router(stack, low_confidence_action="refuse") as client:
        refused = await _vqa(client, make_png())
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_domain"


@pytest.mark.parametrize(
    ("files", "form", "status", "needle"),
    [
        (
            {"image": ("x.txt", b"hello, not an image", "text/plain")},
            {"question": "q?"},
            415,
            "unrecognised image format",
        ),
        ({"image": ("x.png", truncate(make_png(size=(128, 128))), "image/png")}, {"question": "q?"}, 422, ""),
        ({"image": ("x.png", b"", "image/png")}, {"question": "q?"}, 400, "empty"),
        (
            {"image": ("x.png", make_png_declaring(30000, 30000), "image/png")},
            {"question": "q?"},
            413,
            "pixels",
        ),
        ({"image": ("x.png", make_png(), "image/png")}, {}, 400, "question"),
        ({"image": ("x.png", make_png(), "image/png")}, {"question": "   "}, 400, "question"),
        (
            {"image": ("x.png", make_png(), "image/png")},
            {"question": "q?", "domain": "cardiology"},
            400,
            "domain",
        ),
        ({"image": ("x.png", make_png(), "image/png")}, {"question": "q?", "k_max": "0"}, 400, "k_max"),
        ({"image": ("x.png", make_png(), "image/png")}, {"question": "q?", "k_max": "51"}, 400, "k_max"),
        (
            {"image": ("x.png", make_png(), "image/png")},
            {"question": "q?", "retrieval": "maybe"},
            400,
            "retrieval",
        ),
        (
            {"image": ("x.png", make_png(), "image/png")},
            {"question": "q?", "max_tokens": "99999"},
            400,
            "max_tokens",
        ),
        ({}, {"question": "q?"}, 400, "image"),
    ],
    ids=[
        "not-image",
        "truncated",
        "empty",
        "too-many-pixels",
        "no-question",
        "blank-question",
        "unknown-domain",
        "k-max-zero",
        "k-max-high",
        "bad-retrieval",
        "max-tokens-high",
        "no-file",
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    stack: FakeStack, files: dict, form: dict, status: int, needle: str
) -> None:
    async with build_router(stack) as client:
        response = await client.post("/vqa", files=files or None, data=form)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle.lower() in error["message"].lower()
    assert error["code"] and error["type"]
    assert not stack.generator_bodies, "nothing reaches the generator on bad input"


async def test_too_many_bytes_is_413(stack: FakeStack) -> None:
    async with build_router(stack, max_image_bytes=1000) as client:
        response = await _vqa(client, make_noise_image((256, 256)))
    assert response.status_code == 413 and "1000 bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize("failing", ["classifier", "retriever", "generator"])
async def test_a_dependency_down_gives_503_and_the_router_keeps_serving(
    stack: FakeStack, failing: str
) -> None:
    stack.fail[failing] = lambda: httpx.Response(
        503, json={"error": {"message": "loading", "type": "x", "code": "not_ready"}}
    )
    async with build_router(stack) as client:
        down = await _vqa(client, make_png())
        assert down.status_code == 503, down.text
        expected = "retrieval_unavailable" if failing == "retriever" else f"{failing}_unavailable"
        assert down.json()["error"]["code"] == expected
        del stack.fail[failing]
        again = await _vqa(client, make_png())
    assert again.status_code == 200


async def test_unreachable_dependency_is_503_not_500(stack: FakeStack) -> None:
    def refuse() -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    stack.fail["retriever"] = refuse
    async with build_router(stack) as client:
        response = await _vqa(client, make_png())
    assert response.status_code == 503
    assert "cannot reach retriever" in response.json()["error"]["message"]


async def test_readyz_follows_the_dependencies(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        ready = await client.get("/readyz")
        stack.fail["retriever"] = lambda: httpx.Response(503)
        degraded = await client.get("/readyz")
        health = await client.get("/healthz")
    assert ready.status_code == 200 and all(ready.json()["dependencies"].values())
    assert degraded.status_code == 503 and degraded.json()["dependencies"]["retriever"] is False
    assert health.status_code == 200


async def test_readyz_is_false_when_the_generator_lacks_the_configured_model(stack: FakeStack) -> None:
    async with build_router(stack, generator_model="not-served") as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["dependencies"]["generator"] is False


async def test_explicit_confidence_floor_overrides_the_calibrated_threshold(stack: FakeStack) -> None:
    stack.classifier_confidence = 0.7  # the classifier calls this confident (>= its threshold 0.5)
    async with build_router(stack) as client:
        calibrated = await client.post(
            "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": "Q?"}
        )
    async with build_router(stack, min_domain_confidence=0.8) as client:
        strict = await client.post(
            "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": "Q?"}
        )
    assert calibrated.json()["warnings"] == []
    assert "< 0.8" in strict.json()["warnings"][0]


async def test_metrics_record_each_stage(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        await client.post(
            "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": "Q?"}
        )
        metrics = (await client.get("/metrics")).text
    for stage in ("decode", "classify", "retrieve", "generate", "total"):
        assert f'mmedrag_stage_seconds_count{{service="router",stage="{stage}"}} 1.0' in metrics
    assert 'mmedrag_http_requests_total{route="/vqa",service="router",status="200"} 1.0' in metrics
