"""``mmedrag pairs`` end to end on the tiny artifacts: in-process and HTTP backends give the same pairs,
the files follow the shared pair format and the alignment JSON loads back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from services.common.artifacts import GENERATOR_DIR, INDEX_DIR, RETRIEVERS_DIR
from services.common.prompts import build_prompt
from training.data.formats import get_format
from training.pairs.build import PairsConfig, PairsResult, build_pairs
from training.pairs.cli import pairs_cli
from training.pairs.noise import NoiseKind
from training.pairs.rules import RUNS, SETS, STAGE2_SETS
from training.pairs.runner import (
    HttpGenerator,
    HttpRetriever,
    InProcessGenerator,
    InProcessRetriever,
    load_items,
)

MAX_NEW_TOKENS = 6
# The tiny random model ignores most of what it sees, so nearly every item lands in D_cm and no item in
# D_oa, and balancing would empty D_cm: keep it whole here (balancing is tested in test_rules.py).
KEEP_CM = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def medsynth(tiny_artifacts: Path) -> Path:
    return tiny_artifacts / "medsynth"


@pytest.fixture(scope="module")
def retriever(tiny_artifacts: Path, medsynth: Path) -> InProcessRetriever:
    return InProcessRetriever(tiny_artifacts, medsynth)


@pytest.fixture(scope="module")
def config(medsynth: Path, tmp_path_factory: pytest.TempPathFactory) -> PairsConfig:
    return PairsConfig(data=medsynth, out=tmp_path_factory.mktemp("pairs"), limit=2, cm_ratio=KEEP_CM)


@pytest.fixture(scope="module")
def inprocess(tiny_artifacts: Path, config: PairsConfig, retriever: InProcessRetriever) -> PairsResult:
    generator = InProcessGenerator(
        tiny_artifacts / GENERATOR_DIR, batch_size=8, max_new_tokens=MAX_NEW_TOKENS, threads=2
    )
    return build_pairs(config, generator, retriever)


def comparable(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """A pair without what names the backend or the output folder."""
    record = {**record, "provenance": {k: v for k, v in record["provenance"].items() if k != "model"}}
    if record["rejected_image"] is not None:
        record["rejected_image"] = Path(record["rejected_image"]).relative_to(out.resolve()).as_posix()
    return record


def test_http_generator_gives_the_same_pairs_as_in_process(
    tiny_artifacts: Path,
    config: PairsConfig,
    retriever: InProcessRetriever,
    inprocess: PairsResult,
    tmp_path: Path,
) -> None:
    from services.generator.app import build_app
    from services.generator.service import GeneratorService
    from services.generator.settings import GeneratorSettings

    folder = tiny_artifacts / GENERATOR_DIR
    service = GeneratorService(folder, max_tokens_ceiling=64, torch_threads=2)
    service.load()
    app = build_app(GeneratorSettings(model_dir=folder), service=service)
    generator = HttpGenerator(
        "http://generator",
        max_new_tokens=MAX_NEW_TOKENS,
        concurrency=4,
        transport=httpx.ASGITransport(app=app),
    )
    out = tmp_path / "http"
    over_http = build_pairs(replace(config, out=out), generator, retriever)

    assert generator.name == "mmedrag-llava at http://generator/v1"
    assert over_http.pairs, "the small split should give some pairs"
    assert [comparable(r, out) for r in over_http.pairs] == [
        comparable(r, config.out) for r in inprocess.pairs
    ]
    assert over_http.summary["counts"] == inprocess.summary["counts"]
    answers = [r["answers"] for r in read_jsonl(out / "runs.jsonl")]
    assert answers == [r["answers"] for r in read_jsonl(config.out / "runs.jsonl")]
    assert any(a["clean"] != a["noised"] for a in answers)  # the image matters: not a trivial equality


def test_pairs_follow_the_shared_format(inprocess: PairsResult, config: PairsConfig, medsynth: Path) -> None:
    out = config.out
    every = read_jsonl(out / "pairs_all.jsonl")
    assert every == inprocess.pairs
    assert sum(len(read_jsonl(out / f"pairs_{name}.jsonl")) for name in SETS) == len(every)
    assert len({r["id"] for r in every}) == len(every)
    items = {
        (task, item.domain, item.id): item
        for task in ("vqa", "report")
        for domain in ("radiology", "ophthalmology", "pathology")
        for item in load_items(medsynth, domain, task, limit=2)
    }
    for record in every:
        assert set(record) == {
            "id", "set", "domain", "task", "image", "image_root", "rejected_image", "prompt", "chosen",
            "rejected", "references", "provenance",
        }  # fmt: skip
        assert record in read_jsonl(out / f"pairs_{record['set']}.jsonl")
        item = items[(record["task"], record["domain"], record["provenance"]["item_id"])]
        root = Path(record["image_root"])
        assert root.is_absolute() and (root / record["image"]).is_file()
        assert record["image"] == item.image
        assert record["prompt"] == build_prompt(
            record["task"], record["domain"], record["references"], item.question
        )
        assert len(record["references"]) == (0 if record["set"] == "stage1" else 1)
        provenance = record["provenance"]
        assert set(provenance["outcomes"]) == set(RUNS) and set(provenance["answers"]) == set(RUNS)
        assert provenance["noise"] == "diffusion" and provenance["noise_step"] == 500
        assert provenance["retriever"] and provenance["model"]
        # the answers as generated (first token's space included), the pair's texts stripped of it
        assert record["rejected"] == provenance["answers"][provenance["rejected_run"]].strip()
        if record["task"] == "report":
            assert record["chosen"] == item.truth and provenance["chosen_run"] == "ground_truth"
            assert set(provenance["bleu"]) == set(RUNS)
        else:
            assert record["chosen"] == provenance["answers"][provenance["chosen_run"]].strip()
        assert (
            record["chosen"] == record["chosen"].strip() and record["rejected"] == record["rejected"].strip()
        )
        if record["set"] in ("stage1", "cm"):
            noise = root / record["rejected_image"]  # absolute: resolves whatever the root
            assert noise.is_file() and noise.is_relative_to(out / "noise" / record["domain"])
            assert Image.open(noise).size == Image.open(root / record["image"]).size
            assert provenance["noise_source"] != record["image"]
        else:
            assert record["rejected_image"] is None

    runs = read_jsonl(out / "runs.jsonl")
    assert len(runs) == len(items) and all(set(r["answers"]) == set(RUNS) for r in runs)


def test_alignment_json_loads_back(inprocess: PairsResult, config: PairsConfig) -> None:
    alignment = get_format("alignment")
    for filename, sets in (("alignment_stage1.json", ("stage1",)), ("alignment_stage2.json", STAGE2_SETS)):
        expected = [r for r in inprocess.pairs if r["set"] in sets]
        raw = json.loads((config.out / filename).read_text(encoding="utf-8"))
        assert [r["id"] for r in raw] == [r["id"] for r in expected]
        assert all(r["rejected_noised"] in (0, 1) for r in raw)
        loaded = alignment.load(config.out / filename, "/nonexistent", use_file_image_root=True).records
        for pair, record in zip(loaded, expected, strict=True):
            assert pair.prompt == "<image>\n" + record["prompt"]
            assert (pair.chosen, pair.rejected) == (record["chosen"], record["rejected"])
            assert pair.rejected_noised == (record["rejected_image"] is not None)
            assert pair.metadata["image_root"] == record["image_root"]
            assert pair.metadata["set"] == record["set"]
            assert pair.metadata.get("rejected_image") == record["rejected_image"]


def test_summary_counts_and_rates(inprocess: PairsResult, config: PairsConfig) -> None:
    summary = json.loads((config.out / "summary.json").read_text(encoding="utf-8"))
    assert summary["items"] == {
        task: {"radiology": 2, "ophthalmology": 2, "pathology": 2} for task in ("vqa", "report")
    }
    for name in SETS:
        counts = summary["counts"][name]
        assert counts["total"] == sum(r["set"] == name for r in inprocess.pairs)
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert summary["generations"] == 12 * len(RUNS)
    assert summary["generations_per_second"] > 0 and summary["wall_seconds"] > 0
    for task in ("vqa", "report"):
        rates = summary["misalignment"][task]["all"]
        assert rates["items"] == 6 and 0 <= rates["copy_reference"] <= 1
    runs = read_jsonl(config.out / "runs.jsonl")
    vqa_runs = [r for r in runs if r["task"] == "vqa"]
    copy_rate = sum(r["outcomes"]["noised_ref"] for r in vqa_runs) / len(vqa_runs)
    assert summary["misalignment"]["vqa"]["all"]["copy_reference"] == pytest.approx(copy_rate)
    assert set(summary["vqa_accuracy"]) == {"radiology", "ophthalmology", "pathology"}
    assert summary["config"]["noise"] == "diffusion" and summary["config"]["cm_ratio"] == KEEP_CM


@pytest.fixture
def retriever_app(tiny_artifacts: Path, tmp_path: Path) -> Iterator[Any]:
    """The retriever service on a private copy of the tiny artifacts (the embedded store is locked)."""
    from services.retriever.app import build_app
    from services.retriever.service import RetrieverService
    from services.retriever.settings import RetrieverSettings

    root = tmp_path / "artifacts"
    for part in (RETRIEVERS_DIR, INDEX_DIR):
        shutil.copytree(tiny_artifacts / part, root / part)
    service = RetrieverService(RetrieverSettings(artifacts=root))
    service.load()
    try:
        yield build_app(service=service)
    finally:
        service.close()


def test_http_retriever_returns_the_in_process_top1(
    retriever_app: Any, retriever: InProcessRetriever, medsynth: Path
) -> None:
    http = HttpRetriever("http://retriever", transport=httpx.ASGITransport(app=retriever_app))
    for domain in ("radiology", "pathology"):
        images = sorted((medsynth / domain / "images").iterdir())[:4]
        assert http.top1(domain, images) == retriever.top1(domain, images)
        assert http.name(domain) == retriever.name(domain)


def test_cli_pure_noise_one_domain(tiny_artifacts: Path, medsynth: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("pairs")(pairs_cli)
    app.command("other")(lambda: None)  # a group, as mounted in mmedrag
    out = tmp_path / "cli"
    args = ["pairs", "--data", str(medsynth), "--artifacts", str(tiny_artifacts), "--out", str(out)]
    args += ["--task", "vqa", "--domain", "pathology", "--limit", "2", "--noise", "pure"]
    args += ["--max-new-tokens", "3", "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "copy-reference" in result.output
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["items"] == {"vqa": {"pathology": 2}, "report": {}}
    assert summary["config"]["noise"] == NoiseKind.pure.value and summary["config"]["cm_ratio"] == 0.5
    assert sorted(p.name for p in (out / "noise" / "pathology").iterdir())
    bad = CliRunner().invoke(app, [*args[:7], "--backend", "http"])
    assert bad.exit_code != 0 and "--generator-url" in bad.output
