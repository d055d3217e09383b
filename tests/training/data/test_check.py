"""check_learnability on a fake MedSynth folder: visible findings are learnable, invisible ones are not,
for the linear probe, the CNN probe and both together."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.check import CnnProbeConfig, LearnabilityReport, check_learnability
from training.data.medsynth.catalogue import load_catalogue
from training.data.medsynth.reader import read_findings

N_CATALOGUE_FINDINGS = sum(len(spec["findings"]) for spec in load_catalogue().values())
VISIBLE = [("radiology", "nodule"), ("ophthalmology", "haemorrhage"), ("pathology", "tumour")]
INVISIBLE = [("radiology", "cardiomegaly"), ("ophthalmology", "drusen"), ("pathology", "mitoses")]
# A few epochs of a narrow network on the 32 px fake images: a second or two per run.
TINY_CNN = CnnProbeConfig(pixels=32, epochs=8, width=8, threads=1)


@pytest.fixture(scope="module")
def report(fake_medsynth_dir: Path) -> LearnabilityReport:
    return check_learnability(fake_medsynth_dir, probe="linear", progress=False)


@pytest.fixture(scope="module")
def cnn_report(fake_medsynth_dir: Path) -> LearnabilityReport:
    return check_learnability(fake_medsynth_dir, probe="cnn", cnn=TINY_CNN, progress=False)


@pytest.fixture(scope="module")
def both_report(fake_medsynth_dir: Path) -> LearnabilityReport:
    return check_learnability(fake_medsynth_dir, probe="both", cnn=TINY_CNN, progress=False)


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
    report = check_learnability(data_dir, cnn=TINY_CNN, progress=False)
    row = report.row("radiology", "pneumothorax_left")
    assert row.n_train_positive > 0 and row.n_test_positive == 0
    assert not row.evaluable and row.reason == "no positives in test"
    assert row.linear is None and row.cnn is None
    # A domain without images is reported, not raised.
    assert report.row("pathology", "tumour").reason == "no train images; no test images"
    assert report.row("radiology", "nodule").cnn is not None


def _flip_nodule(splits: tuple[str, ...]):
    def flip(rec: dict) -> dict:
        if rec["split"] in splits:
            names = {f["name"] for f in rec["findings"]}
            rest = [f for f in rec["findings"] if f["name"] != "nodule"]
            new = (
                []
                if "nodule" in names
                else [{"name": "nodule", "severity": "mild", "contrast": 1, "subtle": False}]
            )
            rec["findings"] = rest + new
        return rec

    return flip


@pytest.mark.parametrize("probe", ["linear", "cnn"])
def test_flipping_held_out_labels_flips_the_metric(make_fake_medsynth, probe: str) -> None:
    """Training uses only retriever_train/val and evaluation only preference/test."""
    data_dir = make_fake_medsynth(domains=("radiology",))
    _rewrite_findings(data_dir, _flip_nodule(("preference", "test")))
    row = check_learnability(data_dir, probe=probe, cnn=TINY_CNN, progress=False).row("radiology", "nodule")
    assert row.best_probe == probe
    assert row.balanced_accuracy <= 0.05
    assert row.auroc <= 0.05
    assert row.verdict == "weak"


@pytest.mark.parametrize("probe", ["linear", "cnn"])
def test_flipping_training_labels_also_flips_the_metric(make_fake_medsynth, probe: str) -> None:
    data_dir = make_fake_medsynth(domains=("radiology",))
    _rewrite_findings(data_dir, _flip_nodule(("retriever_train", "retriever_val")))
    row = check_learnability(data_dir, probe=probe, cnn=TINY_CNN, progress=False).row("radiology", "nodule")
    assert row.balanced_accuracy <= 0.05


def test_missing_findings_jsonl_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("findings.jsonl")):
        check_learnability(tmp_path, progress=False)


@pytest.mark.parametrize("probe", ["linear", "cnn", "both"])
def test_missing_image_names_the_file(make_fake_medsynth, probe: str) -> None:
    data_dir = make_fake_medsynth(per_domain=20)
    (data_dir / "images" / "pathology" / "pathology-0007.jpg").unlink()
    with pytest.raises(ValueError, match=re.escape("pathology-0007.jpg")):
        check_learnability(data_dir, probe=probe, cnn=TINY_CNN, progress=False)


def test_unknown_probe_and_bad_cnn_settings_are_rejected(fake_medsynth_dir: Path) -> None:
    with pytest.raises(ValueError, match="probe must be one of linear, cnn, both"):
        check_learnability(fake_medsynth_dir, probe="resnet", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs"):
        CnnProbeConfig(epochs=0)
    with pytest.raises(ValueError, match="pixels"):
        CnnProbeConfig(pixels=4)


def _table(md: str) -> tuple[str, list[str]]:
    table = [line for line in md.splitlines() if line.startswith("| ")]
    return table[0], table[1:]


def test_markdown_has_one_row_per_finding(both_report: LearnabilityReport) -> None:
    md = both_report.to_markdown()
    header, body = _table(md)
    for column in ("linear bal acc", "linear AUROC", "CNN bal acc", "CNN AUROC", "recall subtle", "verdict"):
        assert f"| {column} |" in header
    assert len(body) == N_CATALOGUE_FINDINGS == len(both_report.rows)
    assert all(line.count("|") == 13 for line in body)
    nodule = next(line for line in body if "| nodule |" in line)
    assert re.search(r"\| learnable \((linear|cnn)\) \|$", nodule.rstrip())
    assert "not evaluable" in md
    assert "better probe" in md and "Linear probe:" in md and "CNN probe:" in md


def test_markdown_of_one_probe_leaves_the_other_columns_empty(
    report: LearnabilityReport, cnn_report: LearnabilityReport
) -> None:
    _, linear_body = _table(report.to_markdown())
    _, cnn_body = _table(cnn_report.to_markdown())
    linear_nodule = next(line for line in linear_body if "| nodule |" in line).split(" | ")
    cnn_nodule = next(line for line in cnn_body if "| nodule |" in line).split(" | ")
    assert linear_nodule[6:8] == ["–", "–"] and "–" not in linear_nodule[4:6]
    assert cnn_nodule[4:6] == ["–", "–"] and "–" not in cnn_nodule[6:8]
    assert "CNN probe:" not in report.to_markdown() and "Linear probe:" not in cnn_report.to_markdown()


def test_write_and_to_dict(both_report: LearnabilityReport, tmp_path: Path) -> None:
    json_path, md_path = both_report.write(tmp_path / "out")
    assert json_path.name == "learnability.json" and md_path.name == "learnability.md"
    data = json.loads(json_path.read_text())
    assert data == json.loads(json.dumps(both_report.to_dict()))
    settings = data["settings"]
    assert settings["pixels"] == 32 and settings["medsynth"]["seed"] == 0 and settings["probe"] == "both"
    assert settings["cnn"]["epochs"] == TINY_CNN.epochs and settings["cnn"]["pixels"] == 32
    assert len(data["rows"]) == N_CATALOGUE_FINDINGS
    nodule = next(r for r in data["rows"] if r["finding"] == "nodule")
    assert nodule["verdict"] == "learnable" and nodule["label"] == "pulmonary nodule"
    assert set(nodule["linear"]) >= {"balanced_accuracy", "auroc", "recall_obvious", "recall_subtle"}
    assert nodule["cnn"]["converged"] is None and nodule["linear"]["converged"] is not None
    best = nodule[nodule["best_probe"]]
    assert nodule["balanced_accuracy"] == best["balanced_accuracy"] and nodule["auroc"] == best["auroc"]
    assert md_path.read_text() == both_report.to_markdown()


def test_progress_bar_only_when_asked(make_fake_medsynth, capsys) -> None:
    data_dir = make_fake_medsynth(per_domain=20, domains=("ophthalmology",))
    check_learnability(data_dir, cnn=TINY_CNN, progress=False)
    assert "loading images" not in capsys.readouterr().err
    check_learnability(data_dir, cnn=TINY_CNN, progress=True, pixels=8)
    err = capsys.readouterr().err
    assert "ophthalmology: loading images" in err and "training CNNs (ophthalmology)" in err


# --------------------------------------------------------------------------------------------------
# The CNN probe


@pytest.mark.parametrize(("domain", "finding"), VISIBLE)
def test_visible_finding_is_learnable_by_the_cnn(
    cnn_report: LearnabilityReport, domain: str, finding: str
) -> None:
    row = cnn_report.row(domain, finding)
    assert row.linear is None and row.best_probe == "cnn"
    assert row.cnn.balanced_accuracy >= 0.95
    assert row.cnn.auroc >= 0.95
    assert row.cnn.accuracy > row.baseline_accuracy
    assert row.cnn.recall_obvious >= 0.9
    assert row.verdict == "learnable"


@pytest.mark.parametrize(("domain", "finding"), INVISIBLE)
def test_invisible_finding_stays_weak_for_the_cnn(
    cnn_report: LearnabilityReport, domain: str, finding: str
) -> None:
    row = cnn_report.row(domain, finding)
    assert row.evaluable
    assert row.cnn.balanced_accuracy < 0.68
    assert row.cnn.auroc < 0.75
    assert row.verdict == "weak"


def test_cnn_report_is_deterministic(fake_medsynth_dir: Path, cnn_report: LearnabilityReport) -> None:
    again = check_learnability(fake_medsynth_dir, probe="cnn", cnn=TINY_CNN, progress=False)
    assert again.to_dict() == cnn_report.to_dict()
    # Domains train side by side on one thread each, so the CPU count does not change a digit.
    two_cpus = replace(TINY_CNN, threads=2)
    in_parallel = check_learnability(fake_medsynth_dir, probe="cnn", cnn=two_cpus, progress=False)
    assert in_parallel.to_dict()["rows"] == cnn_report.to_dict()["rows"]
    other_seed = check_learnability(fake_medsynth_dir, probe="cnn", cnn=TINY_CNN, seed=1, progress=False)
    assert other_seed.to_dict()["rows"] != cnn_report.to_dict()["rows"]


def test_cnn_leaves_torch_threads_and_random_state_alone(make_fake_medsynth) -> None:
    data_dir = make_fake_medsynth(per_domain=30, domains=("pathology",))
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_learnability(data_dir, probe="cnn", cnn=CnnProbeConfig(pixels=16, epochs=1, width=4, threads=1))
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)


def test_both_probes_verdict_uses_the_better_one(
    both_report: LearnabilityReport, report: LearnabilityReport, cnn_report: LearnabilityReport
) -> None:
    for row in both_report.rows:
        if not row.evaluable:
            assert row.best_probe is None and row.verdict == "not evaluable"
            continue
        # Each probe gives the same numbers alone as together.
        assert row.linear == report.row(row.domain, row.finding).linear
        assert row.cnn == cnn_report.row(row.domain, row.finding).cnn
        assert row.balanced_accuracy == max(row.linear.balanced_accuracy, row.cnn.balanced_accuracy)
        assert row.best == getattr(row, row.best_probe)
        assert row.recall_subtle == row.best.recall_subtle
    # The scattered finding: whichever probe sees it better carries the verdict.
    assert both_report.row("radiology", "pneumothorax_right").verdict == "learnable"


def test_cnn_keeps_left_and_right_apart(make_fake_medsynth) -> None:
    """Each image has a bright square on exactly one side: only a probe trained without horizontal flips
    can tell which (these stand in for the patient-left/right findings of radiology)."""
    data_dir = make_fake_medsynth(domains=("radiology",), per_domain=160)
    path = data_dir / "findings.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    rng = np.random.default_rng(7)
    for rec in records:
        left = bool(rng.random() < 0.5)
        pixels = rng.integers(40, 141, size=(32, 32)).astype(np.uint8)
        rows = slice(10, 18)
        pixels[rows, 2:10] = 240 if left else pixels[rows, 2:10]
        pixels[rows, 22:30] = pixels[rows, 22:30] if left else 240
        Image.fromarray(pixels, "L").save(data_dir / rec["image"])
        name = "pleural_effusion_right" if left else "pleural_effusion_left"  # patient right = image left
        rec["findings"] = [{"name": name, "severity": "mild", "contrast": 1.0, "subtle": False}]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    started = time.perf_counter()
    report = check_learnability(data_dir, probe="cnn", cnn=TINY_CNN, progress=False)
    assert time.perf_counter() - started < 30
    for finding in ("pleural_effusion_left", "pleural_effusion_right"):
        assert report.row("radiology", finding).cnn.balanced_accuracy >= 0.95


def test_cli_probe_option(fake_medsynth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmedrag.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["data", "check", str(fake_medsynth_dir), "--probe", "linear"])
    assert stop.value.code == 0
    captured = capsys.readouterr()
    _, body = _table(captured.out)
    assert len(body) == N_CATALOGUE_FINDINGS
    assert "learnable (linear)" in captured.out and "CNN probe:" not in captured.out
    assert "check took" in captured.err
    assert main(["data", "check", str(fake_medsynth_dir), "--probe", "resnet"]) == 1
    assert "probe must be one of linear, cnn, both" in capsys.readouterr().err
