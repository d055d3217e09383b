"""Importing a release file: records.jsonl + source.json in the project's format, and reading them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from training.data import formats
from training.data.errors import DatasetFormatError
from training.data.importer import RECORDS_FILE, SOURCE_FILE, import_dataset, read_records, read_source
from training.data.records import ImageReport, PreferencePair, VQAItem

FOREIGN_ROOT = "/home/author/data/iu_xray/images"


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (5, 5), color=90).save(path)


def iu_xray_dataset(root: Path) -> None:
    """A dataset folder as a user would have it: images plus the IU-Xray test report JSON."""
    rows = [
        {"id": "CXR1", "report": "Clear lungs.", "image_path": ["CXR1/0.png", "CXR1/1.png"], "split": "test"},
        {
            "id": "CXR2",
            "report": "Small effusion.",
            "image_path": ["CXR2/0.png", "CXR2/1.png"],
            "split": "test",
        },
        {"id": "CXR3", "report": "", "image_path": ["CXR2/0.png"], "split": "test"},  # empty report
    ]
    for row in rows:
        for image in row["image_path"]:
            write_image(root / image)
    (root / "iu_xray_test.json").write_text(json.dumps(rows))


def test_import_writes_records_and_source(tmp_path: Path) -> None:
    root = tmp_path / "iu_xray"
    iu_xray_dataset(root)

    summary = import_dataset("report-iu-xray", root, tmp_path / "out", skip_bad=True)

    lines = [json.loads(line) for line in (tmp_path / "out" / RECORDS_FILE).read_text().splitlines()]
    assert lines == [
        {
            "kind": "image_report",
            "id": "CXR1",
            "domain": "radiology",
            "dataset": "iu-xray",
            "split": "test",
            "image": "CXR1/0.png",
            "report": "Clear lungs.",
            "metadata": {"image_paths": ["CXR1/0.png", "CXR1/1.png"]},
        },
        {
            "kind": "image_report",
            "id": "CXR2",
            "domain": "radiology",
            "dataset": "iu-xray",
            "split": "test",
            "image": "CXR2/0.png",
            "report": "Small effusion.",
            "metadata": {"image_paths": ["CXR2/0.png", "CXR2/1.png"]},
        },
    ]
    source = read_source(tmp_path / "out")
    assert source == summary
    assert source["format"] == "report-iu-xray" and source["kind"] == "image_report"
    assert (source["dataset"], source["domain"]) == ("iu-xray", "radiology")
    assert source["image_root"] == str(root.resolve())
    assert source["source_file"] == str((root / "iu_xray_test.json").resolve())
    assert source["counts"] == {"records": 2, "skipped": 1, "by_split": {"test": 2}}
    assert len(source["errors"]) == 1 and "record 2 (id 'CXR3'), field 'report'" in source["errors"][0]
    assert json.loads((tmp_path / "out" / SOURCE_FILE).read_text()) == summary


def test_read_records_gives_back_the_loaded_records(tmp_path: Path) -> None:
    root = tmp_path / "iu_xray"
    iu_xray_dataset(root)
    import_dataset("report-iu-xray", root, tmp_path / "out", skip_bad=True)

    records = read_records(tmp_path / "out")

    loaded = formats.load_report_iu_xray(root / "iu_xray_test.json", root, skip_bad=True).records
    assert records == loaded
    assert all(isinstance(record, ImageReport) for record in records)


def test_images_resolve_against_root_not_the_file_image_root(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    write_image(root / "files" / "p10" / "a.png")
    rows = [{"id": "s1", "report": "Clear.", "image_path": ["files/p10/a.png"], "split": "train"}]
    rows[0]["image_root"] = FOREIGN_ROOT
    (root / "train.json").write_text(json.dumps(rows))

    summary = import_dataset("retriever-radiology", root, tmp_path / "out", dataset="mimic-cxr")

    [record] = read_records(tmp_path / "out")
    assert Path(summary["image_root"]) / record.image == (root / "files" / "p10" / "a.png").resolve()
    assert "image_root" not in record.metadata


def test_vqa_import_needs_a_dataset_and_counts_answers(tmp_path: Path) -> None:
    root = tmp_path / "harvard"
    write_image(root / "slo_fundus_00001.png")
    rows = [
        {"question_id": i, "question": "Q?\n<image>", "answer": answer, "image": "slo_fundus_00001.png"}
        for i, answer in enumerate(["Yes.", "Yes.", "No"])
    ]
    (root / "qa").mkdir()
    (root / "qa" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    with pytest.raises(ValueError, match="pass dataset="):
        import_dataset("vqa", root, tmp_path / "out", data_file="qa/test.jsonl")
    summary = import_dataset(
        "vqa", root, tmp_path / "out", data_file="qa/test.jsonl", dataset="harvard-fairvlmed"
    )

    assert summary["domain"] == "ophthalmology"
    assert summary["counts"]["by_answer"] == {"no": 1, "yes": 2}
    records = read_records(tmp_path / "out")
    assert all(isinstance(record, VQAItem) for record in records)
    assert [record.answer for record in records] == ["yes", "yes", "no"]


def test_alignment_import_reads_back_preference_pairs(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    write_image(root / "a.png")
    pair = {
        "id": "p1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "No"}],
        "rejected_conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "Yes"}],
        "rejected_noised": 1,
        "image_root": FOREIGN_ROOT,
    }
    (root / "stage1.json").write_text(json.dumps([pair]))

    summary = import_dataset("alignment", root, tmp_path / "out", domain="radiology")

    assert summary["kind"] == "preference" and summary["counts"] == {"records": 1, "skipped": 0}
    [record] = read_records(tmp_path / "out")
    assert record == PreferencePair(
        id="p1",
        image="a.png",
        prompt="Q?",
        chosen="No",
        rejected="Yes",
        rejected_noised=True,
        domain="radiology",
    )


@pytest.mark.parametrize("files", [[], ["a.json", "b.json"]], ids=["none", "two"])
def test_the_release_file_must_be_unambiguous(files: list[str], tmp_path: Path) -> None:
    for name in files:
        (tmp_path / name).write_text("[]")
    (tmp_path / "other.jsonl").write_text("")  # not a candidate for a JSON format
    with pytest.raises(FileNotFoundError, match="Pass data_file"):
        import_dataset("report-iu-xray", tmp_path, tmp_path / "out")


def test_missing_root_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        import_dataset("report-iu-xray", tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown release format"):
        import_dataset("report-chexpert", tmp_path, tmp_path / "out")


def test_a_bad_record_stops_the_import_without_writing(tmp_path: Path) -> None:
    root = tmp_path / "iu_xray"
    iu_xray_dataset(root)
    with pytest.raises(DatasetFormatError, match=r"iu_xray_test\.json, record 2"):
        import_dataset("report-iu-xray", root, tmp_path / "out")
    assert not (tmp_path / "out" / RECORDS_FILE).exists()


GOOD_LINE: dict[str, Any] = {
    "kind": "vqa",
    "id": "q",
    "domain": "radiology",
    "dataset": "iu-xray",
    "split": "test",
    "image": "a.png",
    "question": "Q?",
    "answer": "no",
}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({**GOOD_LINE, "kind": "caption"}, "record 1 (line 2), field 'kind'"),
        ({**GOOD_LINE, "answer": "maybe"}, "record 1 (line 2), field 'answer'"),
        ({k: v for k, v in GOOD_LINE.items() if k != "image"}, "record 1 (line 2), field 'image'"),
    ],
    ids=["kind", "answer", "missing-image"],
)
def test_read_records_names_the_bad_line_and_field(
    line: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    (tmp_path / RECORDS_FILE).write_text(json.dumps(GOOD_LINE) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DatasetFormatError) as caught:
        read_records(tmp_path)
    assert RECORDS_FILE in str(caught.value) and expected in str(caught.value)


def test_read_records_without_an_import_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mmedrag data import"):
        read_records(tmp_path)
