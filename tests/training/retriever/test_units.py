"""Pure pieces of retriever training: Recall@k, the warm-up schedule, config checks, model configs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.retriever.config import RetrieverTrainingConfig, field_help, warmup_steps
from training.retriever.data import distinct_text_batches
from training.retriever.metrics import distinct_texts, paired_recalls, recall_at_k
from training.retriever.model import TEXT_MODEL_PLACEHOLDER, load_model_config
from training.retriever.trainer import _precise_batchnorm, adamw, build_scheduler

# ------------------------------------------------------------------------------------------ recall


def test_recall_at_k_on_a_hand_made_similarity_matrix():
    # 4 queries x 5 gallery items; the positive of query i is item i (query 3 has two: 3 and 4).
    similarity = np.array(
        [
            [0.9, 0.1, 0.2, 0.3, 0.0],  # positive ranked 1st
            [0.8, 0.7, 0.6, 0.5, 0.4],  # positive ranked 2nd
            [0.9, 0.8, 0.1, 0.7, 0.6],  # positive ranked 5th (last)
            [0.5, 0.6, 0.7, 0.1, 0.4],  # positives ranked 5th and 4th: the better one counts
        ]
    )
    positives = np.zeros((4, 5), dtype=bool)
    positives[[0, 1, 2, 3, 3], [0, 1, 2, 3, 4]] = True
    assert recall_at_k(similarity, positives, ks=(1, 2, 3, 4, 5)) == {
        "r1": 0.25,
        "r2": 0.5,
        "r3": 0.5,
        "r4": 0.75,
        "r5": 1.0,
    }


def test_ties_count_against_the_query():
    similarity = np.ones((3, 3))  # a degenerate encoder: every score equal
    assert recall_at_k(similarity, np.eye(3, dtype=bool), ks=(1, 2, 3)) == {"r1": 0.0, "r2": 0.0, "r3": 1.0}


def test_recall_rejects_a_query_without_positive():
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(np.zeros((2, 2)), np.array([[True, False], [False, False]]))


def test_paired_recalls_use_one_gallery_entry_per_distinct_text():
    texts = ["normal", "effusion", "normal", "nodule"]
    gallery = distinct_texts(texts)
    assert gallery == ["normal", "effusion", "nodule"]
    # Text embeddings: one axis per distinct text; images point at their own text, except image 3.
    text_embeddings = np.eye(3)
    image_embeddings = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0.9, 0.1]], dtype=float)
    result = paired_recalls(image_embeddings, text_embeddings, texts, ks=(1, 2))
    assert result["i2t_r1"] == 0.75  # image 3 ("nodule") ranks "effusion" first
    assert result["i2t_r2"] == 1.0
    # Text queries: "normal" has two positive images (0 and 2); "nodule" scores image 3 at 0.1, others 0.
    assert result["t2i_r1"] == 1.0
    assert result["mean_r1"] == pytest.approx((0.75 + 1.0) / 2)


def test_batches_never_hold_a_text_twice():
    texts = ["normal"] * 7 + ["effusion", "effusion"] + [f"report {i}" for i in range(11)]  # 20 items
    batches = distinct_text_batches(texts, 4, torch.Generator().manual_seed(0))
    assert len(batches) == 5 and sorted(len(batch) for batch in batches) == [3, 3, 4, 4, 4]
    for batch in batches:
        assert len({texts[i] for i in batch}) == len(batch)
    used = [i for batch in batches for i in batch]
    assert len(set(used)) == 20 - 2  # "normal" appears in each of the 5 batches; 2 of its 7 rest
    assert sum(texts[i] == "normal" for i in used) == 5
    # Distinct texts: a plain shuffle, every item once.
    plain = distinct_text_batches([str(i) for i in range(10)], 3, torch.Generator().manual_seed(1))
    assert len(plain) == 3 and len({i for batch in plain for i in batch}) == 9


# ---------------------------------------------------------------------------------------- schedule


def test_warmup_is_a_fraction_of_the_total_steps():
    assert warmup_steps(570, 0.1) == 57
    assert warmup_steps(1000, 0.03) == 30
    assert warmup_steps(10, 0.0) == 0
    # Never the whole run (the original release's 10,000 warm-up steps exceeded its ~1-2k steps).
    for total in (1, 2, 7, 180, 1500):
        assert warmup_steps(total, 0.99) < total


def test_the_scheduler_warms_up_linearly_then_decays_by_cosine_to_zero():
    model = torch.nn.Linear(4, 4)
    optimizer = adamw(model, lr=1e-3, weight_decay=1e-2)
    scheduler, warmup = build_scheduler(optimizer, total_steps=100, warmup_fraction=0.1)
    assert warmup == 10
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3)
    assert lrs[10] == pytest.approx(1e-3)  # the peak is reached at the end of warm-up
    assert lrs[55] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_adamw_decays_weight_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = adamw(model, lr=1e-3, weight_decay=1e-2).param_groups
    assert decay["weight_decay"] == 1e-2 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, LN weight, LN bias


class _Tower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _Images:
    def __init__(self, images: list[torch.Tensor]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)


def test_batchnorm_statistics_are_recomputed_over_all_training_images():
    images = [torch.randn(3) * 2 + 5 for _ in range(10)]
    tower = _Tower().eval()
    tower.norm.running_mean.fill_(-7.0)  # stale statistics from the last training batches
    _precise_batchnorm(tower, _Images(images), lambda image: image, batch_size=4)
    # The plain average over the batches (of 4, 4 and 2 images) of their means and unbiased variances.
    batches = [torch.stack(images[i : i + 4]) for i in (0, 4, 8)]
    torch.testing.assert_close(tower.norm.running_mean, sum(b.mean(0) for b in batches) / 3)
    torch.testing.assert_close(tower.norm.running_var, sum(b.var(0) for b in batches) / 3)
    assert tower.norm.momentum == 0.1 and not tower.training


# ------------------------------------------------------------------------------------------ config


def test_config_checks_fields_against_each_other(tmp_path: Path):
    base = {"domain": "radiology", "out": tmp_path / "out"}
    with pytest.raises(ValueError, match="domain must be one of"):
        RetrieverTrainingConfig(**{**base, "domain": "cardiology"}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        RetrieverTrainingConfig(**base)
    with pytest.raises(ValueError, match="--val-file, --format, --image-root"):
        RetrieverTrainingConfig(**base, train_file=tmp_path / "train.json")
    with pytest.raises(ValueError, match="fraction of the total steps"):
        RetrieverTrainingConfig(**base, data_dir=tmp_path, warmup_fraction=1.5)
    with pytest.raises(ValueError, match="in-batch negatives"):
        RetrieverTrainingConfig(**base, data_dir=tmp_path, batch_size=1)
    config = RetrieverTrainingConfig(**base, data_dir=str(tmp_path))  # type: ignore[arg-type]
    assert config.data_dir == tmp_path and config.to_dict()["out"] == str(tmp_path / "out")
    assert (config.lr, config.weight_decay, config.batch_size) == (1e-3, 1e-2, 32)
    assert "paper: 1e-3" in field_help("lr")


# -------------------------------------------------------------------------------------- model configs


def test_bundled_and_builtin_model_configs_resolve():
    small = load_model_config("retriever-small")
    assert "hf_model_name" not in small["text_cfg"] and small["text_cfg"]["context_length"] == 77
    rn50 = load_model_config("RN50", image_size=96)  # open_clip's own config (the original release)
    assert rn50["vision_cfg"]["layers"] == [3, 4, 6, 3] and rn50["vision_cfg"]["image_size"] == 96
    with pytest.raises(ValueError, match="divisible by 32"):
        load_model_config("RN50", image_size=100)
    with pytest.raises(ValueError, match="unknown model config"):
        load_model_config("no-such-model")


def test_a_text_tower_placeholder_must_be_filled(tmp_path: Path):
    with pytest.raises(ValueError, match="--text-model"):
        load_model_config("rn50-bert")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_model_config("rn50-bert", text_model=str(tmp_path))
    with pytest.raises(ValueError, match="has its own text tower"):
        load_model_config("retriever-small", text_model=str(tmp_path))
    assert TEXT_MODEL_PLACEHOLDER == "${TEXT_MODEL}"
