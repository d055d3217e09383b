"""``mmedrag sft``: supervised fine-tuning of the synthetic world's base model (the LLaVA-Med stand-in).

A small ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama text model + two-layer projector,
tokenizer and processor built here, nothing downloaded) is trained from random weights on the MedSynth
**retriever_train** split, VQA and report tasks, with and without retrieved reports in the prompt. The
preference and test splits are never read for training (``mmedrag pairs`` runs the preference split, the
evaluation the test split).

**Training text = serving text.** Every example is ``render_conversation(build_prompt(task, domain,
references, question), answer)`` (``services.common.prompts``), the text the served chat template renders;
the loss covers the answer tokens and the closing ``</s>`` only (``encode_example``). ``<image>`` is expanded
to the model's image tokens exactly as the folder's ``LlavaProcessor`` does (tested).

**Answers.** VQA: ``"Yes."`` or ``"No."`` (the label parsed with ``parse_yes_no``). Reports: the
ground-truth report, cut after the last whole sentence that keeps it within ``max_report_words`` words (the
first sentence is always kept), so the model learns to end a report rather than to stop mid-sentence.

**References, and why the model leans on them.** With probability ``reference_rate`` an example's prompt
carries ``1..max_references`` reports of the domain's retrieval corpus (the retriever_train texts the index
stores). The first one *agrees* with the image with probability ``agreement_rate``: it is the image's own
corpus text (share ``own_report_rate`` of agreeing draws) or the text of another training image with exactly
the same set of findings (ground truth from ``findings.jsonl``); otherwise it is the text of an image with a
different set of findings. Further references are random corpus texts; their number is uniform in
``1..max_references``, because served prompts carry as many reports as adaptive selection keeps, up to the
router's ``k_max`` (measured, MedSynth seed 0, mean of BLEU, ROUGE-L, METEOR: trained on one reference, the
base model's reports with ten scored 22.4, 35.5 without retrieval; trained on 1..10, 34.7 and 34.9).
This "same-findings" sampling sets the
agreement rate exactly (a trained retriever would only approximate it); as LLaVA-Med, the model learns that
references are usually right and copies them — including when, at test time, a weak retriever returns
another patient's report. That is the over-reliance RAG-PT has to fix.

**Measurement.** After training, the VQA test split is run under the four conditions of ``mmedrag pairs``
(real / noise image × with / without the top-1 retrieved report; ``training.pairs.runner.run_four`` with
``InProcessGenerator`` and ``InProcessRetriever``); accuracy of each run and the copy-reference and
over-reliance rates (``training.pairs.rules``) go to ``sft_metrics.json`` in the output folder, with the loss
curve, the settings and the wall time.

Output: a Hugging Face LLaVA folder (default ``<artifacts>/base``) in the layout of
``training.artifacts.generator.build_tiny_generator``: loadable by the generator service, ``mmedrag pairs``
and ``mmedrag dpo``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from services.common.prompts import IMAGE_TOKEN, Task, build_prompt, render_conversation

TRAIN_SPLIT = "retriever_train"  # the only split SFT reads
EVAL_SPLIT = "test"
TASKS: tuple[Task, ...] = ("vqa", "report")
METRICS_FILE = "sft_metrics.json"
IGNORE_INDEX = -100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SFTConfig:
    """Every setting of ``train_sft`` (each is a ``mmedrag sft`` option; ``metadata["help"]`` is its help)."""

    data: Path = field(metadata=_help("MedSynth folder; only its retriever_train split is trained on."))
    out: Path = field(metadata=_help("Output model folder (the CLI default is <artifacts>/base)."))
    retriever_artifacts: Path | None = field(
        default=None,
        metadata=_help(
            "Artifacts folder with retrievers/<domain> for the evaluation's top-1 references "
            "(None: no evaluation)."
        ),
    )
    tasks: tuple[Task, ...] = field(default=TASKS, metadata=_help("Tasks trained on: vqa, report."))
    domains: tuple[str, ...] | None = field(
        default=None, metadata=_help("Domains trained on (None: every domain with retriever_train files).")
    )
    # model
    image_size: int = field(default=64, metadata=_help("Input side in pixels (multiple of 16)."))
    vision_hidden_size: int = field(default=128, metadata=_help("CLIP vision tower width."))
    vision_layers: int = field(default=2, metadata=_help("CLIP vision tower layers."))
    text_hidden_size: int = field(default=128, metadata=_help("Llama text model width."))
    text_layers: int = field(default=3, metadata=_help("Llama text model layers."))
    head_size: int = field(
        default=32, metadata=_help("Attention head size of both towers (vLLM needs >= 32).")
    )
    # data
    reference_rate: float = field(
        default=0.5, metadata=_help("Share of training prompts that carry retrieved report(s).")
    )
    agreement_rate: float = field(
        default=0.9,
        metadata=_help("Share of reference draws that describe the image's findings (same-findings report)."),
    )
    own_report_rate: float = field(
        default=0.5, metadata=_help("Share of agreeing references that are the image's own corpus text.")
    )
    max_references: int = field(
        default=10,
        metadata=_help(
            "References per prompt: 1..max_references, uniformly. Default: the router's default k_max "
            "(MMEDRAG_ROUTER_K_MAX_DEFAULT), so every prompt adaptive selection can serve was trained on."
        ),
    )
    max_report_words: int = field(
        default=64, metadata=_help("Report answers are cut after the last whole sentence within this.")
    )
    limit: int | None = field(default=None, metadata=_help("Items per domain and task (None: all)."))
    vision_pretrain_steps: int = field(
        default=600,
        metadata=_help(
            "Steps of the vision-tower pretraining phase (a linear probe on the projector's input tokens "
            "predicts each training image's findings; the probe is discarded): stands in for the "
            "pretrained CLIP LLaVA starts from. 0 skips it."
        ),
    )
    vision_pretrain_lr: float = field(default=1e-3, metadata=_help("AdamW learning rate of that phase."))
    freeze_vision: bool = field(
        default=True,
        metadata=_help(
            "Keep the pretrained vision tower frozen during SFT (LLaVA-1.5 freezes its CLIP tower); "
            "without vision pretraining the tower is always trained."
        ),
    )
    # optimisation
    epochs: int = field(default=4, metadata=_help("Passes over the training items."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many steps (overrides)."))
    batch_size: int = field(default=16, metadata=_help("Examples per optimizer step."))
    learning_rate: float = field(default=2e-3, metadata=_help("Peak AdamW learning rate."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay."))
    warmup_ratio: float = field(
        default=0.05, metadata=_help("Linear warm-up share of the steps; cosine after.")
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    log_every: int = field(default=10, metadata=_help("Steps per loss-curve point."))
    seed: int = field(default=0, metadata=_help("Seed of weights, data order and reference draws."))
    num_threads: int | None = field(default=2, metadata=_help("torch CPU threads (None: torch's choice)."))
    # evaluation
    eval_limit: int | None = field(
        default=None, metadata=_help("Test VQA items per domain in the evaluation (None: all).")
    )
    eval_batch_size: int = field(default=32, metadata=_help("Generations per batch in the evaluation."))
    progress: bool = field(default=True, metadata=_help("Show progress bars."))

    def __post_init__(self) -> None:
        from training.artifacts.generator import PATCH_SIZE

        object.__setattr__(self, "tasks", tuple(self.tasks))
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        for name in ("reference_rate", "agreement_rate", "own_report_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.image_size < PATCH_SIZE or self.image_size % PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}")
        for name in ("vision_hidden_size", "text_hidden_size"):
            if getattr(self, name) % self.head_size:
                raise ValueError(f"{name} must be a multiple of head_size {self.head_size}")
        positive = ("max_references", "max_report_words", "epochs", "batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("data", "out", "retriever_artifacts"):
            data[name] = None if data[name] is None else str(data[name])
        return data


def config_help() -> dict[str, str]:
    """Help text of every setting, by field name."""
    return {f.name: f.metadata.get("help", "") for f in fields(SFTConfig)}


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class CorpusEntry:
    """One retrieval-corpus text with the findings of its image."""

    image: str  # file name, relative to <domain>/images
    findings: frozenset[str]
    text: str


@dataclass(frozen=True)
class TrainItem:
    """One training question or report: image, ground truth and its answer text."""

    id: str
    domain: str
    task: Task
    image: str  # relative to <data>/<domain>/images
    path: Path
    question: str | None
    answer: str


def vqa_answer(truth: str) -> str:
    """The trained VQA answer: ``"Yes."`` or ``"No."`` (the label as ``parse_yes_no`` reads it)."""
    from services.common.answers import parse_yes_no

    return "Yes." if parse_yes_no(truth) == "yes" else "No."


def truncate_report(text: str, max_words: int) -> str:
    """Whole sentences while the running word count stays within ``max_words`` (at least the first)."""
    kept: list[str] = []
    words = 0
    for sentence in _SENTENCE_END.split(text.strip()):
        n = len(sentence.split())
        if kept and words + n > max_words:
            break
        kept.append(sentence)
        words += n
    return " ".join(kept)


def _image_key(image: str) -> str:
    return Path(image).name


def load_train_data(
    data: Path,
    domains: Sequence[str],
    tasks: Sequence[Task],
    *,
    max_report_words: int,
    limit: int | None = None,
) -> tuple[list[TrainItem], dict[str, list[CorpusEntry]], dict[tuple[str, str], str]]:
    """The retriever_train items, each domain's corpus with findings, and each image's corpus text.

    Only images whose ``findings.jsonl`` split is retriever_train are kept (a second guard besides reading
    the split's files): preference and test images never reach training.
    """
    from training.data.medsynth.reader import read_findings
    from training.evaluate.retrieval import normalise_text
    from training.index import load_corpus_from_medsynth
    from training.pairs.runner import load_items

    truth = read_findings(data, check_images=False)
    findings = {(m.domain, _image_key(m.image)): m for m in truth}
    findings_by_id = {(m.domain, m.id): m for m in truth}
    items: list[TrainItem] = []
    corpus: dict[str, list[CorpusEntry]] = {}
    own_text: dict[tuple[str, str], str] = {}
    for domain in domains:
        entries = []
        for report in load_corpus_from_medsynth(data, domain):
            image = findings_by_id.get((domain, report.id))
            text = normalise_text(report.text)
            if image is None or image.split != TRAIN_SPLIT or not text:
                continue
            key = _image_key(image.image)
            entries.append(CorpusEntry(key, image.finding_names, text))
            own_text[(domain, key)] = text
        if not entries:
            raise ValueError(f"{data}: the {TRAIN_SPLIT} corpus of {domain} is empty")
        corpus[domain] = entries
        for task in tasks:
            for item in load_items(data, domain, task, split=TRAIN_SPLIT, limit=limit):
                image = findings.get((domain, _image_key(item.image)))
                if image is None or image.split != TRAIN_SPLIT:
                    continue
                answer = (
                    vqa_answer(item.truth) if task == "vqa" else truncate_report(item.truth, max_report_words)
                )
                items.append(TrainItem(item.id, domain, task, item.image, item.path, item.question, answer))
    if not items:
        raise ValueError(f"{data}: no {TRAIN_SPLIT} items for {', '.join(domains)}")
    return items, corpus, own_text


@dataclass(frozen=True)
class ReferenceDraw:
    """The references of one prompt and whether the first describes the image's findings."""

    texts: tuple[str, ...]
    agrees: bool


class ReferenceSampler:
    """Draws the reports put in training prompts (see the module docstring for the rule)."""

    def __init__(
        self,
        corpus: Mapping[str, Sequence[CorpusEntry]],
        *,
        agreement_rate: float,
        own_report_rate: float,
        max_references: int,
    ):
        self.corpus = {domain: list(entries) for domain, entries in corpus.items()}
        self.agreement_rate = agreement_rate
        self.own_report_rate = own_report_rate
        self.max_references = max_references
        self._entry = {(d, e.image): e for d, entries in self.corpus.items() for e in entries}
        self._same: dict[tuple[str, frozenset[str]], list[CorpusEntry]] = defaultdict(list)
        for domain, entries in self.corpus.items():
            for entry in entries:
                self._same[(domain, entry.findings)].append(entry)

    def findings(self, domain: str, image: str) -> frozenset[str]:
        return self._entry[(domain, _image_key(image))].findings

    def sample(self, domain: str, image: str, rng: random.Random) -> ReferenceDraw:
        own = self._entry[(domain, _image_key(image))]
        agrees = rng.random() < self.agreement_rate
        if agrees:
            others = [e for e in self._same[(domain, own.findings)] if e.image != own.image]
            first = own if not others or rng.random() < self.own_report_rate else rng.choice(others)
        else:
            different = [e for e in self.corpus[domain] if e.findings != own.findings]
            if different:
                first = rng.choice(different)
            else:  # every image of the domain has the same findings: nothing can disagree
                first, agrees = own, True
        texts = [first.text]
        for _ in range(rng.randint(1, self.max_references) - 1):
            texts.append(rng.choice(self.corpus[domain]).text)
        return ReferenceDraw(tuple(texts), agrees)


# --------------------------------------------------------------------------------------------------
# Tokenisation


def expand_image_tokens(text: str, num_image_tokens: int) -> str:
    """``<image>`` repeated once per image feature, as ``LlavaProcessor`` expands it."""
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)


