"""``mmedrag convert-llava-med``: original LLaVA-Med v1.5 checkpoint → HF ``LlavaForConditionalGeneration``.

LLaVA-Med v1.5 (``microsoft/llava-med-v1.5-mistral-7b``) is saved by the original LLaVA code base:
``model_type`` ``llava_mistral`` (``llava_llama`` / ``llava`` for the Llama variants), the language model's
tensors at the top level (``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``), the
two-layer projector as ``model.mm_projector.0`` / ``.2`` (``mm_projector_type: mlp2x_gelu``), and the CLIP
tower, when saved, as ``model.vision_tower.vision_tower.vision_model.*``. Its ``config.json`` carries the
multimodal settings as ``mm_*`` fields and names the CLIP tower by ``mm_vision_tower`` (a hub name in the
release, so the converter needs a local copy: ``--vision-config``).

The converted folder is what the generator service, the DPO trainer and ``vllm serve`` load: HF key layout,
``<image>`` added to the tokenizer (and ``<pad>`` if it has none) with the embeddings grown by the mean row,
a LLaVA processor (CLIP preprocessing, pad-to-square when ``image_aspect_ratio`` is ``pad``) and
``chat_template.jinja`` = ``services.common.prompts.CHAT_TEMPLATE`` (MMed-RAG's vicuna_v1 conversation).
Every original tensor lands in exactly one HF tensor and every HF tensor comes from one original tensor (or
from the local CLIP folder when the checkpoint holds no tower): anything else is an error. Nothing is
fetched from a hub.

Key mapping (original → HF, transformers 5 names)::

    model.vision_tower.vision_tower.vision_model.X  →  model.vision_tower.X
    model.mm_projector.0.{weight,bias}              →  model.multi_modal_projector.linear_1.{weight,bias}
    model.mm_projector.2.{weight,bias}              →  model.multi_modal_projector.linear_2.{weight,bias}
    model.{embed_tokens,layers,norm}.X              →  model.language_model.{embed_tokens,layers,norm}.X
    lm_head.weight                                  →  lm_head.weight
    *.rotary_emb.inv_freq, *.position_ids           →  dropped (buffers that are recomputed)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from services.common.prompts import CHAT_TEMPLATE, IMAGE_TOKEN

PAD_TOKEN = "<pad>"
CONVERSION_RECORD = "conversion.json"
# Ordered: the first matching prefix wins.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Buffers some checkpoints saved; the HF model recomputes them.
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
VISION_PREFIX = "model.vision_tower."
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# Fields of the original config that describe the multimodal wrapper, not the language model.
_NOT_TEXT_FIELDS = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map"}


class ConversionError(ValueError):
    """The source is not a convertible LLaVA-Med checkpoint; the message says what to fix."""


@dataclass(frozen=True)
class ConversionReport:
    out: str
    source_model_type: str
    tensors_in: int
    tensors_out: int
    dropped: list[str]
    vision_weights_from: str
    added_tokens: list[str]
    vocab_size: int
    image_token_index: int
    dtype: str
    seconds: float


def hf_key(key: str) -> str | None:
    """The HF name of an original tensor, or None for a dropped buffer; ConversionError if unknown."""
    if key.endswith(DROPPED_SUFFIXES):
        return None
    for old, new in KEY_RULES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise ConversionError(f"unexpected tensor {key!r}: not part of a LLaVA v1.5 checkpoint")


# ------------------------------------------------------------------------------------------ reading


def _weight_files(src: Path) -> list[Path]:
    safetensors = sorted(src.glob("*.safetensors"))
    if safetensors:
        return safetensors
    bins = sorted(p for p in src.glob("*.bin") if p.name != "training_args.bin")
    if bins:
        return bins
    raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")


def _read_tensors(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, handle.get_tensor(key)
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def read_original_state_dict(src: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint's shards (safetensors preferred, else ``.bin``), by original name."""
    state: dict[str, Any] = {}
    for path in _weight_files(src):
        for key, tensor in _read_tensors(path):
            if key in state:
                raise ConversionError(f"{path}: tensor {key!r} appears in two shards")
            state[key] = tensor
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------ configs


def _text_config(source: dict[str, Any]):
    from transformers import LlamaConfig, MistralConfig

    model_type = source.get("model_type")
    classes = {"llava_mistral": MistralConfig, "llava_llama": LlamaConfig, "llava": LlamaConfig}
    if "text_config" in source:
        raise ConversionError("config.json has a text_config: this is already a Hugging Face LLaVA folder")
    if model_type not in classes:
        raise ConversionError(
            f"model_type {model_type!r} is not an original LLaVA checkpoint (expected llava_mistral, "
            "llava_llama or llava)"
        )
    config_class = classes[model_type]
    known = set(config_class().to_dict()) - _NOT_TEXT_FIELDS
    return config_class(**{key: value for key, value in source.items() if key in known})


