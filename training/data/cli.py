"""``mmedrag data …``: synthesise MedSynth, check it, import real datasets, extract Harvard images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

FORMAT_NAMES = (
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
)  # kept literal so --help does not import the loaders; a test checks it equals formats.FORMATS

data_app = typer.Typer(
    help="Datasets: MedSynth generation and checks, real-dataset import.", no_args_is_help=True
)


@data_app.command("synth")
def synth(
    out: Annotated[
        Path, typer.Option(help="Output folder (created; a previous MedSynth folder is replaced).")
    ],
    seed: Annotated[int, typer.Option(help="Seed: the same arguments give byte-identical files.")] = 0,
    per_domain: Annotated[int, typer.Option(help="Images per domain, split 60/10/15/15.")] = 300,
    difficulty: Annotated[
        str, typer.Option(help="easy | default | hard: contrast, subtlety and noise.")
    ] = "default",
    image_size: Annotated[int, typer.Option(help="Image side in pixels (64-512).")] = 224,
    workers: Annotated[int, typer.Option(help="Drawing processes (0 = up to 4, by CPU count).")] = 0,
    preview: Annotated[bool, typer.Option(help="Also write a contact-sheet PNG per domain.")] = False,
) -> None:
    """Generate the MedSynth synthetic medical world in the MMed-RAG release formats."""
    from training.data.medsynth.generate import SynthConfig, default_workers, synthesize

    config = SynthConfig(
        out=out,
        seed=seed,
        per_domain=per_domain,
        difficulty=difficulty,  # type: ignore[arg-type]  # checked in SynthConfig
        image_size=image_size,
        workers=workers or default_workers(),
    )
    started = time.perf_counter()
    summary = synthesize(config)
    elapsed = time.perf_counter() - started
    typer.echo(f"wrote {3 * per_domain} images to {out} in {elapsed:.1f} s")
    for domain, counts in summary["counts"].items():
        typer.echo(f"  {domain}: {json.dumps(counts, sort_keys=True)}")
    if preview:
        from training.data.preview import write_contact_sheets

        for path in write_contact_sheets(out):
            typer.echo(f"preview: {path}")


@data_app.command("preview")
def preview(
    data_dir: Annotated[Path, typer.Argument(help="A MedSynth folder.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the PNGs (default: the data folder).")
    ] = None,
    per_domain: Annotated[int, typer.Option(help="Images per contact sheet.")] = 24,
) -> None:
    """Write one contact-sheet PNG per domain with each image's findings printed under it."""
    from training.data.preview import write_contact_sheets

    for path in write_contact_sheets(data_dir, out, per_domain=per_domain):
        typer.echo(str(path))


@data_app.command("check")
def check(
    data_dir: Annotated[Path, typer.Argument(help="A MedSynth folder.")],
    probe: Annotated[
        str, typer.Option(help="linear | cnn | both (the verdict uses the better probe).")
    ] = "both",
    pixels: Annotated[int, typer.Option(help="Side of the downsampled image the linear probe sees.")] = 32,
    out: Annotated[Path | None, typer.Option(help="Also write learnability.json/.md here.")] = None,
) -> None:
    """Prove the images carry their findings: per-finding linear and CNN probes, held-out accuracy."""
    from training.data.check import check_learnability

    started = time.perf_counter()
    report = check_learnability(data_dir, probe=probe, pixels=pixels)  # type: ignore[arg-type]  # checked there
    typer.echo(report.to_markdown())
    typer.echo(f"check took {time.perf_counter() - started:.0f} s", err=True)
    if out is not None:
        report.write(out)


@data_app.command("import")
def import_(
    format_name: Annotated[
        str, typer.Option("--format", help="Release format name: " + ", ".join(FORMAT_NAMES))
    ],
    root: Annotated[Path, typer.Option(help="Image root: image paths in the files are resolved against it.")],
    out: Annotated[Path, typer.Option(help="Output folder for records.jsonl and source.json.")],
    data_file: Annotated[
        Path | None, typer.Option(help="The release JSON/JSONL file (default: look in root).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name, where the format does not fix it.")
    ] = None,
    domain: Annotated[str | None, typer.Option(help="Domain, where the format does not fix it.")] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip malformed records and count them instead of failing.")
    ] = False,
) -> None:
    """Normalise a real dataset (MMed-RAG release format) into the project's own record format."""
    from training.data.importer import import_dataset

    summary = import_dataset(
        format_name, root, out, data_file=data_file, dataset=dataset, domain=domain, skip_bad=skip_bad
    )
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("extract-harvard")
def extract_harvard_cmd(
    npz_dir: Annotated[Path, typer.Argument(help="Folder of Harvard-FairVLMed data_XXXXX.npz files.")],
    out: Annotated[Path, typer.Option(help="Folder for the slo_fundus_XXXXX.jpg images.")],
    key: Annotated[str, typer.Option(help="Array key of the fundus image in each .npz.")] = "slo_fundus",
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable files and count them.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Re-extract images that already exist.")] = False,
) -> None:
    """Extract the SLO fundus images of Harvard-FairVLMed .npz files to JPEG, as the release uses them."""
    from training.data.harvard import extract_harvard

    summary = extract_harvard(npz_dir, out, key=key, skip_bad=skip_bad, overwrite=overwrite)
    typer.echo(str(summary))
