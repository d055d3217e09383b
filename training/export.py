"""``mmedrag export``: merge the DPO adapters into the base weights and write the served generator folder.

vLLM's default maximum LoRA rank is 16 and the paper's adapters have rank 128, so the served model is the
merged one (peft ``merge_and_unload``). The merge is checked before anything is written: the merged model
and the base model with its adapter give the same logits on fixed inputs (an image and each prompt
template), within a tolerance, computed in float32.

The output is a Hugging Face LLaVA folder that both ``transformers`` (the project's generator service) and
``vllm serve`` load: ``config.json``, weights, ``generation_config.json``, the base folder's tokenizer and
processor files copied unchanged (the tokenizer the adapters were trained with), ``chat_template.jinja``
holding exactly ``services.common.prompts.CHAT_TEMPLATE``, and ``export.json`` (what was merged, the parity
result, the serve command). The folder is written next to its target and swapped in at the end, so a failed
export never leaves a half-written generator.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from services.common.artifacts import GENERATOR_DIR
from services.common.prompts import CHAT_TEMPLATE, build_prompt, render_conversation
from training.dpo.defaults import ADAPTERS_DIR, BASE_DIR, artifacts_root

SERVED_MODEL_NAME = "mmedrag-llava"
DEFAULT_TOLERANCE = 1e-4
EXPORT_RECORD = "export.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Written by save_pretrained (or belonging to the adapter), never copied from the base folder.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_NOT_COPIED = {"config.json", "generation_config.json", "adapter_config.json", EXPORT_RECORD}


class ParityError(RuntimeError):
    """The merged model does not reproduce the adapter model's logits."""


@dataclass(frozen=True)
class ExportReport:
    """What ``export_generator`` wrote and how well the merge matched."""

    out: str
    base: str
    adapter: str
    dtype: str
    max_abs_diff: float
    tolerance: float
    max_model_len: int
    vllm_command: str
    seconds: float


def vllm_serve_command(
    folder: Path, *, max_model_len: int, served_model_name: str = SERVED_MODEL_NAME
) -> str:
    """The command that serves ``folder`` the way the router expects: one image per prompt, the folder's
    chat template, no remote media (vLLM fetches none unless ``--allowed-*`` flags say so)."""
    folder = Path(folder)
    return shlex.join(
        [
            "vllm",
            "serve",
            str(folder),
            "--served-model-name",
            served_model_name,
            "--chat-template",
            str(folder / "chat_template.jinja"),
            "--max-model-len",
            str(max_model_len),
            "--limit-mm-per-prompt",
            json.dumps({"image": 1}, separators=(",", ":")),
        ]
    )


def parity_inputs(processor: Any) -> dict[str, Any]:
    """Fixed model inputs: a smooth and a noisy image with a VQA prompt (with a reference) and a report
    prompt (without), rendered as training and serving render them."""
    import numpy as np
    from PIL import Image

    side = 64
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.full((side, side), 90)], -1)
    noisy = np.random.default_rng(0).integers(0, 256, (side, side, 3))
    images = [Image.fromarray(smooth.astype(np.uint8)), Image.fromarray(noisy.astype(np.uint8))]
    texts = [
        render_conversation(
            build_prompt("vqa", "radiology", ["No pleural effusion."], "Is there a pleural effusion?"), "No."
        ),
        render_conversation(build_prompt("report", "pathology", []), "Sections show normal tissue."),
    ]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def _logits(model: Any, inputs: dict[str, Any]):
    import torch

    with torch.inference_mode():
        return model(**inputs).logits.float()


def _resolve_dtype(name: str, base_dir: Path):
    import torch

    if name == "auto":
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        name = name if name in DTYPES else "float32"
    return name, getattr(torch, name)


def _copy_side_files(base_dir: Path, out: Path) -> list[str]:
    """Tokenizer, processor and any other non-weight file of the base folder, unchanged."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED or path.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        shutil.copy2(path, out / path.name)
        copied.append(path.name)
    return copied


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` (rename, so readers see the old folder or the new one)."""
    old = out.with_name(f".{out.name}.old-export")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)


