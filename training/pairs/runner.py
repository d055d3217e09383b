"""The four runs of the base model on the preference split, in-process or over HTTP.

Items come from a MedSynth folder (or any folder in its layout): ``<domain>/preference_vqa.jsonl`` (VQA)
and ``<domain>/preference_report.json`` (reports, in the domain's release report format), read by the
release loaders of ``training.data.formats``.

Each item is run four times (``training.pairs.rules.RUNS``): real or noise image × no reference or the
top-1 report retrieved for the *real* image. Prompts are ``services.common.prompts.build_prompt``; the
model reads ``render_conversation(prompt)`` (in-process) or the folder's chat template, which renders the
same text (HTTP). Decoding is greedy.

Two interchangeable generators (``Generator``):

- ``InProcessGenerator``: transformers ``LlavaForConditionalGeneration`` from a model folder, batched
  (left padding), greedy, ``max_new_tokens``; what the generator service does for one request, done for a
  batch: the image placeholder token is suppressed, the answer is cut at the first EOS and decoded without
  special tokens. For the evaluator it can also return the first generated token's top log-probabilities
  (``top_logprobs``, as the generator service computes them: log-softmax of the raw logits) and decode
  with another strategy (``decoding``: beam search, VCD, DoLa through
  ``training.evaluate.decoding.decode_batch``); ``generate_full`` returns both as ``Generation``.
- ``HttpGenerator``: any OpenAI-compatible server (``services/generator`` or ``vllm serve``) through the
  ``openai`` client, ``temperature=0`` and a fixed ``seed``, at most ``concurrency`` requests in flight.

Both read images the way the services do (``decode_image`` → 8-bit RGB; over HTTP as a PNG data URL, which
decodes to the same pixels), so the same model gives the same answers either way (tested). Batched greedy
decoding equals one-at-a-time decoding on our models (tested); with padding, matrix shapes differ, so a
near-tie between two tokens could in principle flip at float precision.

Two interchangeable retrievers (``Retriever``): ``InProcessRetriever`` (the domain's ``ClipModel`` and the
cosine over the distinct texts of the retriever_train corpus: what ``mmedrag index`` stores and the
service ranks) and ``HttpRetriever`` (``POST /retrieve`` with ``k_max=1``, ``strategy=fixed``).
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
from tqdm.auto import tqdm

from services.common.app import internal_auth_headers
from services.common.logprobs import top_logprobs_by_text
from services.common.prompts import Task, build_prompt, render_conversation
from services.common.threads import torch_threads
from training.pairs.noise import load_image
from training.pairs.rules import NOISE_RUNS, RETRIEVAL_RUNS, RUNS, Run, RunTexts

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_CONCURRENCY = 4
DEFAULT_SEED = 0
TASKS: tuple[Task, ...] = ("vqa", "report")
PREFERENCE_SPLIT = "preference"


# --------------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class PairItem:
    """One question (VQA) or one report to write, with its image and ground truth."""

    id: str
    domain: str
    task: Task
    image: str  # relative to image_root
    image_root: Path
    truth: str  # VQA: the label as written ("Yes." / "No"); report: the ground-truth report
    question: str | None = None

    @property
    def path(self) -> Path:
        return self.image_root / self.image

    def prompt(self, references: Sequence[str] = ()) -> str:
        return build_prompt(self.task, self.domain, references, self.question)


def split_files(data_dir: Path, domain: str, split: str = PREFERENCE_SPLIT) -> dict[Task, Path]:
    """The release files of a split: ``<split>_vqa.jsonl`` and ``<split>_report.json``."""
    folder = Path(data_dir) / domain
    return {"vqa": folder / f"{split}_vqa.jsonl", "report": folder / f"{split}_report.json"}


def load_items(
    data_dir: Path, domain: str, task: Task, *, split: str = PREFERENCE_SPLIT, limit: int | None = None
) -> list[PairItem]:
    """The items of one domain and task, in file order (the first ``limit`` when given)."""
    from training.data.formats import get_format
    from training.data.medsynth.release import RELEASE_FORMATS, dataset_name

    if domain not in RELEASE_FORMATS:
        raise ValueError(f"domain must be one of {', '.join(RELEASE_FORMATS)}, got {domain!r}")
    path = split_files(data_dir, domain, split)[task]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a MedSynth folder (make one with `mmedrag data synth`)"
        )
    root = Path(data_dir).resolve() / domain / "images"
    format_name = "vqa" if task == "vqa" else RELEASE_FORMATS[domain][1]
    records = get_format(format_name).load(path, root, dataset=dataset_name(domain), domain=domain).records
    if limit is not None:
        records = records[:limit]
    items = []
    for record in records:
        if task == "vqa":
            truth = str(record.metadata.get("raw_answer", record.answer))
            items.append(PairItem(record.id, domain, task, record.image, root, truth, record.question))
        else:
            items.append(PairItem(record.id, domain, task, record.image, root, record.report))
    return items


# --------------------------------------------------------------------------------------------------
# Generators


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: an image file and the user text (``build_prompt`` output)."""

    image: Path
    prompt: str


