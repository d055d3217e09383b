"""``mmedrag eval``: a test set through the MMed-RAG pipeline, scored with the paper's metrics.

Two backends answer the same items:

- **HTTP** (``--url``): the running stack's public router (``POST /vqa`` and ``/report``, the image as
  uploaded bytes), at most ``--concurrency`` requests in flight, with a progress bar. A failed request
  (any non-200 answer, a timeout, a refused connection) is recorded on its item (HTTP status and the error
  envelope's ``code``) and scored as a wrong / empty answer; it never stops the run. The router returns no
  token probabilities, so VQA AUROC comes from the hard yes/no answers only.
- **In-process** (``--artifacts``): the services' own classes on the artifacts folder, batched:
  ``DomainClassifier`` routes each image, ``RetrieverService`` (the retriever service's class, on the
  embedded Qdrant store in ``<artifacts>/index``) retrieves and selects, ``InProcessGenerator`` answers
  (``training.pairs.runner``; greedy, or ``--decoding`` beam / VCD / DoLa). The first generated token's
  log-probabilities give P(yes), so VQA also gets a real ROC AUC. The embedded store admits one process:
  in-process evaluation cannot run while the stack (``mmedrag up``) runs on the same artifacts. On the
  same artifacts both backends give the same routes, evidence, k and answers (tested).

**Variants** (``--variant``, repeatable): ``no-retrieval`` (router ``retrieval=off``), ``fixed-k`` (the
domain retriever's top ``--fixed-k``), ``adaptive`` (the paper's selection from ``--k-max`` candidates, the
calibrated ``gamma``: what the stack serves), ``shared-retriever`` (in-process only: one retriever for
every domain, ``<artifacts>/shared-retriever``, searched over the union of the domains' corpora held in
memory, then the adaptive rule; the not-domain-aware ablation row). The prompt is ``build_prompt`` on the
routed domain, exactly as the router builds it.

**Items** come from a MedSynth folder (or any folder in its layout): ``<domain>/test_vqa.jsonl`` and
``<domain>/test_report.json``, read with ``training.pairs.runner.load_items``. Per-domain metrics group
items by their true domain; the routed domain is recorded next to it.

**Outputs** (``--out``): ``results.jsonl`` (one ``ItemResult`` per item and run: prediction, parsed answer,
evidence ids and scores, k, timings, error), ``metrics.json``, ``report.md`` and PNG plots
(``training.evaluate.report``). In-process timings are per-item shares of batched stages; over HTTP they
are the router's stage timings plus the client's wall time per request. ``--misalignment`` (in-process)
adds the copy-reference and over-reliance rates of the model (``training.sft.evaluate_base``).

**Command line.** ``eval_app`` is the ``mmedrag eval`` group: its callback (``eval_cli``) is the default
command, and ``mmedrag/cli.py`` mounts ``ablation`` (``training.evaluate.ablation.ablation_cli``) and
``retrieval`` (``training.evaluate.retrieval.eval_retrieval_cli``) on it.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, get_args

import httpx
import typer
from pydantic import BaseModel, Field

from services.common.answers import parse_yes_no
from services.common.artifacts import GENERATOR_DIR, RETRIEVERS_DIR
from services.common.prompts import Task, build_prompt
from training.data.records import DOMAINS

Variant = Literal["no-retrieval", "fixed-k", "adaptive", "shared-retriever"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
HTTP_VARIANTS: tuple[Variant, ...] = ("no-retrieval", "fixed-k", "adaptive")
RETRIEVAL_MODE: dict[Variant, str] = {"no-retrieval": "off", "fixed-k": "fixed", "adaptive": "adaptive"}
DomainSource = Literal["classifier", "truth"]
TASKS: tuple[Task, ...] = ("vqa", "report")
DECODINGS = ("greedy", "beam", "vcd", "dola")  # training.evaluate.decoding.DECODINGS

TEST_SPLIT = "test"
SHARED_RETRIEVER_DIR = "shared-retriever"
# The paper gives no k for its fixed-k row; the author recommends 6-10 candidates for the adaptive rule
# (our k_max default is 10). Three keeps prompts short on the tiny models and matches bench/load.py.
DEFAULT_FIXED_K = 3
# Candidates the adaptive rule chooses from when --k-max is not given: RetrieverSidecar.k_max_default.
DEFAULT_K_MAX = 10
# The router's defaults (RouterSettings.max_tokens_vqa / max_tokens_report): both backends answer alike.
DEFAULT_MAX_NEW_TOKENS: dict[Task, int] = {"vqa": 32, "report": 256}
DEFAULT_CONCURRENCY = 4
DEFAULT_BATCH_SIZE = 8
DEFAULT_TIMEOUT_S = 300.0
TOP_LOGPROBS = 20  # the OpenAI maximum; enough to find "yes" and "no" at the first position
API_KEY_ENV = "MMEDRAG_API_KEY"


# --------------------------------------------------------------------------------------------------
# Per-item results (one JSON line each)


class EvidenceRecord(BaseModel):
    """One retrieved report: ``kept`` ones went into the prompt."""

    id: str
    text: str
    score: float
    rank: int
    kept: bool


class ItemError(BaseModel):
    """Why an item has no answer."""

    status: int | None = Field(description="HTTP status (in-process: the service error's); None: no answer.")
    code: str | None = Field(description="The error envelope's code, or the client-side failure kind.")
    message: str


class ItemResult(BaseModel):
    """One item answered in one run."""

    run: str = Field(description="Name of the run (the variant, or the ablation row).")
    model: str = Field(description="Model label or folder (in-process) / the served model name (HTTP).")
    variant: Variant
    decoding: str
    task: Task
    id: str
    domain: str = Field(description="The item's true domain (per-domain metrics group by it).")
    image: str = Field(description="Image path relative to the data folder.")
    question: str | None = None
    truth: str = Field(description="VQA: the label as written; report: the ground-truth report.")
    routed_domain: str | None = Field(None, description="The domain the pipeline used.")
    domain_confidence: float | None = None
    domain_source: str | None = Field(None, description="classifier, or truth (the item's own domain).")
    prediction: str | None = Field(None, description="Raw model output; None when the item failed.")
    answer: str | None = Field(None, description="VQA: 'yes' / 'no' (MMed-RAG rule); report: the text.")
    correct: bool | None = Field(None, description="VQA: answer equals the parsed label.")
    yes_probability: float | None = Field(None, description="P(yes) at the first token (in-process VQA).")
    evidence: list[EvidenceRecord] = Field(default_factory=list)
    k: int = Field(0, description="Reports kept and put into the prompt.")
    k_max: int | None = None
    gamma: float | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    error: ItemError | None = None


def vqa_fields(task: Task, prediction: str | None, truth: str) -> dict[str, Any]:
    """``answer`` and ``correct`` of a prediction (report: the stripped text, no correctness)."""
    if prediction is None:
        return {"answer": None, "correct": None}
    if task == "report":
        return {"answer": prediction.strip(), "correct": None}
    answer = parse_yes_no(prediction) if prediction.strip() else None
    return {"answer": answer, "correct": answer is not None and answer == parse_yes_no(truth)}


# --------------------------------------------------------------------------------------------------
# Items and runs


@dataclass(frozen=True)
class RunSpec:
    """One pass over the items: a variant answered by a model (in-process: ``"base"``, ``"generator"`` or
    a folder; over HTTP the stack's model answers whatever this says)."""

    name: str
    variant: Variant
    model: str = "generator"


@dataclass(frozen=True)
class RetrievalOptions:
    """How the retrieval variants retrieve."""

    fixed_k: int = DEFAULT_FIXED_K
    k_max: int | None = None  # adaptive candidates; None: the retriever's (router's) default
    gamma: float | None = None  # adaptive threshold; None: the calibrated one

    def __post_init__(self) -> None:
        if self.fixed_k < 1:
            raise ValueError(f"fixed_k must be >= 1, got {self.fixed_k}")
        if self.k_max is not None and self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")


def available_domains(data: Path, tasks: Sequence[Task], split: str = TEST_SPLIT) -> tuple[str, ...]:
    """Domains of ``data`` that have a test file for every task."""
    from training.pairs.runner import split_files

    return tuple(d for d in DOMAINS if all(split_files(data, d, split)[t].is_file() for t in tasks))


def load_test_items(
    data: Path,
    task: Task,
    domains: Sequence[str] | None = None,
    *,
    split: str = TEST_SPLIT,
    limit: int | None = None,
) -> list[Any]:
    """The items (``training.pairs.runner.PairItem``) of every domain, ``limit`` per domain."""
    from training.pairs.runner import load_items

    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such data folder (make one with `mmedrag data synth`)")
    chosen = tuple(domains) if domains else available_domains(data, (task,), split)
    if not chosen:
        raise FileNotFoundError(
            f"{data}: no <domain>/{split}_{'vqa.jsonl' if task == 'vqa' else 'report.json'} file "
            "(is it a MedSynth folder? make one with `mmedrag data synth`)"
        )
    return [item for domain in chosen for item in load_items(data, domain, task, split=split, limit=limit)]


def _relative_image(item: Any, data: Path) -> str:
    try:
        return item.path.resolve().relative_to(Path(data).resolve()).as_posix()
    except ValueError:
        return str(item.path)


class Backend(Protocol):
    """Answers items under one variant; ``yes_probability``: whether P(yes) comes with VQA answers."""

    mode: str
    yes_probability: bool

    def run(
        self, items: Sequence[Any], spec: RunSpec, *, task: Task, progress: bool = False
    ) -> list[ItemResult]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# HTTP: the running stack's router


class HttpBackend:
    """The router's ``/vqa`` and ``/report``; concurrent (bounded by a semaphore), errors recorded per item.

    Args:
        url: the router's base URL.
        data: the data folder (for relative image paths in the results).
        options: fixed k, k_max, gamma of the retrieval variants.
        api_key: sent as ``Authorization: Bearer`` when the router has auth on.
        concurrency: requests in flight at once.
        timeout_s: deadline of one request.
        max_new_tokens: ``max_tokens`` per task (None: the router's default).
        domain_source: ``classifier`` lets the router classify; ``truth`` sends the item's domain.
        transport: an httpx transport (tests pass ``httpx.ASGITransport`` or ``httpx.MockTransport``).
    """

    mode = "http"
    yes_probability = False

    def __init__(
        self,
        url: str,
        data: Path,
        *,
        options: RetrievalOptions | None = None,
        api_key: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_new_tokens: Mapping[str, int] | None = None,
        domain_source: DomainSource = "classifier",
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = url.rstrip("/")
        self.data = Path(data)
        self.options = options or RetrievalOptions()
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_new_tokens = dict(max_new_tokens or {})
        self.domain_source = domain_source
        self.transport = transport

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "url": self.url,
            "concurrency": self.concurrency,
            "domain_source": self.domain_source,
            "auroc": "hard answers only: the router returns no token probabilities",
        }

    def close(self) -> None:
        return None

    def form(self, item: Any, variant: Variant, task: Task) -> dict[str, str]:
        """The multipart fields of one request (besides the image)."""
        if variant not in HTTP_VARIANTS:
            raise ValueError(
                f"variant {variant!r} runs in-process only (--artifacts), not through the router"
            )
        fields = {"retrieval": RETRIEVAL_MODE[variant], "temperature": "0"}
        if variant == "fixed-k":
            fields["k_max"] = str(self.options.fixed_k)
        elif variant == "adaptive":
            if self.options.k_max is not None:
                fields["k_max"] = str(self.options.k_max)
            if self.options.gamma is not None:
                fields["gamma"] = repr(self.options.gamma)
        if task == "vqa":
            fields["question"] = item.question
        if self.domain_source == "truth":
            fields["domain"] = item.domain
        if task in self.max_new_tokens:
            fields["max_tokens"] = str(self.max_new_tokens[task])
        return fields

    def _base(self, item: Any, spec: RunSpec, task: Task) -> dict[str, Any]:
        return {
            "run": spec.name,
            "model": spec.model,
            "variant": spec.variant,
            "decoding": "greedy",
            "task": task,
            "id": item.id,
            "domain": item.domain,
            "image": _relative_image(item, self.data),
            "question": item.question,
            "truth": item.truth,
        }

    async def _one(
        self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, item: Any, spec: RunSpec, task: Task
    ) -> ItemResult:
        base = self._base(item, spec, task)
        fields = self.form(item, spec.variant, task)
        path = Path(item.path)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        async with semaphore:
            data = await asyncio.to_thread(path.read_bytes)
            started = time.perf_counter()
            try:
                response = await client.post(
                    f"/{task}", files={"image": (path.name, data, mime)}, data=fields
                )
            except httpx.TimeoutException as exc:
                return ItemResult(**base, error=ItemError(status=None, code="timeout", message=repr(exc)))
            except httpx.HTTPError as exc:
                error = ItemError(status=None, code="connection_error", message=repr(exc))
                return ItemResult(**base, error=error)
            wall_ms = round((time.perf_counter() - started) * 1000, 2)
        if response.status_code != 200:
            return ItemResult(**base, timings_ms={"client_total": wall_ms}, error=_http_error(response))
        try:
            body = response.json()
            text = str(body["text"])
            retrieval = body.get("retrieval") or {}
            domain = body.get("domain") or {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not a RAGResponse
            error = ItemError(status=200, code="invalid_response", message=f"{exc!r}: {response.text[:300]}")
            return ItemResult(**base, timings_ms={"client_total": wall_ms}, error=error)
        return ItemResult(
            **{**base, "model": str(body.get("model") or spec.model)},
            routed_domain=domain.get("label"),
            domain_confidence=(domain.get("probabilities") or {}).get(domain.get("label")),
            domain_source="truth" if domain.get("source") == "client" else domain.get("source"),
            prediction=text,
            **vqa_fields(task, text, item.truth),
            evidence=[
                EvidenceRecord(id=e["id"], text=e["text"], score=e["score"], rank=e["rank"], kept=e["kept"])
                for e in body.get("evidence", [])
            ],
            k=int(retrieval.get("k", 0)),
            k_max=retrieval.get("k_max"),
            gamma=retrieval.get("gamma"),
            timings_ms={**body.get("timings_ms", {}), "client_total": wall_ms},
            warnings=list(body.get("warnings", [])),
        )

    async def arun(
        self, items: Sequence[Any], spec: RunSpec, *, task: Task, progress: bool = False
    ) -> list[ItemResult]:
        from tqdm.auto import tqdm

        for item in items[:1]:
            self.form(item, spec.variant, task)  # an unsupported variant fails before any request
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        bar = tqdm(total=len(items), desc=f"{task} {spec.name}", unit="item", disable=not progress)
        async with httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=self.timeout_s,
            transport=self.transport,
            limits=limits,
        ) as client:

            async def tracked(item: Any) -> ItemResult:
                result = await self._one(client, semaphore, item, spec, task)
                bar.update(1)
                if result.error is not None:
                    bar.set_postfix_str(f"last error: {result.error.status} {result.error.code}")
                return result

            try:
                return list(await asyncio.gather(*(tracked(item) for item in items)))
            finally:
                bar.close()

    def run(
        self, items: Sequence[Any], spec: RunSpec, *, task: Task, progress: bool = False
    ) -> list[ItemResult]:
        return asyncio.run(self.arun(items, spec, task=task, progress=progress))


def _http_error(response: httpx.Response) -> ItemError:
    """The error envelope of a non-200 answer (or its start, when the body is not the envelope)."""
    try:
        error = response.json().get("error") or {}
        return ItemError(
            status=response.status_code,
            code=error.get("code"),
            message=str(error.get("message", ""))[:500],
        )
    except (ValueError, AttributeError):
        return ItemError(status=response.status_code, code=None, message=response.text[:500])


# --------------------------------------------------------------------------------------------------
# In-process: the services' classes on an artifacts folder


@dataclass(frozen=True)
class Route:
    """The domain an image is routed to."""

    label: str
    confidence: float | None
    source: str  # "classifier" or "truth"


@dataclass(frozen=True)
class Retrieval:
    """What one image's retrieval gave (or why it failed)."""

    evidence: tuple[EvidenceRecord, ...] = ()
    k: int = 0
    k_max: int | None = None
    gamma: float | None = None
    error: ItemError | None = None

    @property
    def kept(self) -> list[str]:
        return [e.text for e in self.evidence if e.kept]


class SharedRetriever:
    """One retriever for every domain, over the union of the domains' retrieval corpora, in memory.

    The not-domain-aware ablation row: no classifier decides where to search; every image is matched
    against every domain's reports (``training.index.load_corpus_from_medsynth`` of each domain in
    ``data``, one entry per distinct text, as the index stores them), ranked by cosine like the retriever
    service, and the kept prefix is chosen by the same adaptive rule (``select_contexts``) with the
    folder's ``retriever.json`` gamma when it has one, else the service default.
    """

    def __init__(self, folder: Path, data: Path, *, gamma: float | None = None):
        from services.common.clip import ClipModel
        from services.retriever.selection import DEFAULT_GAMMA
        from training.evaluate.retrieval import encode_texts, normalise_text, split_file
        from training.index import load_corpus_from_medsynth

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no shared retriever (train one with `mmedrag train retriever --domain all`)"
            )
        self.folder = folder
        self.encoder = ClipModel.load(folder, root=folder.parent)
        sidecar = folder / "retriever.json"
        calibrated = (
            json.loads(sidecar.read_text(encoding="utf-8")).get("gamma") if sidecar.is_file() else None
        )
        self.gamma = gamma if gamma is not None else calibrated if calibrated is not None else DEFAULT_GAMMA
        entries: dict[str, str] = {}  # text -> the first report id with it
        for domain in DOMAINS:
            if not split_file(data, domain, "retriever_train").is_file():
                continue
            for report in load_corpus_from_medsynth(data, domain):
                text = normalise_text(report.text)
                if text:
                    entries.setdefault(text, report.id)
        if not entries:
            raise ValueError(f"{data}: no retrieval corpus in any domain for the shared retriever")
        self.texts = list(entries)
        self.ids = [entries[text] for text in self.texts]
        self.vectors = encode_texts(self.encoder, self.texts)

    def retrieve(self, images: Sequence[Any], k_max: int) -> list[Retrieval]:
        from services.retriever.selection import SelectionParams, select_contexts
        from training.evaluate.retrieval import cosine_top_k

        if not images:
            return []
        queries = self.encoder.encode_images(list(images))
        indices, scores = cosine_top_k(queries, self.vectors, k_max)
        params = SelectionParams(gamma=self.gamma, k_min=1, k_max=k_max)
        results = []
        for row, row_scores in zip(indices, scores, strict=True):
            values = [float(s) for s in row_scores]
            k = select_contexts(values, "adaptive", params)
            evidence = tuple(
                EvidenceRecord(id=self.ids[j], text=self.texts[j], score=s, rank=r, kept=r <= k)
                for r, (j, s) in enumerate(zip(row.tolist(), values, strict=True), start=1)
            )
            results.append(Retrieval(evidence, k, len(values), self.gamma))
        return results


