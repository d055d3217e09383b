"""``mmedrag``: the project's single command line, composed from each package's sub-commands.

Sub-command groups live next to the code they drive (``training/data/cli.py`` …); this module only
mounts them and turns expected errors into one clear line (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from mmedrag.errors import run_with_clean_errors
from training.data.cli import data_app

app = typer.Typer(
    name="mmedrag",
    help="MMed-RAG Serve: data, training and serving for medical multimodal RAG.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")


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
) -> None:
    """Start the whole stack on the embedded default (router, classifier, retriever, generator)."""
    typer.echo(
        "error: the serving stack is not built yet (issue 'Serving: router, domain-classifier, retriever and "
        f"generator services'); nothing to start for {artifacts}.",
        err=True,
    )
    raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    return run_with_clean_errors(app, args, verbose="--verbose" in args or "-v" in args)


if __name__ == "__main__":
    sys.exit(main())