class Generator(Protocol):
    """Greedy answers for many requests, in request order."""

    name: str

    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False) -> list[str]: ...


def _unique(requests: Sequence[GenerationRequest]) -> tuple[list[GenerationRequest], list[int]]:
    """Distinct requests and, for each request, the index of its distinct twin."""
    position: dict[GenerationRequest, int] = {}
    index = [position.setdefault(request, len(position)) for request in requests]
    return list(position), index


@dataclass(frozen=True)
class Generation:
    """One generated answer and, when asked for, its first token's top log-probabilities."""

    text: str
    # token text -> log-probability at the first generated position (empty unless top_logprobs > 0,
    # or a decoding strategy returned them)
    first_token_logprobs: dict[str, float] = field(default_factory=dict)


class InProcessGenerator:
    """A LLaVA folder loaded with transformers; batched greedy generation with left padding.

    Args:
        folder: Hugging Face LLaVA folder (``artifacts/generator``).
        batch_size: requests per ``generate`` call.
        max_new_tokens: the longest answer (``generate(..., max_new_tokens=n)`` overrides it per call).
        threads: torch intra-op threads while generating (None: the process setting).
        top_logprobs: how many top log-probabilities of the first generated token ``generate_full``
            returns (0: none; greedy path only, a ``decoding`` strategy returns its own).
        decoding: a ``training.evaluate.decoding.DecodingConfig``; None: greedy ``model.generate`` here.
            Given, every batch goes through ``decode_batch`` (beam, VCD, DoLa, or its greedy).
        seed: seed passed to ``decode_batch`` (strategies that draw noise, e.g. VCD).
    """

    def __init__(
        self,
        folder: Path,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        threads: int | None = None,
        top_logprobs: int = 0,
        decoding: Any | None = None,
        seed: int = DEFAULT_SEED,
    ):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.folder}: no generator model folder (config.json missing); build one with "
                "`mmedrag artifacts tiny` or `mmedrag sft`"
            )
        self.name = str(self.folder.resolve())
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.threads = threads
        self.top_logprobs = top_logprobs
        self.decoding = decoding
        self.seed = seed
        self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaForConditionalGeneration.from_pretrained(
            self.folder, dtype=torch.float32, local_files_only=True
        ).eval()
        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos) if isinstance(eos, list) else {int(eos)}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.pad_id = int(pad)
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=pad,
            bos_token_id=tokenizer.bos_token_id,
            # as the generator service: never write an image placeholder
            suppress_tokens=[self.processor.image_token_id],
        )

    def _cut(self, row: Sequence[int]) -> str:
        """The answer of one generated row: up to the first EOS, without special tokens."""
        end = next((i for i, token in enumerate(row) if token in self.eos_ids), len(row))
        return self.processor.tokenizer.decode(list(row[:end]), skip_special_tokens=True)

    def _top_logprobs(self, logits: Any) -> dict[str, float]:
        """Top log-probabilities of one position's raw logits, by token text (as the generator service)."""
        tokenizer = self.processor.tokenizer
        return top_logprobs_by_text(
            logits, self.top_logprobs, lambda index: tokenizer.decode([index], skip_special_tokens=False)
        )

    def generate_batch_full(
        self, requests: Sequence[GenerationRequest], *, max_new_tokens: int | None = None
    ) -> list[Generation]:
        """One padded batch; answers cut at the first EOS, with first-token log-probabilities if asked."""
        import torch

        texts = [render_conversation(request.prompt) for request in requests]
        images = [load_image(request.image) for request in requests]
        limit = max_new_tokens or self.max_new_tokens
        if self.decoding is not None:
            from training.evaluate.decoding import decode_batch

            with torch_threads(self.threads):
                decoded = decode_batch(
                    self.model,
                    self.processor,
                    texts,
                    images,
                    config=self.decoding,
                    max_new_tokens=limit,
                    eos_ids=sorted(self.eos_ids),
                    pad_id=self.pad_id,
                    suppress_ids=(self.processor.image_token_id,),
                    seed=self.seed,
                )
            return [Generation(d.text, dict(d.first_token_logprobs)) for d in decoded]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = limit
        config.return_dict_in_generate = True
        config.output_logits = self.top_logprobs > 0
        with torch_threads(self.threads), torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config)
        prompt_len = int(inputs["input_ids"].shape[1])
        generations = []
        for i, row in enumerate(output.sequences[:, prompt_len:].tolist()):
            first = self._top_logprobs(output.logits[0][i]) if self.top_logprobs > 0 and row else {}
            generations.append(Generation(self._cut(row), first))
        return generations

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, max_new_tokens: int | None = None
    ) -> list[str]:
        """One padded batch through ``model.generate``; answers cut at the first EOS."""
        return [g.text for g in self.generate_batch_full(requests, max_new_tokens=max_new_tokens)]

    def generate_full(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: bool = False,
        max_new_tokens: int | None = None,
    ) -> list[Generation]:
        """All generations, in request order; duplicates are generated once, batches group similar lengths."""
        unique, index = _unique(requests)
        order = sorted(range(len(unique)), key=lambda i: len(unique[i].prompt))
        results: list[Generation] = [Generation("")] * len(unique)
        with tqdm(total=len(unique), desc="generating", unit="gen", disable=not progress) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                chunk = [unique[i] for i in batch]
                generated = self.generate_batch_full(chunk, max_new_tokens=max_new_tokens)
                for i, generation in zip(batch, generated, strict=True):
                    results[i] = generation
                bar.update(len(batch))
        return [results[i] for i in index]

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: bool = False,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """All answers, in request order; duplicates are generated once, batches group similar lengths."""
        generations = self.generate_full(requests, progress=progress, max_new_tokens=max_new_tokens)
        return [g.text for g in generations]