def _vision_source(source: dict[str, Any], vision_config: Path | None) -> tuple[Path, Path]:
    """(config.json of the CLIP tower, the folder that may hold its weights and preprocessor)."""
    named = vision_config if vision_config is not None else source.get("mm_vision_tower")
    if not named:
        raise ConversionError("config.json names no mm_vision_tower; pass --vision-config")
    path = Path(named)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"the CLIP tower {str(named)!r} is not a local folder or config file (nothing is fetched from a "
            "hub): pass --vision-config with a local copy of its config.json (e.g. openai/clip-vit-large-"
            "patch14-336 downloaded beforehand)"
        )
    return path, path.parent


def _vision_config(config_path: Path):
    from transformers import CLIPVisionConfig

    data = _read_json(config_path)
    data = data.get("vision_config", data)  # a full CLIP config holds the tower's under vision_config
    known = set(CLIPVisionConfig().to_dict()) - _NOT_TEXT_FIELDS
    return CLIPVisionConfig(**{key: value for key, value in data.items() if key in known})


def _check_multimodal_fields(source: dict[str, Any], vision: Any) -> None:
    projector = source.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type {projector!r}: the HF LLaVA model has the mlp2x_gelu projector only"
        )
    if source.get("mm_use_im_start_end") or source.get("mm_use_im_patch_token"):
        raise ConversionError("mm_use_im_start_end / mm_use_im_patch_token checkpoints are not supported")
    if source.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError(f"mm_patch_merge_type {source['mm_patch_merge_type']!r}: only 'flat' (v1.5)")
    if source.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        raise ConversionError(f"mm_vision_select_feature {source['mm_vision_select_feature']!r} is unknown")
    hidden = source.get("mm_hidden_size")
    if hidden is not None and hidden != vision.hidden_size:
        raise ConversionError(
            f"mm_hidden_size {hidden} differs from the CLIP tower's hidden_size {vision.hidden_size}: "
            "--vision-config names the wrong tower"
        )


def _image_processor(folder: Path, vision: Any, pad_to_square: bool):
    """LLaVA's preprocessing: the tower's CLIP settings, plus pad-to-square (``image_aspect_ratio: pad``)."""
    from transformers import LlavaImageProcessor

    settings: dict[str, Any] = {
        "size": {"shortest_edge": vision.image_size},
        "crop_size": {"height": vision.image_size, "width": vision.image_size},
    }
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        saved = _read_json(preprocessor)
        saved = saved.get("image_processor", saved)
        keep = (
            "size",
            "crop_size",
            "image_mean",
            "image_std",
            "resample",
            "rescale_factor",
            "do_center_crop",
        )
        settings.update({key: saved[key] for key in keep if key in saved})
    return LlavaImageProcessor(**settings, do_pad=pad_to_square)


# ------------------------------------------------------------------------------------------ weights


def _grow_rows(tensor: Any, rows: int) -> Any:
    """``tensor`` with ``rows`` extra rows equal to the mean row (new tokens start as an average token)."""
    import torch

    if rows <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows, -1)], dim=0)


