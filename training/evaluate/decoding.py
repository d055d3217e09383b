"""Decoding baselines the paper compares MMed-RAG against, run on the base model: ``--decoding`` of the
evaluator.

- ``greedy``: ``model.generate`` with ``do_sample=False``, as pair construction and the generator
  service decode (left-padded batch, answer cut at the first EOS, decoded without special tokens).
- ``beam``: transformers beam search with ``num_beams`` beams (the best beam is the answer).
- ``vcd``: visual contrastive decoding (Leng et al., CVPR 2024). At every step the next-token logits under
  the real image, ``l(x, v)``, are contrasted with those under a noised copy of the image,
  ``l(x, v')``: ``(1 + alpha) * l(x, v) - alpha * l(x, v')``, restricted to the *adaptive plausibility*
  set ``{y : p(y | x, v) >= beta * max_w p(w | x, v)}`` (everything else is -inf), and the argmax is
  taken. The VCD paper samples from this distribution; here it is decoded greedily, so runs are
  deterministic and comparable with the other greedy baselines. ``v'`` is the preprocessed image (the
  model's own input resolution, as VCD noises the image tensor) noised by the forward diffusion process
  ``q(x_t | x_0)`` at step ``vcd_noise_step`` of 1000 (``services.common.noise.diffuse``: DDPM's linear
  schedule in [-1, 1] pixel space; VCD used its own schedule and did not clip). The noise of an image is
  a function of ``(seed, pixels)`` only, so a batch decodes exactly as its rows one at a time.
  ``VCDLogitsProcessor`` runs the noised-image branch as a second forward pass with its own KV cache:
  the whole prompt with the noised pixels on the first step, then only the newly generated token.
- ``dola``: decoding by contrasting layers (Chuang et al., ICLR 2024), greedy. transformers 5 removed
  DoLa from ``generate`` (huggingface/transformers#40082): ``dola_layers=`` now needs
  ``custom_generate="transformers-community/dola"`` with ``trust_remote_code``, a Hub download, which this
  project never does. It is small, so it is implemented here as ``DoLaLogitsProcessor``: forward
  pre-hooks capture the hidden state entering each candidate ("premature") layer at the last position,
  each goes through the final norm and the LM head (early exit), the premature layer is the candidate
  whose next-token distribution is farthest (Jensen-Shannon) from the final layer's, *per row* (the
  removed transformers code averaged the divergence over the batch, which makes a row's answer depend on
  its batch mates), and the score is ``log p_final - log p_premature`` over the tokens with
  ``p_final >= 0.1 * max p_final`` (the paper's adaptive plausibility constraint, -inf elsewhere).
  ``dola_layers`` takes transformers' values: ``"high"``, ``"low"`` or explicit layer indices
  (``"0,2,4"``; index j is the hidden state entering decoder layer j, 0 = the embeddings). DoLa's
  authors pair it with ``repetition_penalty=1.2``; this baseline applies none (the other baselines have
  none either).

OPERA (over-trust penalty with retrospection-allocation beam search) is left out: it needs the attention
maps of every step inside a custom beam search, which is far beyond a logits processor.

``DecodedAnswer.first_token_logprobs`` holds the top-20 log-probabilities of the first generated position
(token text -> logprob), for AUROC from P(yes) (``training.evaluate.metrics.yes_probability_from_logprobs``):
for ``greedy`` and ``beam`` the model's own log-softmax over its raw logits, suppressed ids included (what
the generator service and vLLM report as ``top_logprobs``); for ``vcd`` and ``dola`` the log-softmax of
the adjusted scores the first token is chosen from, where tokens the method rules out (suppressed ids,
tokens outside the plausibility set) are -inf and left out, so the mapping may hold fewer than 20
entries (``yes_probability_from_logprobs`` then reads a missing answer word as less likely than every
listed token). Different ids that decode to the same text (byte-level pieces of one character, shown as
U+FFFD) keep the likelier one's value.

Example::

    processor.tokenizer.padding_side = "left"
    answers = decode_batch(model, processor, [render_conversation(prompt)], [image],
                           config=DecodingConfig("vcd"), max_new_tokens=64, eos_ids={2}, pad_id=3,
                           suppress_ids=[processor.image_token_id])
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from services.common.logprobs import top_logprobs_by_text
from services.common.noise import DIFFUSION_STEPS, diffuse

if TYPE_CHECKING:
    from PIL import Image

DECODINGS = ("greedy", "beam", "vcd", "dola")
DOLA_LAYER_SETS = ("low", "high")
TOP_LOGPROBS = 20
# DoLa's adaptive plausibility constraint (the paper's alpha): keep tokens with p >= 0.1 * max p.
DOLA_RELATIVE_TOP = 0.1


@dataclass(frozen=True)
class DecodingConfig:
    """How ``decode_batch`` decodes; only the fields of the chosen ``name`` matter."""

    name: str = "greedy"  # one of DECODINGS
    num_beams: int = 3  # beam: beams kept at each step
    vcd_alpha: float = 1.0  # VCD: logits = (1 + alpha) * l(x, v) - alpha * l(x, v_noised)
    vcd_beta: float = 0.1  # VCD plausibility cut-off: keep tokens with p >= beta * max p (clean image)
    vcd_noise_step: int = 500  # VCD: noised image = q(x_t | x_0) at step t of 1000
    dola_layers: str = "high"  # DoLa candidate layers: "high", "low" or comma-separated indices

    def __post_init__(self) -> None:
        if self.name not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {self.name!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not self.vcd_alpha >= 0:
            raise ValueError(f"vcd_alpha must be >= 0, got {self.vcd_alpha}")
        if not 0 <= self.vcd_beta <= 1:
            raise ValueError(f"vcd_beta must be in [0, 1], got {self.vcd_beta}")
        if not 0 <= self.vcd_noise_step <= DIFFUSION_STEPS:
            raise ValueError(f"vcd_noise_step must be in [0, {DIFFUSION_STEPS}], got {self.vcd_noise_step}")
        parse_dola_layers(self.dola_layers)


@dataclass(frozen=True)
class DecodedAnswer:
    """One answer and the top log-probabilities of its first generated position."""

    text: str
    first_token_logprobs: dict[str, float]


# --------------------------------------------------------------------------------------------------
# VCD


def noised_pixel_values(
    pixel_values: torch.Tensor, image_processor: Any, *, step: int, seed: int
) -> torch.Tensor:
    """The preprocessed images ``(batch, 3, H, W)`` noised by forward diffusion to ``step``.

    Pixels go back to [0, 1] (undoing the processor's normalisation and rescaling), through
    ``services.common.noise.diffuse`` and forward again. Each image's noise is drawn from a stream seeded
    by ``seed`` and a checksum of its own pixels, so it does not depend on the batch it is in.
    """
    mean = std = None
    if getattr(image_processor, "do_normalize", False):
        shape = (1, -1, 1, 1)
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(shape)
        std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(shape)
    scale = 1.0 if getattr(image_processor, "do_rescale", True) else 255.0
    values = pixel_values.detach().to("cpu", torch.float64)
    unit = (values * std + mean if mean is not None else values) / scale
    rows = []
    for clean, row in zip(pixel_values.detach().cpu(), unit.numpy(), strict=True):
        checksum = zlib.crc32(clean.contiguous().numpy().tobytes())
        rows.append(diffuse(row, step, np.random.default_rng([seed, checksum])))
    noised = torch.from_numpy(np.stack(rows)) * scale
    if mean is not None:
        noised = (noised - mean) / std
    return noised.to(pixel_values.device, pixel_values.dtype)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` makes them (pads get 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def vcd_contrast(clean: torch.Tensor, noised: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
    """``(1 + alpha) * clean - alpha * noised`` where ``p_clean >= beta * max p_clean``, -inf elsewhere.

    Comparing logits with ``max + log(beta)`` is comparing probabilities (the softmax normaliser cancels).
    """
    clean = clean.float()
    contrasted = (1.0 + alpha) * clean - alpha * noised.float()
    cutoff = clean.max(dim=-1, keepdim=True).values + (math.log(beta) if beta > 0 else -math.inf)
    return contrasted.masked_fill(clean < cutoff, -math.inf)


class VCDLogitsProcessor(LogitsProcessor):
    """Contrasts each step's logits with the same model's logits for the noised image.

    Holds the noised-image inputs of the batch (the clean prompt's ``input_ids`` and ``attention_mask``
    with noised ``pixel_values``) and a KV cache of its own: the first call runs the whole prompt, later
    calls only the tokens ``generate`` appended since (one per step). Rows are left-padded, so the
    positions and attention mask are built the way ``generate`` builds them. Greedy only (one sequence
    per prompt row).

    Args:
        model: the LLaVA model ``generate`` runs.
        noised_inputs: ``input_ids``, ``attention_mask`` and noised ``pixel_values`` of the batch.
        alpha: contrast strength (0 leaves the clean logits, apart from the plausibility cut).
        beta: plausibility cut-off relative to the clean image's most likely token.
    """

    def __init__(self, model: Any, noised_inputs: Mapping[str, torch.Tensor], *, alpha: float, beta: float):
        self.model = model
        self.inputs = dict(noised_inputs)
        self.alpha = alpha
        self.beta = beta
        self.prompt_width = int(self.inputs["input_ids"].shape[1])
        self.cache: Any = None
        self.seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        prompt_mask = self.inputs["attention_mask"]
        if input_ids.shape[0] != prompt_mask.shape[0]:
            raise ValueError("VCDLogitsProcessor decodes one sequence per prompt row (greedy), not beams")
        generated = input_ids.shape[1] - self.prompt_width
        mask = torch.cat([prompt_mask, prompt_mask.new_ones((prompt_mask.shape[0], generated))], dim=1)
        positions = _positions(mask)
        if self.cache is None:
            outputs = self.model(
                **self.inputs, position_ids=positions, use_cache=True, logits_to_keep=1, return_dict=True
            )
        else:
            outputs = self.model(
                input_ids=input_ids[:, self.seen :],
                attention_mask=mask,
                position_ids=positions[:, self.seen :],
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
                return_dict=True,
            )
        self.cache = outputs.past_key_values
        self.seen = input_ids.shape[1]
        noised = outputs.logits[:, -1, :].to(scores.device)
        return vcd_contrast(scores, noised, alpha=self.alpha, beta=self.beta).to(scores.dtype)


# --------------------------------------------------------------------------------------------------
# DoLa


def parse_dola_layers(value: str) -> str | list[int]:
    """``"low"`` / ``"high"``, or comma-separated non-negative layer indices as a list."""
    text = value.strip()
    if text in DOLA_LAYER_SETS:
        return text
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers or any(layer < 0 for layer in layers):
        raise ValueError(
            f"dola_layers must be 'low', 'high' or comma-separated layer indices (e.g. '0,2'), got {value!r}"
        )
    return layers


def dola_candidate_layers(num_layers: int, dola_layers: str, *, tied_embeddings: bool = False) -> list[int]:
    """The premature layers DoLa chooses from, by transformers' documented rule for ``dola_layers``.

    ``"low"`` / ``"high"``: ``range(0, N // 2, 2)`` / ``range(N // 2, N, 2)`` for ``N <= 40`` layers,
    ``range(0, 20, 2)`` / ``range(N - 20, N, 2)`` above. With tied input and output embeddings the
    embedding layer's early exit is close to the identity, so ``"low"`` starts at 2 (1 for two layers).
    Explicit indices must be below ``N`` (the final layer is the one contrasted against).
    """
    chosen = parse_dola_layers(dola_layers)
    if isinstance(chosen, list):
        if any(layer >= num_layers for layer in chosen):
            raise ValueError(f"dola_layers {chosen} must be below the model's {num_layers} layers")
        return sorted(set(chosen))
    if chosen == "high":
        start = num_layers // 2 if num_layers <= 40 else num_layers - 20
        return list(range(start, num_layers, 2))
    start = 0
    if tied_embeddings:
        start = 2 if num_layers > 2 else 1 if num_layers == 2 else 0
    stop = num_layers // 2 if num_layers <= 40 else 20
    return list(range(start, stop, 2)) or [start]


def _js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence over the last axis (zero-probability tokens contribute nothing)."""
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log(0.5 * (p + q))
    kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def dola_contrast(final: torch.Tensor, premature: torch.Tensor) -> torch.Tensor:
    """DoLa scores from the final layer's logits ``(batch, vocab)`` and the candidates' ``(layers, batch,
    vocab)``: per row, the candidate farthest from the final distribution is contrasted against."""
    log_final = torch.log_softmax(final.float(), dim=-1)
    log_premature = torch.log_softmax(premature.float(), dim=-1)
    divergence = _js_divergence(log_final.unsqueeze(0), log_premature)  # (layers, batch)
    chosen = divergence.argmax(dim=0)
    rows = torch.arange(final.shape[0], device=final.device)
    base = log_premature[chosen, rows]
    keep = log_final >= log_final.max(dim=-1, keepdim=True).values + math.log(DOLA_RELATIVE_TOP)
    return torch.where(keep, log_final - base, torch.full_like(log_final, -math.inf))


def _language_model(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        raise ValueError(
            f"DoLa needs a decoder with `layers` and a final `norm` (Llama-like); "
            f"{type(model).__name__} has none"
        )
    return decoder


class DoLaLogitsProcessor(LogitsProcessor):
    """Replaces each step's final-layer logits with DoLa's contrast against a premature layer.

    Use as a context manager: entering registers forward pre-hooks on the candidate decoder layers (each
    keeps the hidden state at the last position of the latest forward), leaving removes them.

    Args:
        model: the LLaVA (or any decoder-only) model ``generate`` runs.
        dola_layers: ``"high"``, ``"low"`` or comma-separated layer indices.
    """

    def __init__(self, model: Any, dola_layers: str):
        self.decoder = _language_model(model)
        self.head = model.get_output_embeddings()
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        self.layers = dola_candidate_layers(len(self.decoder.layers), dola_layers, tied_embeddings=tied)
        self.captured: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _capture(self, index: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.captured[index] = hidden[:, -1, :].detach()

        return hook

    def __enter__(self) -> DoLaLogitsProcessor:
        for index in self.layers:
            layer = self.decoder.layers[index]
            self._handles.append(layer.register_forward_pre_hook(self._capture(index), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.captured.clear()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if set(self.captured) != set(self.layers):
            raise RuntimeError("DoLaLogitsProcessor is used outside its `with` block (no hidden states)")
        hidden = torch.stack([self.captured[index] for index in self.layers])
        premature = self.head(self.decoder.norm(hidden)).to(scores.device)
        return dola_contrast(scores, premature).to(scores.dtype)


# --------------------------------------------------------------------------------------------------
# Decoding a batch


class _FirstScores(LogitsProcessor):
    """Keeps the scores it sees at the first step (one row per prompt: beams of a row share them then).

    Only the first position is kept: ``output_scores`` would hold every step's full vocabulary."""

    def __init__(self, beams: int = 1):
        self.beams = beams
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.scores is None:
            self.scores = scores.detach().float().view(-1, self.beams, scores.shape[-1])[:, 0].clone()
        return scores


class _Suppress(LogitsProcessor):
    """Tokens that are never generated (the image placeholder): their scores become -inf."""

    def __init__(self, token_ids: Collection[int]):
        self.token_ids = sorted({int(token) for token in token_ids})

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = torch.tensor(self.token_ids, device=scores.device)
        return scores.index_fill(-1, ids, -math.inf)


def _token_logprobs(processor: Any, scores: torch.Tensor) -> dict[str, float]:
    """Top log-probabilities of one position (after this strategy's processors), by token text."""
    tokenizer = processor.tokenizer
    return top_logprobs_by_text(
        scores, TOP_LOGPROBS, lambda index: tokenizer.decode([index], skip_special_tokens=False)
    )


@contextmanager
def _active(processors: Sequence[Any]) -> Iterator[None]:
    """Enter the processors that hook into the model (DoLa) for the duration of ``generate``."""
    entered = []
    try:
        for item in processors:
            if hasattr(item, "__enter__"):
                entered.append(item.__enter__())
        yield
    finally:
        for item in reversed(entered):
            item.__exit__(None, None, None)


def decode_batch(
    model: Any,
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    config: DecodingConfig,
    max_new_tokens: int,
    eos_ids: Collection[int],
    pad_id: int,
    suppress_ids: Collection[int] = (),
    seed: int = 0,
) -> list[DecodedAnswer]:
    """Decode one left-padded batch with ``config``'s method; answers in input order.

    Args:
        model: a transformers ``LlavaForConditionalGeneration`` (eval mode).
        processor: its ``LlavaProcessor``, with ``tokenizer.padding_side == "left"``.
        texts: rendered conversations (``render_conversation`` output, holding ``<image>``).
        images: one PIL image per text.
        config: the decoding method and its parameters.
        max_new_tokens: the longest answer, in tokens.
        eos_ids: tokens that end an answer (the answer is cut at the first one).
        pad_id: the pad token (fills finished rows).
        suppress_ids: tokens never generated (pass the image placeholder, as the generator service does).
        seed: seeds torch for the call and VCD's noise (nothing else here is random).
    """
    if len(texts) != len(images):
        raise ValueError(f"got {len(texts)} texts but {len(images)} images")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos_ids:
        raise ValueError("eos_ids must name at least one token")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not texts:
        return []
    tokenizer = processor.tokenizer
    if tokenizer.padding_side != "left":
        raise ValueError(
            "the processor's tokenizer must pad on the left for batched generation "
            "(set processor.tokenizer.padding_side = 'left')"
        )
    inputs = processor(text=list(texts), images=list(images), return_tensors="pt", padding=True)
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    width = int(inputs["input_ids"].shape[1])
    beams = config.num_beams if config.name == "beam" else 1
    eos = {int(token) for token in eos_ids}
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=beams,
        eos_token_id=sorted(eos),
        pad_token_id=int(pad_id),
        bos_token_id=tokenizer.bos_token_id,
    )
    # Suppression is a processor of ours (not ``suppress_tokens``) so the recorder can sit before it
    # (raw logits, as served) or after the method's adjustment (vcd, dola).
    first = _FirstScores(beams)
    suppress = [_Suppress(suppress_ids)] if suppress_ids else []
    processors: list[Any] = [first, *suppress]
    if config.name == "vcd":
        noised = dict(inputs)
        noised["pixel_values"] = noised_pixel_values(
            inputs["pixel_values"], processor.image_processor, step=config.vcd_noise_step, seed=seed
        )
        vcd = VCDLogitsProcessor(model, noised, alpha=config.vcd_alpha, beta=config.vcd_beta)
        processors = [*suppress, vcd, first]
    elif config.name == "dola":
        processors = [*suppress, DoLaLogitsProcessor(model, config.dola_layers), first]
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), _active(processors):
        torch.manual_seed(seed)
        output = model.generate(
            **inputs, generation_config=generation_config, logits_processor=LogitsProcessorList(processors)
        )
    # a tensor, unless the model's own generation config asks for a dict
    sequences = output.sequences if hasattr(output, "sequences") else output
    if first.scores is None:
        raise RuntimeError("generate produced no token")  # unreachable with max_new_tokens >= 1
    answers = []
    for row, ids in enumerate(sequences[:, width:].tolist()):
        end = next((i for i, token in enumerate(ids) if token in eos), len(ids))
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        logprobs = _token_logprobs(processor, first.scores[row])
        answers.append(DecodedAnswer(text=text, first_token_logprobs=logprobs))
    return answers