class HttpGenerator:
    """An OpenAI-compatible chat-completions server (our generator service or vLLM), greedy.

    Args:
        base_url: the server, with or without the ``/v1`` suffix.
        model: the served model name; None asks the server (first of ``/v1/models``).
        max_new_tokens: ``max_tokens`` of each request.
        seed: sent with each request (greedy decoding does not need it; it pins any sampling fallback).
        concurrency: requests in flight at once.
        api_key: bearer key, when the server wants one.
        transport: an httpx transport (tests pass ``httpx.ASGITransport(app=...)``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        seed: int = DEFAULT_SEED,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if concurrency < 1 or max_new_tokens < 1:
            raise ValueError("concurrency and max_new_tokens must be >= 1")
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        # the stack's internal token (``mmedrag up`` writes it to logs/internal-token) is the generator's key
        self.api_key = api_key or os.environ.get("MMEDRAG_INTERNAL_TOKEN") or "EMPTY"
        self.transport = transport
        self.name = f"{model or 'served model'} at {self.base_url}"

    async def _generate(self, requests: Sequence[GenerationRequest], progress: bool) -> list[str]:
        import openai

        from services.common.images import encode_png, to_data_url
        from services.common.prompts import build_chat_messages

        semaphore = asyncio.Semaphore(self.concurrency)
        async with (
            httpx.AsyncClient(transport=self.transport, timeout=self.timeout_s) as http,
            openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self.api_key, http_client=http, max_retries=2
            ) as client,
        ):
            try:
                model = self.model or (await client.models.list()).data[0].id
            except (openai.APIConnectionError, IndexError) as exc:
                raise RuntimeError(f"cannot list the models of the generator at {self.base_url}") from exc
            self.name = f"{model} at {self.base_url}"
            bar = tqdm(total=len(requests), desc="generating", unit="gen", disable=not progress)

            async def one(request: GenerationRequest) -> str:
                async with semaphore:
                    png = await asyncio.to_thread(lambda: encode_png(load_image(request.image)))
                    completion = await client.chat.completions.create(
                        model=model,
                        messages=build_chat_messages(request.prompt, to_data_url(png)),  # type: ignore[arg-type]
                        max_tokens=self.max_new_tokens,
                        temperature=0,
                        seed=self.seed,
                    )
                bar.update(1)
                return completion.choices[0].message.content or ""

            try:
                return list(await asyncio.gather(*(one(request) for request in requests)))
            finally:
                bar.close()

    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False) -> list[str]:
        unique, index = _unique(requests)
        answers = asyncio.run(self._generate(unique, progress))
        return [answers[i] for i in index]


# --------------------------------------------------------------------------------------------------
# Retrievers


class Retriever(Protocol):
    """The top-1 report of a domain's corpus for each image."""

    def top1(self, domain: str, images: Sequence[Path], *, progress: bool = False) -> list[str]: ...

    def name(self, domain: str) -> str | None: ...


