"""Release-format loaders and writers: samples in the exact MMed-RAG release formats, read field by field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from training.data import formats
from training.data.errors import DatasetFormatError
from training.data.formats import FORMATS, get_format, pmc_oa_image_naming, strip_image_marker
from training.data.records import ImageReport, PreferencePair, VQAItem

# The authors' machines, as the release files carry them: never to be used.
FOREIGN_ROOT = "/home/author/data/mmed-rag"


def write_image(path: Path) -> None:
    """A tiny real image, PNG or JPEG by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if path.suffix == ".png" else "RGB"
    Image.new(mode, (6, 4), color=128 if mode == "L" else (200, 120, 160)).save(path)


def write_release(path: Path, rows: list[Any]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")


@dataclass
class Case:
    """One release file: its records, the images it needs (relative to the root) and what must load."""

    format_name: str
    rows: list[dict[str, Any]]
    images: list[str]
    expected: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        suffix = "jsonl" if FORMATS[self.format_name].file_type == "jsonl" else "json"
        return f"{self.format_name}.{suffix}"

    def write(self, root: Path) -> Path:
        for image in self.images:
            write_image(root / image)
        path = root / self.file_name
        write_release(path, self.rows)
        return path


def image_report(**fields: Any) -> dict[str, Any]:
    return {"metadata": {}, **fields}


CASES = [
    Case(
        "retriever-radiology",
        rows=[
            {
                "id": "CXR1_1_IM-0001",
                "report": "The lungs are clear. No pleural effusion.",
                "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"],
                "split": "train",
                "image_root": f"{FOREIGN_ROOT}/iu_xray/images",
            },
            {
                "id": 17,
                "report": "Mild cardiomegaly.",
                "image_path": ["CXR17/0.png"],
                "split": "val",
                "image_root": f"{FOREIGN_ROOT}/iu_xray/images",
            },
        ],
        images=["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png", "CXR17/0.png"],
        options={"dataset": "iu-xray"},
        expected=[
            image_report(
                id="CXR1_1_IM-0001",
                domain="radiology",
                dataset="iu-xray",
                split="train",
                image="CXR1_1_IM-0001/0.png",
                report="The lungs are clear. No pleural effusion.",
                metadata={"image_paths": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]},
            ),
            image_report(
                id="17",
                domain="radiology",
                dataset="iu-xray",
                split="val",
                image="CXR17/0.png",
                report="Mild cardiomegaly.",
                metadata={"image_paths": ["CXR17/0.png"], "id_is_int": True},
            ),
        ],
    ),
    Case(
        "retriever-pmc-oa",
        rows=[
            {
                "id": "pmc_oa_8736",
                "image": "8736.jpg",
                "report": "H&E section showing adenocarcinoma.",
                "metadata": {"subfigure": "a"},
                "image_root": f"{FOREIGN_ROOT}/pmc_oa/images",
            }
        ],
        images=["train_images/8736.jpg"],
        expected=[
            image_report(
                id="pmc_oa_8736",
                domain="pathology",
                dataset="pmc-oa",
                split="train",
                image="train_images/8736.jpg",
                report="H&E section showing adenocarcinoma.",
                metadata={
                    "metadata": {"subfigure": "a"},
                    "image_naming": "numeric",
                    "release_image": "8736.jpg",
                },
            )
        ],
    ),
    Case(
        "retriever-quilt",
        rows=[
            {
                "id": "quilt_42",
                "caption": "Granulomatous inflammation with giant cells.",
                "image_path": "quilt/img_42.jpg",
                "subset": "quilt",
                "pathology": ["lung"],
                "image_root": f"{FOREIGN_ROOT}/quilt",
            }
        ],
        images=["quilt/img_42.jpg"],
        expected=[
            image_report(
                id="quilt_42",
                domain="pathology",
                dataset="quilt-1m",
                split="train",
                image="quilt/img_42.jpg",
                report="Granulomatous inflammation with giant cells.",
                metadata={"subset": "quilt", "pathology": ["lung"]},
            )
        ],
    ),
    Case(
        "retriever-harvard",
        rows=[
            {
                "id": "data_00001",
                "image_path": "slo_fundus_00001.jpg",
                "filename": "data_00001.npz",
                "report": "Long clinical note on both eyes.",
                "gpt4_summary": "Glaucoma suspect with a large cup-to-disc ratio.",
                "glaucoma": 1,
                "age": 61.5,
                "gender": "female",
                "race": "asian",
                "use": "training",
                "image_root": f"{FOREIGN_ROOT}/harvard",
            }
        ],
        images=["slo_fundus_00001.jpg"],
        expected=[
            image_report(
                id="data_00001",
                domain="ophthalmology",
                dataset="harvard-fairvlmed",
                split="training",
                image="slo_fundus_00001.jpg",
                report="Glaucoma suspect with a large cup-to-disc ratio.",
                metadata={
                    "filename": "data_00001.npz",
                    "report": "Long clinical note on both eyes.",
                    "glaucoma": 1,
                    "age": 61.5,
                    "gender": "female",
                    "race": "asian",
                },
            )
        ],
    ),
    Case(
        "vqa",
        rows=[
            {
                "question_id": 0,
                "question": "Is there a pleural effusion?\n<image>",
                "answer": "No",
                "image": "CXR2/0.png",
                "report": "No effusion.",
            },
            {
                "question_id": "q1",
                "question": "Is the heart enlarged?\n<image>",
                "answer": "Yes.",
                "image": "CXR2/0.png",
                "report": "The heart is enlarged.",
            },
        ],
        images=["CXR2/0.png"],
        options={"dataset": "iu-xray"},
        expected=[
            {
                "id": "0",
                "domain": "radiology",
                "dataset": "iu-xray",
                "split": "test",
                "image": "CXR2/0.png",
                "question": "Is there a pleural effusion?",
                "answer": "no",
                "report": "No effusion.",
                "metadata": {"raw_answer": "No", "id_is_int": True},
            },
            {
                "id": "q1",
                "domain": "radiology",
                "dataset": "iu-xray",
                "split": "test",
                "image": "CXR2/0.png",
                "question": "Is the heart enlarged?",
                "answer": "yes",
                "report": "The heart is enlarged.",
                "metadata": {"raw_answer": "Yes."},
            },
        ],
    ),
    Case(
        "report-iu-xray",
        rows=[
            {
                "id": "CXR2384_IM-0942",
                "report": "Heart size normal. Lungs clear.",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
                "split": "test",
            }
        ],
        images=["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
        expected=[
            image_report(
                id="CXR2384_IM-0942",
                domain="radiology",
                dataset="iu-xray",
                split="test",
                image="CXR2384_IM-0942/0.png",
                report="Heart size normal. Lungs clear.",
                metadata={"image_paths": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"]},
            )
        ],
    ),
    Case(
        "report-mimic-cxr",
        rows=[
            {
                "id": "s50414267",
                "study_id": 50414267,
                "subject_id": 10000032,
                "report": "No acute cardiopulmonary process.",
                "image_path": ["files/p10/p10000032/s50414267/02aa804e.jpg"],
                "split": "test",
            }
        ],
        images=["files/p10/p10000032/s50414267/02aa804e.jpg"],
        expected=[
            image_report(
                id="s50414267",
                domain="radiology",
                dataset="mimic-cxr",
                split="test",
                image="files/p10/p10000032/s50414267/02aa804e.jpg",
                report="No acute cardiopulmonary process.",
                metadata={
                    "study_id": 50414267,
                    "subject_id": 10000032,
                    "image_paths": ["files/p10/p10000032/s50414267/02aa804e.jpg"],
                },
            )
        ],
    ),
    Case(
        "report-harvard",
        rows=[
            {
                "id": "data_08001",
                "image_path": "slo_fundus_08001.jpg",
                "filename": "data_08001.npz",
                "report": "Optic disc with mild cupping; no haemorrhage.",
                "gpt4_summary": "Mild cupping.",
                "glaucoma": 0,
                "age": 70,
                "gender": "male",
                "race": "black",
                "language": "english",
                "use": "test",
            }
        ],
        images=["slo_fundus_08001.jpg"],
        expected=[
            image_report(
                id="data_08001",
                domain="ophthalmology",
                dataset="harvard-fairvlmed",
                split="test",
                image="slo_fundus_08001.jpg",
                report="Optic disc with mild cupping; no haemorrhage.",
                metadata={
                    "filename": "data_08001.npz",
                    "gpt4_summary": "Mild cupping.",
                    "glaucoma": 0,
                    "age": 70,
                    "gender": "male",
                    "race": "black",
                    "language": "english",
                },
            )
        ],
    ),
    Case(
        "report-pmc-oa",
        rows=[
            {
                "id": "PMC6146807_F2_369615",
                "image": "PMC6146807_F2_369615.jpg",
                "report": "Necrosis surrounded by viable tumour.",
                "metadata": {"pmcid": "PMC6146807"},
            },
            {
                "id": "PMC212319_Fig3",
                "image": "PMC212319_Fig3.jpg",
                "report": "Dense lymphocytic infiltrate.",
                "metadata": {},
            },
        ],
        images=["test_images/PMC6146807_F2_369615.jpg", "PMC212319_Fig3.jpg"],
        expected=[
            image_report(
                id="PMC6146807_F2_369615",
                domain="pathology",
                dataset="pmc-oa",
                split="test",
                image="test_images/PMC6146807_F2_369615.jpg",
                report="Necrosis surrounded by viable tumour.",
                metadata={
                    "metadata": {"pmcid": "PMC6146807"},
                    "image_naming": "pmc",
                    "pmc_id": "PMC6146807",
                    "pmc_figure": "F2_369615",
                    "release_image": "PMC6146807_F2_369615.jpg",
                },
            ),
            image_report(
                id="PMC212319_Fig3",
                domain="pathology",
                dataset="pmc-oa",
                split="test",
                image="PMC212319_Fig3.jpg",
                report="Dense lymphocytic infiltrate.",
                metadata={"metadata": {}, "image_naming": "pmc", "pmc_id": "PMC212319", "pmc_figure": "Fig3"},
            ),
        ],
    ),
    Case(
        "report-quilt",
        rows=[
            {
                "caption": "Keratin pearls in squamous cell carcinoma.",
                "image_path": "quilt/a.jpg",
                "subset": "quilt",
                "split": "test",
                "pathology": "dermatopathology",
            },
            {
                "caption": "Another caption of the same frame.",
                "image_path": "quilt/a.jpg",
                "subset": "quilt",
                "split": "test",
                "pathology": "dermatopathology",
            },
            {"id": "q7", "caption": "Signet ring cells.", "image_path": "quilt/b.jpg", "split": "test"},
        ],
        images=["quilt/a.jpg", "quilt/b.jpg"],
        expected=[
            image_report(
                id="quilt/a.jpg",
                domain="pathology",
                dataset="quilt-1m",
                split="test",
                image="quilt/a.jpg",
                report="Keratin pearls in squamous cell carcinoma.",
                metadata={"subset": "quilt", "pathology": "dermatopathology", "id_derived": True},
            ),
            image_report(
                id="quilt/a.jpg#2",
                domain="pathology",
                dataset="quilt-1m",
                split="test",
                image="quilt/a.jpg",
                report="Another caption of the same frame.",
                metadata={"subset": "quilt", "pathology": "dermatopathology", "id_derived": True},
            ),
            image_report(
                id="q7",
                domain="pathology",
                dataset="quilt-1m",
                split="test",
                image="quilt/b.jpg",
                report="Signet ring cells.",
            ),
        ],
    ),
    Case(
        "alignment",
        rows=[
            {
                "id": "iu-xray-0001",
                "image": "CXR3/0.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nIs there a pleural effusion?"},
                    {"from": "gpt", "value": "No"},
                ],
                "rejected_conversations": [
                    {"from": "human", "value": "<image>\nIs there a pleural effusion?"},
                    {"from": "gpt", "value": "Yes"},
                ],
                "rejected_noised": 1,
                "image_root": f"{FOREIGN_ROOT}/iu_xray/images",
            },
            {
                "id": 2,
                "image": "CXR3/0.png",
                "conversations": [
                    {"from": "human", "value": "Describe the image."},
                    {"from": "gpt", "value": "Lungs clear."},
                ],
                "rejected_conversations": [
                    {"from": "human", "value": "Describe the image."},
                    {"from": "gpt", "value": "Large effusion."},
                ],
                "rejected_noised": 0,
                "set": "D_oa2",
            },
        ],
        images=["CXR3/0.png"],
        options={"domain": "radiology"},
        expected=[
            {
                "id": "iu-xray-0001",
                "image": "CXR3/0.png",
                "prompt": "<image>\nIs there a pleural effusion?",
                "chosen": "No",
                "rejected": "Yes",
                "rejected_noised": True,
                "domain": "radiology",
                "metadata": {},
            },
            {
                "id": "2",
                "image": "CXR3/0.png",
                "prompt": "Describe the image.",
                "chosen": "Lungs clear.",
                "rejected": "Large effusion.",
                "rejected_noised": False,
                "domain": "radiology",
                "metadata": {"set": "D_oa2", "id_is_int": True},
            },
        ],
    ),
]
CASE_IDS = [case.format_name for case in CASES]


