"""``mmedrag eval ablation`` on the tiny artifacts, two items per domain: every row, both tasks, the
misalignment table, the files; a skipped shared row; base and aligned models kept apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.common.artifacts import CLASSIFIER_DIR, GENERATOR_DIR, INDEX_DIR, RETRIEVERS_DIR
from training.data.records import DOMAINS
from training.evaluate.ablation import (
    ABLATION_JSON,
    ABLATION_MARKDOWN,
    ROWS,
    AblationConfig,
    ablation_cli,
    run_ablation,
)
from training.evaluate.report import PLOTS_DIR, RESULTS_FILE, read_jsonl
from training.evaluate.run import load_test_items

LIMIT = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def private_artifacts(tiny: Path, root: Path) -> Path:
    """The tiny artifacts with a private copy of the embedded store (it admits one client at a time)."""
    root.mkdir(parents=True)
    for part in (CLASSIFIER_DIR, RETRIEVERS_DIR, GENERATOR_DIR, "medsynth"):
        (root / part).symlink_to(tiny / part, target_is_directory=True)
    shutil.copytree(tiny / INDEX_DIR, root / INDEX_DIR)
    return root


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.artifacts.clip import write_clip_artifact

    root = private_artifacts(tiny_artifacts, tmp_path_factory.mktemp("ablation") / "artifacts")
    write_clip_artifact(root / "shared-retriever", config_name="tiny", seed=7)
    return root


@pytest.fixture(scope="module")
def ablation(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The whole table through the command line (no base folder: base = the generator)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("ablation")(ablation_cli)
    app.command("other")(lambda: None)  # a group, as mounted under `mmedrag eval`
    out = tmp_path_factory.mktemp("ablation-out")
    args = ["ablation", "--data", str(artifacts / "medsynth"), "--artifacts", str(artifacts)]
    args += ["--out", str(out), "--limit", str(LIMIT), "--max-new-tokens", "6", "--threads", "2"]
    args += ["--no-meteor"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def rows_of(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out / RESULTS_FILE)


def test_every_row_on_every_task_and_domain(ablation: tuple[Path, str], artifacts: Path) -> None:
    out, printed = ablation
    payload = json.loads((out / ABLATION_JSON).read_text(encoding="utf-8"))
    assert [row["key"] for row in payload["rows"]] == [row.key for row in ROWS]
    assert all(row["skipped"] is None for row in payload["rows"])
    assert payload["domains"] == list(DOMAINS)
    assert {(s["task"], s["run"]) for s in payload["runs"]} == {
        (task, row.key) for task in ("vqa", "report") for row in ROWS
    }
    for summary in payload["runs"]:
        assert summary["n"] == summary["n_ok"] == LIMIT * len(DOMAINS)
        assert set(summary["metrics"]["by_domain"]) == set(DOMAINS)
        assert set(summary["headline"]) == {*DOMAINS, "overall"}
    base = payload["models"]["base"]
    assert base == payload["models"]["aligned"] == str(artifacts / GENERATOR_DIR)
    assert any("same folder" in note for note in payload["notes"])

    results = rows_of(out)
    variants = {row.key: row.variant for row in ROWS}
    for row in results:
        assert row["variant"] == variants[row["run"]] and row["model"] == base
    # The same model on the same retrievals answers alike: the RAG-PT row repeats the adaptive row here.
    answers = {(r["run"], r["task"], r["id"]): r["prediction"] for r in results}
    for (run, task, item), prediction in answers.items():
        if run == "aligned+adaptive":
            assert prediction == answers[("base+adaptive", task, item)]
    expected = {
        task: len(load_test_items(artifacts / "medsynth", task, limit=LIMIT)) for task in ("vqa", "report")
    }
    assert len(results) == len(ROWS) * sum(expected.values())
    assert "## Closed VQA: mean of accuracy, F1, AUROC (%)" in printed


def test_markdown_and_plots(ablation: tuple[Path, str]) -> None:
    out, _ = ablation
    markdown = (out / ABLATION_MARKDOWN).read_text(encoding="utf-8")
    assert "| row | radiology | ophthalmology | pathology | overall |" in markdown
    for row in ROWS:
        assert f"| {row.label} |" in markdown
    assert "## Report generation: mean of BLEU, ROUGE-L, METEOR (%)" in markdown
    assert "| model | domain | items | copy-reference | over-reliance | acc clean | acc +ref |" in markdown
    plots = sorted(p.name for p in (out / PLOTS_DIR).iterdir())
    assert {
        "runs_vqa.png",
        "runs_report.png",
        "domains_vqa.png",
        "misalignment.png",
        "k_distribution.png",
    } <= set(plots)
    for name in plots:
        assert (out / PLOTS_DIR / name).read_bytes().startswith(PNG_SIGNATURE)


def test_misalignment_table(ablation: tuple[Path, str], artifacts: Path) -> None:
    out, _ = ablation
    payload = json.loads((out / ABLATION_JSON).read_text(encoding="utf-8"))
    rates = payload["misalignment"]
    assert set(rates) == {"base", "aligned (RAG-PT)"}
    assert rates["base"] == rates["aligned (RAG-PT)"]  # one folder, measured once
    measured = rates["base"]
    assert set(measured["per_domain"]) == set(DOMAINS)
    # The diffusion noise image is another image of the domain: the limit grows until there are two.
    assert measured["limit"] >= LIMIT
    for domain, result in measured["per_domain"].items():
        items = load_test_items(artifacts / "medsynth", "vqa", (domain,), limit=measured["limit"])
        assert result["items"] == len(items) and len({item.image for item in items}) >= 2
        assert 0.0 <= result["copy_reference"] <= 1.0
        if result["over_reliance"] is not None:
            assert 0.0 <= result["over_reliance"] <= 1.0
    total = measured["all"]
    assert total["items"] == sum(r["items"] for r in measured["per_domain"].values())


def test_missing_shared_retriever_skips_its_row(artifacts: Path, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    root.mkdir()
    for part in (CLASSIFIER_DIR, RETRIEVERS_DIR, "medsynth"):
        (root / part).symlink_to(artifacts / part, target_is_directory=True)
    shutil.copytree(artifacts / INDEX_DIR, root / INDEX_DIR)
    base = tmp_path / "base-model"
    shutil.copytree(artifacts / GENERATOR_DIR, base)
    (root / GENERATOR_DIR).symlink_to(artifacts / GENERATOR_DIR, target_is_directory=True)
    config = AblationConfig(
        data=root / "medsynth",
        artifacts=root,
        out=tmp_path / "out",
        tasks=("vqa",),
        domains=("pathology",),
        limit=1,
        base_model=base,
        max_new_tokens={"vqa": 4},
        meteor=False,
        misalignment=False,
        threads=2,
    )
    outcome = run_ablation(config)
    payload = outcome.payload
    shared = next(row for row in payload["rows"] if row["key"] == "base+shared-adaptive")
    assert "no shared retriever" in shared["skipped"] and "--domain all" in shared["skipped"]
    assert {s["run"] for s in payload["runs"]} == {row.key for row in ROWS} - {"base+shared-adaptive"}
    assert payload["misalignment"] is None and not any("same folder" in n for n in payload["notes"])
    models = {r.run: r.model for r in outcome.records}
    assert models["aligned+adaptive"] == str(root / GENERATOR_DIR) and models["base"] == str(base)
    markdown = (tmp_path / "out" / ABLATION_MARKDOWN).read_text(encoding="utf-8")
    assert "| shared retriever (not domain-aware), adaptive | skipped |" in markdown
    assert "base+shared-adaptive: skipped (no shared retriever" in markdown