def served_domains(artifacts: Path) -> tuple[str, ...]:
    """Domains with a retriever in ``<artifacts>/retrievers``."""
    return tuple(d for d in DOMAINS if (Path(artifacts) / RETRIEVERS_DIR / d / "retriever.json").is_file())


def resolve_model(artifacts: Path, model: str) -> tuple[Path, str | None]:
    """The folder of ``--model`` (``base``, ``generator`` or a path) and a note when base falls back."""
    from training.pairs.cli import default_base_model

    artifacts = Path(artifacts)
    if model == "generator":
        return artifacts / GENERATOR_DIR, None
    if model == "base":
        folder = default_base_model(artifacts)
        note = None
        if folder.name == GENERATOR_DIR:
            note = f"no {artifacts / 'base'}: the base model is the generator folder ({folder})"
        return folder, note
    return Path(model), None


class InProcessBackend:
    """The pipeline in this process on an artifacts folder: classifier → retriever service → generator.

    Classification and retrieval are done once per image and variant and shared by every run; models are
    loaded once per folder. Call ``close()`` to release the embedded store.

    Args:
        artifacts: the artifacts folder (classifier/, retrievers/, index/, generator/, base/).
        data: the data folder (the shared retriever's corpus; relative image paths in the results).
        options: fixed k, k_max, gamma of the retrieval variants.
        shared_retriever: folder of the shared retriever (default ``<artifacts>/shared-retriever``).
        domain_source: ``classifier`` (as served) or ``truth`` (the item's own domain).
        batch_size: generations per forward pass.
        max_new_tokens: the longest answer per task.
        decoding: a ``training.evaluate.decoding.DecodingConfig`` (None: greedy).
        threads: torch threads while generating.
    """

    mode = "inprocess"
    yes_probability = True

    def __init__(
        self,
        artifacts: Path,
        data: Path,
        *,
        options: RetrievalOptions | None = None,
        shared_retriever: Path | None = None,
        domain_source: DomainSource = "classifier",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_new_tokens: Mapping[str, int] | None = None,
        decoding: Any | None = None,
        threads: int | None = None,
    ):
        self.artifacts = Path(artifacts)
        if not self.artifacts.is_dir():
            raise FileNotFoundError(
                f"{self.artifacts}: no artifacts folder (build one with `mmedrag artifacts tiny --out "
                f"{self.artifacts}` or `mmedrag bootstrap`)"
            )
        self.data = Path(data)
        self.options = options or RetrievalOptions()
        self.shared_folder = Path(shared_retriever or self.artifacts / SHARED_RETRIEVER_DIR)
        self.domain_source = domain_source
        self.batch_size = batch_size
        self.max_new_tokens = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
        self.decoding = decoding
        self.threads = threads
        self.notes: list[str] = []
        self._classifier: Any = None
        self._retriever: Any = None
        self._shared: SharedRetriever | None = None
        self._generators: dict[Path, Any] = {}
        self._routes: dict[tuple[Path, str], Route] = {}
        self._retrievals: dict[tuple[Variant, Path, str], Retrieval] = {}
        self._stage_ms: dict[tuple[str, Path], float] = {}

    @property
    def decoding_name(self) -> str:
        return "greedy" if self.decoding is None else str(self.decoding.name)

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "artifacts": str(self.artifacts),
            "domain_source": self.domain_source,
            "decoding": self.decoding_name,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "auroc": "auroc_prob from P(yes) / (P(yes) + P(no)) at the first generated token",
        }

    def close(self) -> None:
        """Release the embedded store (the classifier runs without a batching thread: nothing to stop)."""
        if self._retriever is not None:
            self._retriever.close()
            self._retriever = None

    def __enter__(self) -> InProcessBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- components

    def classifier(self) -> Any:
        if self._classifier is None:
            from services.classifier.service import DomainClassifier

            classifier = DomainClassifier(max_batch=1)
            classifier.load(self.artifacts)
            self._classifier = classifier
        return self._classifier

    def retriever(self) -> Any:
        if self._retriever is None:
            from services.common.errors import DependencyUnavailable
            from services.retriever.service import RetrieverService
            from services.retriever.settings import RetrieverSettings

            domains = served_domains(self.artifacts)
            if not domains:
                raise FileNotFoundError(
                    f"{self.artifacts / RETRIEVERS_DIR}: no retriever (no <domain>/retriever.json); build "
                    "them with `mmedrag train retriever` and `mmedrag index`, or `mmedrag artifacts tiny`"
                )
            service = RetrieverService(RetrieverSettings(artifacts=self.artifacts, domains=domains))
            try:
                service.load()
            except DependencyUnavailable as exc:
                if exc.code != "store_locked":
                    raise
                raise DependencyUnavailable(
                    f"{exc.message}. In-process evaluation cannot run while the stack (`mmedrag up`) runs "
                    f"on the same artifacts ({self.artifacts}): stop the stack, or evaluate through it "
                    "with --url",
                    code="store_locked",
                ) from exc
            self._retriever = service
        return self._retriever

    def shared(self) -> SharedRetriever:
        if self._shared is None:
            self._shared = SharedRetriever(self.shared_folder, self.data, gamma=self.options.gamma)
        return self._shared

    def generator(self, model: str) -> tuple[Any, Path]:
        folder, note = resolve_model(self.artifacts, model)
        if note and note not in self.notes:
            self.notes.append(note)
        key = folder.resolve()
        if key not in self._generators:
            from training.pairs.runner import InProcessGenerator

            self._generators[key] = InProcessGenerator(
                folder,
                batch_size=self.batch_size,
                max_new_tokens=max(self.max_new_tokens.values()),
                threads=self.threads,
                top_logprobs=TOP_LOGPROBS,
                decoding=self.decoding,
            )
        return self._generators[key], folder

    # ---------------------------------------------------------------------------------------- stages

    def _images(self, paths: Iterable[Path]) -> dict[Path, Any]:
        from training.pairs.noise import load_image

        return {path: load_image(path) for path in paths}

    def routes(self, items: Sequence[Any]) -> dict[tuple[Path, str], Route]:
        """The domain of every distinct image (classified once, cached)."""
        needed = list(dict.fromkeys((item.path, item.domain) for item in items))
        missing = [key for key in needed if key not in self._routes]
        if missing and self.domain_source == "truth":
            self._routes.update({key: Route(key[1], None, "truth") for key in missing})
        elif missing:
            classifier = self.classifier()
            started = time.perf_counter()
            for start in range(0, len(missing), 64):
                chunk = missing[start : start + 64]
                images = self._images(path for path, _ in chunk)
                for key, result in zip(chunk, classifier.classify(list(images.values())), strict=True):
                    self._routes[key] = Route(result.label, result.confidence, "classifier")
            share = (time.perf_counter() - started) * 1000 / len(missing)
            self._stage_ms.update({("classify", path): share for path, _ in missing})
        return {key: self._routes[key] for key in needed}

    def retrievals(
        self, items: Sequence[Any], variant: Variant, routes: Mapping[tuple[Path, str], Route]
    ) -> dict[tuple[Path, str], Retrieval]:
        """Each distinct (image, routed domain)'s retrieval under ``variant`` (cached)."""
        if variant == "no-retrieval":  # as the router reports retrieval=off: k = k_max = 0
            return {key: Retrieval(k_max=0) for key in routes}
        wanted = list(dict.fromkeys((item.path, routes[(item.path, item.domain)].label) for item in items))
        missing = [key for key in wanted if (variant, *key) not in self._retrievals]
        if missing:
            # loaded before the clock starts: timings are per-item work, not start-up
            if variant == "shared-retriever":
                self.shared()
            else:
                self.retriever()
            started = time.perf_counter()
            for start in range(0, len(missing), 64):
                chunk = missing[start : start + 64]
                images = self._images(path for path, _ in chunk)
                if variant == "shared-retriever":
                    found = self.shared().retrieve(
                        [images[path] for path, _ in chunk], self.options.k_max or DEFAULT_K_MAX
                    )
                else:
                    found = asyncio.run(self._service_retrieve(chunk, images, variant))
                for key, retrieval in zip(chunk, found, strict=True):
                    self._retrievals[(variant, *key)] = retrieval
            share = (time.perf_counter() - started) * 1000 / len(missing)
            self._stage_ms.update({(f"retrieve:{variant}", path): share for path, _ in missing})
        return {
            (item.path, item.domain): self._retrievals[
                (variant, item.path, routes[(item.path, item.domain)].label)
            ]
            for item in items
        }

    async def _service_retrieve(
        self, keys: Sequence[tuple[Path, str]], images: Mapping[Path, Any], variant: Variant
    ) -> list[Retrieval]:
        from services.common.errors import ServiceError
        from services.retriever.protocol import RetrieveParams

        service = self.retriever()
        if variant == "fixed-k":
            params = {"k_max": self.options.fixed_k, "strategy": "fixed"}
        else:
            params = {"k_max": self.options.k_max, "strategy": "adaptive", "gamma": self.options.gamma}

        async def one(path: Path, domain: str) -> Retrieval:
            try:
                response = await service.retrieve(images[path], RetrieveParams(domain=domain, **params))
            except ServiceError as exc:
                return Retrieval(error=ItemError(status=exc.status_code, code=exc.code, message=exc.message))
            evidence = tuple(
                EvidenceRecord(id=c.id, text=c.text, score=c.score, rank=c.rank, kept=c.kept)
                for c in response.contexts
            )
            return Retrieval(evidence, response.k, response.k_max, response.gamma)

        return list(await asyncio.gather(*(one(path, domain) for path, domain in keys)))

    def run(
        self, items: Sequence[Any], spec: RunSpec, *, task: Task, progress: bool = False
    ) -> list[ItemResult]:
        """Answer every item under ``spec`` (batched), in item order."""
        from training.evaluate.metrics import yes_probability_from_logprobs
        from training.pairs.runner import GenerationRequest

        if not items:
            return []
        routes = self.routes(items)
        retrievals = self.retrievals(items, spec.variant, routes)
        generator, folder = self.generator(spec.model)
        pending = [i for i, item in enumerate(items) if retrievals[(item.path, item.domain)].error is None]
        requests = []
        for i in pending:
            item = items[i]
            route = routes[(item.path, item.domain)]
            references = retrievals[(item.path, item.domain)].kept
            requests.append(
                GenerationRequest(item.path, build_prompt(task, route.label, references, item.question))
            )
        started = time.perf_counter()
        generations = generator.generate_full(
            requests, progress=progress, max_new_tokens=self.max_new_tokens[task]
        )
        generate_ms = (time.perf_counter() - started) * 1000 / max(1, len(requests))
        answered = dict(zip(pending, generations, strict=True))
        results = []
        for i, item in enumerate(items):
            key = (item.path, item.domain)
            route, retrieval = routes[key], retrievals[key]
            timings = {
                "classify": self._stage_ms.get(("classify", item.path), 0.0),
                "retrieve": self._stage_ms.get((f"retrieve:{spec.variant}", item.path), 0.0),
            }
            base: dict[str, Any] = {
                "run": spec.name,
                "model": spec.model if spec.model in ("base", "generator") else str(folder),
                "variant": spec.variant,
                "decoding": self.decoding_name,
                "task": task,
                "id": item.id,
                "domain": item.domain,
                "image": _relative_image(item, self.data),
                "question": item.question,
                "truth": item.truth,
                "routed_domain": route.label,
                "domain_confidence": route.confidence,
                "domain_source": route.source,
                "evidence": list(retrieval.evidence),
                "k": retrieval.k,
                "k_max": retrieval.k_max,
                "gamma": retrieval.gamma,
            }
            if i not in answered:
                timings["total"] = sum(timings.values())
                results.append(ItemResult(**base, timings_ms=_rounded(timings), error=retrieval.error))
                continue
            generation = answered[i]
            probability = None
            if task == "vqa" and generation.first_token_logprobs:
                probability = yes_probability_from_logprobs([generation.first_token_logprobs])
            timings["generate"] = generate_ms
            timings["total"] = sum(timings.values())
            warnings = [] if generation.text.strip() else ["the model returned an empty answer"]
            results.append(
                ItemResult(
                    **base,
                    prediction=generation.text,
                    **vqa_fields(task, generation.text, item.truth),
                    yes_probability=probability,
                    timings_ms=_rounded(timings),
                    warnings=warnings,
                )
            )
        return results