def test_every_format_has_a_case() -> None:
    assert set(FORMATS) == set(CASE_IDS)
    assert set(FORMATS) == {
        "retriever-radiology",
        "retriever-pmc-oa",
        "retriever-quilt",
        "retriever-harvard",
        "vqa",
        "report-iu-xray",
        "report-mimic-cxr",
        "report-harvard",
        "report-pmc-oa",
        "report-quilt",
        "alignment",
    }


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_reads_every_field(case: Case, tmp_path: Path) -> None:
    path = case.write(tmp_path)
    spec = FORMATS[case.format_name]

    result = spec.load(path, tmp_path, **case.options)

    assert result.skipped == 0 and result.errors == []
    assert all(isinstance(record, spec.record_type) for record in result.records)
    assert [record.model_dump() for record in result.records] == case.expected
    for record in result.records:  # the image the record names opens under the caller's root
        assert (tmp_path / record.image).is_file()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dump_then_load_gives_the_same_records(case: Case, tmp_path: Path) -> None:
    spec = FORMATS[case.format_name]
    first = spec.load(case.write(tmp_path), tmp_path, **case.options).records
    written = tmp_path / "out" / case.file_name

    assert spec.dump(first, written) == len(first)

    assert spec.load(written, tmp_path, **case.options).records == first


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dump_writes_the_release_records_back(case: Case, tmp_path: Path) -> None:
    """Writers reproduce the release record exactly, less the foreign image_root."""
    spec = FORMATS[case.format_name]
    records = spec.load(case.write(tmp_path), tmp_path, **case.options).records
    written = tmp_path / "out" / case.file_name
    spec.dump(records, written)

    text = written.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()] if spec.file_type == "jsonl" else json.loads(text)
    assert rows == [{k: v for k, v in row.items() if k != "image_root"} for row in case.rows]


