"""MedSynth end to end: deterministic trees, every split and release format, read back by the real loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from training.data.formats import get_format
from training.data.medsynth.catalogue import finding_names
from training.data.medsynth.generate import SynthConfig, assign_splits, synthesize
from training.data.medsynth.reader import read_findings
from training.data.medsynth.release import RELEASE_FORMATS, dataset_name
from training.data.records import DOMAINS, SPLITS

PER_DOMAIN = 40
SIZE = 64


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def medsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("medsynth") / "a"
    synthesize(
        SynthConfig(out=out, seed=0, per_domain=PER_DOMAIN, image_size=SIZE, workers=2), progress=False
    )
    return out


def test_same_arguments_give_identical_trees(medsynth: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    synthesize(
        SynthConfig(out=again, seed=0, per_domain=PER_DOMAIN, image_size=SIZE, workers=1), progress=False
    )
    first, second = _tree_digest(medsynth), _tree_digest(again)
    assert len(first) > 3 * PER_DOMAIN
    assert first == second


def test_another_seed_gives_other_images(medsynth: Path, tmp_path: Path) -> None:
    other = tmp_path / "c"
    synthesize(
        SynthConfig(out=other, seed=1, per_domain=PER_DOMAIN, image_size=SIZE, workers=1), progress=False
    )
    first, second = _tree_digest(medsynth), _tree_digest(other)
    images = [name for name in first if "/images/" in name]
    assert sum(first[name] != second.get(name) for name in images) == len(images)


def test_every_domain_has_every_split_and_format(medsynth: Path) -> None:
    for domain in DOMAINS:
        folder = medsynth / domain
        expected = {"retriever_train.json", "retriever_val.json"}
        expected |= {f"{split}_report.json" for split in SPLITS} | {f"{split}_vqa.jsonl" for split in SPLITS}
        assert expected <= {path.name for path in folder.iterdir()}
    summary = json.loads((medsynth / "medsynth.json").read_text())
    assert summary["seed"] == 0 and summary["per_domain"] == PER_DOMAIN and summary["image_size"] == SIZE
    assert sum(summary["counts"]["radiology"][s]["images"] for s in SPLITS) == PER_DOMAIN


@pytest.mark.parametrize("domain", DOMAINS)
def test_real_loaders_read_every_file_back(medsynth: Path, domain: str) -> None:
    root = medsynth / domain / "images"
    retriever_format, report_format = (get_format(name) for name in RELEASE_FORMATS[domain])
    truth = {item.id: item for item in read_findings(medsynth) if item.domain == domain}
    seen_images: dict[str, str] = {}
    for split in SPLITS:
        reports = report_format.load(
            medsynth / domain / f"{split}_report.json", root, dataset=dataset_name(domain)
        ).records
        assert reports, f"{domain}/{split} has no reports"
        for record in reports:
            assert record.split == split and record.domain == domain
            assert truth[record.id].split == split
            assert (root / record.image).is_file()
            seen_images.setdefault(record.image, split)
            assert seen_images[record.image] == split, "an image appears in two splits"
        vqa = (
            get_format("vqa")
            .load(medsynth / domain / f"{split}_vqa.jsonl", root, dataset=dataset_name(domain), domain=domain)
            .records
        )
        assert sum(q.answer == "yes" for q in vqa) == sum(q.answer == "no" for q in vqa)
        for question in vqa:
            image_id = question.id.rsplit("-q", 1)[0]
            present = truth[image_id].finding_names
            assert (question.answer == "yes") == (question.metadata["finding"] in present)
    for split in ("retriever_train", "retriever_val"):
        corpus = retriever_format.load(
            medsynth / domain / f"{split}.json", root, split=split, dataset=dataset_name(domain)
        ).records
        assert len(corpus) == sum(1 for item in truth.values() if item.split == split)


def test_vqa_lines_use_the_release_question_format(medsynth: Path) -> None:
    line = json.loads((medsynth / "radiology" / "retriever_train_vqa.jsonl").read_text().splitlines()[0])
    assert set(line) >= {"question_id", "question", "answer", "image", "report"}
    assert line["question"].endswith("\n<image>")
    assert line["answer"] in {"Yes.", "No"}


def test_reports_state_present_findings_and_negate_others(medsynth: Path) -> None:
    records = (
        get_format("report-mimic-cxr")
        .load(
            medsynth / "radiology" / "retriever_train_report.json",
            medsynth / "radiology" / "images",
            dataset=dataset_name("radiology"),
        )
        .records
    )
    assert all(r.report.startswith("FINDINGS:") and "IMPRESSION:" in r.report for r in records)
    assert sum(" No " in f" {r.report}" or "no " in r.report for r in records) >= len(records) // 2
    assert len({r.report for r in records}) > len(records) * 0.8, "reports should vary in wording"


def test_harvard_retriever_text_is_the_summary(medsynth: Path) -> None:
    raw = json.loads((medsynth / "ophthalmology" / "retriever_train.json").read_text())
    assert {"gpt4_summary", "report", "glaucoma", "filename", "image_path"} <= set(raw[0])
    records = (
        get_format("retriever-harvard")
        .load(medsynth / "ophthalmology" / "retriever_train.json", medsynth / "ophthalmology" / "images")
        .records
    )
    assert records[0].report == raw[0]["gpt4_summary"]
    assert raw[0]["image_path"].startswith("slo_fundus_") and raw[0]["filename"].startswith("data_")


def test_ground_truth_uses_catalogue_names(medsynth: Path) -> None:
    for item in read_findings(medsynth):
        assert item.finding_names <= set(finding_names(item.domain))  # type: ignore[arg-type]


def test_splits_are_disjoint_and_sized() -> None:
    splits = assign_splits(1000, seed=3, domain="pathology")
    assert {s: splits.count(s) for s in SPLITS} == {
        "retriever_train": 600,
        "retriever_val": 100,
        "preference": 150,
        "test": 150,
    }
    assert splits == assign_splits(1000, seed=3, domain="pathology")
    assert splits != assign_splits(1000, seed=4, domain="pathology")


def test_refuses_to_write_into_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no MedSynth dataset"):
        synthesize(SynthConfig(out=tmp_path, per_domain=8, image_size=64), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"difficulty": "extreme"}, "difficulty must be one of"),
        ({"per_domain": 3}, "per_domain must be at least 8"),
        ({"image_size": 32}, "image_size must be between 64 and 512"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(out=tmp_path, **kwargs)
