"""The MMed-RAG pipeline behind ``/vqa`` and ``/report``: decode → classify → retrieve → prompt → generate.

The upload is decoded and validated once, then normalised (``services.common.images.normalise``: 8-bit RGB
PNG, longest side at most the setting ``normalised_max_side``); the classifier, retriever and generator all
receive that compact PNG (the generator as a base64 data URL: the router never forwards a user URL), not
the original upload three times.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import PIL.Image

from services.common.answers import parse_yes_no
from services.common.errors import (
    DependencyTimeout,
    DependencyUnavailable,
    InvalidInput,
    ServiceError,
    UnprocessableImage,
)
from services.common.images import (
    DecodedImage,
    ImageLimits,
    decode_image,
    encode_png,
    normalise,
    to_data_url,
)
from services.common.noise import pure_noise_image
from services.common.prompts import build_prompt
from services.router.dependencies import ClassifierClient, Generation, GeneratorClient, RetrieverClient
from services.router.protocol import (
    DomainInfo,
    Evidence,
    Grounding,
    RAGResponse,
    RetrievalInfo,
    RetrievalMode,
)
from services.router.settings import RouterSettings

DOMAINS = ("radiology", "ophthalmology", "pathology")
Task = Literal["vqa", "report"]


@dataclass
class RAGRequest:
    """A validated request (the API layer has checked types and ranges)."""

    task: Task
    image: bytes
    request_id: str
    question: str | None = None
    domain: str | None = None
    retrieval: RetrievalMode = "adaptive"
    k_max: int | None = None
    gamma: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    grounding_check: bool = False


def _png_image(png: bytes) -> PIL.Image.Image:
    with PIL.Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB")


def decode_and_normalise(data: bytes, limits: ImageLimits, max_side: int) -> tuple[DecodedImage, bytes]:
    """Validate and decode the upload once, and make the one compact PNG every dependency receives."""
    decoded = decode_image(data, limits)
    return decoded, normalise(decoded.image, max_side=max_side)


@dataclass
class _Clock:
    timings_ms: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def stage(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings_ms[name] = round((now - since) * 1000, 2)
        return now


class RAGPipeline:
    """Orchestrates one request across the three dependencies."""

    def __init__(
        self,
        settings: RouterSettings,
        classifier: ClassifierClient,
        retriever: RetrieverClient,
        generator: GeneratorClient,
    ):
        self.settings = settings
        self.classifier = classifier
        self.retriever = retriever
        self.generator = generator
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)

    def validate(self, request: RAGRequest) -> None:
        """Range checks that depend on settings (types were checked by the API layer)."""
        s = self.settings
        if request.task == "vqa":
            if request.question is None or not request.question.strip():
                raise InvalidInput("'question' is required and must not be empty", param="question")
            if len(request.question) > s.max_question_chars:
                raise InvalidInput(
                    f"'question' is longer than {s.max_question_chars} characters", param="question"
                )
        if request.domain is not None and request.domain not in DOMAINS:
            raise InvalidInput(
                f"'domain' must be one of {', '.join(DOMAINS)}; got {request.domain!r}", param="domain"
            )
        if request.k_max is not None and not 1 <= request.k_max <= s.k_max_ceiling:
            raise InvalidInput(
                f"'k_max' must be between 1 and {s.k_max_ceiling}; got {request.k_max}", param="k_max"
            )
        if request.max_tokens is not None and not 1 <= request.max_tokens <= s.max_tokens_ceiling:
            raise InvalidInput(
                f"'max_tokens' must be between 1 and {s.max_tokens_ceiling}; got {request.max_tokens}",
                param="max_tokens",
            )

    async def run(self, request: RAGRequest) -> RAGResponse:
        self.validate(request)
        clock = _Clock()
        warnings: list[str] = []
        decoded, png = await anyio.to_thread.run_sync(
            decode_and_normalise, request.image, self.limits, self.settings.normalised_max_side
        )
        warnings.extend(decoded.warnings)
        mark = clock.stage("decode", clock.started)

        domain = await self._domain(request, png, warnings)
        mark = clock.stage("classify", mark)

        evidence, retrieval = await self._retrieve(request, png, domain.label, warnings)
        mark = clock.stage("retrieve", mark)

        references = [e.text for e in evidence if e.kept]
        prompt = build_prompt(request.task, domain.label, references, request.question)
        default_tokens = (
            self.settings.max_tokens_vqa if request.task == "vqa" else self.settings.max_tokens_report
        )
        max_tokens = request.max_tokens or default_tokens
        temperature = request.temperature
        if temperature is None:
            temperature = self.settings.temperature_default

        async def generate(prompt: str, png: bytes) -> Generation:
            return await self.generator.generate(
                prompt,
                to_data_url(png),
                max_tokens=max_tokens,
                temperature=temperature,
                request_id=request.request_id,
            )

        grounding: Grounding | None = None
        if request.grounding_check and request.task == "vqa":
            temperature = 0.0  # greedy: an answer that changes must change because of the input
            generation, grounding = await self._with_grounding(
                request, domain.label, references, png, generate
            )
        else:
            generation = await generate(prompt, png)
        mark = clock.stage("generate", mark)
        clock.timings_ms["total"] = round((mark - clock.started) * 1000, 2)

        text = generation.text.strip()
        answer = parse_yes_no(text) if request.task == "vqa" else text
        if not text:
            warnings.append("the model returned an empty answer")
        return RAGResponse(
            answer=answer,
            text=generation.text,
            domain=domain,
            evidence=evidence,
            retrieval=retrieval,
            model=generation.model,
            timings_ms=clock.timings_ms,
            request_id=request.request_id,
            warnings=warnings,
            grounding=grounding,
        )

    async def _with_grounding(
        self,
        request: RAGRequest,
        domain: str,
        references: list[str],
        png: bytes,
        generate: Callable[[str, bytes], Awaitable[Generation]],
    ) -> tuple[Generation, Grounding]:
        """The answer, plus the same question with a noise image and without references, sent together so
        the generator batches them (our server and vLLM both do). The noise image is the release code's
        pure Gaussian noise, seeded by the request id (reproducible from the audit log)."""
        noise = await anyio.to_thread.run_sync(
            lambda: encode_png(pure_noise_image(_png_image(png), key=request.request_id))
        )
        prompt = build_prompt("vqa", domain, references, request.question)
        runs: dict[str, tuple[str, bytes]] = {"answer": (prompt, png), "noise": (prompt, noise)}
        if references:
            runs["no_retrieval"] = (build_prompt("vqa", domain, [], request.question), png)
        try:
            async with asyncio.TaskGroup() as group:  # a failure cancels the other generations
                tasks = {name: group.create_task(generate(*run)) for name, run in runs.items()}
        except* ServiceError as errors:  # the first one, as itself: a clean 503/504 envelope
            raise errors.exceptions[0] from None
        results = {name: task.result() for name, task in tasks.items()}
        answer = parse_yes_no(results["answer"].text)
        noise_answer = parse_yes_no(results["noise"].text)
        plain = parse_yes_no(results["no_retrieval"].text) if "no_retrieval" in results else None
        return results["answer"], Grounding(
            image_dependent=noise_answer != answer,
            retrieval_changed_answer=None if plain is None else plain != answer,
            noise_image_answer=noise_answer,
            no_retrieval_answer=plain,
        )

    async def _domain(self, request: RAGRequest, png: bytes, warnings: list[str]) -> DomainInfo:
        if request.domain is not None:
            return DomainInfo(label=request.domain, source="client")
        result = await self.classifier.classify(png, request_id=request.request_id)
        floor = self.settings.min_domain_confidence
        if (not result.confident) if floor is None else result.confidence < floor:
            limit = "the calibrated threshold" if floor is None else str(floor)
            message = (
                f"the image does not look like any known domain (best: {result.label}, confidence "
                f"{result.confidence:.2f} < {limit}); pass 'domain' to override"
            )
            if self.settings.low_confidence_action == "refuse":
                raise UnprocessableImage(message, code="unknown_domain", param="image")
            warnings.append(message)
        return DomainInfo(label=result.label, probabilities=result.probabilities, source="classifier")

    async def _retrieve(
        self, request: RAGRequest, png: bytes, domain: str, warnings: list[str]
    ) -> tuple[list[Evidence], RetrievalInfo]:
        k_max = request.k_max or self.settings.k_max_default
        if request.retrieval == "off":
            return [], RetrievalInfo(mode="off", k_max=0, k=0, gamma=None)
        try:
            body = await self.retriever.retrieve(
                png,
                domain=domain,
                k_max=k_max,
                strategy=request.retrieval,
                gamma=request.gamma,
                request_id=request.request_id,
            )
        except (DependencyUnavailable, DependencyTimeout) as error:
            if self.settings.retrieval_failure != "degrade":
                raise DependencyUnavailable(
                    f"retrieval is unavailable: {error.message}", code="retrieval_unavailable"
                ) from error
            warnings.append(
                f"degraded: retrieval unavailable ({error.message}); answered without retrieved reports"
            )
            return [], RetrievalInfo(mode=request.retrieval, k_max=k_max, k=0, gamma=None)
        evidence = [
            Evidence(
                id=str(c["id"]),
                text=c["text"],
                score=float(c["score"]),
                rank=int(c["rank"]),
                source=str(c.get("source") or domain),
                kept=bool(c["kept"]),
            )
            for c in body["contexts"]
        ]
        kept = sum(e.kept for e in evidence)
        gamma = body.get("gamma") if request.retrieval == "adaptive" else None
        return evidence, RetrievalInfo(mode=request.retrieval, k_max=k_max, k=kept, gamma=gamma)

    async def readiness(self) -> dict[str, bool]:
        checks = {
            "classifier": await self.classifier.http.ready(),
            "retriever": await self.retriever.http.ready(),
            "generator": await self.generator.ready(),
        }
        return checks
