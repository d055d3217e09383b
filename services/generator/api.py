"""Thin routes of the OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/models`` and ``/health``."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from services.common.errors import ErrorResponse
from services.generator.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelList
from services.generator.service import GeneratorService
from services.generator.settings import GeneratorSettings

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503)}


def get_service(request: Request) -> GeneratorService:
    return request.app.state.generator


def require_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has a key (vLLM --api-key); open otherwise."""
    settings: GeneratorSettings = request.app.state.settings
    if settings.api_key is None:
        return
    expected = f"Bearer {settings.api_key.get_secret_value()}"
    given = request.headers.get("Authorization", "")
    # constant-time comparison, so the key cannot be guessed byte by byte from response times
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status_code=401,
            detail="invalid or missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


ServiceDep = Annotated[GeneratorService, Depends(get_service)]

v1 = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)], responses=ERRORS)
health = APIRouter(tags=["health"])


@v1.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> ChatCompletionResponse:
    """One answer to a conversation with one image (OpenAI chat completions, no streaming)."""
    return await service.chat(body, request_id=getattr(request.state, "request_id", None))


@v1.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    """The served model (one name, like vLLM --served-model-name)."""
    return service.models()


@health.get("/health", summary="vLLM's health path: 200 once the model is loaded")
async def vllm_health(service: ServiceDep) -> JSONResponse:
    """200 when the model is loaded, 503 while it is loading."""
    if not service.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})
