"""The OpenAI-compatible API in-process: answers, sampling controls, logprobs and every refusal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from services.common.prompts import build_chat_messages, build_vqa_prompt, render_conversation
from services.generator.app import build_app
from services.generator.service import GeneratorService
from services.generator.settings import GeneratorSettings

pytestmark = pytest.mark.anyio
QUESTION = build_vqa_prompt("Is there a pleural effusion?", "radiology", ["Small left effusion."])


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://generator")


async def post_chat(app: FastAPI, body: dict, headers: dict | None = None) -> httpx.Response:
    async with client_for(app) as client:
        return await client.post("/v1/chat/completions", json=body, headers=headers)


def test_chat_template_renders_the_training_conversation(generator_service: GeneratorService) -> None:
    messages = build_chat_messages(QUESTION, "data:image/png;base64,AAAA")
    processor = generator_service.processor
    expected = render_conversation(QUESTION)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert (
        processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == expected
    )


async def test_answer_has_the_openai_shape_and_exact_usage(
    make_app: Callable, chat_body: Callable, generator_service: GeneratorService
) -> None:
    response = await post_chat(make_app(), chat_body(prompt=QUESTION, max_tokens=6))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "mmedrag-llava"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["logprobs"] is None
    # the prompt counts the rendered text with <image> expanded to one token per patch (16 at 64 px)
    tokenizer = generator_service.processor.tokenizer
    text_tokens = len(tokenizer(render_conversation(QUESTION))["input_ids"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == text_tokens - 1 + 16
    assert usage["completion_tokens"] == 6 and choice["finish_reason"] == "length"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.headers["X-Request-ID"]


async def test_greedy_is_deterministic_and_a_seed_fixes_sampling(
    make_app: Callable, chat_body: Callable
) -> None:
    app = make_app()
    greedy = [
        (await post_chat(app, chat_body())).json()["choices"][0]["message"]["content"] for _ in range(2)
    ]
    assert greedy[0] == greedy[1]
    sampled = [
        (await post_chat(app, chat_body(temperature=1.5, seed=s))).json()["choices"][0]["message"]["content"]
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


async def test_concurrent_requests_get_the_answers_they_get_alone(
    make_app: Callable, chat_body: Callable
) -> None:
    app = make_app()
    bodies = [chat_body(prompt="Describe the image."), chat_body(prompt=QUESTION)]
    alone = [(await post_chat(app, body)).json()["choices"][0]["message"]["content"] for body in bodies]
    together = await asyncio.gather(*(post_chat(app, body) for body in bodies))
    assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone


async def test_max_tokens_and_max_completion_tokens_cap_the_answer(
    make_app: Callable, chat_body: Callable
) -> None:
    app = make_app()
    short = (await post_chat(app, chat_body(max_tokens=3))).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    newer = (await post_chat(app, chat_body(max_tokens=9, max_completion_tokens=2))).json()
    assert newer["usage"]["completion_tokens"] == 2


async def test_logprobs_have_one_entry_per_token_with_sorted_alternatives(
    make_app: Callable, chat_body: Callable
) -> None:
    body = (await post_chat(make_app(), chat_body(max_tokens=5, logprobs=True, top_logprobs=3))).json()
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"] == 5
    assert "".join(entry["token"] for entry in entries) == body["choices"][0]["message"]["content"]
    for entry in entries:
        assert entry["logprob"] <= 0
        alternatives = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        # greedy picks the most likely token, so it heads its own alternatives
        assert entry["logprob"] == pytest.approx(alternatives[0])
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    no_top = (await post_chat(make_app(), chat_body(max_tokens=2, logprobs=True))).json()
    assert all(entry["top_logprobs"] == [] for entry in no_top["choices"][0]["logprobs"]["content"])


async def test_stop_string_ends_the_answer_before_it(make_app: Callable, chat_body: Callable) -> None:
    app = make_app()
    full = (await post_chat(app, chat_body(max_tokens=12))).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    cut = (await post_chat(app, chat_body(max_tokens=12, stop=[stop]))).json()
    assert cut["choices"][0]["message"]["content"] == full[: full.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 12


async def test_context_length_is_checked_like_vllm(make_app: Callable, chat_body: Callable) -> None:
    app = make_app()
    too_long = await post_chat(app, chat_body(prompt="effusion " * 2100))
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 2048 tokens" in error["message"]
    tight = await post_chat(app, chat_body(prompt="effusion " * 1960, max_tokens=64))
    assert tight.status_code == 400 and tight.json()["error"]["param"] == "max_tokens"


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _with_content(body: dict, content: list | str, role: str = "user") -> dict:
    return {**body, "messages": [{"role": role, "content": content}]}


BAD_REQUESTS: dict[str, tuple[Callable[[dict, str], dict], int, str, str | None]] = {
    # name: (make the body from a good one and the data URL, status, message part, param)
    "no image": (lambda b, u: _with_content(b, "Is there an effusion?"), 400, "exactly 1 image", "messages"),
    "two images": (
        lambda b, u: _with_content(b, [_image_part(u), _image_part(u), {"type": "text", "text": "?"}]),
        400,
        "(got 2)",
        "messages",
    ),
    "http url": (
        lambda b, u: _with_content(
            b, [_image_part("https://example.org/x.png"), {"type": "text", "text": "?"}]
        ),
        400,
        "remote media not allowed",
        "messages",
    ),
    "bad base64": (
        lambda b, u: _with_content(
            b, [_image_part("data:image/png;base64,@@@"), {"type": "text", "text": "?"}]
        ),
        400,
        "not valid base64",
        "image_url",
    ),
    "not an image": (
        lambda b, u: _with_content(
            b, [_image_part("data:image/png;base64,aGVsbG8="), {"type": "text", "text": "?"}]
        ),
        415,
        "unrecognised image format",
        None,
    ),
    "image in system message": (
        lambda b, u: {**b, "messages": [{"role": "system", "content": [_image_part(u)]}, *b["messages"]]},
        400,
        "user messages only",
        "messages",
    ),
    "stream": (lambda b, u: {**b, "stream": True}, 400, "streaming is not supported", "stream"),
    "n": (lambda b, u: {**b, "n": 2}, 400, "only n=1", "n"),
    "unknown model": (lambda b, u: {**b, "model": "gpt-4o"}, 404, "`gpt-4o` does not exist", "model"),
    "temperature": (lambda b, u: {**b, "temperature": 2.5}, 400, "less than or equal to 2", "temperature"),
    "missing messages": (
        lambda b, u: {k: v for k, v in b.items() if k != "messages"},
        400,
        "'messages' is required",
        "messages",
    ),
    "empty messages": (lambda b, u: {**b, "messages": []}, 400, "at least 1 item", "messages"),
    "unknown role": (
        lambda b, u: _with_content(b, "hi", role="tool"),
        400,
        "'messages.0.role'",
        "messages.0.role",
    ),
    "max_tokens over ceiling": (lambda b, u: {**b, "max_tokens": 65}, 400, "at most 64", "max_tokens"),
    "max_tokens zero": (lambda b, u: {**b, "max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
    "top_logprobs without logprobs": (
        lambda b, u: {**b, "top_logprobs": 2},
        400,
        "requires logprobs",
        "top_logprobs",
    ),
    "top_logprobs too many": (
        lambda b, u: {**b, "logprobs": True, "top_logprobs": 21},
        400,
        "less than or equal to 20",
        "top_logprobs",
    ),
    "too many stops": (lambda b, u: {**b, "stop": list("abcde")}, 400, "at most 4 stop", "stop"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_are_refused_in_the_envelope(
    case: str, make_app: Callable, chat_body: Callable, data_url: str
) -> None:
    change, status, message, param = BAD_REQUESTS[case]
    response = await post_chat(make_app(), change(chat_body(), data_url))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


async def test_unknown_fields_are_ignored(make_app: Callable, chat_body: Callable) -> None:
    response = await post_chat(make_app(), chat_body(max_tokens=1, frequency_penalty=0.0, logit_bias={}))
    assert response.status_code == 200


async def test_api_key_guards_the_v1_routes_only(make_app: Callable, chat_body: Callable) -> None:
    app = make_app(api_key="s3cret")
    async with client_for(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = await client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]["message"]
        refused = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        good = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/v1/models", headers=good)).status_code == 200
        assert (
            await client.post("/v1/chat/completions", json=chat_body(max_tokens=1), headers=good)
        ).status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_models_health_and_readiness_when_loaded(make_app: Callable, generator_folder: Path) -> None:
    async with client_for(make_app()) as client:
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [
            ("mmedrag-llava", "model", 2048)
        ]
        assert models["data"][0]["root"] == str(generator_folder)
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = (await client.get("/metrics")).text
        assert "mmedrag_generator_requests_waiting 0.0" in metrics


async def test_before_loading_everything_answers_503(generator_folder: Path, chat_body: Callable) -> None:
    app = build_app(GeneratorSettings(model_dir=generator_folder))  # lifespan not run: nothing loaded
    async with client_for(app) as client:
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/readyz")).status_code == 503
        models = await client.get("/v1/models")
        assert models.status_code == 503 and models.json()["error"]["code"] == "not_ready"
        chat = await client.post("/v1/chat/completions", json=chat_body())
        assert chat.status_code == 503


async def test_lifespan_loads_the_model_named_by_the_settings(generator_folder: Path) -> None:
    settings = GeneratorSettings(artifacts=generator_folder.parent, served_model_name="tiny", torch_threads=1)
    assert settings.model_folder == generator_folder
    app = build_app(settings)
    async with app.router.lifespan_context(app), client_for(app) as client:
        assert (await client.get("/readyz")).json()["ready"] is True
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "tiny"