def test_named_functions_are_the_registry_ones(tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index("report-iu-xray")]
    records = formats.load_report_iu_xray(case.write(tmp_path), tmp_path).records
    assert formats.dump_report_iu_xray(records, tmp_path / "again.json") == 1
    assert formats.load_report_iu_xray(tmp_path / "again.json", tmp_path).records == records
    assert get_format("vqa") is formats.VQA


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="report-quilt"):
        get_format("report-padchest")


def test_dump_writes_a_given_image_root_only_where_the_format_has_one(tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index("retriever-radiology")]
    records = formats.load_retriever_radiology(case.write(tmp_path), tmp_path, dataset="iu-xray").records

    formats.dump_retriever_radiology(records, tmp_path / "r.json", image_root="/data/iu_xray/images")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {row["image_root"] for row in rows} == {"/data/iu_xray/images"}
    with pytest.raises(ValueError, match="image_root"):
        formats.dump_report_iu_xray(records, tmp_path / "t.json", image_root="/data")


def test_dump_refuses_records_of_another_kind(tmp_path: Path) -> None:
    pair = PreferencePair(id="p", image="a.png", prompt="q", chosen="a", rejected="b", rejected_noised=False)
    with pytest.raises(TypeError, match="ImageReport"):
        formats.dump_report_iu_xray([pair], tmp_path / "x.json")  # type: ignore[list-item]


