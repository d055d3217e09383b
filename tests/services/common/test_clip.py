"""ClipModel: loading open_clip artifact folders (errors name the file) and encoding images and texts."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import transformers
from PIL import Image

from services.common.artifacts import ArtifactError
from services.common.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ClipModel
from training.artifacts.clip import save_clip_model, write_clip_artifact

TEXTS = ["no acute cardiopulmonary findings", "small left pleural effusion", "cup to disc ratio 0.6"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of varying sizes (the preprocessing resizes and crops them)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(40 + 7 * i, 56, 3), dtype=np.uint8), mode="RGB")
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny open_clip artifact for the whole session (tests that break files copy it first)."""
    return write_clip_artifact(tmp_path_factory.mktemp("clip") / "retrievers" / "radiology", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir: Path) -> ClipModel:
    return ClipModel.load(tiny_clip_dir, root=tiny_clip_dir.parent.parent)


@pytest.fixture
def broken_copy(tiny_clip_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "artifacts" / "retrievers" / "radiology"
    shutil.copytree(tiny_clip_dir, target)
    return target


def test_load_reports_sizes_identity_and_eval_mode(tiny_clip: ClipModel, tiny_clip_dir: Path) -> None:
    assert tiny_clip.embed_dim == 32
    assert tiny_clip.image_size == 64
    assert not tiny_clip.model.training
    expected = hashlib.sha256((tiny_clip_dir / OPEN_CLIP_WEIGHTS).read_bytes()).hexdigest()
    assert tiny_clip.weights_sha256 == expected
    assert tuple(tiny_clip.preprocess(_images(1)[0]).shape) == (3, 64, 64)


def test_encode_images_shape_dtype_and_unit_norm(tiny_clip: ClipModel) -> None:
    embeddings = tiny_clip.encode_images(_images(5))
    assert embeddings.shape == (5, 32)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # Different images give different embeddings.
    assert not np.allclose(embeddings[0], embeddings[1])


def test_encode_texts_shape_dtype_and_unit_norm(tiny_clip: ClipModel) -> None:
    embeddings = tiny_clip.encode_texts(TEXTS)
    assert embeddings.shape == (3, 32)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])


def test_empty_inputs_give_empty_matrices(tiny_clip: ClipModel) -> None:
    assert tiny_clip.encode_images([]).shape == (0, 32)
    assert tiny_clip.encode_texts([]).shape == (0, 32)


def test_batch_of_one_equals_its_row_in_a_batch_of_three(tiny_clip: ClipModel) -> None:
    images = _images(3, seed=1)
    batch = tiny_clip.encode_images(images)
    np.testing.assert_allclose(tiny_clip.encode_images([images[1]])[0], batch[1], atol=1e-5)
    texts = tiny_clip.encode_texts(TEXTS)
    np.testing.assert_allclose(tiny_clip.encode_texts([TEXTS[2]])[0], texts[2], atol=1e-5)


def test_small_batch_size_gives_the_same_embeddings(tiny_clip_dir: Path, tiny_clip: ClipModel) -> None:
    chunked = ClipModel.load(tiny_clip_dir, root=tiny_clip_dir, batch_size=2)
    images = _images(5)
    np.testing.assert_allclose(chunked.encode_images(images), tiny_clip.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(chunked.encode_texts(TEXTS), tiny_clip.encode_texts(TEXTS), atol=1e-5)


def test_same_artifact_loaded_twice_gives_identical_embeddings(
    tiny_clip_dir: Path, tiny_clip: ClipModel
) -> None:
    again = ClipModel.load(tiny_clip_dir, root=tiny_clip_dir)
    images = _images(2)
    np.testing.assert_array_equal(again.encode_images(images), tiny_clip.encode_images(images))
    np.testing.assert_array_equal(again.encode_texts(TEXTS), tiny_clip.encode_texts(TEXTS))


def test_other_seed_gives_other_embeddings(tmp_path: Path, tiny_clip: ClipModel) -> None:
    other = ClipModel.load(write_clip_artifact(tmp_path / "other", seed=1), root=tmp_path)
    assert other.weights_sha256 != tiny_clip.weights_sha256
    assert not np.allclose(other.encode_texts(TEXTS), tiny_clip.encode_texts(TEXTS))


def test_image_and_text_embeddings_match_open_clip_directly(
    tiny_clip_dir: Path, tiny_clip: ClipModel
) -> None:
    """The same folder loaded by open_clip itself gives the same numbers."""
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tiny_clip_dir))
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(tiny_clip_dir))
    image = _images(1)[0]
    with torch.no_grad():
        reference_image = model.encode_image(preprocess(image)[None], normalize=True).numpy()
        reference_text = model.encode_text(tokenizer(TEXTS[:1]), normalize=True).numpy()
    np.testing.assert_allclose(tiny_clip.encode_images([image]), reference_image, atol=1e-5)
    np.testing.assert_allclose(tiny_clip.encode_texts(TEXTS[:1]), reference_text, atol=1e-5)


def test_concurrent_encoding_from_threads(tiny_clip: ClipModel) -> None:
    expected = tiny_clip.encode_texts(TEXTS)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(tiny_clip.encode_texts(TEXTS))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors


def _assert_artifact_error(excinfo: pytest.ExceptionInfo[ArtifactError], path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert excinfo.value.path == path
    assert str(path) in message
    assert "mmedrag artifacts tiny" in message
    for word in words:
        assert word in message


def test_missing_weights_file_names_it(broken_copy: Path) -> None:
    (broken_copy / OPEN_CLIP_WEIGHTS).unlink()
    # A stray .safetensors (e.g. a classifier head) must not be taken for the model.
    (broken_copy / "head.safetensors").write_bytes(b"not weights")
    root = broken_copy.parent.parent
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=root)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_WEIGHTS, "not found", str(root))