class InProcessRetriever:
    """``artifacts/retrievers/<domain>`` over the distinct texts of ``data``'s retriever_train corpus."""

    def __init__(self, artifacts: Path, data_dir: Path):
        self.artifacts = Path(artifacts)
        self.data_dir = Path(data_dir)
        self._loaded: dict[str, tuple[Any, list[str], np.ndarray]] = {}

    def _domain(self, domain: str) -> tuple[Any, list[str], np.ndarray]:
        if domain not in self._loaded:
            from services.common.artifacts import RETRIEVERS_DIR
            from services.common.clip import ClipModel
            from training.evaluate.retrieval import encode_texts, normalise_text
            from training.index import load_corpus_from_medsynth

            encoder = ClipModel.load(self.artifacts / RETRIEVERS_DIR / domain, root=self.artifacts)
            texts = list(
                dict.fromkeys(
                    text
                    for text in (
                        normalise_text(r.text) for r in load_corpus_from_medsynth(self.data_dir, domain)
                    )
                    if text
                )
            )
            if not texts:
                raise ValueError(f"{self.data_dir}: the retrieval corpus of {domain} is empty")
            self._loaded[domain] = (encoder, texts, encode_texts(encoder, texts))
        return self._loaded[domain]

    def top1(self, domain: str, images: Sequence[Path], *, progress: bool = False) -> list[str]:
        from training.evaluate.retrieval import cosine_top_k, encode_images

        encoder, texts, corpus = self._domain(domain)
        if not images:
            return []
        vectors = encode_images(encoder, list(images), progress=progress, desc=f"{domain} retrieval")
        indices, _ = cosine_top_k(vectors, corpus, 1)
        return [texts[int(row[0])] for row in indices]

    def name(self, domain: str) -> str | None:
        from services.retriever.protocol import RETRIEVER_ID_CHARS

        return self._domain(domain)[0].weights_sha256[:RETRIEVER_ID_CHARS]


class HttpRetriever:
    """The retriever service: ``POST /retrieve`` with ``k_max=1`` and ``strategy=fixed``."""

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.transport = transport
        self._names: dict[str, str] = {}
        self.headers = internal_auth_headers(os.environ.get("MMEDRAG_INTERNAL_TOKEN"))

    async def _top1(self, domain: str, images: Sequence[Path], progress: bool) -> list[str]:
        from services.common.images import encode_png

        semaphore = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(images), desc=f"{domain} retrieval", unit="img", disable=not progress)
        async with httpx.AsyncClient(
            base_url=self.base_url, transport=self.transport, timeout=self.timeout_s, headers=self.headers
        ) as client:

            async def one(path: Path) -> str:
                async with semaphore:
                    png = await asyncio.to_thread(lambda: encode_png(load_image(path)))
                    response = await client.post(
                        "/retrieve",
                        files={"image": ("image.png", png, "image/png")},
                        data={"domain": domain, "k_max": "1", "strategy": "fixed"},
                    )
                if response.status_code != 200:
                    raise RuntimeError(
                        f"retriever at {self.base_url} answered {response.status_code}: {response.text[:500]}"
                    )
                body = response.json()
                self._names[domain] = body.get("retriever")
                bar.update(1)
                return str(body["contexts"][0]["text"])

            try:
                return list(await asyncio.gather(*(one(path) for path in images)))
            finally:
                bar.close()

    def top1(self, domain: str, images: Sequence[Path], *, progress: bool = False) -> list[str]:
        return asyncio.run(self._top1(domain, images, progress)) if images else []

    def name(self, domain: str) -> str | None:
        return self._names.get(domain)


# --------------------------------------------------------------------------------------------------
# The four runs


def retrieve_references(
    items: Sequence[PairItem], retriever: Retriever, *, progress: bool = False
) -> dict[tuple[str, str], str]:
    """The top-1 report of every distinct real image, by (domain, image)."""
    references: dict[tuple[str, str], str] = {}
    for domain in dict.fromkeys(item.domain for item in items):
        paths = {item.image: item.path for item in items if item.domain == domain}
        texts = retriever.top1(domain, list(paths.values()), progress=progress)
        references.update({(domain, image): text for image, text in zip(paths, texts, strict=True)})
    return references


def run_requests(item: PairItem, noise_image: Path, reference: str) -> dict[Run, GenerationRequest]:
    """The four requests of one item."""
    return {
        run: GenerationRequest(
            image=noise_image if run in NOISE_RUNS else item.path,
            prompt=item.prompt([reference] if run in RETRIEVAL_RUNS else []),
        )
        for run in RUNS
    }


def run_four(
    items: Sequence[PairItem],
    noise_images: Mapping[tuple[str, str], Path],
    references: Mapping[tuple[str, str], str],
    generator: Generator,
    *,
    progress: bool = False,
) -> list[RunTexts]:
    """Generate the four runs of every item (one ``generate`` call, so the backend batches across items)."""
    requests: list[GenerationRequest] = []
    for item in items:
        key = (item.domain, item.image)
        per_run = run_requests(item, noise_images[key], references[key])
        requests.extend(per_run[run] for run in RUNS)
    answers = generator.generate(requests, progress=progress)
    width = len(RUNS)
    return [RunTexts(*answers[i * width : (i + 1) * width]) for i in range(len(items))]
