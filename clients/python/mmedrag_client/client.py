"""Synchronous and asynchronous clients for ``/vqa`` and ``/report``."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from mmedrag_client.types import APIError, RAGResult

ImageInput = str | Path | bytes | BinaryIO
OPTION_NAMES = ("domain", "retrieval", "k_max", "gamma", "max_tokens", "temperature", "grounding_check")


def _image_part(image: ImageInput) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        return ("image", image, "application/octet-stream")
    if isinstance(image, (str, Path)):
        path = Path(image)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return (path.name, path.read_bytes(), kind)
    return (getattr(image, "name", "image"), image.read(), "application/octet-stream")


def _form(options: dict[str, Any], question: str | None = None) -> dict[str, str]:
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {OPTION_NAMES}")
    form = {
        key: (str(value).lower() if isinstance(value, bool) else str(value))
        for key, value in options.items()
        if value is not None
    }
    if question is not None:
        form["question"] = question
    return form


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _result(response: httpx.Response) -> RAGResult:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            raise APIError(
                response.status_code,
                error.get("code", "error"),
                error.get("message", ""),
                error.get("param"),
                response.headers.get("X-Request-ID"),
            )
        except (ValueError, KeyError, TypeError):
            raise APIError(response.status_code, "http_error", response.text[:500]) from None
    return RAGResult.from_json(response.json())


class MMedRAGClient:
    """Blocking client. ``options``: domain, retrieval (adaptive|fixed|off), k_max, gamma, max_tokens,
    temperature."""

    def __init__(
        self, base_url: str, api_key: str | None = None, *, timeout: float = 120.0, transport: Any = None
    ):
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=_headers(api_key), transport=transport
        )

    def vqa(self, image: ImageInput, question: str, **options: Any) -> RAGResult:
        """Ask a yes/no question about an image; ``result.answer`` is "yes" or "no"."""
        files = {"image": _image_part(image)}
        return _result(self._http.post("/vqa", files=files, data=_form(options, question)))

    def report(self, image: ImageInput, **options: Any) -> RAGResult:
        """Generate a report for an image; ``result.answer`` is the report text."""
        return _result(self._http.post("/report", files={"image": _image_part(image)}, data=_form(options)))

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MMedRAGClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMMedRAGClient:
    """The same API for asyncio applications."""

    def __init__(
        self, base_url: str, api_key: str | None = None, *, timeout: float = 120.0, transport: Any = None
    ):
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers=_headers(api_key), transport=transport
        )

    async def vqa(self, image: ImageInput, question: str, **options: Any) -> RAGResult:
        files = {"image": _image_part(image)}
        return _result(await self._http.post("/vqa", files=files, data=_form(options, question)))

    async def report(self, image: ImageInput, **options: Any) -> RAGResult:
        return _result(
            await self._http.post("/report", files={"image": _image_part(image)}, data=_form(options))
        )

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMMedRAGClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