def test_file_image_root_is_used_only_when_asked(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "CXR9/0.png")
    rows = [
        {
            "id": "CXR9",
            "report": "Clear lungs.",
            "image_path": ["CXR9/0.png"],
            "split": "train",
            "image_root": str(elsewhere),
        }
    ]
    caller_root = tmp_path / "caller"
    caller_root.mkdir()
    write_release(tmp_path / "train.json", rows)

    with pytest.raises(DatasetFormatError, match="image file not found"):
        formats.load_retriever_radiology(tmp_path / "train.json", caller_root, dataset="mimic-cxr")
    trusted = formats.load_retriever_radiology(
        tmp_path / "train.json", caller_root, dataset="mimic-cxr", use_file_image_root=True
    ).records
    assert trusted[0].image == "CXR9/0.png"
    assert trusted[0].metadata["image_root"] == str(elsewhere)

    formats.dump_retriever_radiology(trusted, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())[0]["image_root"] == str(elsewhere)
    again = formats.load_retriever_radiology(
        tmp_path / "again.json", caller_root, dataset="mimic-cxr", use_file_image_root=True
    )
    assert again.records == trusted


def test_absolute_image_paths_need_use_file_image_root(tmp_path: Path) -> None:
    write_image(tmp_path / "pmc" / "8736.jpg")
    absolute = str(tmp_path / "pmc" / "8736.jpg")
    write_release(tmp_path / "t.json", [{"id": "a", "image": absolute, "report": "Tumour.", "metadata": {}}])

    with pytest.raises(DatasetFormatError, match="absolute image path"):
        formats.load_report_pmc_oa(tmp_path / "t.json", tmp_path)
    [record] = formats.load_report_pmc_oa(tmp_path / "t.json", tmp_path, use_file_image_root=True).records
    assert record.image == absolute