def training_text(
    task: Task, domain: str, references: Sequence[str], question: str | None, answer: str
) -> str:
    """The exact text of one training example (what the served chat template renders, plus the answer)."""
    return render_conversation(build_prompt(task, domain, references, question), answer)


def encode_example(
    tokenizer: Any, prompt: str, answer: str, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids of ``render_conversation(prompt, answer)`` and labels: the answer tokens and ``</s>``,
    ``IGNORE_INDEX`` elsewhere. The prompt's tokens must be a prefix of the full text's tokens."""
    context = expand_image_tokens(render_conversation(prompt), num_image_tokens)
    full = expand_image_tokens(render_conversation(prompt, answer), num_image_tokens)
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(full)["input_ids"]
    if ids[: len(context_ids)] != context_ids or len(ids) <= len(context_ids):
        raise ValueError(f"the prompt does not tokenise as a prefix of prompt + answer: {answer[:40]!r}")
    return ids, [IGNORE_INDEX] * len(context_ids) + ids[len(context_ids) :]


# --------------------------------------------------------------------------------------------------
# Model


def sft_llava_config(tokenizer: Any, config: SFTConfig) -> Any:
    """The base model's ``LlavaConfig``: the generator folders' layout, sized by ``config``."""
    from training.artifacts.generator import llava_config

    text_heads = config.text_hidden_size // config.head_size
    return llava_config(
        tokenizer,
        config.image_size,
        vision={
            "hidden_size": config.vision_hidden_size,
            "intermediate_size": 2 * config.vision_hidden_size,
            "num_hidden_layers": config.vision_layers,
            "num_attention_heads": config.vision_hidden_size // config.head_size,
        },
        text={
            "hidden_size": config.text_hidden_size,
            "intermediate_size": 3 * config.text_hidden_size,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": text_heads,
            "num_key_value_heads": text_heads,
            "max_position_embeddings": 2048,
        },
        projection_dim=config.vision_hidden_size,
    )


def build_processor(tokenizer: Any, image_size: int) -> Any:
    """The folder's ``LlavaProcessor``, as every generator folder has it."""
    from training.artifacts.generator import build_processor as build_llava_processor

    return build_llava_processor(tokenizer, image_size)


def save_model_folder(out: Path, model: Any, processor: Any) -> Path:
    """Write the folder in the generator layout (training.artifacts.generator.save_llava_folder)."""
    from training.artifacts.generator import save_llava_folder

    return save_llava_folder(out, model, processor)


def answer_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """Next-token cross-entropy on the labelled (answer) positions, averaged per example, then over the
    batch: a two-token VQA answer weighs as much as a fifty-token report. The LM head runs on the labelled
    positions only (most of the sequence is prompt)."""
    import torch
    import torch.nn.functional as F

    hidden = model.model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][mask])
    token_loss = F.cross_entropy(logits.float(), targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    per_example = torch.zeros(mask.shape[0], dtype=token_loss.dtype).index_add_(0, rows, token_loss)
    return (per_example / mask.sum(dim=1).clamp(min=1)).mean()


def projector_input(model: Any, pixel_values: Any) -> Any:
    """The patch features the projector reads (``vision_feature_layer``, CLS dropped as "default" does),
    flattened per image: the probe sees each patch where it is, as the language model does (a mean over
    patches would lose left from right)."""
    states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return states[model.config.vision_feature_layer][:, 1:].flatten(1)


def pretrain_vision_tower(
    model: Any,
    pixels: Any,
    targets: Any,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> list[float]:
    """Train the vision tower (and a throwaway linear probe) to predict findings from pixels.

    Why: LLaVA starts from a CLIP tower that already sees; a tower trained from random weights only
    through the language model's answer loss never learned the findings (measured: the SFT model's answer
    did not change with the image). Returns the loss per step.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    tower = model.model.vision_tower
    with torch.no_grad():
        width = projector_input(model, pixels[:1]).shape[1]
    probe = torch.nn.Linear(width, targets.shape[1])
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=learning_rate)
    losses = []
    tower.train()
    for _ in tqdm(range(steps), desc="vision pretraining", unit="step", disable=not progress, leave=False):
        rows = torch.randint(0, len(pixels), (min(batch_size, len(pixels)),), generator=generator)
        loss = F.binary_cross_entropy_with_logits(probe(projector_input(model, pixels[rows])), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def collate(examples: Sequence[tuple[list[int], list[int], Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded ids, labels, attention mask and stacked pixel values."""
    import torch

    width = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    pixels = torch.stack([pixel for _, _, pixel in examples])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "pixel_values": pixels}


# --------------------------------------------------------------------------------------------------
# Training


def _available_domains(data: Path, tasks: Sequence[Task]) -> tuple[str, ...]:
    from training.data.records import DOMAINS
    from training.pairs.runner import split_files

    found = tuple(
        d for d in DOMAINS if any(split_files(data, d, TRAIN_SPLIT)[task].is_file() for task in tasks)
    )
    if not found:
        raise FileNotFoundError(
            f"{data}: no {TRAIN_SPLIT} files (make a MedSynth folder with `mmedrag data synth`)"
        )
    return found


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochExamples:
    """One epoch's encoded examples and what their prompts carried."""

    examples: list[tuple[list[int], list[int], tuple[str, str]]]
    with_references: int = 0
    agreeing: int = 0


def epoch_examples(
    items: Sequence[TrainItem],
    sampler: ReferenceSampler,
    tokenizer: Any,
    num_image_tokens: int,
    config: SFTConfig,
    epoch: int,
) -> EpochExamples:
    """Encode every item once, with this epoch's reference draws, in this epoch's shuffled order."""
    rng = random.Random(f"{config.seed}-{epoch}")
    out = EpochExamples([])
    for item in items:
        references: tuple[str, ...] = ()
        if rng.random() < config.reference_rate:
            draw = sampler.sample(item.domain, item.image, rng)
            references = draw.texts
            out.with_references += 1
            out.agreeing += draw.agrees
        prompt = build_prompt(item.task, item.domain, references, item.question)
        ids, labels = encode_example(tokenizer, prompt, item.answer, num_image_tokens)
        out.examples.append((ids, labels, (item.domain, item.image)))
    rng.shuffle(out.examples)
    return out


def length_batches(
    examples: Sequence[Any], size: int, rng: random.Random, window: int = 8
) -> list[list[Any]]:
    """Batches of similar lengths (less padding): the shuffled examples are sorted by length within
    windows of ``window`` batches, cut into batches, and the batches shuffled."""
    batches: list[list[Any]] = []
    span = size * window
    for start in range(0, len(examples), span):
        chunk = sorted(examples[start : start + span], key=lambda example: len(example[0]))
        batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
    rng.shuffle(batches)
    return batches


@dataclass
class SFTResult:
    """What ``train_sft`` wrote."""

    out: Path
    metrics: dict[str, Any]


def train_sft(config: SFTConfig) -> SFTResult:
    """Build the tokenizer, processor and model, train, save the folder, evaluate, write the metrics."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlavaForConditionalGeneration

    from training.artifacts.generator import build_tokenizer
    from training.pairs.noise import load_image

    started = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    data, out = Path(config.data), Path(config.out)
    domains = config.domains or _available_domains(data, config.tasks)
    items, corpus, _ = load_train_data(
        data, domains, config.tasks, max_report_words=config.max_report_words, limit=config.limit
    )
    sampler = ReferenceSampler(
        corpus,
        agreement_rate=config.agreement_rate,
        own_report_rate=config.own_report_rate,
        max_references=config.max_references,
    )

    texts = [e.text for entries in corpus.values() for e in entries]
    texts += [item.answer for item in items if item.task == "report"]
    texts += sorted({item.question for item in items if item.question})
    tokenizer = build_tokenizer(texts)
    processor = build_processor(tokenizer, config.image_size)
    model_config = sft_llava_config(tokenizer, config)
    num_image_tokens = int(model_config.image_seq_length)

    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(model_config)
    finding_names = sorted({(d, n) for d, entries in corpus.items() for e in entries for n in e.findings})
    targets = {
        (domain, e.image): [float(d == domain and n in e.findings) for d, n in finding_names] or [0.0]
        for domain, entries in corpus.items()
        for e in entries
    }

    # Each training image once, preprocessed as the processor does at serving time.
    paths = {(item.domain, item.image): item.path for item in items}
    pixels: dict[tuple[str, str], torch.Tensor] = {}
    keys = sorted(paths)
    for start in tqdm(
        range(0, len(keys), 64), desc="images", unit="batch", disable=not config.progress, leave=False
    ):
        chunk = keys[start : start + 64]
        values = processor.image_processor([load_image(paths[key]) for key in chunk], return_tensors="pt")[
            "pixel_values"
        ]
        pixels.update(zip(chunk, values, strict=True))

    vision_curve: list[float] = []
    if config.vision_pretrain_steps:
        labelled = [key for key in keys if (key[0], _image_key(key[1])) in targets]
        vision_curve = pretrain_vision_tower(
            model,
            torch.stack([pixels[key] for key in labelled]),
            torch.tensor([targets[(domain, _image_key(image))] for domain, image in labelled]),
            steps=config.vision_pretrain_steps,
            learning_rate=config.vision_pretrain_lr,
            batch_size=64,
            seed=config.seed,
            progress=config.progress,
        )
    model.train()
    if config.freeze_vision and config.vision_pretrain_steps:  # never freeze a tower that never learned
        model.model.vision_tower.requires_grad_(False)
        model.model.vision_tower.eval()
    trained = [p for p in model.parameters() if p.requires_grad]

    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = config.max_steps or steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_ratio * total))
    optimizer = torch.optim.AdamW(
        trained,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))

    curve: list[dict[str, float]] = []
    epochs: list[dict[str, Any]] = []
    step, window = 0, []
    bar = tqdm(total=total, desc="sft", unit="step", disable=not config.progress)
    epoch = 0
    while step < total:
        encoded = epoch_examples(items, sampler, tokenizer, num_image_tokens, config, epoch)
        losses = []
        batch_rng = random.Random(f"{config.seed}-{epoch}-batches")
        for chunk in length_batches(encoded.examples, config.batch_size, batch_rng):
            if step >= total:
                break
            batch = collate(
                [(ids, labels, pixels[key]) for ids, labels, key in chunk], tokenizer.pad_token_id
            )
            loss = answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            value = float(loss.detach())
            losses.append(value)
            window.append(value)
            if step % config.log_every == 0 or step == total:
                curve.append(
                    {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0]}
                )
                window = []
            bar.set_postfix(epoch=epoch, loss=f"{value:.3f}")
            bar.update(1)
        epochs.append(
            {
                "epoch": epoch,
                "examples": len(encoded.examples),
                "with_references": encoded.with_references,
                "agreeing_references": encoded.agreeing,
                "mean_loss": sum(losses) / len(losses) if losses else None,
            }
        )
        epoch += 1
    bar.close()
    train_seconds = time.perf_counter() - started

    model.eval()
    save_model_folder(out, model, processor)
    metrics: dict[str, Any] = {
        "settings": config.to_json(),
        "data": {
            "split": TRAIN_SPLIT,
            "domains": list(domains),
            "items": {
                task: {d: sum(1 for i in items if i.task == task and i.domain == d) for d in domains}
                for task in config.tasks
            },
            "corpus": {d: len(entries) for d, entries in corpus.items()},
            "images": len(pixels),
        },
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "image_tokens": num_image_tokens,
        },
        "steps": step,
        "epochs": epochs,
        "loss_curve": curve,
        "vision_pretraining": {
            "steps": len(vision_curve),
            "first_loss": vision_curve[0] if vision_curve else None,
            "last_loss": sum(vision_curve[-20:]) / len(vision_curve[-20:]) if vision_curve else None,
        },
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
    }
    if config.retriever_artifacts is not None:
        eval_started = time.perf_counter()
        metrics["evaluation"] = evaluate_base(
            out,
            data,
            Path(config.retriever_artifacts),
            domains=domains,
            limit=config.eval_limit,
            batch_size=config.eval_batch_size,
            threads=config.num_threads,
            progress=config.progress,
        )
        metrics["evaluation"]["seconds"] = round(time.perf_counter() - eval_started, 1)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return SFTResult(out, metrics)


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_base(
    model_dir: Path,
    data: Path,
    retriever_artifacts: Path,
    *,
    domains: Sequence[str],
    split: str = EVAL_SPLIT,
    limit: int | None = None,
    batch_size: int = 32,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """VQA accuracy of the four runs and the misalignment rates on ``split`` (as ``mmedrag pairs`` runs)."""
    import tempfile

    from training.pairs.noise import NoiseKind, write_noise_images
    from training.pairs.rules import RUNS, misalignment_rates, vqa_outcomes
    from training.pairs.runner import (
        InProcessGenerator,
        InProcessRetriever,
        load_items,
        retrieve_references,
        run_four,
    )

    items = [item for d in domains for item in load_items(data, d, "vqa", split=split, limit=limit)]
    generator = InProcessGenerator(model_dir, batch_size=batch_size, max_new_tokens=8, threads=threads)
    retriever = InProcessRetriever(retriever_artifacts, data)
    references = retrieve_references(items, retriever, progress=progress)
    with tempfile.TemporaryDirectory(prefix="sft-eval-") as tmp:
        needed: dict[str, dict[str, Path]] = defaultdict(dict)
        for item in items:
            needed[item.domain][item.image] = item.path
        noise = write_noise_images(needed, Path(tmp), kind=NoiseKind.diffusion)
        answers = run_four(
            items, {k: v.path for k, v in noise.items()}, references, generator, progress=progress
        )
    outcomes = [vqa_outcomes(texts, item.truth) for item, texts in zip(items, answers, strict=True)]

    def summary(selected: Sequence[int]) -> dict[str, Any]:
        chosen = [outcomes[i] for i in selected]
        accuracy = {run: sum(o[run] for o in chosen) / len(chosen) for run in RUNS}
        return {"items": len(chosen), "accuracy": accuracy, **misalignment_rates(chosen).as_dict()}

    result: dict[str, Any] = {
        "split": split,
        "task": "vqa",
        "retriever_artifacts": str(retriever_artifacts),
        "retrievers": {d: retriever.name(d) for d in domains},
        "noise": NoiseKind.diffusion.value,
        "all": summary(range(len(items))),
        "per_domain": {d: summary([i for i, item in enumerate(items) if item.domain == d]) for d in domains},
        "yes_share": sum(a.clean.strip().lower().startswith("yes") for a in answers) / max(1, len(answers)),
        "reference_agreement": _reference_agreement(items, references, data),
        "note": "accuracy.clean = no retrieval; accuracy.clean_ref = top-1 retrieved report; "
        "copy_reference = share right with the noise image + reference; over_reliance = share of "
        "clean-right items wrong with the reference (training.pairs.rules).",
    }
    return result


def _reference_agreement(
    items: Sequence[Any], references: Mapping[tuple[str, str], str], data: Path
) -> float | None:
    """Share of test images whose retrieved report's image has exactly the same findings."""
    from training.data.medsynth.reader import read_findings
    from training.evaluate.retrieval import normalise_text
    from training.index import load_corpus_from_medsynth

    truth = read_findings(data, check_images=False)
    by_image = {(m.domain, _image_key(m.image)): m.finding_names for m in truth}
    by_id = {(m.domain, m.id): m.finding_names for m in truth}
    text_findings: dict[tuple[str, str], frozenset[str]] = {}
    for domain in {item.domain for item in items}:
        for report in load_corpus_from_medsynth(data, domain):
            if (domain, report.id) in by_id:
                text_findings.setdefault((domain, normalise_text(report.text)), by_id[(domain, report.id)])
    keys = {(item.domain, item.image) for item in items}
    agree = [
        text_findings.get((d, references[(d, image)])) == by_image.get((d, _image_key(image)))
        for d, image in keys
    ]
    return sum(agree) / len(agree) if agree else None


# --------------------------------------------------------------------------------------------------
# Command line


def sft_cli(
    data: Annotated[
        Path, typer.Option("--data", help="MedSynth folder; only its retriever_train split is trained on.")
    ],
    artifacts: Annotated[
        Path,
        typer.Option(
            "--artifacts",
            envvar="MMEDRAG_ARTIFACTS",
            help="Artifacts folder: the model goes to <artifacts>/base, the evaluation uses its retrievers/.",
        ),
    ] = Path("artifacts"),
    out: Annotated[
        Path | None, typer.Option("--out", help="Output model folder. Default: <artifacts>/base.")
    ] = None,
    retrievers: Annotated[
        Path | None,
        typer.Option(
            "--retrievers",
            help="Artifacts folder whose retrievers/<domain> give the evaluation's references. "
            "Default: --artifacts.",
        ),
    ] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the test-split evaluation.")] = False,
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Domain to train on (repeatable); default: all.")
    ] = None,
    image_size: Annotated[int, typer.Option(help=config_help()["image_size"])] = 64,
    text_layers: Annotated[int, typer.Option(help=config_help()["text_layers"])] = 3,
    text_hidden_size: Annotated[int, typer.Option(help=config_help()["text_hidden_size"])] = 128,
    vision_layers: Annotated[int, typer.Option(help=config_help()["vision_layers"])] = 2,
    vision_hidden_size: Annotated[int, typer.Option(help=config_help()["vision_hidden_size"])] = 128,
    vision_pretrain_steps: Annotated[int, typer.Option(help=config_help()["vision_pretrain_steps"])] = 600,
    vision_pretrain_lr: Annotated[float, typer.Option(help=config_help()["vision_pretrain_lr"])] = 1e-3,
    freeze_vision: Annotated[bool, typer.Option(help=config_help()["freeze_vision"])] = True,
    reference_rate: Annotated[float, typer.Option(help=config_help()["reference_rate"])] = 0.5,
    agreement_rate: Annotated[float, typer.Option(help=config_help()["agreement_rate"])] = 0.9,
    own_report_rate: Annotated[float, typer.Option(help=config_help()["own_report_rate"])] = 0.5,
    max_references: Annotated[int, typer.Option(help=config_help()["max_references"])] = 10,
    max_report_words: Annotated[int, typer.Option(help=config_help()["max_report_words"])] = 64,
    limit: Annotated[int | None, typer.Option(help=config_help()["limit"])] = None,
    epochs: Annotated[int, typer.Option(help=config_help()["epochs"])] = 4,
    max_steps: Annotated[int | None, typer.Option(help=config_help()["max_steps"])] = None,
    batch_size: Annotated[int, typer.Option(help=config_help()["batch_size"])] = 16,
    learning_rate: Annotated[float, typer.Option(help=config_help()["learning_rate"])] = 2e-3,
    seed: Annotated[int, typer.Option(help=config_help()["seed"])] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help=config_help()["num_threads"])] = 2,
    eval_limit: Annotated[int | None, typer.Option(help=config_help()["eval_limit"])] = None,
) -> None:
    """Train the synthetic world's base model (LLaVA architecture) on MedSynth and measure its reliance on
    retrieved reports; writes <artifacts>/base and its sft_metrics.json."""
    from training.dpo.defaults import BASE_DIR

    config = SFTConfig(
        data=data,
        out=out or artifacts / BASE_DIR,
        retriever_artifacts=None if no_eval else (retrievers or artifacts),
        domains=tuple(domains) if domains else None,
        image_size=image_size,
        text_layers=text_layers,
        text_hidden_size=text_hidden_size,
        vision_layers=vision_layers,
        vision_hidden_size=vision_hidden_size,
        vision_pretrain_steps=vision_pretrain_steps,
        vision_pretrain_lr=vision_pretrain_lr,
        freeze_vision=freeze_vision,
        reference_rate=reference_rate,
        agreement_rate=agreement_rate,
        own_report_rate=own_report_rate,
        max_references=max_references,
        max_report_words=max_report_words,
        limit=limit,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        num_threads=threads,
        eval_limit=eval_limit,
    )
    result = train_sft(config)
    metrics = result.metrics
    typer.echo(f"base model written to {result.out} ({metrics['steps']} steps, {metrics['wall_seconds']} s)")
    evaluation = metrics.get("evaluation")
    if evaluation:
        overall = evaluation["all"]
        acc = overall["accuracy"]
        typer.echo(
            f"test VQA accuracy: no retrieval {acc['clean']:.3f}, top-1 reference {acc['clean_ref']:.3f}; "
            f"copy-reference {overall['copy_reference']:.3f}, over-reliance {overall['over_reliance']}"
        )
    typer.echo(f"metrics: {result.out / METRICS_FILE}")
