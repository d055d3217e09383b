"""The embedded stack as users run it: four real processes on loopback, tiny artifacts, real HTTP."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from image_factories import make_dicom
from mmedrag_client import MMedRAGClient
from mmedrag_client.cli import main as client_main
from PIL import Image
from ports import free_base_port
from router_fakes import RESPONSE_FIELDS as FIELDS

from services.launcher import Stack, curl_example, plan, service_environment
from training.data.formats import get_format
from training.data.medsynth.release import RELEASE_FORMATS, dataset_name

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def stack_url(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_base_port()
    logs = tmp_path_factory.mktemp("logs")
    stack = Stack()
    env = service_environment(tiny_artifacts, HOST, port)
    try:
        for service in plan(port):
            stack.start(service, HOST, tiny_artifacts, env, logs)
        stack.wait_ready(HOST, logs, timeout_s=240)
        yield f"http://{HOST}:{port}"
    finally:
        stack.stop()


def _corpus(artifacts: Path, domain: str) -> set[str]:
    data = artifacts / "medsynth"
    retriever_format = get_format(RELEASE_FORMATS[domain][0])
    records = retriever_format.load(
        data / domain / "retriever_train.json", data / domain / "images", dataset=dataset_name(domain)
    ).records
    return {r.report for r in records}


def _example(artifacts: Path, domain: str) -> tuple[Path, str]:
    example = json.loads((artifacts / "examples" / "examples.json").read_text())[domain]
    return artifacts / example["image"], example["question"]


def _as_jpeg(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / "image.jpg"
    Image.open(path).convert("RGB").save(target, format="JPEG")
    return target


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_vqa_answers_png_jpeg_and_dicom(
    stack_url: str, tiny_artifacts: Path, tmp_path: Path, kind: str
) -> None:
    image, question = _example(tiny_artifacts, "radiology")
    if kind == "jpeg":
        image = _as_jpeg(image, tmp_path)
    elif kind == "dicom":
        image = tmp_path / "image.dcm"
        image.write_bytes(make_dicom())
    response = httpx.post(
        f"{stack_url}/vqa",
        files={"image": (image.name, image.read_bytes())},
        data={"question": question},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == FIELDS
    assert body["answer"] in {"yes", "no"}
    assert body["domain"]["source"] == "classifier"
    assert set(body["domain"]["probabilities"]) == {"radiology", "ophthalmology", "pathology"}
    assert body["evidence"] and body["retrieval"]["mode"] == "adaptive"
    assert body["retrieval"]["k"] == sum(e["kept"] for e in body["evidence"]) >= 1
    assert {"decode", "classify", "retrieve", "generate", "total"} <= set(body["timings_ms"])
    assert body["model"] == "mmedrag-llava"


@pytest.mark.parametrize("domain", ["radiology", "ophthalmology", "pathology"])
def test_client_domain_skips_the_classifier_and_evidence_comes_from_that_collection(
    stack_url: str, tiny_artifacts: Path, domain: str
) -> None:
    image, question = _example(tiny_artifacts, domain)
    with MMedRAGClient(stack_url) as client:
        result = client.vqa(image, question, domain=domain, k_max=5)
    assert result.domain.source == "client" and result.domain.label == domain
    assert len(result.evidence) == 5
    assert {e.text for e in result.evidence} <= _corpus(tiny_artifacts, domain)


def test_report_returns_text(stack_url: str, tiny_artifacts: Path) -> None:
    image, _ = _example(tiny_artifacts, "pathology")
    with MMedRAGClient(stack_url) as client:
        result = client.report(image, retrieval="fixed", k_max=3, max_tokens=16)
    assert result.retrieval.k == 3 and all(e.kept for e in result.evidence)
    assert result.text == result.text and result.model == "mmedrag-llava"


def test_bad_upload_is_a_clear_4xx_through_the_whole_stack(stack_url: str) -> None:
    response = httpx.post(
        f"{stack_url}/vqa", files={"image": ("x.png", b"GIF89a-not-really")}, data={"question": "Q?"}
    )
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["message"]


def test_client_command_line_prints_answer_and_evidence(
    stack_url: str, tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, question = _example(tiny_artifacts, "ophthalmology")
    status = client_main(
        [
            "--url",
            stack_url,
            "vqa",
            "--image",
            str(image),
            "--question",
            question,
            "--domain",
            "ophthalmology",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("answer: ") and "domain: ophthalmology (client)" in out and " 1. [" in out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_printed_curl_example_answers(stack_url: str, tiny_artifacts: Path) -> None:
    command = curl_example(tiny_artifacts, stack_url)
    completed = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(completed.stdout)["answer"] in {"yes", "no"}


def test_readyz_is_true_when_all_services_are_up(stack_url: str) -> None:
    response = httpx.get(f"{stack_url}/readyz")
    assert response.status_code == 200
    assert response.json()["dependencies"] == {"classifier": True, "retriever": True, "generator": True}