def test_check_images_false_loads_records_without_images(tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index("report-pmc-oa")]
    path = tmp_path / "test.json"
    write_release(path, case.rows)

    records = formats.load_report_pmc_oa(path, tmp_path / "no-such-folder", check_images=False).records

    assert [record.image for record in records] == ["PMC6146807_F2_369615.jpg", "PMC212319_Fig3.jpg"]


@pytest.mark.parametrize("folder", ["", "images", "train_images", "test_images"])
@pytest.mark.parametrize("name", ["8736.jpg", "PMC6146807_F2_369615.jpg"])
def test_pmc_oa_images_are_found_in_each_release_folder(folder: str, name: str, tmp_path: Path) -> None:
    write_image(tmp_path / folder / name)
    write_release(tmp_path / "pmc.json", [{"id": "x", "image": name, "report": "Tumour.", "metadata": {}}])

    [record] = formats.load_retriever_pmc_oa(tmp_path / "pmc.json", tmp_path).records

    assert record.image == (f"{folder}/{name}" if folder else name)
    assert (tmp_path / record.image).is_file()
    assert record.metadata["image_naming"] == ("numeric" if name[0].isdigit() else "pmc")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("8736.jpg", {"image_naming": "numeric"}),
        ("images/12.png", {"image_naming": "numeric"}),
        (
            "PMC6146807_F2_369615.jpg",
            {"image_naming": "pmc", "pmc_id": "PMC6146807", "pmc_figure": "F2_369615"},
        ),
        (
            "PMC1064076_1471-2121-6-17-2.jpg",
            {"image_naming": "pmc", "pmc_id": "PMC1064076", "pmc_figure": "1471-2121-6-17-2"},
        ),
        ("figure_a.jpg", {"image_naming": "other"}),
    ],
)
def test_pmc_oa_image_naming(name: str, expected: dict[str, str]) -> None:
    assert pmc_oa_image_naming(name) == expected


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Is there an effusion?\n<image>", "Is there an effusion?"),
        ("Is there an effusion? <image>  ", "Is there an effusion?"),
        ("<image>\nIs there an effusion?", "Is there an effusion?"),
        ("Is there an effusion?", "Is there an effusion?"),
    ],
)
def test_strip_image_marker(question: str, expected: str) -> None:
    assert strip_image_marker(question) == expected


