"""The httpx-only Python client against the real router app (dependencies faked at the HTTP layer)."""

from __future__ import annotations

import httpx
import pytest
from image_factories import make_png
from mmedrag_client import APIError, AsyncMMedRAGClient, Grounding, RAGResult
from router_fakes import FakeStack, build_router_app


def _client(stack: FakeStack, **overrides: object) -> AsyncMMedRAGClient:
    app = build_router_app(stack, **overrides)
    return AsyncMMedRAGClient("http://router", transport=httpx.ASGITransport(app=app))


async def test_vqa_returns_a_typed_result(tmp_path) -> None:
    image = tmp_path / "chest.png"
    image.write_bytes(make_png())
    async with _client(FakeStack()) as client:
        result = await client.vqa(image, "Is there an effusion?", k_max=2)
    assert isinstance(result, RAGResult)
    assert result.answer == "yes"
    assert result.retrieval.k_max == 2 and result.evidence[0].kept
    assert result.domain.source == "classifier" and result.request_id


async def test_grounding_check_option_returns_the_typed_signals() -> None:
    stack = FakeStack()
    stack.answer = "Yes."
    async with _client(stack) as client:
        plain = await client.vqa(make_png(), "Is there an effusion?")
        checked = await client.vqa(make_png(), "Is there an effusion?", grounding_check=True)
    assert plain.grounding is None
    assert isinstance(checked.grounding, Grounding)
    assert checked.grounding.image_dependent is False and checked.grounding.noise_image_answer == "yes"
    assert len(stack.generator_bodies) == 1 + 3


async def test_report_with_options_from_bytes() -> None:
    stack = FakeStack()
    stack.answer = "Normal study."
    async with _client(stack) as client:
        result = await client.report(make_png(), domain="radiology", retrieval="off")
    assert result.answer == "Normal study." and result.evidence == []
    assert stack.classifier_calls == 0


async def test_api_errors_become_exceptions_with_code_and_message() -> None:
    async with _client(FakeStack()) as client:
        with pytest.raises(APIError) as error:
            await client.vqa(b"not an image", "Is it?")
    assert error.value.status == 415
    assert error.value.code and "image format" in error.value.message


async def test_unknown_option_is_refused_before_sending() -> None:
    async with _client(FakeStack()) as client:
        with pytest.raises(TypeError, match="unknown option"):
            await client.vqa(make_png(), "Q?", colour="red")
