"""Build a tiny LLaVA generator folder with random weights: the stand-in for LLaVA-Med in tests and CI.

The folder has the layout ``vllm serve`` and ``transformers`` both load (``LlavaForConditionalGeneration``):
``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer (``tokenizer.json`` +
``tokenizer_config.json``), the processor (``processor_config.json`` and, for readers that predate it,
``preprocessor_config.json``) and ``chat_template.jinja`` holding exactly
``services.common.prompts.CHAT_TEMPLATE``.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the prompt templates, a fixed set
of sample report sentences and the caller's corpus, so any ASCII report text round-trips through it.

Example::

    from training.artifacts.generator import build_tiny_generator
    folder = build_tiny_generator(Path("artifacts/generator"), corpus=reports, seed=0)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from services.common.prompts import (
    CHAT_TEMPLATE,
    VQA_NOUN,
    build_report_prompt,
    build_vqa_prompt,
    render_conversation,
)

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
# Upper bound of the BPE vocabulary; a small corpus stops merging earlier.
TINY_VOCAB_SIZE = 4096
PATCH_SIZE = 16
# Head size 32 (not 16): vLLM's attention kernels do not take heads smaller than 32.
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
# LLaVA-1.5 conventions: features from the second-to-last CLIP layer, CLS dropped ("default"), which the
# processor mirrors with num_additional_image_tokens=1 so it expands <image> to exactly one token per patch.
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT_STRATEGY = "default"
NUM_ADDITIONAL_IMAGE_TOKENS = 1

# Fixed text so the tokenizer is useful with an empty corpus: report sentences of the three domains
# (with numbers, punctuation and negations) and yes/no questions.
SAMPLE_TEXTS = (
    "The lungs are clear. No pleural effusion or pneumothorax is seen.",
    "Heart size is normal. The mediastinal contours are within normal limits.",
    "There is a small left pleural effusion with adjacent atelectasis.",
    "Moderate cardiomegaly. Mild pulmonary vascular congestion.",
    "A 1.5 cm nodule is seen in the right upper lobe.",
    "Patchy opacity in the left lower lobe, concerning for pneumonia.",
    "No focal consolidation. No acute cardiopulmonary process.",
    "Large right pneumothorax with mediastinal shift to the left.",
    "Impression: no acute findings. Findings: bony structures are intact.",
    "The optic disc is well defined; the cup-to-disc ratio is 0.3.",
    "Enlarged cup-to-disc ratio of 0.7, suspicious for glaucoma.",
    "Scattered drusen in the macula. No haemorrhage is seen.",
    "Several dot and blot haemorrhages in the posterior pole.",
    "The retinal vessels are normal in calibre. The fovea is unremarkable.",
    "Fundus photograph of the left eye shows a normal retina.",
    "Sections show sheets of atypical cells with a tumour infiltrating the stroma.",
    "Dense inflammation with lymphocytes and plasma cells; no necrosis.",
    "Areas of necrosis are present (about 20%). Mitoses are frequent.",
    "H&E stained tissue with normal glandular architecture.",
    "No tumour is identified in the submitted sections.",
    "Is there a pleural effusion? Is the heart enlarged? Is there a nodule?",
    "Does the fundus show haemorrhages? Is the cup-to-disc ratio increased?",
    "Is there necrosis in this tissue? Are tumour cells present?",
    "Yes. No. yes, no [yes, no] Yes, there is. No, there is not.",
    "Left and right; upper, middle and lower; mild, moderate and severe; small and large.",
    "0 1 2 3 4 5 6 7 8 9 10 15 20 25 50 100 mm cm % - / : ; , . ' \" ( ) [ ] ! ? & + = < > _ * # @ $",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
)


def _prompt_texts() -> Iterator[str]:
    """The prompt templates as the router fills them, so their words become single tokens."""
    refs = ("No pleural effusion.", "Small nodule.")
    for domain in VQA_NOUN:
        for references in ((), refs):
            vqa = build_vqa_prompt("Is there an effusion?", domain, references)
            yield render_conversation(vqa, "Yes.")
            yield render_conversation(build_report_prompt(domain, references), "The image is normal.")


def build_tokenizer(
    corpus: Sequence[str] = (), *, vocab_size: int = TINY_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (lossless on any text) with <s>, </s>, <unk>, <pad> and the <image> placeholder.

    Encoding adds ``<s>`` in front (as LLaVA's Llama tokenizer does); ``</s>`` inside text (the chat
    template's end of an assistant turn) becomes the single EOS id.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [*SAMPLE_TEXTS, *_prompt_texts(), *corpus]
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    backend.add_special_tokens([AddedToken(IMAGE, special=True, normalized=False)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
        model_max_length=TEXT["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )


def _check_image_size(image_size: int) -> None:
    if image_size < PATCH_SIZE or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of the patch size {PATCH_SIZE}")


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast, image_size: int) -> LlavaConfig:
    """CLIP vision tower + Llama text model + two-layer projector, sized for CPU tests."""
    return llava_config(tokenizer, image_size)


def llava_config(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int,
    *,
    vision: dict[str, int] = VISION,
    text: dict[str, int] = TEXT,
    projection_dim: int = 64,
) -> LlavaConfig:
    """A LLaVA config in the project's layout (LLaVA-1.5 feature conventions), sized by ``vision``/``text``
    (CLIPVisionConfig / LlamaConfig size fields): the tiny test model and the SFT base share it."""
    _check_image_size(image_size)
    num_patches = (image_size // PATCH_SIZE) ** 2
    vision_config = CLIPVisionConfig(
        **vision, image_size=image_size, patch_size=PATCH_SIZE, projection_dim=projection_dim
    )
    text_config = LlamaConfig(
        **text,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=num_patches,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
    )


def _patch_tokenizer_class(out: Path) -> None:
    """Name the tokenizer class by its long-standing alias so older transformers (e.g. inside a vLLM
    image) load it too; transformers 5 maps ``PreTrainedTokenizerFast`` to the same backend."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> LlavaProcessor:
    """The folder's processor: CLIP image processing at ``image_size`` and the shared chat template."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        num_additional_image_tokens=NUM_ADDITIONAL_IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def save_llava_folder(out: Path, model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> Path:
    """Write a generator folder (weights, processor, tokenizer, generation config, chat_template.jinja)
    that transformers, our generator service and `vllm serve` all load; used by every model builder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5 keeps the image processor inside processor_config.json; older readers want it alone.
    processor.image_processor.save_pretrained(out)
    _patch_tokenizer_class(out)
    # Byte-exact, whatever the installed transformers writes for chat templates.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def build_tiny_generator(
    out: Path, *, corpus: Sequence[str] = (), seed: int = 0, image_size: int = 64
) -> Path:
    """Write a random-weight LLaVA folder to ``out`` (created if needed) and return it.

    Args:
        out: target folder; files already there with the same names are overwritten.
        corpus: extra texts (e.g. the report corpus) the tokenizer is trained on.
        seed: weights are a function of the seed (byte-identical files for the same inputs).
        image_size: square input side in pixels, a multiple of 16 (64 gives 16 image tokens).
    """
    _check_image_size(image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    config = tiny_llava_config(tokenizer, image_size)

    processor = build_processor(tokenizer, image_size)

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    return save_llava_folder(out, model, processor)