def _rounded(timings: Mapping[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in timings.items()}


# --------------------------------------------------------------------------------------------------
# One evaluation: items x runs, then metrics, report and plots


@dataclass
class EvalConfig:
    """What ``evaluate`` runs and where it writes."""

    data: Path
    out: Path
    tasks: tuple[Task, ...] = ("vqa",)
    runs: tuple[RunSpec, ...] = (RunSpec("adaptive", "adaptive"),)
    domains: tuple[str, ...] | None = None
    split: str = TEST_SPLIT
    limit: int | None = None
    meteor: bool | None = None  # None: when a Java runtime is available
    misalignment: bool = False  # in-process VQA only: the four runs of training.sft.evaluate_base
    settings: dict[str, Any] = field(default_factory=dict)  # recorded in metrics.json as given

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("choose at least one task")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        names = [run.name for run in self.runs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"runs need distinct names, got {names}")
        for run in self.runs:
            if run.variant not in VARIANTS:
                raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {run.variant!r}")
        if self.domains:
            for domain in self.domains:
                if domain not in DOMAINS:
                    raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")


def meteor_enabled(requested: bool | None) -> bool:
    """METEOR when asked for (it needs Java), or by default when a Java runtime is on PATH."""
    return shutil.which("java") is not None if requested is None else requested


@dataclass
class EvalOutcome:
    """What ``evaluate`` produced."""

    records: list[ItemResult]
    metrics: dict[str, Any]
    paths: dict[str, Path]


def run_items(
    backend: Backend,
    items_by_task: Mapping[Task, Sequence[Any]],
    runs: Sequence[RunSpec],
    *,
    progress: bool = False,
    on_run: Callable[[Task, RunSpec, list[ItemResult]], None] | None = None,
) -> list[ItemResult]:
    """Every run on every task's items, in order (task, then run)."""
    records: list[ItemResult] = []
    for task, items in items_by_task.items():
        for spec in runs:
            results = backend.run(items, spec, task=task, progress=progress)
            if on_run is not None:
                on_run(task, spec, results)
            records.extend(results)
    return records


def evaluate(config: EvalConfig, backend: Backend, *, progress: bool = False) -> EvalOutcome:
    """Run the test items through ``backend`` for every run, score them and write every output."""
    from training.evaluate import report

    items_by_task = {
        task: load_test_items(config.data, task, config.domains, split=config.split, limit=config.limit)
        for task in config.tasks
    }
    records = run_items(backend, items_by_task, config.runs, progress=progress)
    rows = [record.model_dump(mode="json") for record in records]
    report.write_results_file(config.out, rows)
    with_meteor = meteor_enabled(config.meteor)
    summaries = report.summarise_runs(rows, meteor=with_meteor, yes_probability=backend.yes_probability)
    misalignment = None
    if config.misalignment:
        if not isinstance(backend, InProcessBackend):
            raise ValueError("--misalignment runs in-process only (--artifacts)")
        models = dict.fromkeys(spec.model for spec in config.runs)
        misalignment = {
            model: misalignment_rates(
                backend,
                model,
                config.data,
                domains=config.domains,
                split=config.split,
                limit=config.limit,
                progress=progress,
            )
            for model in models
        }
    notes = list(getattr(backend, "notes", []))
    if "vqa" in config.tasks and not backend.yes_probability:
        notes.append("AUROC from hard yes/no answers only: the router returns no token probabilities")
    if "report" in config.tasks and not with_meteor:
        notes.append("METEOR not computed (no Java runtime, or --no-meteor); report averages omit it")
    metrics = {
        "kind": "eval",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": str(config.data),
        "split": config.split,
        "limit": config.limit,
        "tasks": list(config.tasks),
        "backend": backend.describe(),
        "settings": config.settings,
        "runs": summaries,
        "misalignment": misalignment,
        "notes": notes,
    }
    paths = report.write_eval_outputs(config.out, rows, metrics)
    return EvalOutcome(records, metrics, paths)


def misalignment_limit(data: Path, domains: Sequence[str], split: str, limit: int | None) -> int | None:
    """The smallest per-domain limit >= ``limit`` whose VQA items hold two distinct images in every domain.

    The paper's noise image is another real image of the same domain, diffused
    (``training.pairs.noise``); with a small ``--limit`` a domain's first items can all ask about one
    image, so the misalignment runs take a few more items until there are two images.
    """
    if limit is None:
        return None
    from training.pairs.runner import load_items

    needed = limit
    for domain in domains:
        images: set[str] = set()
        for count, item in enumerate(load_items(data, domain, "vqa", split=split), start=1):
            images.add(item.image)
            if len(images) >= 2:
                needed = max(needed, count)
                break
    return needed


def misalignment_rates(
    backend: InProcessBackend,
    model: str,
    data: Path,
    *,
    domains: Sequence[str] | None = None,
    split: str = TEST_SPLIT,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Copy-reference and over-reliance rates of a model on the VQA test items (``evaluate_base``: clean
    / noise image x with / without the top-1 report of the domain retriever), per domain and overall."""
    from training.sft import evaluate_base

    folder, _ = resolve_model(backend.artifacts, model)
    domains = domains or available_domains(data, ("vqa",), split)
    limit = misalignment_limit(data, domains, split, limit)
    result = evaluate_base(
        folder,
        data,
        backend.artifacts,
        domains=domains,
        split=split,
        limit=limit,
        batch_size=backend.batch_size,
        threads=backend.threads,
        progress=progress,
    )
    return {"model": str(folder), "limit": limit, **result}


# --------------------------------------------------------------------------------------------------
# Command line


class TaskChoice(StrEnum):
    vqa = "vqa"
    report = "report"
    both = "both"


class VariantChoice(StrEnum):
    no_retrieval = "no-retrieval"
    fixed_k = "fixed-k"
    adaptive = "adaptive"
    shared_retriever = "shared-retriever"


class DecodingChoice(StrEnum):
    greedy = "greedy"
    beam = "beam"
    vcd = "vcd"
    dola = "dola"


class DomainSourceChoice(StrEnum):
    classifier = "classifier"
    truth = "truth"


def task_tuple(task: TaskChoice) -> tuple[Task, ...]:
    return TASKS if task is TaskChoice.both else (task.value,)  # type: ignore[return-value]


def decoding_config(
    name: str, *, num_beams: int, vcd_alpha: float, vcd_beta: float, vcd_noise_step: int, dola_layers: str
) -> Any | None:
    """None for greedy (the generator's own path); else ``training.evaluate.decoding.DecodingConfig``."""
    if name == "greedy":
        return None
    try:
        from training.evaluate.decoding import DecodingConfig
    except ImportError as exc:  # pragma: no cover - the module ships with the project
        raise ValueError(f"--decoding {name} needs training.evaluate.decoding ({exc})") from exc
    return DecodingConfig(
        name=name,
        num_beams=num_beams,
        vcd_alpha=vcd_alpha,
        vcd_beta=vcd_beta,
        vcd_noise_step=vcd_noise_step,
        dola_layers=dola_layers,
    )


eval_app = typer.Typer(
    help="Evaluate the pipeline on a test set (`mmedrag eval --data DIR --task vqa ...`), the ablation "
    "tables (`mmedrag eval ablation`) and retrieval quality (`mmedrag eval retrieval`).",
    invoke_without_command=True,
    no_args_is_help=True,
)


@eval_app.callback(invoke_without_command=True)
def eval_cli(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option("--data", help="MedSynth folder (or one in its layout); its test split.")
    ] = None,
    task: Annotated[
        TaskChoice | None, typer.Option("--task", help="vqa, report, or both.", case_sensitive=False)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for results.jsonl, metrics.json, report.md and plots/."),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Router of a running stack: evaluate over HTTP.")
    ] = None,
    artifacts: Annotated[
        Path,
        typer.Option(
            "--artifacts",
            envvar="MMEDRAG_ARTIFACTS",
            help="Artifacts folder: evaluate in-process (ignored with --url).",
        ),
    ] = Path("artifacts"),
    variants: Annotated[
        list[VariantChoice] | None,
        typer.Option("--variant", help="Retrieval variant (repeatable); default: adaptive."),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="In-process model: base (<artifacts>/base, else the generator), generator, or a folder.",
        ),
    ] = "generator",
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Domain (repeatable); default: all in --data.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Items per domain and task.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data to evaluate.")] = TEST_SPLIT,
    fixed_k: Annotated[
        int, typer.Option("--fixed-k", min=1, help="Reports kept by the fixed-k variant.")
    ] = DEFAULT_FIXED_K,
    k_max: Annotated[
        int | None,
        typer.Option(
            "--k-max", min=1, help="Candidates of the adaptive rule; default: the retriever's (10)."
        ),
    ] = None,
    gamma: Annotated[
        float | None,
        typer.Option(
            "--gamma", min=0.0, help="Adaptive threshold; default: each retriever's calibrated one."
        ),
    ] = None,
    domain_source: Annotated[
        DomainSourceChoice,
        typer.Option("--domain-source", help="classifier (as served) or truth (each item's own domain)."),
    ] = DomainSourceChoice.classifier,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="HTTP requests in flight at once.")
    ] = DEFAULT_CONCURRENCY,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar=API_KEY_ENV, help="Router API key (when auth is on).")
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds per HTTP request.")
    ] = DEFAULT_TIMEOUT_S,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Generations per batch (in-process).")
    ] = DEFAULT_BATCH_SIZE,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Longest answer; default 32 (VQA) and 256 (report)."),
    ] = None,
    decoding: Annotated[
        DecodingChoice,
        typer.Option(
            "--decoding", help="In-process decoding: greedy, beam, vcd or dola.", case_sensitive=False
        ),
    ] = DecodingChoice.greedy,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1, help="Beams (--decoding beam).")] = 3,
    vcd_alpha: Annotated[float, typer.Option("--vcd-alpha", help="VCD contrast weight.")] = 1.0,
    vcd_beta: Annotated[float, typer.Option("--vcd-beta", help="VCD plausibility cut-off.")] = 0.1,
    vcd_noise_step: Annotated[
        int, typer.Option("--vcd-noise-step", min=0, help="VCD diffusion noise step of the distorted image.")
    ] = 500,
    dola_layers: Annotated[
        str, typer.Option("--dola-layers", help="DoLa premature layers: low, high, or indices.")
    ] = "high",
    meteor: Annotated[
        bool | None,
        typer.Option(
            "--meteor/--no-meteor", help="Compute METEOR (needs Java); default: when Java is found."
        ),
    ] = None,
    misalignment: Annotated[
        bool,
        typer.Option(
            "--misalignment", help="Also the copy-reference / over-reliance rates (in-process, VQA, 4 runs)."
        ),
    ] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch threads.")] = None,
) -> None:
    """Run a test set through the running stack (--url) or in-process (--artifacts) and write per-item
    results, metrics.json, report.md and plots."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--data", data), ("--task", task), ("--out", out)) if value is None]
    if missing:
        raise typer.BadParameter(f"missing option(s) {', '.join(missing)}", param_hint=missing[0])
    assert data is not None and task is not None and out is not None
    chosen = tuple(v.value for v in variants) if variants else ("adaptive",)
    tasks = task_tuple(task)
    options = RetrievalOptions(fixed_k=fixed_k, k_max=k_max, gamma=gamma)
    limits = {t: max_new_tokens for t in tasks} if max_new_tokens else None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    backend: Backend
    if url:
        for flag, value, default in (
            ("--model", model, "generator"),
            ("--decoding", decoding.value, "greedy"),
        ):
            if value != default:
                raise typer.BadParameter(f"{flag} applies in-process only (the stack serves its own model)")
        if "shared-retriever" in chosen:
            raise typer.BadParameter(
                "the shared-retriever variant runs in-process only", param_hint="--variant"
            )
        if misalignment:
            raise typer.BadParameter("--misalignment runs in-process only", param_hint="--misalignment")
        backend = HttpBackend(
            url,
            data,
            options=options,
            api_key=api_key,
            concurrency=concurrency,
            timeout_s=timeout_s,
            max_new_tokens=limits,
            domain_source=domain_source.value,  # type: ignore[arg-type]
        )
    else:
        config = decoding_config(
            decoding.value,
            num_beams=num_beams,
            vcd_alpha=vcd_alpha,
            vcd_beta=vcd_beta,
            vcd_noise_step=vcd_noise_step,
            dola_layers=dola_layers,
        )
        backend = InProcessBackend(
            artifacts,
            data,
            options=options,
            domain_source=domain_source.value,  # type: ignore[arg-type]
            batch_size=batch_size,
            max_new_tokens=limits,
            decoding=config,
            threads=threads,
        )
    settings = {
        "variants": list(chosen),
        "model": model,
        "fixed_k": fixed_k,
        "k_max": k_max,
        "gamma": gamma,
        "decoding": decoding.value,
        "domain_source": domain_source.value,
        "max_new_tokens": max_new_tokens,
    }
    eval_config = EvalConfig(
        data=data,
        out=out,
        tasks=tasks,
        runs=tuple(RunSpec(v, v, model) for v in chosen),  # type: ignore[arg-type]
        domains=tuple(domains) if domains else None,
        split=split,
        limit=limit,
        meteor=meteor,
        misalignment=misalignment,
        settings=settings,
    )
    try:
        outcome = evaluate(eval_config, backend, progress=True)
    finally:
        backend.close()
    from training.evaluate.report import render_eval_markdown

    typer.echo(render_eval_markdown(outcome.metrics))
    typer.echo(f"wrote {', '.join(str(p) for p in outcome.paths.values())}")
