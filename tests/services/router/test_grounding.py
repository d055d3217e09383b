"""``grounding_check=true`` on ``/vqa``: the answer again with a noise image and without the references, in
one go, and whether the answer changed (the paper's copy-reference and over-reliance signals, per request)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from image_factories import make_png
from router_fakes import FakeStack, build_router

from services.common.images import decode_data_url


@pytest.fixture
def stack() -> FakeStack:
    return FakeStack()


def _image_std(body: dict[str, Any]) -> float:
    """Pixel spread of the image the generator received: the noise image is far from uniform."""
    url = next(part for part in body["messages"][0]["content"] if part["type"] == "image_url")["image_url"]
    image = decode_data_url(url["url"]).image
    return float(np.asarray(image.convert("L"), dtype=np.float64).std())


def _prompt(body: dict[str, Any]) -> str:
    return next(part for part in body["messages"][0]["content"] if part["type"] == "text")["text"]


async def _vqa(client: httpx.AsyncClient, **form: Any) -> httpx.Response:
    form.setdefault("question", "Is there a pleural effusion?")
    return await client.post(
        "/vqa",
        files={"image": ("x.png", make_png(), "image/png")},
        data={k: str(v) for k, v in form.items()},
    )


async def test_off_by_default_one_generation_and_no_grounding(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        response = await _vqa(client)
    assert response.status_code == 200
    assert response.json()["grounding"] is None
    assert len(stack.generator_bodies) == 1


async def test_same_answer_for_the_noise_image_means_not_image_dependent(stack: FakeStack) -> None:
    stack.answer = "Yes."
    async with build_router(stack) as client:
        response = await _vqa(client, grounding_check="true")
    body = response.json()
    assert response.status_code == 200, body
    assert body["answer"] == "yes"
    assert body["grounding"] == {
        "image_dependent": False,
        "retrieval_changed_answer": False,
        "noise_image_answer": "yes",
        "no_retrieval_answer": "yes",
    }
    # three generations: the answer, the noise image with the same prompt, the image without references
    assert len(stack.generator_bodies) == 3
    prompts = [_prompt(b) for b in stack.generator_bodies]
    with_refs = [p for p in prompts if "No pleural effusion." in p]
    assert len(with_refs) == 2 and len(set(prompts)) == 2
    spreads = sorted(_image_std(b) for b in stack.generator_bodies)
    assert spreads[-1] > 40 > spreads[1]  # exactly one call got the noise image


async def test_an_answer_that_follows_the_image_and_the_references(stack: FakeStack) -> None:
    # "no" for the noise image; "no" without references: the answer depends on both
    def answer(body: dict[str, Any]) -> str:
        if _image_std(body) > 40:
            return "No."
        return "Yes." if "No pleural effusion." in _prompt(body) else "No."

    stack.answer_for = answer
    async with build_router(stack) as client:
        response = await _vqa(client, grounding_check="true")
    body = response.json()
    assert body["answer"] == "yes"
    assert body["grounding"]["image_dependent"] is True
    assert body["grounding"]["retrieval_changed_answer"] is True
    assert body["grounding"]["noise_image_answer"] == "no"
    assert body["grounding"]["no_retrieval_answer"] == "no"


async def test_without_kept_references_the_retrieval_signal_is_null(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        response = await _vqa(client, grounding_check="true", retrieval="off")
    grounding = response.json()["grounding"]
    assert grounding["retrieval_changed_answer"] is None and grounding["no_retrieval_answer"] is None
    assert len(stack.generator_bodies) == 2


async def test_the_noise_image_is_reproducible_from_the_request_id(stack: FakeStack) -> None:
    async with build_router(stack) as client:
        for _ in range(2):
            await client.post(
                "/vqa",
                files={"image": ("x.png", make_png(), "image/png")},
                data={"question": "Is there an effusion?", "grounding_check": "true", "retrieval": "off"},
                headers={"X-Request-ID": "req-grounding-1"},
            )
    noise = [b for b in stack.generator_bodies if _image_std(b) > 40]
    assert len(noise) == 2 and noise[0]["messages"] == noise[1]["messages"]


async def test_a_generator_failure_during_the_check_is_a_clean_503(stack: FakeStack) -> None:
    stack.fail["generator"] = lambda: httpx.Response(500, json={"error": {"message": "boom"}})
    async with build_router(stack) as client:
        response = await _vqa(client, grounding_check="true")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "generator_unavailable"