def export_generator(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    *,
    dtype: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    max_model_len: int | None = None,
    served_model_name: str = SERVED_MODEL_NAME,
) -> ExportReport:
    """Merge ``adapter_dir`` into ``base_dir``'s weights, check parity, write the folder to ``out``.

    Args:
        base_dir: the LLaVA folder the adapter was trained on (DPO's ``--model``).
        adapter_dir: the peft adapter (stage 2 continues stage 1, so the stage-2 adapter holds both).
        out: the generator folder to (re)write, e.g. ``artifacts/generator``; may equal ``base_dir``.
        dtype: weights dtype of the written folder; ``auto`` keeps the base folder's. The merge and the
            parity check run in float32 either way.
        tolerance: largest allowed absolute logit difference between merged and adapter model.
        max_model_len: for the printed ``vllm serve`` command; default the model's context length.
        served_model_name: the name the router asks the generator for.

    Raises:
        ParityError: the merged logits differ by more than ``tolerance`` (nothing is written).
        ValueError: ``base_dir`` is an earlier export (the adapter would be merged twice).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    started = time.perf_counter()
    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}: base model folder not found (DPO's --model folder)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: adapter not found; train one with `mmedrag dpo --stage 1|2`")
    if (base_dir / EXPORT_RECORD).is_file():
        raise ValueError(
            f"{base_dir} is itself an export ({EXPORT_RECORD}): merging into it would apply the adapter "
            "twice; pass the un-merged model the adapter was trained on"
        )
    dtype_name, save_dtype = _resolve_dtype(dtype, base_dir)

    processor = AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    base = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    inputs = parity_inputs(processor)
    adapter_logits = _logits(model, inputs)
    merged = model.merge_and_unload().eval()
    merged_logits = _logits(merged, inputs)
    max_abs_diff = float((merged_logits - adapter_logits).abs().max())
    if not max_abs_diff <= tolerance:
        raise ParityError(
            f"merged model differs from base + adapter by {max_abs_diff:.3g} (tolerance {tolerance:g}); "
            "nothing was written"
        )

    context = max_model_len or int(merged.config.text_config.max_position_embeddings)
    command = vllm_serve_command(out, max_model_len=context, served_model_name=served_model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-export")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        copied = _copy_side_files(base_dir, staging)
        merged.to(save_dtype).save_pretrained(staging)
        # Byte-exact, whatever the base folder or the installed transformers wrote.
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
        if AutoProcessor.from_pretrained(staging, local_files_only=True).chat_template != CHAT_TEMPLATE:
            raise RuntimeError(f"{staging}: the processor does not read chat_template.jinja")
        report = ExportReport(
            out=str(out),
            base=str(base_dir),
            adapter=str(adapter_dir),
            dtype=dtype_name,
            max_abs_diff=max_abs_diff,
            tolerance=tolerance,
            max_model_len=context,
            vllm_command=command,
            seconds=round(time.perf_counter() - started, 1),
        )
        record = {
            **asdict(report),
            "adapter_config": json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")),
            "copied_from_base": copied,
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def export_cli(
    base: Annotated[
        Path | None,
        typer.Option("--base", help="LLaVA folder the adapter was trained on. Default: <artifacts>/base."),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", help="peft adapter to merge. Default: <artifacts>/adapters/stage2."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Generator folder to write. Default: <artifacts>/generator."),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Weights dtype written: auto (the base's), float32, bfloat16, float16."),
    ] = "auto",
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Largest allowed |merged - adapter| logit difference.")
    ] = DEFAULT_TOLERANCE,
    max_model_len: Annotated[
        int | None,
        typer.Option("--max-model-len", help="Context length for the vllm command. Default: the model's."),
    ] = None,
    served_model_name: Annotated[
        str, typer.Option("--served-model-name", help="Model name the router requests.")
    ] = SERVED_MODEL_NAME,
) -> None:
    """Merge the LoRA adapters into the base weights and write the served generator folder (vLLM-ready)."""
    if dtype not in DTYPES:
        raise typer.BadParameter(f"choose one of {', '.join(DTYPES)}", param_hint="--dtype")
    root = artifacts_root()
    report = export_generator(
        base if base is not None else root / BASE_DIR,
        adapter if adapter is not None else root / ADAPTERS_DIR / "stage2",
        out if out is not None else root / GENERATOR_DIR,
        dtype=dtype,
        tolerance=tolerance,
        max_model_len=max_model_len,
        served_model_name=served_model_name,
    )
    typer.echo(
        f"parity: max |merged - adapter| logit difference {report.max_abs_diff:.3g} "
        f"(tolerance {report.tolerance:g})"
    )
    typer.echo(f"wrote {report.out} ({report.dtype}) in {report.seconds} s; serve it with:")
    typer.echo(f"  {report.vllm_command}")
