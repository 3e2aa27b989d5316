"""``attndistill info``: the parameters a result carries, to reproduce or compare runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import PREVIEW_MARK, run_command

INFO_EXAMPLE = ("Example: attndistill info horse-watercolor.png\n\n"
                "Rerun it: attndistill info horse-watercolor.png --job > jobs.jsonl && attndistill batch jobs.jsonl "
                "--out rerun/")


@app.command("info", epilog=INFO_EXAMPLE)
def info(image: Annotated[Path, typer.Argument(help="A PNG written by attndistill")],
         job: Annotated[bool, typer.Option(
             "--job", help="Print the run as one line for 'attndistill batch' instead (to rerun or vary it)")] = False,
         ) -> None:
    """Print the parameters embedded in IMAGE (task, inputs, model, steps, seed, version...) as JSON."""
    from ..batchjobs import job_from_parameters
    from ..errors import UserError
    from ..images import load_image, read_parameters

    def body() -> None:
        try:
            params = read_parameters(image) if image.is_file() else {}
        except (OSError, ValueError):  # a damaged PNG: load_image below says how
            params = {}
        if not params:
            load_image(image, what="image")  # missing, corrupt, not an image: the usual one-line errors
            raise UserError(f"image '{image}' carries no attndistill parameters (was it written by attndistill?)")
        if params == PREVIEW_MARK:
            raise UserError(f"image '{image}' is a --preview of a run, not its result; run info on the result")
        if job:
            try:
                line = job_from_parameters(params, source=f"image '{image}'")
            except (TypeError, ValueError, AttributeError):  # hand-edited parameters of the wrong types
                raise UserError(f"image '{image}' carries parameters of unexpected types; they cannot be "
                                "turned into a job (was the text chunk edited?)") from None
            typer.echo(json.dumps(line))
        else:
            typer.echo(json.dumps(params, indent=2, sort_keys=True))

    run_command(body)
