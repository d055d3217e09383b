"""``mmedrag bootstrap``: the whole training pipeline on MedSynth, into one trained artifacts folder.

synth → classifier → retrievers (one per domain, and one shared) → index → calibrate → sft → pairs →
dpo stage 1 → dpo stage 2 → export → examples + manifest.

Each step is the command a user would run by hand (the same functions ``mmedrag`` mounts), called with
the folder layout of DESIGN.md §4, so a bootstrapped folder is indistinguishable from a hand-built one.

**Resumable.** ``<out>/bootstrap.json`` records each finished step with the settings it ran with; a rerun
skips a step whose record matches the current settings and whose outputs exist, and reruns it (and every
later step) otherwise. An interrupted step leaves no record, so it reruns from its start.

**A stage without pairs is skipped, not fatal.** A base model that never answers differently for the
real and the noise image gives no stage-1 pairs; that stage is recorded as skipped with its reason (in the
manifest's ``alignment``), stage 2 then starts a new adapter, and export merges the last adapter trained
(or serves the base model as is when neither stage had pairs).

**Deterministic for a seed.** Every step takes its seed from ``--seed``; the same seed and sizes give the
same data and, on the same machine and thread count, the same weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from services.common.artifacts import CLASSIFIER_DIR, GENERATOR_DIR, INDEX_DIR, MANIFEST, RETRIEVERS_DIR
from training.data.records import DOMAINS

STATE_FILE = "bootstrap.json"
MEDSYNTH_DIR = "medsynth"
SHARED_RETRIEVER_DIR = "shared-retriever"


@dataclass(frozen=True)
class BootstrapConfig:
    """Sizes of every step; the defaults take 13–15 minutes on a 2-core machine (seed 2, nothing else
    running: 790 s — SFT 294 s, pairs 118 s, DPO stage 1 85 s and stage 2 108 s, the three retrievers
    139 s, the rest under a minute; seed 1: 905 s, more stage-2 pairs). The shared retriever adds ~2 min."""

    out: Path
    seed: int = 0
    per_domain: int = 1000
    image_size: int = 224
    classifier_epochs: int = 4
    retriever_epochs: int = 12
    shared_retriever: bool = False  # the ablation's "not domain-aware" row; about 3x a domain retriever
    sft_epochs: int = 3
    sft_vision_pretrain_steps: int = 600
    sft_max_references: int = 10  # the router's default k_max: served prompts stay in the SFT distribution
    # The base model's four-way test evaluation inside SFT (~20 s): `mmedrag eval ablation` measures the
    # same (its misalignment table), so the default build leaves it out.
    sft_eval: bool = False
    pairs_limit: int | None = None
    pairs_max_new_tokens: int = 96
    dpo_epochs: int | None = None
    threads: int = 2

    def step_settings(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("out")
        return data


@dataclass(frozen=True)
class Step:
    """One pipeline step: its name, what it writes (relative to ``out``) and the call that builds it."""

    name: str
    outputs: tuple[str, ...]
    run: Callable[[], None]
    # settings whose change invalidates this step (and every step downstream of it)
    keys: tuple[str, ...]
    # the step whose outputs this one reads; None: the step before it
    after: str | None = None


def _fingerprint(settings: dict[str, Any], keys: tuple[str, ...], previous: str) -> str:
    chosen = {key: settings[key] for key in keys}
    blob = json.dumps({"settings": chosen, "previous": previous}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pipeline_steps(config: BootstrapConfig, echo: Callable[[str], None] = print) -> list[Step]:
    """The steps in order; each calls the function its ``mmedrag`` command runs."""
    out = config.out
    data = out / MEDSYNTH_DIR
    seed, threads = config.seed, config.threads

    def synth() -> None:
        from training.data.medsynth.generate import SynthConfig, default_workers, synthesize

        synthesize(  # the files do not depend on the number of drawing processes
            SynthConfig(
                out=data,
                seed=seed,
                per_domain=config.per_domain,
                image_size=config.image_size,
                workers=default_workers(),
            ),
            progress=False,
        )

    def classifier() -> None:
        from training.classifier import classifier_cli

        classifier_cli(
            data=data,
            out=out / CLASSIFIER_DIR,
            epochs=config.classifier_epochs,
            seed=seed,
            num_threads=threads,
            progress=False,
        )

    def retriever(domain: str, folder: Path) -> Callable[[], None]:
        def run() -> None:
            from training.retriever.cli import retriever_cli

            retriever_cli(
                domain=domain,
                data=data,
                out=folder,
                epochs=config.retriever_epochs,
                seed=seed,
                num_threads=threads,
                progress=False,
            )

        return run

    def index() -> None:
        from training.index import index_cli

        for domain in DOMAINS:
            index_cli(domain=domain, data=data, artifacts=out, recreate=True)

    def calibrate() -> None:
        from training.calibrate import calibrate_cli

        for domain in DOMAINS:
            calibrate_cli(domain=domain, data=data, artifacts=out, threads=threads)

    def sft() -> None:
        from training.sft import SFTConfig, train_sft

        train_sft(
            SFTConfig(
                data=data,
                out=out / "base",
                retriever_artifacts=out if config.sft_eval else None,
                epochs=config.sft_epochs,
                vision_pretrain_steps=config.sft_vision_pretrain_steps,
                max_references=config.sft_max_references,
                seed=seed,
                num_threads=threads,
                progress=False,
            )
        )

    def pairs() -> None:
        from training.pairs.cli import pairs_cli

        pairs_cli(
            data=data,
            out=out / "pairs",
            artifacts=out,
            noise_seed=seed,
            limit=config.pairs_limit,
            max_new_tokens=config.pairs_max_new_tokens,
            threads=threads,
        )

    def dpo(stage: int) -> Callable[[], None]:
        def run() -> None:
            from training.dpo.cli import dpo_cli
            from training.dpo.data import PairError
            from training.dpo.defaults import NO_STAGE1_ADAPTER

            stage1_trained = _read_stage(out, 1).get("trained", False)
            try:
                dpo_cli(
                    stage=stage,
                    artifacts=out,
                    stage1_adapter=None if stage == 1 or stage1_trained else Path(NO_STAGE1_ADAPTER),
                    epochs=config.dpo_epochs,
                    seed=seed,
                    num_threads=threads,
                    progress=False,
                )
            except PairError as exc:  # the base model gave no pairs of this stage: nothing to learn
                _write_stage(out, stage, {"trained": False, "reason": str(exc)})
                echo(f"  dpo stage {stage} skipped: {exc}")
                return
            _write_stage(out, stage, {"trained": True})

        return run

    def export() -> None:
        from training.export import export_cli

        generator = out / GENERATOR_DIR
        if generator.exists():  # export refuses to overwrite an exported folder; this step owns it
            shutil.rmtree(generator)
        trained = [stage for stage in (2, 1) if _read_stage(out, stage).get("trained")]
        if trained:
            export_cli(base=out / "base", adapter=out / "adapters" / f"stage{trained[0]}", out=generator)
        else:  # no preference pairs at all: the served model is the base model, and the manifest says so
            echo("  no DPO adapter was trained: the generator is the unaligned base model")
            shutil.copytree(out / "base", generator)

    def examples() -> None:
        from training.artifacts.tiny import write_examples

        write_examples(data, out)

    data_keys = ("seed", "per_domain", "image_size")
    steps = [
        Step("synth", (MEDSYNTH_DIR + "/findings.jsonl",), synth, data_keys),
        Step(
            "classifier", (CLASSIFIER_DIR + "/classifier.json",), classifier, ("classifier_epochs", "threads")
        ),
    ]
    for domain in DOMAINS:
        folder = out / RETRIEVERS_DIR / domain
        steps.append(
            Step(
                f"retriever {domain}",
                (f"{RETRIEVERS_DIR}/{domain}/retriever.json",),
                retriever(domain, folder),
                ("retriever_epochs", "threads"),
            )
        )
    steps += [
        Step("index", (INDEX_DIR,), index, ()),
        Step("calibrate", (), calibrate, ()),
        Step(
            "sft",
            ("base/config.json",),
            sft,
            ("sft_epochs", "sft_vision_pretrain_steps", "sft_max_references", "sft_eval"),
        ),
        Step("pairs", ("pairs",), pairs, ("pairs_limit", "pairs_max_new_tokens")),
        Step("dpo stage 1", (_stage_file(1),), dpo(1), ("dpo_epochs",)),
        Step("dpo stage 2", (_stage_file(2),), dpo(2), ("dpo_epochs",)),
        Step("export", (GENERATOR_DIR + "/config.json",), export, ()),
        Step("examples", ("examples/examples.json",), examples, ()),
    ]
    if config.shared_retriever:  # last: turning it on later reruns nothing else
        steps.append(
            Step(
                "retriever shared",
                (f"{SHARED_RETRIEVER_DIR}/retriever.json",),
                retriever("all", out / SHARED_RETRIEVER_DIR),
                ("retriever_epochs", "threads"),
                after="synth",  # it reads only the data: a changed SFT or DPO setting leaves it be
            )
        )
    return steps


def _stage_file(stage: int) -> str:
    return f"adapters/stage{stage}.bootstrap.json"


def _read_stage(out: Path, stage: int) -> dict[str, Any]:
    """What the DPO step of ``stage`` did: {"trained": bool, "reason": ...}; {} before it ran."""
    path = out / _stage_file(stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_stage(out: Path, stage: int, record: dict[str, Any]) -> None:
    path = out / _stage_file(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, record)


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"steps": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"steps": {}}
    return state if isinstance(state.get("steps"), dict) else {"steps": {}}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_bootstrap(
    config: BootstrapConfig, *, echo: Callable[[str], None] = print, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) every step; write the manifest; return the per-step record."""
    from tqdm.auto import tqdm

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = _read_state(state_path)
    settings = config.step_settings()
    steps = pipeline_steps(config, echo)
    started = time.perf_counter()
    fingerprints: dict[str, str] = {}
    rebuilt: set[str] = set()  # steps run this time: everything downstream of them runs too
    previous = ""
    bar = tqdm(total=len(steps), desc="bootstrap", unit="step", disable=not progress)
    for number, step in enumerate(steps, start=1):
        upstream = step.after if step.after is not None else previous
        fingerprint = _fingerprint(settings, ("seed", *step.keys), fingerprints.get(upstream, ""))
        fingerprints[step.name] = fingerprint
        previous = step.name
        record = state["steps"].get(step.name)
        done = (
            upstream not in rebuilt
            and record is not None
            and record.get("fingerprint") == fingerprint
            and all((out / output).exists() for output in step.outputs)
        )
        if done:
            echo(f"[{number}/{len(steps)}] {step.name}: done ({record['seconds']} s), skipped")
            bar.update(1)
            continue
        rebuilt.add(step.name)
        state["steps"].pop(step.name, None)
        bar.set_postfix_str(step.name)
        echo(f"[{number}/{len(steps)}] {step.name} ...")
        t0 = time.perf_counter()
        step.run()
        seconds = round(time.perf_counter() - t0, 1)
        state["steps"][step.name] = {"fingerprint": fingerprint, "seconds": seconds}
        _write_json(state_path, state)
        echo(f"[{number}/{len(steps)}] {step.name}: {seconds} s")
        bar.update(1)
    bar.close()
    state["settings"] = settings
    state["total_seconds_this_run"] = round(time.perf_counter() - started, 1)
    _write_json(state_path, state)
    write_manifest(config, state)
    return state