def test_split_override_fills_records_without_one_and_survives_a_round_trip(tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index("retriever-pmc-oa")]
    records = formats.load_retriever_pmc_oa(case.write(tmp_path), tmp_path, split="val").records
    assert [record.split for record in records] == ["val"]

    formats.dump_retriever_pmc_oa(records, tmp_path / "val.json")
    assert json.loads((tmp_path / "val.json").read_text())[0]["split"] == "val"
    assert formats.load_retriever_pmc_oa(tmp_path / "val.json", tmp_path).records == records


def test_dataset_override_keeps_the_format_domain(tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index("report-mimic-cxr")]
    [record] = formats.load_report_mimic_cxr(case.write(tmp_path), tmp_path, dataset="medsynth-cxr").records
    assert (record.dataset, record.domain) == ("medsynth-cxr", "radiology")


def test_alignment_keeps_the_given_dataset_in_metadata(tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index("alignment")]
    records = formats.load_alignment(case.write(tmp_path), tmp_path, dataset="iu-xray").records
    assert [(record.domain, record.metadata.get("dataset")) for record in records] == [
        ("radiology", "iu-xray"),
        ("radiology", "iu-xray"),
    ]


def test_vqa_answers_are_parsed_with_the_mmed_rag_rule(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    answers = ["Yes.", "No", "No, there is not.", "yes, a small one", "There is not any effusion."]
    rows = [
        {"question_id": i, "question": "Q?\n<image>", "answer": answer, "image": "a.png", "report": "r"}
        for i, answer in enumerate(answers)
    ]
    write_release(tmp_path / "test.jsonl", rows)

    records = formats.load_vqa(tmp_path / "test.jsonl", tmp_path, dataset="harvard-fairvlmed").records

    assert [record.answer for record in records] == ["yes", "no", "no", "yes", "no"]
    assert [record.metadata["raw_answer"] for record in records] == answers
    assert {record.domain for record in records} == {"ophthalmology"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "pass dataset="),
        ({"dataset": "medsynth-cxr"}, "pass domain="),
        ({"dataset": "medsynth-cxr", "domain": "cardiology"}, "unknown domain"),
    ],
)
def test_vqa_needs_the_dataset_and_domain(options: dict[str, str], message: str, tmp_path: Path) -> None:
    write_release(tmp_path / "test.jsonl", [])
    with pytest.raises(ValueError, match=message):
        formats.load_vqa(tmp_path / "test.jsonl", tmp_path, **options)


