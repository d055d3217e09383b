"""A fake classifier, retriever and generator behind the real router, faked at the HTTP layer.

Wire formats stay real (multipart forms, OpenAI JSON); each fake records what it received.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from services.common.http import ServiceClient
from services.router.app import build_app
from services.router.dependencies import ClassifierClient, GeneratorClient, RetrieverClient
from services.router.service import RAGPipeline
from services.router.settings import RouterSettings

CORPUS = {
    "radiology": ["No pleural effusion.", "Small left pleural effusion.", "The heart is enlarged."],
    "ophthalmology": ["The cup-to-disc ratio is 0.7.", "Scattered drusen at the macula."],
    "pathology": ["Sheets of atypical cells.", "No tumour is identified."],
}
RESPONSE_FIELDS = {
    "answer",
    "text",
    "domain",
    "evidence",
    "retrieval",
    "model",
    "timings_ms",
    "request_id",
    "warnings",
    "grounding",
    "disclaimer",
}


class FakeStack:
    """Records what each dependency received and answers like the real services do."""

    def __init__(self) -> None:
        self.classifier_calls = 0
        self.retriever_forms: list[dict[str, str]] = []
        self.generator_bodies: list[dict[str, Any]] = []
        self.classifier_label = "radiology"
        self.classifier_confidence = 0.9
        self.fail: dict[str, Callable[[], httpx.Response]] = {}
        self.answer = "Yes, there is an effusion."
        # answer as a function of the chat request body (None: always ``answer``)
        self.answer_for: Callable[[dict[str, Any]], str] | None = None

    def classifier(self, request: httpx.Request) -> httpx.Response:
        if "classifier" in self.fail:
            return self.fail["classifier"]()
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"ready": True})
        self.classifier_calls += 1
        rest = (1 - self.classifier_confidence) / 2
        probabilities = {d: rest for d in ("radiology", "ophthalmology", "pathology")}
        probabilities[self.classifier_label] = self.classifier_confidence
        body = {
            "label": self.classifier_label,
            "probabilities": probabilities,
            "confidence": self.classifier_confidence,
            "confident": self.classifier_confidence >= 0.5,
        }
        return httpx.Response(200, json=body)

    def retriever(self, request: httpx.Request) -> httpx.Response:
        if "retriever" in self.fail:
            return self.fail["retriever"]()
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"ready": True})
        form = _form_fields(request)
        self.retriever_forms.append(form)
        texts = CORPUS[form["domain"]][: int(form["k_max"])]
        keep = 1 if form["strategy"] == "adaptive" else len(texts)
        contexts = [
            {
                "id": f"{form['domain']}-{i}",
                "text": t,
                "score": 0.9 - 0.1 * i,
                "rank": i + 1,
                "source": "medsynth",
                "kept": i < keep,
            }
            for i, t in enumerate(texts)
        ]
        return httpx.Response(
            200, json={"domain": form["domain"], "k": keep, "gamma": 0.05, "contexts": contexts}
        )

    def generator(self, request: httpx.Request) -> httpx.Response:
        if "generator" in self.fail:
            return self.fail["generator"]()
        if request.url.path == "/v1/models":
            return httpx.Response(
                200,
                json={
                    "object": "list",
                    "data": [{"id": "mmedrag-llava", "object": "model", "created": 0, "owned_by": "mmedrag"}],
                },
            )
        body = json.loads(request.content)
        self.generator_bodies.append(body)
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": self.answer if self.answer_for is None else self.answer_for(body),
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            },
        )


def _form_fields(request: httpx.Request) -> dict[str, str]:
    content_type = request.headers["content-type"]
    boundary = content_type.split("boundary=")[1].encode()
    fields = {}
    for part in request.content.split(b"--" + boundary):
        if b'name="' not in part or b"filename=" in part:
            continue
        header, _, value = part.partition(b"\r\n\r\n")
        name = header.split(b'name="')[1].split(b'"')[0].decode()
        fields[name] = value.rstrip(b"\r\n").decode()
    return fields


def build_router_app(stack: FakeStack, **overrides: Any) -> Any:
    """The real router app over the fakes; auth is off unless a test turns it on."""
    overrides.setdefault("auth_enabled", False)
    settings = RouterSettings(retries=1, **overrides)
    pipeline = RAGPipeline(
        settings,
        ClassifierClient(
            ServiceClient(
                "classifier",
                "http://classifier",
                timeout_s=5,
                retries=1,
                backoff_s=0,
                transport=httpx.MockTransport(stack.classifier),
            )
        ),
        RetrieverClient(
            ServiceClient(
                "retriever",
                "http://retriever",
                timeout_s=5,
                retries=1,
                backoff_s=0,
                transport=httpx.MockTransport(stack.retriever),
            )
        ),
        GeneratorClient(
            "http://generator/v1",
            model=settings.generator_model,
            api_key="EMPTY",
            timeout_s=5,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(stack.generator)),
        ),
    )
    return build_app(settings, pipeline)


def build_router(stack: FakeStack, **overrides: Any) -> httpx.AsyncClient:
    """An httpx client talking to the router app in-process."""
    app = build_router_app(stack, **overrides)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
