"""``mmedrag export``: the merged folder reproduces base + adapter, is laid out for vLLM and transformers, and
the generator service serves it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
import typer
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from services.common.images import encode_png, to_data_url
from services.common.prompts import CHAT_TEMPLATE, build_chat_messages, build_vqa_prompt
from services.generator.app import build_app
from services.generator.service import GeneratorService
from services.generator.settings import GeneratorSettings
from training.artifacts.generator import build_tiny_generator
from training.dpo.defaults import LANGUAGE_MODEL_LINEAR
from training.export import ParityError, export_cli, export_generator, parity_inputs, vllm_serve_command

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny base folder and a LoRA adapter with random (not zero) B, so merging visibly changes logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    base = build_tiny_generator(root / "base", seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(base, local_files_only=True)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LANGUAGE_MODEL_LINEAR, init_lora_weights=False)
    torch.manual_seed(1)
    get_peft_model(model, config).save_pretrained(root / "adapter")
    return base, root / "adapter"


@pytest.fixture(scope="module")
def exported(base_and_adapter: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    base, adapter = base_and_adapter
    out = tmp_path_factory.mktemp("artifacts") / "generator"
    return export_generator(base, adapter, out), out


def logits_of(model, processor) -> torch.Tensor:
    with torch.inference_mode():
        return model(**parity_inputs(processor)).logits.float()


def test_merged_logits_equal_adapter_logits(base_and_adapter, exported) -> None:
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    base, adapter = base_and_adapter
    report, out = exported
    assert report.max_abs_diff <= 1e-4 and report.tolerance == 1e-4
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    merged = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    plain = LlavaForConditionalGeneration.from_pretrained(base, local_files_only=True).eval()
    base_logits = logits_of(plain, processor)
    with_adapter = logits_of(PeftModel.from_pretrained(plain, adapter).eval(), processor)
    reloaded = logits_of(merged, processor)
    print(f"max |merged - adapter| = {(reloaded - with_adapter).abs().max():.3g}")  # noqa: T201 (shown with -s)
    torch.testing.assert_close(reloaded, with_adapter, rtol=0, atol=1e-4)
    assert (reloaded - base_logits).abs().max() > 1e-2  # the adapter really is in the weights
    assert not any("lora" in name for name in merged.state_dict())


def test_folder_is_vllm_ready(base_and_adapter, exported) -> None:
    base, _ = base_and_adapter
    report, out = exported
    assert (out / "chat_template.jinja").read_bytes() == CHAT_TEMPLATE.encode("utf-8")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "generation_config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    record = json.loads((out / "export.json").read_text())
    assert record["max_abs_diff"] == report.max_abs_diff and record["adapter_config"]["r"] == 8
    assert report.vllm_command == (
        f"vllm serve {out} --served-model-name mmedrag-llava --chat-template {out}/chat_template.jinja "
        "--max-model-len 2048 --limit-mm-per-prompt '{\"image\":1}'"
    )
    assert "--allowed" not in report.vllm_command  # no remote media
    assert not list(out.parent.glob(".generator.*"))  # staging folders are gone


async def test_generator_service_answers_from_the_exported_folder(exported) -> None:
    _, out = exported
    service = GeneratorService(out, max_tokens_ceiling=16, torch_threads=1)
    service.load()
    image = Image.new("RGB", (64, 64), (30, 30, 30))
    prompt = build_vqa_prompt("Is there a pleural effusion?", "radiology", ["No pleural effusion."])
    body = {
        "model": "mmedrag-llava",
        "messages": build_chat_messages(prompt, to_data_url(encode_png(image))),
        "max_tokens": 4,
        "temperature": 0,
    }
    app = build_app(GeneratorSettings(model_dir=out), service=service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://generator") as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "mmedrag-llava" and isinstance(answer["choices"][0]["message"]["content"], str)
    assert 1 <= answer["usage"]["completion_tokens"] <= 4


def test_parity_failure_writes_nothing(base_and_adapter, tmp_path: Path) -> None:
    base, adapter = base_and_adapter
    with pytest.raises(ParityError, match="nothing was written"):
        export_generator(base, adapter, tmp_path / "generator", tolerance=-1.0)
    assert not list(tmp_path.iterdir())


def test_an_export_is_never_merged_into_again(base_and_adapter, exported, tmp_path: Path) -> None:
    _, adapter = base_and_adapter
    _, out = exported
    with pytest.raises(ValueError, match="adapter twice"):
        export_generator(out, adapter, tmp_path / "generator")


def test_cli_writes_bfloat16_over_an_old_folder_and_prints_the_serve_command(
    base_and_adapter, tmp_path: Path
) -> None:
    base, adapter = base_and_adapter
    out = tmp_path / "generator"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    app = typer.Typer()
    app.command()(export_cli)
    result = CliRunner().invoke(
        app,
        ["--base", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "bfloat16",
         "--max-model-len", "1024"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "parity: max |merged - adapter|" in result.output
    assert vllm_serve_command(out, max_model_len=1024) in result.output
    assert not (out / "stale.txt").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}  # noqa: SIM118