def write_manifest(config: BootstrapConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The artifacts manifest (the format ``mmedrag artifacts tiny`` writes), kind "trained"."""
    from training.artifacts.tiny import weights_checksums

    out = config.out
    examples = json.loads((out / "examples" / "examples.json").read_text(encoding="utf-8"))
    parts: dict[str, Any] = {
        "classifier": {"path": CLASSIFIER_DIR, "weights": weights_checksums(out / CLASSIFIER_DIR)},
        "retrievers": {
            domain: {
                "path": f"{RETRIEVERS_DIR}/{domain}",
                "weights": weights_checksums(out / RETRIEVERS_DIR / domain),
            }
            for domain in DOMAINS
        },
        "generator": {"path": GENERATOR_DIR, "weights": weights_checksums(out / GENERATOR_DIR)},
        "base": {"path": "base", "weights": weights_checksums(out / "base")},
        "index": {"path": INDEX_DIR, "collections": [f"mmedrag_{d}" for d in DOMAINS]},
    }
    if (out / SHARED_RETRIEVER_DIR).is_dir():
        parts["shared_retriever"] = {
            "path": SHARED_RETRIEVER_DIR,
            "weights": weights_checksums(out / SHARED_RETRIEVER_DIR),
        }
    manifest = {
        "version": 1,
        "kind": "trained",
        "built_by": "mmedrag bootstrap",
        "seed": config.seed,
        "data": {"medsynth": MEDSYNTH_DIR, "per_domain": config.per_domain, "image_size": config.image_size},
        "parts": parts,
        "alignment": {f"dpo_stage{stage}": _read_stage(out, stage) for stage in (1, 2)},
        "examples": examples,
        "steps_seconds": {name: record["seconds"] for name, record in state["steps"].items()},
        "build_seconds": round(sum(record["seconds"] for record in state["steps"].values()), 1),
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


def bootstrap_cli(
    out: Annotated[
        Path, typer.Option("--out", envvar="MMEDRAG_ARTIFACTS", help="Artifacts folder to build (or resume).")
    ] = Path("artifacts"),
    seed: Annotated[int, typer.Option(help="Seed of every step: the same seed gives the same folder.")] = 0,
    per_domain: Annotated[int, typer.Option(help="MedSynth images per domain.")] = 1000,
    threads: Annotated[int, typer.Option(help="torch CPU threads of the training steps.")] = 2,
    shared_retriever: Annotated[
        bool,
        typer.Option(
            help="Also train one retriever on every domain (<out>/shared-retriever), the ablation's "
            "not-domain-aware row (`mmedrag eval ablation`)."
        ),
    ] = False,
    fresh: Annotated[bool, typer.Option(help="Forget finished steps and build everything again.")] = False,
) -> None:
    """Build trained artifacts from nothing: MedSynth, classifier, retrievers, index, calibration, SFT base
    model, preference pairs, two-stage DPO and the exported generator. Resumes where it stopped."""
    config = BootstrapConfig(
        out=out, seed=seed, per_domain=per_domain, threads=threads, shared_retriever=shared_retriever
    )
    if fresh and (out / STATE_FILE).exists():
        (out / STATE_FILE).unlink()
    state = run_bootstrap(config, echo=typer.echo)
    total = sum(record["seconds"] for record in state["steps"].values())
    this_run = state["total_seconds_this_run"]
    typer.echo(f"trained artifacts in {out} (steps total {total:.0f} s; this run {this_run} s)")
    typer.echo(f"start the stack: mmedrag up --artifacts {out}")
