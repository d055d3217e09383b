"""``mmedrag``: the project's single command line, composed from each package's sub-commands.

Sub-command groups live next to the code they drive (``training/data/cli.py`` …); this module only
mounts them and turns expected errors into one clear line (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys

# Before anything imports torch: OpenMP threads that spin while waiting starve each other on a shared
# machine (measured: 25x slower batch-1 generation next to another job); sleeping waiters cost nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Annotated, Literal

import typer

from mmedrag.errors import run_with_clean_errors
from services.status import status_cli
from training.bootstrap import bootstrap_cli
from training.calibrate import calibrate_cli
from training.classifier import classifier_cli
from training.convert_llava_med import convert_llava_med_cli
from training.data.cli import data_app
from training.dpo.cli import dpo_cli
from training.evaluate.ablation import ablation_cli
from training.evaluate.retrieval import eval_retrieval_cli
from training.evaluate.run import eval_app
from training.export import export_cli
from training.index import index_cli
from training.pairs.cli import pairs_cli
from training.retriever.cli import retriever_cli
from training.sft import sft_cli

app = typer.Typer(
    name="mmedrag",
    help="MMed-RAG Serve: data, training and serving for medical multimodal RAG.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.command("index")(index_cli)
app.command("calibrate")(calibrate_cli)
app.command("status")(status_cli)
app.command("sft")(sft_cli)
app.command("pairs")(pairs_cli)
app.command("dpo")(dpo_cli)
app.command("export")(export_cli)
app.command("convert-llava-med")(convert_llava_med_cli)
app.command("bootstrap")(bootstrap_cli)

train_app = typer.Typer(
    help="Train the domain classifier and the per-domain retrievers.", no_args_is_help=True
)
train_app.command("classifier")(classifier_cli)
train_app.command("retriever")(retriever_cli)
app.add_typer(train_app, name="train")

eval_app.command("ablation")(ablation_cli)
eval_app.command("retrieval")(eval_retrieval_cli)
app.add_typer(eval_app, name="eval")


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show full tracebacks and debug logs.")
    ] = False,
) -> None:
    """MMed-RAG Serve command line."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command("up")
def up(
    artifacts: Annotated[Path, typer.Option(help="Artifacts folder the services load.")] = Path("artifacts"),
    host: Annotated[
        str, typer.Option(help="Interface for all services (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Router port; the classifier, retriever and generator use the next three.")
    ] = 8000,
    log_dir: Annotated[Path, typer.Option(help="Where each service writes <name>.log.")] = Path("logs"),
    log_format: Annotated[
        Literal["json", "text"] | None,
        typer.Option(
            help="Log lines of every service: json (one object per line) or text; default: "
            "MMEDRAG_LOG_FORMAT, else json."
        ),
    ] = None,
) -> None:
    """Start the whole stack on the embedded default (router, classifier, retriever, generator)."""
    from services.launcher import run_stack

    raise typer.Exit(run_stack(artifacts, host=host, port=port, log_dir=log_dir, log_format=log_format))


keys_app = typer.Typer(help="API keys of the router.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    key_id: Annotated[str, typer.Option("--id", help="A name for the key (shown in audit logs).")],
) -> None:
    """Make a new API key: prints the key once, and the 'id:sha256' entry the router stores."""
    from services.router.auth import hash_key, new_key

    if not key_id.strip() or any(c in key_id for c in ":,#\n"):
        raise ValueError("--id must be non-empty and contain none of ':', ',', '#'")
    key = new_key()
    typer.echo(f"key (give it to the client; it is not stored): {key}")
    typer.echo(f"entry (add to MMEDRAG_ROUTER_API_KEYS or the keys file): {key_id}:{hash_key(key)}")


artifacts_app = typer.Typer(help="Build artifact folders the services load.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")


@artifacts_app.command("tiny")
def artifacts_tiny(
    out: Annotated[Path, typer.Option(help="Artifacts folder to (re)build.")] = Path("artifacts"),
    seed: Annotated[int, typer.Option(help="Seed of the random weights and the MedSynth corpus.")] = 0,
) -> None:
    """Tiny random-weight models in the real formats and small MedSynth indexes, for tests and smoke runs."""
    from training.artifacts.tiny import build_tiny_artifacts

    manifest = build_tiny_artifacts(out, seed=seed)
    typer.echo(f"built tiny artifacts in {out} ({manifest['build_seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    return run_with_clean_errors(app, args, verbose="--verbose" in args or "-v" in args)


if __name__ == "__main__":
    sys.exit(main())
