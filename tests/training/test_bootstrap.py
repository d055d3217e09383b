"""``mmedrag bootstrap``: the resume rules on recorded steps, and one real run of the whole pipeline at tiny
sizes whose folder the services load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import bootstrap
from training.bootstrap import STATE_FILE, BootstrapConfig, Step, run_bootstrap


def _fake_steps(calls: list[str], *, side_step: bool = False):
    def factory(config: BootstrapConfig, echo=print) -> list[Step]:
        def make(name: str, output: str):
            def run() -> None:
                calls.append(name)
                target = config.out / output
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(name)

            return run

        steps = [
            Step("a", ("a.txt",), make("a", "a.txt"), ("per_domain",)),
            Step("b", ("b.txt",), make("b", "b.txt"), ("sft_epochs",)),
            Step("c", ("c.txt",), make("c", "c.txt"), ()),
        ]
        if side_step:  # reads only a's output, as the shared retriever reads only the data
            steps.append(Step("d", ("d.txt",), make("d", "d.txt"), ("threads",), after="a"))
        return steps

    return factory


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(bootstrap, "pipeline_steps", _fake_steps(calls))
    monkeypatch.setattr(bootstrap, "write_manifest", lambda config, state: {})
    return calls


def test_finished_steps_are_skipped_on_a_rerun(tmp_path: Path, fake_pipeline: list[str]) -> None:
    config = BootstrapConfig(out=tmp_path)
    run_bootstrap(config, echo=lambda _: None, progress=False)
    assert fake_pipeline == ["a", "b", "c"]
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert set(state["steps"]) == {"a", "b", "c"}
    run_bootstrap(config, echo=lambda _: None, progress=False)
    assert fake_pipeline == ["a", "b", "c"]  # nothing ran again


def test_a_changed_setting_reruns_its_step_and_every_later_one(
    tmp_path: Path, fake_pipeline: list[str]
) -> None:
    run_bootstrap(BootstrapConfig(out=tmp_path), echo=lambda _: None, progress=False)
    fake_pipeline.clear()
    run_bootstrap(BootstrapConfig(out=tmp_path, sft_epochs=9), echo=lambda _: None, progress=False)
    assert fake_pipeline == ["b", "c"]  # "a" does not depend on sft_epochs
    fake_pipeline.clear()
    run_bootstrap(BootstrapConfig(out=tmp_path, sft_epochs=9, seed=1), echo=lambda _: None, progress=False)
    assert fake_pipeline == ["a", "b", "c"]  # the seed reaches every step


def test_a_step_after_an_earlier_one_reruns_only_when_that_one_or_its_own_settings_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(bootstrap, "pipeline_steps", _fake_steps(calls, side_step=True))
    monkeypatch.setattr(bootstrap, "write_manifest", lambda config, state: {})
    run_bootstrap(BootstrapConfig(out=tmp_path), echo=lambda _: None, progress=False)
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    run_bootstrap(BootstrapConfig(out=tmp_path, sft_epochs=9), echo=lambda _: None, progress=False)
    assert calls == ["b", "c"]  # d does not read b or c
    calls.clear()
    run_bootstrap(BootstrapConfig(out=tmp_path, sft_epochs=9, threads=1), echo=lambda _: None, progress=False)
    assert calls == ["d"]
    calls.clear()
    run_bootstrap(
        BootstrapConfig(out=tmp_path, per_domain=7, sft_epochs=9, threads=1),
        echo=lambda _: None,
        progress=False,
    )
    assert calls == ["a", "b", "c", "d"]


def test_the_shared_retriever_reads_only_the_synthetic_data() -> None:
    steps = {
        step.name: step
        for step in bootstrap.pipeline_steps(BootstrapConfig(out=Path("x"), shared_retriever=True))
    }
    assert steps["retriever shared"].after == "synth"
    assert "sft_max_references" in steps["sft"].keys


def test_a_missing_output_or_an_interrupted_step_reruns(tmp_path: Path, fake_pipeline: list[str]) -> None:
    run_bootstrap(BootstrapConfig(out=tmp_path), echo=lambda _: None, progress=False)
    fake_pipeline.clear()
    (tmp_path / "b.txt").unlink()
    run_bootstrap(BootstrapConfig(out=tmp_path), echo=lambda _: None, progress=False)
    assert fake_pipeline == ["b", "c"]


def test_a_failing_step_keeps_earlier_records_and_raises(
    tmp_path: Path, fake_pipeline: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = bootstrap.pipeline_steps

    def failing(config: BootstrapConfig, echo=print) -> list[Step]:
        steps = factory(config, echo)

        def boom() -> None:
            raise RuntimeError("step b failed")

        steps[1] = Step("b", ("b.txt",), boom, ())
        return steps

    monkeypatch.setattr(bootstrap, "pipeline_steps", failing)
    with pytest.raises(RuntimeError, match="step b failed"):
        run_bootstrap(BootstrapConfig(out=tmp_path), echo=lambda _: None, progress=False)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert list(state["steps"]) == ["a"]


@pytest.mark.slow
def test_the_whole_pipeline_at_tiny_sizes_builds_a_folder_the_services_load(tmp_path: Path) -> None:
    from services.classifier.service import DomainClassifier
    from services.generator.service import GeneratorService

    out = tmp_path / "artifacts"
    config = BootstrapConfig(
        out=out,
        per_domain=12,
        image_size=64,
        classifier_epochs=1,
        retriever_epochs=1,
        shared_retriever=False,
        sft_epochs=1,
        sft_vision_pretrain_steps=2,
        sft_eval=False,
        pairs_limit=2,
        pairs_max_new_tokens=8,
        dpo_epochs=1,
        threads=1,
    )
    lines: list[str] = []
    state = run_bootstrap(config, echo=lines.append, progress=False)
    names = [step.name for step in bootstrap.pipeline_steps(config)]
    assert list(state["steps"]) == names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "trained" and manifest["built_by"] == "mmedrag bootstrap"
    assert set(manifest["steps_seconds"]) == set(names)
    for part in ("classifier", "generator", "base"):
        assert manifest["parts"][part]["weights"], part
    # the exported generator is the base model merged with the last trained adapter; a stage without pairs
    # (likely for an almost untrained base model) is recorded as skipped with its reason
    alignment = manifest["alignment"]
    assert set(alignment) == {"dpo_stage1", "dpo_stage2"}
    for record in alignment.values():
        assert record["trained"] or "no stage-" in record["reason"]
    aligned = any(record["trained"] for record in alignment.values())
    same = manifest["parts"]["generator"]["weights"] == manifest["parts"]["base"]["weights"]
    assert same != aligned

    classifier = DomainClassifier()
    classifier.load(out)
    generator = GeneratorService(
        out / "generator", served_model_name="m", max_tokens_ceiling=8, torch_threads=1
    )
    generator.load()
    assert generator.ready

    lines.clear()
    run_bootstrap(config, echo=lines.append, progress=False)
    assert all("skipped" in line for line in lines)