def test_a_domain_that_contradicts_the_format_is_refused(tmp_path: Path) -> None:
    write_release(tmp_path / "test.json", [])
    with pytest.raises(ValueError, match="radiology"):
        formats.load_report_iu_xray(tmp_path / "test.json", tmp_path, domain="pathology")


# --------------------------------------------------------------------------------------------------
# Malformed input: every error names the file, the record and the field

GOOD_IU = {"id": "ok", "report": "Clear.", "image_path": ["a.png", "b.png"], "split": "test"}
GOOD_PAIR = {
    "id": "p1",
    "image": "a.png",
    "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "No"}],
    "rejected_conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "Yes"}],
    "rejected_noised": 1,
}
GOOD_HARVARD = {
    "id": "data_00001",
    "image_path": "a.png",
    "filename": "data_00001.npz",
    "report": "Note.",
    "gpt4_summary": "Summary.",
    "use": "training",
}


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def _turns(human: str, gpt: str, *, speaker: str = "gpt") -> list[dict[str, str]]:
    return [{"from": "human", "value": human}, {"from": speaker, "value": gpt}]


BAD_RECORDS = [
    # (case id, format, records, options, record label, field)
    ("missing-report", "report-iu-xray", [_without(GOOD_IU, "report")], {}, "record 0 (id 'ok')", "report"),
    ("wrong-type", "report-iu-xray", [{**GOOD_IU, "image_path": 5}], {}, "record 0 (id 'ok')", "image_path"),
    ("id-type", "report-iu-xray", [GOOD_IU, {**GOOD_IU, "id": ["x"]}], {}, "record 1", "id"),
    ("empty-text", "report-iu-xray", [{**GOOD_IU, "report": "  \n"}], {}, "record 0 (id 'ok')", "report"),
    (
        "escapes-root",
        "report-iu-xray",
        [{**GOOD_IU, "image_path": ["a.png", "../../etc/x.png"]}],
        {},
        "record 0 (id 'ok')",
        "image_path[1]",
    ),
    (
        "absolute-path",
        "report-pmc-oa",
        [{"id": 9, "image": "/home/author/pmc/9.jpg", "report": "R.", "metadata": {}}],
        {},
        "record 0 (id '9')",
        "image",
    ),
    (
        "missing-image",
        "report-iu-xray",
        [GOOD_IU, {**GOOD_IU, "id": "two", "image_path": ["a.png", "missing.png"]}],
        {},
        "record 1 (id 'two')",
        "image_path[1]",
    ),
    (
        "harvard-no-summary",
        "retriever-harvard",
        [_without(GOOD_HARVARD, "gpt4_summary")],
        {},
        "record 0 (id 'data_00001')",
        "gpt4_summary",
    ),
    (
        "pair-prompts-differ",
        "alignment",
        [{**GOOD_PAIR, "rejected_conversations": _turns("Other question?", "Yes")}],
        {},
        "record 0 (id 'p1')",
        "rejected_conversations[0].value",
    ),
    (
        "pair-speaker",
        "alignment",
        [{**GOOD_PAIR, "conversations": _turns("Q?", "No", speaker="human")}],
        {},
        "record 0 (id 'p1')",
        "conversations[1].from",
    ),
    (
        "pair-noised",
        "alignment",
        [{**GOOD_PAIR, "rejected_noised": 2}],
        {},
        "record 0 (id 'p1')",
        "rejected_noised",
    ),
    (
        "vqa-no-answer",
        "vqa",
        [
            {"question_id": "q0", "question": "Q?\n<image>", "answer": "No", "image": "a.png"},
            {"question_id": "q1", "question": "Q?\n<image>", "image": "a.png"},
        ],
        {"dataset": "iu-xray"},
        "record 1 (line 2, id 'q1')",
        "answer",
    ),
    (
        "vqa-only-marker",
        "vqa",
        [{"question_id": 3, "question": "\n<image>", "answer": "No", "image": "a.png"}],
        {"dataset": "iu-xray"},
        "record 0 (line 1, id '3')",
        "question",
    ),
    (
        "quilt-no-caption",
        "report-quilt",
        [{"image_path": "a.png", "split": "test"}],
        {},
        "record 0 (id 'a.png')",
        "caption",
    ),
]


