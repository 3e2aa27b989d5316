"""The ``attndistill`` command line: parse input, call the library, write results.

Each command lives in a small module of this package and registers itself on
:data:`app`; none of them contains algorithm code.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from .. import __version__

app = typer.Typer(
    name="attndistill", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Attention Distillation: transfer style, appearance and texture with Stable Diffusion.",
    context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attndistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors")] = False,
) -> None:
    if debug:
        os.environ["ATTNDISTILL_DEBUG"] = "1"


def _register() -> None:
    """Import the command modules; each adds its commands to :data:`app`."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register()


def main() -> None:
    """Console-script entry point."""
    app()
