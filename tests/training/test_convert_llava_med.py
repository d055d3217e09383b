"""``mmedrag convert-llava-med`` on a tiny fake checkpoint written in the original LLaVA-Med v1.5 layout:
every tensor maps one-to-one, the converted model computes what the original computes, and the folder loads
in the generator service."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from services.common.prompts import CHAT_TEMPLATE, build_vqa_prompt, render_conversation
from services.generator.service import GeneratorService
from training.convert_llava_med import ConversionError, convert_llava_med, convert_llava_med_cli, hf_key

TEXTS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
    "Is there a pleural effusion? Please answer the question based on the image. Yes. No.",
    "The lungs are clear. No pleural effusion or pneumothorax is seen.",
)


@dataclass
class Original:
    """A fake original checkpoint and the modules its tensors came from (the 'original forward')."""

    src: Path
    clip: Path  # local CLIP tower folder (what --vision-config points at)
    tensors: dict[str, torch.Tensor]
    language_model: MistralForCausalLM
    tower: CLIPVisionModel
    projector: torch.nn.Sequential


def write_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A Mistral-like tokenizer: <unk>, <s>, </s>, BOS added, no pad and no <image> token."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_original(root: Path, *, with_tower: bool = True, fmt: str = "safetensors") -> Original:
    """Tiny Mistral + tiny CLIP tower + mlp2x_gelu projector saved under the original names, in two shards,
    with the original config.json fields (the tower named by its hub id, as in the release)."""
    src = root / "llava-med-v1.5-tiny"
    src.mkdir(parents=True)
    tokenizer = write_tokenizer(src)
    torch.manual_seed(0)
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=16, projection_dim=32,
    )  # fmt: skip
    language_model, tower = MistralForCausalLM(text).eval(), CLIPVisionModel(vision).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    tensors = dict(language_model.state_dict())  # model.embed_tokens, model.layers.N..., model.norm, lm_head
    tensors |= {f"model.mm_projector.{key}": value for key, value in projector.state_dict().items()}
    if with_tower:
        tensors |= {
            f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()
        }
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # saved by old checkpoints
    tensors = {key: value.detach().clone().contiguous() for key, value in tensors.items()}

    keys = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((keys[::2], keys[1::2]), start=1):
        if fmt == "safetensors":
            name = f"model-0000{number}-of-00002.safetensors"
            save_file({key: tensors[key] for key in part}, str(src / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-0000{number}-of-00002.bin"
            torch.save({key: tensors[key] for key in part}, src / name)
        weight_map |= dict.fromkeys(part, name)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (src / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        **{key: value for key, value in text.to_dict().items() if key != "dtype"},
        "_name_or_path": "llava-med-v1.5-tiny",
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "torch_dtype": "float32",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tokenizer_model_max_length": 256,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    (src / "config.json").write_text(json.dumps(config, indent=2))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    clip = root / "clip-vit-tiny"
    tower.save_pretrained(clip)
    return Original(src, clip, tensors, language_model, tower, projector)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    torch.set_num_threads(1)
    return write_original(tmp_path_factory.mktemp("llava_med"))


@pytest.fixture(scope="module")
def converted(original: Original, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("converted") / "llava-med-hf"
    report = convert_llava_med(original.src, out, vision_config=original.clip)
    return report, out, LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()


def test_every_original_tensor_lands_in_exactly_one_hf_tensor(original: Original, converted) -> None:
    report, _, model = converted
    hf = model.state_dict()
    vocab = original.tensors["model.embed_tokens.weight"].shape[0]
    targets = {}
    for key, tensor in original.tensors.items():
        target = hf_key(key)
        if target is None:
            assert key.endswith("rotary_emb.inv_freq")
            continue
        assert target not in targets, f"{key} and {targets.get(target)} both map to {target}"
        targets[target] = key
        rows = (
            tensor.shape[0]
            if target in ("model.language_model.embed_tokens.weight", "lm_head.weight")
            else None
        )
        assert torch.equal(hf[target][:rows], tensor), key
    assert set(targets) == set(hf)  # none left over on either side
    assert report.tensors_in == len(original.tensors) and report.tensors_out == len(hf) == len(targets)
    assert report.dropped == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    # <image> and <pad> were appended after the original vocabulary, initialised to the mean row.
    assert report.added_tokens == ["<image>", "<pad>"] and report.vocab_size == vocab + 2
    assert report.image_token_index == vocab == model.config.image_token_id
    embed = original.tensors["model.embed_tokens.weight"]
    torch.testing.assert_close(hf["model.language_model.embed_tokens.weight"][vocab], embed.mean(0))


def test_converted_model_computes_what_the_original_computes(original: Original, converted) -> None:
    _, out, model = converted
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    # Text only: LLaVA-Med's language path is a plain Mistral forward.
    ids = processor.tokenizer(TEXTS[1], return_tensors="pt")["input_ids"]
    vocab = original.language_model.config.vocab_size
    with torch.inference_mode():
        converted_logits = model(input_ids=ids).logits
        original_logits = original.language_model(input_ids=ids).logits
    torch.testing.assert_close(converted_logits[..., :vocab], original_logits, rtol=0, atol=1e-5)
    # Image features: CLIP layer -2 without CLS, then mm_projector (Linear, GELU, Linear).
    pixels = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        hidden = original.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = original.projector(hidden)
        features = model.model.get_image_features(pixel_values=pixels)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    torch.testing.assert_close(features.reshape(expected.shape), expected, rtol=0, atol=1e-5)


def test_folder_has_llava_processing_and_serves(converted) -> None:
    _, out, model = converted
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert processor.image_processor.do_pad  # image_aspect_ratio "pad": pad to square like LLaVA
    assert (
        model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    )
    prompt = build_vqa_prompt("Is there a pleural effusion?", "radiology")
    from PIL import Image

    inputs = processor(
        text=[render_conversation(prompt)], images=[Image.new("RGB", (48, 32))], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # (32 / 16)² patches
    service = GeneratorService(out, torch_threads=1)
    service.load()  # the checks the generator runs at start-up (model_type, processor, <image> id)
    assert service.ready


def test_tower_weights_from_the_local_clip_folder_and_bin_shards(tmp_path: Path) -> None:
    original = write_original(tmp_path, with_tower=False, fmt="bin")
    report = convert_llava_med(original.src, tmp_path / "out", vision_config=original.clip / "config.json")
    assert report.vision_weights_from == str(original.clip)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", local_files_only=True)
    tower = original.tower.state_dict()
    for key, tensor in tower.items():
        assert torch.equal(model.state_dict()[f"model.vision_tower.{key}"], tensor), key


def test_refusals_say_what_to_fix(original: Original, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="--vision-config"):
        convert_llava_med(original.src, tmp_path / "out")  # the release names the tower by its hub id
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="unexpected tensor"):
        hf_key("model.image_newline")  # LLaVA-NeXT, not v1.5
    assert hf_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert hf_key("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert hf_key("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") == (
        "model.vision_tower.post_layernorm.weight"
    )


def test_cli(original: Original, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(convert_llava_med_cli)
    out = tmp_path / "hf"
    result = CliRunner().invoke(
        app,
        [
            "--src",
            str(original.src),
            "--out",
            str(out),
            "--vision-config",
            str(original.clip),
            "--dtype",
            "bfloat16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "vision tower from checkpoint" in result.output
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == "mistral"
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "bfloat16"
