"""check_learnability on a fake MedSynth folder: visible findings are learnable, invisible ones are not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.data.check import LearnabilityReport, check_learnability
from training.data.medsynth.catalogue import load_catalogue
from training.data.medsynth.reader import read_findings

N_CATALOGUE_FINDINGS = sum(len(spec["findings"]) for spec in load_catalogue().values())
VISIBLE = [("radiology", "nodule"), ("ophthalmology", "haemorrhage"), ("pathology", "tumour")]
INVISIBLE = [("radiology", "cardiomegaly"), ("ophthalmology", "drusen"), ("pathology", "mitoses")]


@pytest.fixture(scope="module")
def report(fake_medsynth_dir: Path) -> LearnabilityReport:
    return check_learnability(fake_medsynth_dir, progress=False)


def _rewrite_findings(data_dir: Path, edit) -> None:
    path = data_dir / "findings.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(rec)) + "\n" for rec in records))


@pytest.mark.parametrize(("domain", "finding"), VISIBLE)
def test_visible_finding_is_learnable(report: LearnabilityReport, domain: str, finding: str) -> None:
    row = report.row(domain, finding)
    assert row.evaluable
    assert row.balanced_accuracy >= 0.95
    assert row.auroc >= 0.95
    assert row.accuracy > row.baseline_accuracy
    assert row.recall_obvious >= 0.9
    assert row.verdict == "learnable"


@pytest.mark.parametrize(("domain", "finding"), INVISIBLE)
def test_invisible_finding_stays_near_chance(report: LearnabilityReport, domain: str, finding: str) -> None:
    row = report.row(domain, finding)
    assert row.evaluable
    assert row.balanced_accuracy <= 0.65
    assert row.verdict == "weak"


def test_scattered_finding_is_caught_by_histograms(report: LearnabilityReport) -> None:
    # 40 black pixels at random places: no fixed position, only the intensity histogram sees them.
    row = report.row("radiology", "pneumothorax_right")
    assert row.balanced_accuracy >= 0.9
    assert row.verdict == "learnable"


def test_counts_prevalence_and_baseline(report: LearnabilityReport, fake_medsynth_dir: Path) -> None:
    items = [it for it in read_findings(fake_medsynth_dir) if it.domain == "radiology"]
    test = [it for it in items if it.split in ("preference", "test")]
    row = report.row("radiology", "nodule")
    assert (row.n_train, row.n_test) == (72, 48)
    positives = sum("nodule" in it.finding_names for it in test)
    assert row.n_test_positive == positives
    assert row.prevalence == pytest.approx(positives / 48)
    assert row.baseline_accuracy == pytest.approx(max(row.prevalence, 1 - row.prevalence))
    assert row.n_test_obvious + row.n_test_subtle == positives


def test_subtle_recall_reported_only_when_subtle_positives_exist(report: LearnabilityReport) -> None:
    for row in report.rows:
        if not row.evaluable:
            continue
        assert (row.recall_subtle is None) == (row.n_test_subtle == 0)
        assert (row.recall_obvious is None) == (row.n_test_obvious == 0)
    # The fake draws no subtle case of the invisible or scattered findings.
    assert report.row("radiology", "cardiomegaly").recall_subtle is None


def test_finding_without_positives_is_not_evaluable(report: LearnabilityReport) -> None:
    row = report.row("radiology", "pleural_effusion_left")
    assert not row.evaluable
    assert row.verdict == "not evaluable"
    assert "no positives" in row.reason
    assert row.balanced_accuracy is None and row.auroc is None


def test_finding_with_positives_only_in_train_is_not_evaluable(make_fake_medsynth) -> None:
    data_dir = make_fake_medsynth(domains=("radiology",))

    def edit(rec: dict) -> dict:
        if rec["split"] == "retriever_train" and rec["id"].endswith(("0", "1")):
            rec["findings"].append(
                {"name": "pneumothorax_left", "severity": "mild", "contrast": 1, "subtle": False}
            )
        return rec

    _rewrite_findings(data_dir, edit)
    report = check_learnability(data_dir, progress=False)
    row = report.row("radiology", "pneumothorax_left")
    assert row.n_train_positive > 0 and row.n_test_positive == 0
    assert not row.evaluable and row.reason == "no positives in test"
    # A domain without images is reported, not raised.
    assert report.row("pathology", "tumour").reason == "no train images; no test images"


def test_flipping_held_out_labels_flips_the_metric(make_fake_medsynth) -> None:
    """Training uses only retriever_train/val and evaluation only preference/test."""
    data_dir = make_fake_medsynth(domains=("radiology",))

    def flip(rec: dict) -> dict:
        if rec["split"] in ("preference", "test"):
            names = {f["name"] for f in rec["findings"]}
            rest = [f for f in rec["findings"] if f["name"] != "nodule"]
            new = (
                []
                if "nodule" in names
                else [{"name": "nodule", "severity": "mild", "contrast": 1, "subtle": False}]
            )
            rec["findings"] = rest + new
        return rec

    _rewrite_findings(data_dir, flip)
    row = check_learnability(data_dir, progress=False).row("radiology", "nodule")
    assert row.balanced_accuracy <= 0.05
    assert row.auroc <= 0.05
    assert row.verdict == "weak"


def test_flipping_training_labels_also_flips_the_metric(make_fake_medsynth) -> None:
    data_dir = make_fake_medsynth(domains=("radiology",))

    def flip(rec: dict) -> dict:
        if rec["split"] in ("retriever_train", "retriever_val"):
            names = {f["name"] for f in rec["findings"]}
            rest = [f for f in rec["findings"] if f["name"] != "nodule"]
            new = (
                []
                if "nodule" in names
                else [{"name": "nodule", "severity": "mild", "contrast": 1, "subtle": False}]
            )
            rec["findings"] = rest + new
        return rec

    _rewrite_findings(data_dir, flip)
    row = check_learnability(data_dir, progress=False).row("radiology", "nodule")
    assert row.balanced_accuracy <= 0.05


def test_missing_findings_jsonl_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("findings.jsonl")):
        check_learnability(tmp_path, progress=False)


def test_missing_image_names_the_file(make_fake_medsynth) -> None:
    data_dir = make_fake_medsynth(per_domain=20)
    (data_dir / "images" / "pathology" / "pathology-0007.jpg").unlink()
    with pytest.raises(ValueError, match=re.escape("pathology-0007.jpg")):
        check_learnability(data_dir, progress=False)


def test_markdown_has_one_row_per_finding(report: LearnabilityReport) -> None:
    md = report.to_markdown()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert "balanced acc" in header and "AUROC" in header and "recall subtle" in header
    assert len(body) == N_CATALOGUE_FINDINGS == len(report.rows)
    assert all(line.count("|") == 11 for line in body)
    nodule = next(line for line in body if "| nodule |" in line)
    assert nodule.rstrip().endswith("learnable |")
    assert "not evaluable" in md


def test_write_and_to_dict(report: LearnabilityReport, tmp_path: Path) -> None:
    json_path, md_path = report.write(tmp_path / "out")
    assert json_path.name == "learnability.json" and md_path.name == "learnability.md"
    data = json.loads(json_path.read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["settings"]["pixels"] == 32 and data["settings"]["medsynth"]["seed"] == 0
    assert len(data["rows"]) == N_CATALOGUE_FINDINGS
    nodule = next(r for r in data["rows"] if r["finding"] == "nodule")
    assert nodule["verdict"] == "learnable" and nodule["label"] == "pulmonary nodule"
    assert md_path.read_text() == report.to_markdown()


def test_progress_bar_only_when_asked(make_fake_medsynth, capsys) -> None:
    data_dir = make_fake_medsynth(per_domain=20, domains=("ophthalmology",))
    check_learnability(data_dir, progress=False)
    assert "loading images" not in capsys.readouterr().err
    check_learnability(data_dir, progress=True, pixels=8)
    assert "ophthalmology: loading images" in capsys.readouterr().err