def test_missing_config_names_it(broken_copy: Path) -> None:
    (broken_copy / OPEN_CLIP_CONFIG).unlink()
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=broken_copy.parent.parent)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_CONFIG, "not found")


def test_missing_folder_names_the_config(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(tmp_path / "retrievers" / "pathology", root=tmp_path)
    _assert_artifact_error(excinfo, tmp_path / "retrievers" / "pathology" / OPEN_CLIP_CONFIG)


def test_corrupt_config_json_names_it(broken_copy: Path) -> None:
    (broken_copy / OPEN_CLIP_CONFIG).write_text('{"model_cfg": {', encoding="utf-8")
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=broken_copy.parent.parent)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_CONFIG, "not valid JSON")


def test_config_without_model_cfg_names_it(broken_copy: Path) -> None:
    (broken_copy / OPEN_CLIP_CONFIG).write_text('{"preprocess_cfg": {}}', encoding="utf-8")
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=broken_copy.parent.parent)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_CONFIG, "model_cfg")


def test_config_with_unknown_field_names_it(broken_copy: Path) -> None:
    config = json.loads((broken_copy / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["vision_cfg"]["no_such_option"] = 1
    (broken_copy / OPEN_CLIP_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=broken_copy.parent.parent)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_CONFIG, "open_clip model")


def test_corrupt_weights_name_the_weights(broken_copy: Path) -> None:
    (broken_copy / OPEN_CLIP_WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=broken_copy.parent.parent)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_WEIGHTS, "weights")


def test_weights_of_another_architecture_name_the_weights(broken_copy: Path) -> None:
    config = json.loads((broken_copy / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["embed_dim"] = 16
    (broken_copy / OPEN_CLIP_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(broken_copy, root=broken_copy.parent.parent)
    _assert_artifact_error(excinfo, broken_copy / OPEN_CLIP_WEIGHTS, "weights")


# ------------------------------------------------------------------------ Hugging Face text tower

HF_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "findings", "pleural", "effusion"]


def _hf_tower(folder: Path) -> None:
    """A tiny BERT config (no weights) and its WordPiece tokenizer, written locally."""
    transformers.BertConfig(
        vocab_size=len(HF_VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    ).save_pretrained(folder / "text_tower")
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(HF_VOCAB)})
    tokenizer.save_pretrained(folder / "tokenizer")


def _hf_model_cfg(tower: str, tokenizer: str) -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {
            "hf_model_name": tower,
            "hf_tokenizer_name": tokenizer,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 16,
        },
    }


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip folder whose text tower and tokenizer are local folders named relative to it."""
    folder = tmp_path_factory.mktemp("hf") / "retriever"
    _hf_tower(folder)
    absolute = _hf_model_cfg(str(folder / "text_tower"), str(folder / "tokenizer"))
    absolute["text_cfg"]["hf_model_pretrained"] = False  # random weights from the config: no download
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CustomTextCLIP(**absolute)
    save_clip_model(folder, model, _hf_model_cfg("text_tower", "tokenizer"))
    return folder


def test_hf_text_tower_with_relative_local_tokenizer(hf_clip_dir: Path) -> None:
    clip = ClipModel.load(hf_clip_dir, root=hf_clip_dir.parent)
    embeddings = clip.encode_texts(["no acute findings", "pleural effusion"])
    assert embeddings.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])
    assert clip.encode_images(_images(1)).shape == (1, 16)


def test_hf_artifact_moved_elsewhere_still_loads(hf_clip_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(hf_clip_dir, moved)
    original = ClipModel.load(hf_clip_dir, root=hf_clip_dir.parent)
    copy = ClipModel.load(moved, root=tmp_path)
    np.testing.assert_allclose(
        copy.encode_texts(["no effusion"]), original.encode_texts(["no effusion"]), atol=1e-6
    )


def test_hf_tokenizer_given_as_absolute_folder(hf_clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "abs"
    shutil.copytree(hf_clip_dir, folder)
    outside = tmp_path / "shared_tokenizer"
    shutil.move(folder / "tokenizer", outside)
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(outside)
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    clip = ClipModel.load(folder, root=tmp_path)
    assert clip.encode_texts(["acute findings"]).shape == (1, 16)


def test_hf_tower_that_is_not_a_local_folder_is_refused(hf_clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(hf_clip_dir, folder)
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-PubMedBERT-base"
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(folder, root=tmp_path)
    _assert_artifact_error(excinfo, folder / OPEN_CLIP_CONFIG, "hf_model_name", "local folder")


def test_hf_tokenizer_that_is_not_a_local_folder_is_refused(hf_clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hub_tok"
    shutil.copytree(hf_clip_dir, folder)
    shutil.rmtree(folder / "tokenizer")
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "bert-base-uncased"
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ArtifactError) as excinfo:
        ClipModel.load(folder, root=tmp_path)
    _assert_artifact_error(excinfo, folder / OPEN_CLIP_CONFIG, "hf_tokenizer_name")


def test_hf_tokenizer_files_next_to_the_weights_follow_open_clip_convention(
    hf_clip_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "flat"
    shutil.copytree(hf_clip_dir, folder)
    for path in (folder / "tokenizer").iterdir():
        shutil.move(path, folder / path.name)
    (folder / "tokenizer").rmdir()
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "bert-base-uncased"  # a hub name: not fetched
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    original = ClipModel.load(hf_clip_dir, root=hf_clip_dir.parent)
    flat = ClipModel.load(folder, root=tmp_path)
    np.testing.assert_allclose(
        flat.encode_texts(["no effusion"]), original.encode_texts(["no effusion"]), atol=1e-6
    )