def map_state_dict(original: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(HF state dict, dropped original keys); two originals mapping to one HF name is an error."""
    mapped: dict[str, Any] = {}
    dropped: list[str] = []
    for key, tensor in original.items():
        new = hf_key(key)
        if new is None:
            dropped.append(key)
            continue
        if new in mapped:
            raise ConversionError(f"two original tensors map to {new!r}")
        mapped[new] = tensor
    return mapped, dropped


def _vision_from_folder(folder: Path) -> dict[str, Any]:
    """The CLIP tower's weights from its local folder (CLIPVisionModel or full CLIPModel layout)."""
    from transformers import CLIPVisionModel

    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConversionError(
            f"the checkpoint holds no CLIP tower weights and {folder} has none either: point --vision-config "
            "at a local CLIP folder with its weights"
        )
    tower = CLIPVisionModel.from_pretrained(folder, local_files_only=True)
    return {VISION_PREFIX + key: value for key, value in tower.state_dict().items()}


# ------------------------------------------------------------------------------------------ convert


def convert_llava_med(
    src: Path, out: Path, *, vision_config: Path | None = None, dtype: str = "auto"
) -> ConversionReport:
    """Convert the original checkpoint folder ``src`` into a HF LLaVA folder ``out`` (created/replaced).

    Args:
        src: folder with the original ``config.json``, weight shards and tokenizer files.
        out: target folder.
        vision_config: local CLIP tower folder (or its config.json); default the checkpoint's
            ``mm_vision_tower``, which must then be a local path.
        dtype: weights dtype written: ``auto`` keeps the checkpoint's, or float32 / bfloat16 / float16.
    """
    import torch
    from transformers import (
        AddedToken,
        AutoTokenizer,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    started = time.perf_counter()
    src, out = Path(src), Path(out)
    source = _read_json(src / "config.json")
    text = _text_config(source)
    vision_config_path, vision_folder = _vision_source(source, vision_config)
    vision = _vision_config(vision_config_path)
    _check_multimodal_fields(source, vision)

    # Tokenizer: <image> (and <pad> when missing) appended after the original vocabulary.
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as exc:  # transformers raises many types on a broken or unreadable tokenizer
        raise ConversionError(
            f"{src}: the tokenizer cannot be loaded ({exc}); a tokenizer.model-only folder needs the "
            "sentencepiece package"
        ) from exc
    added: list[str] = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE

    # Weights: map names, take the tower from its folder if the checkpoint lacks it, grow the vocabulary.
    original = read_original_state_dict(src)
    state, dropped = map_state_dict(original)
    vision_from = "checkpoint"
    if not any(key.startswith(VISION_PREFIX) for key in state):
        state.update(_vision_from_folder(vision_folder))
        vision_from = str(vision_folder)
    if EMBED_KEY not in state:
        raise ConversionError("the checkpoint has no model.embed_tokens.weight")
    old_vocab = state[EMBED_KEY].shape[0]
    if old_vocab != text.vocab_size:
        raise ConversionError(f"config vocab_size {text.vocab_size} but embed_tokens has {old_vocab} rows")
    new_vocab = max(len(tokenizer), old_vocab)
    state[EMBED_KEY] = _grow_rows(state[EMBED_KEY], new_vocab - old_vocab)
    if LM_HEAD_KEY in state:
        state[LM_HEAD_KEY] = _grow_rows(state[LM_HEAD_KEY], new_vocab - old_vocab)
    dtype_name = (
        str(source.get("torch_dtype") or source.get("dtype") or "float32") if dtype == "auto" else dtype
    )
    target_dtype = getattr(torch, dtype_name)
    state = {key: value.to(target_dtype) for key, value in state.items()}

    text.vocab_size = new_vocab
    text.pad_token_id = tokenizer.pad_token_id
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    strategy = SELECT_FEATURE[source.get("mm_vision_select_feature", "patch")]
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=source.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(
            f"the checkpoint does not map one-to-one onto LlavaForConditionalGeneration: missing "
            f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'…' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    generation = (
        _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    )
    model.generation_config = GenerationConfig(
        bos_token_id=generation.get("bos_token_id", tokenizer.bos_token_id),
        eos_token_id=generation.get("eos_token_id", tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id,
    )

    image_processor = _image_processor(vision_folder, vision, source.get("image_aspect_ratio") == "pad")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if strategy == "default" else 0,  # the CLS token the tower adds
        chat_template=CHAT_TEMPLATE,
    )

    staging = out.with_name(f".{out.name}.tmp-convert")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        image_processor.save_pretrained(
            staging
        )  # preprocessor_config.json for readers that predate processors
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
        report = ConversionReport(
            out=str(out),
            source_model_type=str(source.get("model_type")),
            tensors_in=len(original),
            tensors_out=len(expected),
            dropped=dropped,
            vision_weights_from=vision_from,
            added_tokens=added,
            vocab_size=new_vocab,
            image_token_index=image_token_index,
            dtype=dtype_name,
            seconds=round(time.perf_counter() - started, 1),
        )
        record = {**asdict(report), "source": str(src), "vision_config": str(vision_config_path)}
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def convert_llava_med_cli(
    src: Annotated[Path, typer.Option("--src", help="Original LLaVA-Med v1.5 checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", help="Hugging Face LLaVA folder to write (replaced).")],
    vision_config: Annotated[
        Path | None,
        typer.Option(
            "--vision-config",
            help="Local CLIP tower folder (or its config.json). Default: the checkpoint's mm_vision_tower, "
            "which must then be a local path (nothing is downloaded).",
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Weights dtype: auto (the checkpoint's), float32, bfloat16, float16."),
    ] = "auto",
) -> None:
    """Convert an original LLaVA-Med v1.5 checkpoint into a LlavaForConditionalGeneration folder (offline)."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter("choose auto, float32, bfloat16 or float16", param_hint="--dtype")
    report = convert_llava_med(src, out, vision_config=vision_config, dtype=dtype)
    typer.echo(
        f"converted {report.tensors_in} tensors ({report.source_model_type}) into {report.tensors_out} "
        f"(vision tower from {report.vision_weights_from}; dropped {len(report.dropped)} buffers; added "
        f"{', '.join(report.added_tokens) or 'no'} tokens) → {report.out} in {report.seconds} s"
    )
