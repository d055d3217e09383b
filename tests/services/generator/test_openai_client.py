"""The official ``openai`` client as a real client of the generator: in-process and over a real socket."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from ports import free_base_port, serve_in_thread

from services.common.prompts import build_chat_messages, build_report_prompt
from services.generator.app import build_app
from services.generator.settings import GeneratorSettings


@pytest.mark.anyio
async def test_async_client_in_process(make_app: Callable, data_url: str) -> None:
    app = make_app(api_key="client-key")
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport) as http,
        openai.AsyncOpenAI(
            base_url="http://generator/v1", api_key="client-key", http_client=http, max_retries=0
        ) as client,
    ):
        completion = await client.chat.completions.create(
            model="mmedrag-llava",
            messages=build_chat_messages(build_report_prompt("ophthalmology"), data_url),  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        )
        [choice] = completion.choices
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == completion.usage.completion_tokens
        assert completion.model == "mmedrag-llava"
        assert (
            completion.usage.total_tokens
            == completion.usage.prompt_tokens + completion.usage.completion_tokens
        )
        models = await client.models.list()
        assert [model.id for model in models.data] == ["mmedrag-llava"]

        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(
                model="gpt-4o",
                messages=build_chat_messages("hi", data_url),
                max_tokens=1,  # type: ignore[arg-type]
            )
        assert "does not exist" in missing.value.message
        with pytest.raises(openai.BadRequestError) as remote:
            await client.chat.completions.create(
                model="mmedrag-llava",
                messages=build_chat_messages("hi", "https://example.org/cxr.png"),  # type: ignore[arg-type]
                max_tokens=1,
            )
        assert "remote media not allowed" in remote.value.message

    async with (
        httpx.AsyncClient(transport=transport) as http,
        openai.AsyncOpenAI(
            base_url="http://generator/v1", api_key="wrong", http_client=http, max_retries=0
        ) as bad,
    ):
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


@pytest.fixture
def live_server(generator_folder: Path) -> Iterator[str]:
    """uvicorn on loopback; the app loads the model itself in its lifespan, as in production."""
    settings = GeneratorSettings(model_dir=generator_folder, port=free_base_port(), torch_threads=1)
    with serve_in_thread(build_app(settings), settings.port) as url:
        yield f"{url}/v1"


def test_sync_client_over_http(live_server: str, data_url: str) -> None:
    with openai.OpenAI(base_url=live_server, api_key="EMPTY", max_retries=0, timeout=60) as client:
        completion = client.chat.completions.create(
            model="mmedrag-llava",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": "Is there a nodule?"},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
            extra_headers={"X-Request-ID": "req-123"},
        )
        assert completion.choices[0].message.content
        assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
        assert completion.id.startswith("chatcmpl-")
        assert [model.id for model in client.models.list().data] == ["mmedrag-llava"]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="mmedrag-llava", messages=[{"role": "user", "content": "no image"}], max_tokens=1
            )
        assert "image" in refused.value.message
