"""Writers of open_clip artifact folders and of the classifier folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.common.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ClipModel
from training.artifacts.classifier import save_classifier, write_tiny_classifier
from training.artifacts.clip import (
    create_clip_model,
    get_clip_config,
    list_clip_configs,
    write_clip_artifact,
)
from training.data.records import DOMAINS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_artifact(tmp_path_factory.mktemp("artifacts") / "tiny", seed=0)


def test_bundled_tiny_config_is_a_small_open_clip_model() -> None:
    assert "tiny" in list_clip_configs()
    config = get_clip_config("tiny")
    assert set(config) == {"embed_dim", "vision_cfg", "text_cfg"}
    model = open_clip.CLIP(**config)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_get_clip_config_returns_a_copy() -> None:
    get_clip_config("tiny")["embed_dim"] = 999
    assert get_clip_config("tiny")["embed_dim"] == 32


def test_unknown_config_lists_the_bundled_ones() -> None:
    with pytest.raises(ValueError, match="tiny"):
        get_clip_config("ViT-H-14-no-such")


def test_artifact_folder_is_open_clip_local_dir(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
    config = json.loads((tiny_dir / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"] == get_clip_config("tiny")
    assert config["preprocess_cfg"]["size"] == 64
    assert config["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert config["preprocess_cfg"]["std"] == list(open_clip.OPENAI_DATASET_STD)
    # open_clip alone loads it, with the weights we wrote.
    model = open_clip.create_model("local-dir:" + str(tiny_dir))
    stored = load_file(str(tiny_dir / OPEN_CLIP_WEIGHTS))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stored[name])


def test_same_seed_gives_byte_identical_weights(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_clip_artifact(tmp_path / "again", seed=0)
    assert (again / OPEN_CLIP_WEIGHTS).read_bytes() == (tiny_dir / OPEN_CLIP_WEIGHTS).read_bytes()
    assert (again / OPEN_CLIP_CONFIG).read_bytes() == (tiny_dir / OPEN_CLIP_CONFIG).read_bytes()


def test_different_seeds_give_different_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = load_file(str(write_clip_artifact(tmp_path / "other", seed=1) / OPEN_CLIP_WEIGHTS))
    base = load_file(str(tiny_dir / OPEN_CLIP_WEIGHTS))
    assert not torch.equal(other["visual.conv1.weight"], base["visual.conv1.weight"])
    assert not torch.equal(other["token_embedding.weight"], base["token_embedding.weight"])


def test_seeded_creation_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_clip_model("tiny", seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_given_model_weights_are_stored_and_sidecars_written(tmp_path: Path) -> None:
    model = create_clip_model("tiny", seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(1.2345)  # a "trained" value no initialisation produces
    folder = write_clip_artifact(
        tmp_path / "retrievers" / "radiology", model=model, extra={"retriever.json": {"domain": "radiology"}}
    )
    assert json.loads((folder / "retriever.json").read_text()) == {"domain": "radiology"}
    clip = ClipModel.load(folder, root=tmp_path)
    assert clip.model.logit_scale.item() == pytest.approx(1.2345)


@pytest.mark.parametrize("name", ["../escape.json", "notes.txt", OPEN_CLIP_CONFIG])
def test_bad_sidecar_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="sidecar"):
        write_clip_artifact(tmp_path / "x", extra={name: {}})
    assert not (tmp_path / "x").exists()


def test_model_that_does_not_match_the_config_fails_when_written(tmp_path: Path) -> None:
    config = get_clip_config("tiny")
    config["embed_dim"] = 16
    (tmp_path / "small.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="weights"):
        write_clip_artifact(
            tmp_path / "bad", config_name=str(tmp_path / "small.json"), model=create_clip_model()
        )


# ---------------------------------------------------------------------------------------- classifier


def test_tiny_classifier_folder(tmp_path: Path) -> None:
    folder = write_tiny_classifier(tmp_path / "classifier", seed=0)
    assert sorted(p.name for p in folder.iterdir()) == [
        "classifier.json",
        "head.safetensors",
        OPEN_CLIP_CONFIG,
        OPEN_CLIP_WEIGHTS,
    ]
    config = json.loads((folder / "classifier.json").read_text())
    assert config == {"labels": list(DOMAINS), "threshold": 0.5, "head": "linear", "embed_dim": 32}
    head = load_file(str(folder / "head.safetensors"))
    assert head["weight"].shape == (3, 32)
    assert head["bias"].shape == (3,)
    again = write_tiny_classifier(tmp_path / "again", seed=0)
    for name in ("head.safetensors", OPEN_CLIP_WEIGHTS):
        assert (again / name).read_bytes() == (folder / name).read_bytes()


def test_save_classifier_from_a_loaded_clip_model_keeps_tower_and_head(
    tiny_dir: Path, tmp_path: Path
) -> None:
    clip = ClipModel.load(tiny_dir, root=tiny_dir.parent)
    head = torch.nn.Linear(32, 2)
    folder = save_classifier(tmp_path / "classifier", clip, head, ["chest", "eye"], threshold=0.7)
    tower = ClipModel.load(folder, root=tmp_path)
    assert tower.weights_sha256 == clip.weights_sha256
    image = Image.new("RGB", (64, 64), (120, 40, 40))
    np.testing.assert_allclose(tower.encode_images([image]), clip.encode_images([image]), atol=1e-6)
    stored = load_file(str(folder / "head.safetensors"))
    torch.testing.assert_close(stored["weight"], head.weight.detach())
    assert json.loads((folder / "classifier.json").read_text())["threshold"] == 0.7


@pytest.mark.parametrize(
    ("head", "labels", "threshold", "match"),
    [
        (torch.nn.Linear(32, 3), ["a", "a", "b"], 0.5, "unique"),
        (torch.nn.Linear(32, 2), ["a", "b"], 1.5, "threshold"),
        (torch.nn.Linear(16, 2), ["a", "b"], 0.5, "head"),
        (torch.nn.Linear(32, 2, bias=False), ["a", "b"], 0.5, "bias"),
    ],
)
def test_save_classifier_refuses_inconsistent_inputs(
    tmp_path: Path, head: torch.nn.Linear, labels: list[str], threshold: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        save_classifier(tmp_path / "classifier", create_clip_model(), head, labels, threshold)
