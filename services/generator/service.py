"""Chat completions on a transformers LLaVA model: what vLLM does on a GPU, done simply on a CPU.

The request is checked the way vLLM checks it (served model name, one image per prompt, no remote media,
context length), the conversation goes through the model folder's own chat template, and generation runs
in a worker thread under a lock: one ``generate`` call at a time, so requests never share the model's
state or the global RNG that seeded sampling uses.

Static batching: requests that wait for the model are run together as one left-padded ``generate``
(``services.common.batching``). Only requests with the same sampling parameters share a batch: all
greedy requests together, unseeded sampling by (temperature, top_p), and a seeded request always alone
(its sample must not depend on its neighbours). Each row keeps its own ``max_tokens`` (the batch runs to
the largest; a row stops at its own), stop strings and logprobs. vLLM's continuous batching (rows join
and leave at every step) is what production runs; this is the simple form for a CPU. ``max_batch=1``
turns it off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from transformers import (
    AutoProcessor,
    GenerationConfig,
    LlavaForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)

from services.common.artifacts import ArtifactError, read_json, require_file
from services.common.batching import BatchMetrics, MicroBatcher
from services.common.errors import InvalidInput, NotFound, NotReady
from services.common.images import ImageLimits, decode_data_url
from services.common.logprobs import top_token_logprobs
from services.common.threads import torch_threads
from services.generator.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
IMAGES_PER_PROMPT = 1
# What a folder must hold besides its weights (vLLM needs the same files).
REQUIRED_FILES = {
    "config.json": "model config",
    "tokenizer_config.json": "tokenizer config",
    "chat_template.jinja": "chat template",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SamplingParams:
    """What one generation needs, checked and resolved from the request."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: bool
    top_logprobs: int


@dataclass(frozen=True)
class _Job:
    """One request, preprocessed and checked, waiting for the model."""

    inputs: dict[str, torch.Tensor]  # the processor's output for this request alone (batch of 1)
    prompt_len: int
    params: SamplingParams


def _batch_key(job: _Job) -> Hashable:
    """Requests with equal keys may share one ``generate`` call."""
    params = job.params
    if params.temperature <= 0:
        return ("greedy",)
    if params.seed is not None:
        return object()  # equal to no other key: a seeded sample is reproducible only when run alone
    return ("sample", params.temperature, params.top_p)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None