@pytest.mark.parametrize(
    ("format_name", "rows", "options", "label", "field_name"),
    [case[1:] for case in BAD_RECORDS],
    ids=[case[0] for case in BAD_RECORDS],
)
def test_bad_record_errors_name_file_record_and_field(
    format_name: str, rows: list[Any], options: dict[str, Any], label: str, field_name: str, tmp_path: Path
) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    suffix = FORMATS[format_name].file_type
    path = tmp_path / f"release-{format_name}.{suffix}"
    write_release(path, rows)

    with pytest.raises(DatasetFormatError) as caught:
        FORMATS[format_name].load(path, tmp_path, **options)

    message = str(caught.value)
    assert path.name in message
    assert label in message
    assert f"field '{field_name}'" in message
    assert caught.value.field == field_name


def test_skip_bad_skips_and_counts_every_bad_record(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    rows: list[Any] = [
        GOOD_IU,
        _without(GOOD_IU, "report"),
        {**GOOD_IU, "id": "second"},
        ["not", "an", "object"],
        {**GOOD_IU, "id": "third", "image_path": ["/abs.png"]},
        {**GOOD_IU, "id": "fourth"},
    ]
    write_release(tmp_path / "test.json", rows)

    result = formats.load_report_iu_xray(tmp_path / "test.json", tmp_path, skip_bad=True)

    assert [record.id for record in result.records] == ["ok", "second", "fourth"]
    assert len(result) == 3 and list(result) == result.records
    assert result.skipped == 3
    assert len(result.errors) == 3
    assert "field 'report'" in result.errors[0]
    assert "record 3" in result.errors[1] and "expected a JSON object" in result.errors[1]
    assert "field 'image_path[0]'" in result.errors[2]


def test_skip_bad_skips_invalid_jsonl_lines(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    good = {"question_id": 1, "question": "Q?\n<image>", "answer": "No", "image": "a.png"}
    (tmp_path / "test.jsonl").write_text(f"{json.dumps(good)}\n\n{{not json\n{json.dumps(good)}\n")

    with pytest.raises(DatasetFormatError) as caught:
        formats.load_vqa(tmp_path / "test.jsonl", tmp_path, dataset="iu-xray")
    assert "test.jsonl, record 1 (line 3): invalid JSON" in str(caught.value)

    result = formats.load_vqa(tmp_path / "test.jsonl", tmp_path, dataset="iu-xray", skip_bad=True)
    assert (len(result.records), result.skipped) == (2, 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"id": "a",', "invalid JSON at line 1"),
        ('{"id": "a", "report": "x"}', "expected a JSON list of records at the top level, got object"),
        ("", "invalid JSON"),
    ],
    ids=["truncated", "top-level-object", "empty"],
)
def test_unreadable_files_raise_even_with_skip_bad(content: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text(content)
    with pytest.raises(DatasetFormatError, match=message) as caught:
        formats.load_report_iu_xray(tmp_path / "broken.json", tmp_path, skip_bad=True)
    assert "broken.json" in str(caught.value)


def test_missing_file_and_missing_image_root_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"nope\.json: file does not exist"):
        formats.load_report_iu_xray(tmp_path / "nope.json", tmp_path)
    write_release(tmp_path / "t.json", [])
    with pytest.raises(FileNotFoundError, match="image root"):
        formats.load_report_iu_xray(tmp_path / "t.json", tmp_path / "no-images")


def test_records_are_the_project_types() -> None:
    assert FORMATS["vqa"].record_type is VQAItem
    assert FORMATS["alignment"].record_type is PreferencePair
    assert {spec.record_type for name, spec in FORMATS.items() if name not in {"vqa", "alignment"}} == {
        ImageReport
    }
