"""The router's three dependencies, each behind a small typed client.

Classifier and retriever are our own services (multipart over HTTP, retried: both calls are
idempotent). The generator is reached through the OpenAI protocol with the ``openai`` client, exactly as
vLLM serves it: moving from our CPU server to vLLM is a change of ``generator_url`` and nothing else.
Each has a circuit breaker when the settings ask for one (``services.common.circuit``).

The internal token reaches the generator two ways: as the OpenAI API key (``Authorization: Bearer``, which
vLLM's ``--api-key`` checks) unless a separate generator key is configured, and always as
``X-Internal-Token`` (read by our services, ignored by vLLM).

A generator that refuses the router's key (401/403) or does not serve the configured model (404) is a
deployment error, not the client's: it becomes 503 ``generator_unavailable`` naming the setting to check,
without the generator's own body, and does not count towards the circuit breaker (``through_breaker``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from pydantic import SecretStr

from services.common.app import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER, token_value
from services.common.circuit import CircuitBreaker
from services.common.errors import DependencyTimeout, DependencyUnavailable
from services.common.http import DependencyMisconfigured, DownstreamError, ServiceClient, through_breaker
from services.common.prompts import build_chat_messages


@dataclass(frozen=True)
class Classification:
    label: str
    probabilities: dict[str, float]
    confidence: float
    confident: bool  # confidence at or above the classifier's calibrated threshold


class ClassifierClient:
    def __init__(self, client: ServiceClient):
        self.http = client

    async def classify(self, png: bytes, *, request_id: str) -> Classification:
        response = await self.http.request(
            "POST", "/classify", files={"image": ("image.png", png, "image/png")}, request_id=request_id
        )
        body = response.json()
        return Classification(
            label=body["label"],
            probabilities=dict(body["probabilities"]),
            confidence=float(body["confidence"]),
            confident=bool(body["confident"]),
        )


class RetrieverClient:
    def __init__(self, client: ServiceClient):
        self.http = client

    async def retrieve(
        self, png: bytes, *, domain: str, k_max: int, strategy: str, gamma: float | None, request_id: str
    ) -> dict[str, Any]:
        form: dict[str, str] = {"domain": domain, "k_max": str(k_max), "strategy": strategy}
        if gamma is not None:
            form["gamma"] = str(gamma)
        response = await self.http.request(
            "POST",
            "/retrieve",
            files={"image": ("image.png", png, "image/png")},
            data=form,
            request_id=request_id,
        )
        return response.json()


@dataclass(frozen=True)
class Generation:
    text: str
    model: str


NO_API_KEY = "EMPTY"  # what OpenAI clients send to a vLLM that has no --api-key
logger = logging.getLogger(__name__)


class GeneratorClient:
    """OpenAI chat completions; one image (as a data URL) and one text part per request."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str,
        timeout_s: float,
        http_client: httpx.AsyncClient | None = None,
        internal_token: SecretStr | str | None = None,
        breaker: CircuitBreaker | None = None,
    ):
        self.model = model
        self.base_url = base_url
        self.breaker = breaker
        token = token_value(internal_token)
        self.sends_internal_token = bool(token and api_key in ("", NO_API_KEY))
        if self.sends_internal_token:
            api_key = token
        # Our own httpx client (openai's defaults), so that it can be instrumented for tracing.
        self.httpx_client = http_client or openai.DefaultAsyncHttpxClient()
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or NO_API_KEY,
            timeout=timeout_s,
            max_retries=0,
            http_client=self.httpx_client,
            default_headers={INTERNAL_TOKEN_HEADER: token} if token else None,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def generate(
        self, prompt: str, image_url: str, *, max_tokens: int, temperature: float, request_id: str
    ) -> Generation:
        """One completion; through the breaker when there is one (not retried: generation is costly)."""
        return await through_breaker(
            self.breaker, lambda: self._generate(prompt, image_url, max_tokens, temperature, request_id)
        )

    async def _generate(
        self, prompt: str, image_url: str, max_tokens: int, temperature: float, request_id: str
    ) -> Generation:
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=build_chat_messages(prompt, image_url),  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                extra_headers={REQUEST_ID_HEADER: request_id},
            )
        except openai.APITimeoutError as exc:
            raise DependencyTimeout("generator did not answer before the deadline") from exc
        except openai.APIConnectionError as exc:
            raise DependencyUnavailable(
                f"cannot reach the generator at {self.base_url}", code="generator_unavailable"
            ) from exc
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403, 404):
                raise self._misconfigured(exc) from exc
            if exc.status_code >= 500:
                raise DependencyUnavailable(
                    f"generator failed ({exc.status_code})", code="generator_unavailable"
                ) from exc
            raise DownstreamError(
                exc.status_code,
                f"generator refused the request: {exc.message}",
                code="generator_rejected",
                error_type="invalid_request_error",
                param=None,
            ) from exc
        content = completion.choices[0].message.content or ""
        return Generation(text=content, model=completion.model)

    def _misconfigured(self, exc: openai.APIStatusError) -> DependencyMisconfigured:
        """What to check when the generator refuses the router or the model; its body goes to the log only."""
        status = exc.status_code
        logger.error("the generator answered %d to the router: %s", status, exc.message)
        if status == 404:
            hint = (
                f"it does not serve model '{self.model}' at {self.base_url}: check "
                "MMEDRAG_ROUTER_GENERATOR_MODEL against the generator's served model name (vLLM "
                "--served-model-name) and MMEDRAG_ROUTER_GENERATOR_URL (it ends in /v1)"
            )
        elif self.sends_internal_token:
            hint = (
                "it refused the router's key, the internal token: check MMEDRAG_INTERNAL_TOKEN (the same "
                "value on the router and the generator; vLLM: one of its --api-key values) or set "
                "MMEDRAG_ROUTER_GENERATOR_API_KEY to the generator's key"
            )
        else:
            hint = (
                "it refused the router's key: check MMEDRAG_ROUTER_GENERATOR_API_KEY against the "
                "generator's key (vLLM --api-key / VLLM_API_KEY, ours MMEDRAG_GENERATOR_API_KEY) and "
                "MMEDRAG_INTERNAL_TOKEN"
            )
        return DependencyMisconfigured(
            f"the generator cannot be used ({status}): {hint}", code="generator_unavailable"
        )

    async def ready(self) -> bool:
        """Reachable and serving the configured model (a wrong model name would 404 every request)."""
        try:
            models = await self._client.models.list(timeout=2.0)
        except openai.OpenAIError:
            return False
        return any(model.id == self.model for model in models.data)