class _RowStops(StoppingCriteria):
    """Per-row stopping: a row is done at its own ``max_tokens`` or when its new text holds a stop string.

    Rows of a batch differ in both; ``generate`` pads a finished row from then on and stops when every
    row is done.
    """

    def __init__(self, tokenizer: Any, rows: Sequence[SamplingParams], prompt_width: int):
        self.tokenizer = tokenizer
        self.rows = rows
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = []
        for row, params in zip(input_ids, self.rows, strict=True):
            finished = generated >= params.max_tokens
            if not finished and params.stop:
                text = self.tokenizer.decode(row[self.prompt_width :], skip_special_tokens=True)
                finished = any(stop in text for stop in params.stop)
            done.append(finished)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _collate(jobs: Sequence[_Job], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the requests' token rows into one batch (the new tokens then line up on the right)."""
    width = max(job.prompt_len for job in jobs)
    batch: dict[str, torch.Tensor] = {}
    for name in jobs[0].inputs:
        tensors = [job.inputs[name] for job in jobs]
        if name == "input_ids" or name.endswith("attention_mask") or name.endswith("token_type_ids"):
            fill = pad_token_id if name == "input_ids" else 0
            tensors = [
                torch.nn.functional.pad(t, (width - t.shape[-1], 0), value=fill) if t.shape[-1] < width else t
                for t in tensors
            ]
        batch[name] = torch.cat(tensors, dim=0)
    return batch


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


class GeneratorService:
    """Loads one LLaVA folder and answers OpenAI chat-completion requests with it.

    Args:
        folder: Hugging Face LLaVA folder (config, weights, tokenizer, processor, chat_template.jinja).
        served_model_name: the only ``model`` value requests may name.
        max_tokens_ceiling: the largest ``max_tokens`` accepted.
        dtype: weights dtype on the CPU ("float32" is fastest; "bfloat16" halves the memory).
        torch_threads: intra-op threads while generating (None: the process setting).
        image_limits: size and pixel limits of the decoded image.
        artifacts_root: named in the hint of an ArtifactError.
        max_batch: most waiting requests run as one ``generate`` (1 = one request at a time).
        max_wait_s: how long a request waits for others before its batch starts anyway.
    """

    def __init__(
        self,
        folder: Path,
        *,
        served_model_name: str = "mmedrag-llava",
        max_tokens_ceiling: int = 1024,
        dtype: str = "float32",
        torch_threads: int | None = None,
        image_limits: ImageLimits | None = None,
        artifacts_root: Path | None = None,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        self.folder = Path(folder)
        self.served_model_name = served_model_name
        self.max_tokens_ceiling = max_tokens_ceiling
        self.dtype = DTYPES[dtype]
        self.torch_threads = torch_threads
        self.image_limits = image_limits or ImageLimits()
        self.artifacts_root = artifacts_root
        self.processor: Any = None
        self.model: Any = None
        self.max_model_len = 0
        self.loaded_at: int | None = None
        self._lock = threading.Lock()
        # Preprocessing runs in the callers' threads, overlapping generation; one at a time, because a
        # Hugging Face fast tokenizer must not be reconfigured by two threads at once.
        self._processor_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._waiting_for_lock = 0
        self.running = 0  # requests being generated now
        self.batcher: MicroBatcher[_Job, Generation] = MicroBatcher(
            self._run_jobs, max_batch=max_batch, max_wait_s=max_wait_s, name="generate", key=_batch_key
        )

    @property
    def waiting(self) -> int:
        """Requests queued for the model (vLLM's num_requests_waiting)."""
        return self._waiting_for_lock + self.batcher.queue_depth

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Export batch sizes, waits and queue depth on an app's registry."""
        self.batcher.attach_metrics(BatchMetrics.on(registry, service="generator"))

    @classmethod
    def from_settings(cls, settings: GeneratorSettings) -> GeneratorService:
        return cls(
            settings.model_folder,
            served_model_name=settings.served_model_name,
            max_tokens_ceiling=settings.max_tokens_ceiling,
            dtype=settings.dtype,
            torch_threads=settings.torch_threads,
            artifacts_root=settings.artifacts,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
        )

    @property
    def ready(self) -> bool:
        return self.model is not None

    # ------------------------------------------------------------------------------------------ loading

    def _error(self, path: Path, problem: str) -> ArtifactError:
        return ArtifactError(path, problem, root=self.artifacts_root)

    def _check_folder(self) -> Path:
        """Every file the load needs, so a half-built folder fails with the missing file's name."""
        root = self.artifacts_root or self.folder.parent
        if not self.folder.is_dir():
            raise self._error(self.folder, "generator model folder not found")
        for name, what in REQUIRED_FILES.items():
            require_file(self.folder / name, root, f"generator {what}")
        if not any((self.folder / name).is_file() for name in PROCESSOR_FILES):
            raise self._error(self.folder / PROCESSOR_FILES[0], "generator processor config not found")
        weights = next((self.folder / n for n in WEIGHT_FILES if (self.folder / n).is_file()), None)
        if weights is None:
            raise self._error(self.folder / WEIGHT_FILES[0], "generator weights not found")
        config = read_json(self.folder / "config.json", root, "generator model config")
        if config.get("model_type") != "llava":
            raise self._error(
                self.folder / "config.json",
                f"model_type is {config.get('model_type')!r}; this server runs LLaVA ('llava') models",
            )
        return weights

    def load(self) -> None:
        """Load processor and model from the folder; ArtifactError names what is missing or broken."""
        weights = self._check_folder()
        started = time.perf_counter()
        try:
            processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        except Exception as exc:  # transformers raises many types on a broken folder
            raise self._error(
                self.folder / "tokenizer_config.json", f"processor cannot be loaded: {exc}"
            ) from exc
        if getattr(processor, "chat_template", None) is None:
            raise self._error(self.folder / "chat_template.jinja", "the processor has no chat template")
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                self.folder, dtype=self.dtype, local_files_only=True
            )
        except Exception as exc:
            raise self._error(weights, f"model cannot be loaded: {exc}") from exc
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id != model.config.image_token_id:
            raise self._error(
                self.folder / "config.json",
                f"image_token_index {model.config.image_token_id} differs from the tokenizer's "
                f"<image> id {image_token_id}",
            )
        self.processor = processor
        self.max_model_len = int(model.config.text_config.max_position_embeddings)
        self.model = model.eval()
        self.loaded_at = int(time.time())
        logger.info(
            "loaded generator %s from %s in %.1fs",
            self.served_model_name,
            self.folder,
            time.perf_counter() - started,
        )

    # ------------------------------------------------------------------------------------------ serving

    def models(self) -> ModelList:
        self._require_ready()
        card = ModelCard(
            id=self.served_model_name,
            created=self.loaded_at or int(time.time()),
            root=str(self.folder),
            max_model_len=self.max_model_len,
        )
        return ModelList(data=[card])

    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady("the generator model is still loading")

    def sampling_params(self, request: ChatCompletionRequest) -> SamplingParams:
        max_tokens = request.requested_max_tokens(min(DEFAULT_MAX_TOKENS, self.max_tokens_ceiling))
        if max_tokens > self.max_tokens_ceiling:
            raise InvalidInput(
                f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_ceiling}",
                param="max_tokens",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=tuple(request.stop_sequences),
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs or 0,
        )

    def _image_url(self, request: ChatCompletionRequest) -> str:
        """The request's one image (vLLM: --limit-mm-per-prompt image=1), refusing remote media."""
        urls: list[str] = []
        for message in request.messages:
            found = message.image_urls()
            if found and message.role != "user":
                raise InvalidInput(
                    f"images are accepted in user messages only, not {message.role}", param="messages"
                )
            urls.extend(found)
        if len(urls) != IMAGES_PER_PROMPT:
            raise InvalidInput(
                f"exactly {IMAGES_PER_PROMPT} image per request is supported (got {len(urls)}): this server "
                f"runs with a limit of {IMAGES_PER_PROMPT} image per prompt",
                param="messages",
                code="image_count",
            )
        url = urls[0].strip()
        if not url.lower().startswith("data:"):
            raise InvalidInput(
                "remote media not allowed: send the image inline as a base64 data URL "
                "(data:image/png;base64,...)",
                param="messages",
                code="remote_media_not_allowed",
            )
        return url

    async def chat(
        self, request: ChatCompletionRequest, *, request_id: str | None = None
    ) -> ChatCompletionResponse:
        """Answer one request; raises the error-envelope exceptions on anything a client must fix."""
        self._require_ready()
        if request.model is not None and request.model != self.served_model_name:
            raise NotFound(
                f"The model `{request.model}` does not exist.", param="model", code="model_not_found"
            )
        params = self.sampling_params(request)
        url = self._image_url(request)
        decoded = await anyio.to_thread.run_sync(decode_data_url, url, self.image_limits)
        conversation = [message.template_dict() for message in request.messages]
        started = time.perf_counter()
        if self.batcher.enabled:
            job = await anyio.to_thread.run_sync(self.prepare, conversation, decoded.image, params)
            generation = await self.batcher.submit(job)  # waits without holding a worker thread
        else:
            generation = await anyio.to_thread.run_sync(self.generate, conversation, decoded.image, params)
        logger.info(
            "request %s: %d prompt + %d completion tokens, finish %s, %.2fs",
            request_id,
            generation.prompt_tokens,
            generation.completion_tokens,
            generation.finish_reason,
            time.perf_counter() - started,
        )
        choice = Choice(
            message=AssistantMessage(content=generation.text),
            finish_reason=generation.finish_reason,
            logprobs=ChoiceLogprobs(content=generation.logprobs) if generation.logprobs is not None else None,
        )
        usage = Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
        )
        return ChatCompletionResponse(model=self.served_model_name, choices=[choice], usage=usage)

    def render(self, conversation: list[dict[str, Any]]) -> str:
        """The prompt text from the folder's chat template (the same text vLLM renders)."""
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------------------------------ generation

    def generate(
        self, conversation: list[dict[str, Any]], image: Image.Image, params: SamplingParams
    ) -> Generation:
        """Blocking generation of one answer (batched with concurrent callers' when batching is on);
        callers in an event loop run it in a worker thread."""
        self._require_ready()
        [generation] = self.batcher.submit_blocking([self.prepare(conversation, image, params)])
        return generation

    def prepare(self, conversation: list[dict[str, Any]], image: Image.Image, params: SamplingParams) -> _Job:
        """Render and preprocess one request and check its context length, before it queues."""
        self._require_ready()
        text = self.render(conversation)
        with self._processor_lock:
            inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        prompt_len = int(inputs["input_ids"].shape[1])
        self._check_context(prompt_len, params.max_tokens)
        return _Job(inputs=dict(inputs), prompt_len=prompt_len, params=params)

    def _run_jobs(self, jobs: list[_Job]) -> list[Generation]:
        """Generate a batch of compatible requests, in chunks that fit the context window."""
        results: list[Generation] = []
        chunk: list[_Job] = []
        for job in jobs:
            candidate = [*chunk, job]
            width = max(j.prompt_len for j in candidate) + max(j.params.max_tokens for j in candidate)
            if chunk and width > self.max_model_len:
                results.extend(self._generate_rows(chunk))
                candidate = [job]
            chunk = candidate
        results.extend(self._generate_rows(chunk))
        return results

    def _generate_rows(self, jobs: list[_Job]) -> list[Generation]:
        """One ``generate`` call for the rows (same sampling parameters, see ``_batch_key``)."""
        tokenizer = self.processor.tokenizer
        eos_ids = self._eos_ids()
        first = jobs[0].params
        sampling = first.temperature > 0
        logprobs = any(job.params.logprobs for job in jobs)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        with self._model_slot(len(jobs)):
            inputs = _collate(jobs, pad_token_id)
            width = int(inputs["input_ids"].shape[1])
            config = GenerationConfig(
                max_new_tokens=max(job.params.max_tokens for job in jobs),
                do_sample=sampling,
                temperature=first.temperature if sampling else 1.0,
                top_p=first.top_p if sampling else 1.0,
                eos_token_id=sorted(eos_ids),
                pad_token_id=pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                # the model must never write an image placeholder (it would need pixels to mean anything)
                suppress_tokens=[self.processor.image_token_id],
                return_dict_in_generate=True,
                output_logits=logprobs,
            )
            stopping = StoppingCriteriaList([_RowStops(tokenizer, [job.params for job in jobs], width)])
            seeded = len(jobs) == 1 and first.seed is not None
            with (
                torch_threads(self.torch_threads),
                torch.random.fork_rng(devices=[], enabled=seeded),
                torch.inference_mode(),
            ):
                if seeded:
                    torch.manual_seed(first.seed)
                output = self.model.generate(**inputs, generation_config=config, stopping_criteria=stopping)
        generations = []
        for row, job in enumerate(jobs):
            new_ids = output.sequences[row, width:].tolist()[: job.params.max_tokens]
            row_logits = [step[row] for step in output.logits] if job.params.logprobs else None
            generations.append(self._finish(new_ids, row_logits, job.params, job.prompt_len, eos_ids))
        return generations

    @contextmanager
    def _model_slot(self, rows: int) -> Iterator[None]:
        """Hold the model alone; counts requests waiting for it and running on it (for metrics)."""
        with self._counts_lock:
            self._waiting_for_lock += rows
        try:
            self._lock.acquire()
        finally:
            with self._counts_lock:
                self._waiting_for_lock -= rows
        try:
            with self._counts_lock:
                self.running += rows
            yield
        finally:
            with self._counts_lock:
                self.running -= rows
            self._lock.release()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {int(eos)}

    def _check_context(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:
            raise InvalidInput(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="max_tokens" if prompt_len < self.max_model_len else "messages",
                code="context_length_exceeded",
            )

    def _finish(
        self,
        new_ids: list[int],
        logits: Sequence[torch.Tensor] | None,  # one row of scores per generated token
        params: SamplingParams,
        prompt_len: int,
        eos_ids: set[int],
    ) -> Generation:
        """Cut at EOS or the first stop string; count tokens; pair each kept token with its logprobs.

        ``new_ids`` may end in padding after the row finished (batch mates went on); EOS, the stop
        string or ``max_tokens`` (the caller cuts there) always comes first.
        """
        tokenizer = self.processor.tokenizer
        finish: Literal["stop", "length"] = "length"
        end = next((i for i, token in enumerate(new_ids) if token in eos_ids), None)
        if end is not None:
            content_ids, completion_tokens, finish = new_ids[:end], end + 1, "stop"
        else:
            content_ids, completion_tokens = new_ids, len(new_ids)
        text = tokenizer.decode(content_ids, skip_special_tokens=True)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            # the shortest token prefix whose text reaches the stop string; the stop itself is not returned
            kept = next(
                k
                for k in range(1, len(content_ids) + 1)
                if _first_stop(tokenizer.decode(content_ids[:k], skip_special_tokens=True), params.stop)
                is not None
            )
            content_ids, completion_tokens, finish = content_ids[:kept], kept, "stop"
            text = text[:cut]
        token_logprobs = None
        if logits is not None:
            token_logprobs = [
                self._token_logprob(token, step_logits, params.top_logprobs)
                for token, step_logits in zip(content_ids, logits, strict=False)
            ]
        return Generation(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_len,
            completion_tokens=completion_tokens,
            logprobs=token_logprobs,
        )

    def _token_text(self, token_id: int) -> str:
        return self.processor.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_logprob(self, token_id: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        """Log-probabilities from the raw model logits (before temperature/top-p), as vLLM reports them."""
        alternatives = []
        for index, value in top_token_logprobs(logits, top):
            text = self._token_text(index)
            alternatives.append(TopLogprob(token=text, logprob=value, bytes=list(text.encode("utf-8"))))
        text = self._token_text(token_id)
        return TokenLogprob(
            token=text,
            logprob=float(torch.log_softmax(logits.float(), dim=-1)[token_id]),
            bytes=list(text.encode("utf-8")),
            top_logprobs=alternatives,
        )
