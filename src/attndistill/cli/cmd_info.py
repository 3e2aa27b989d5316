"""``attndistill info``: the parameters a result carries, to reproduce or compare runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import PREVIEW_MARK, run_command

INFO_EXAMPLE = ("Example: attndistill info horse-watercolor.png\n\n"
                "Rerun it: attndistill info horse-watercolor.png --job > jobs.jsonl && attndistill batch jobs.jsonl "
                "--out rerun/")


@app.command("info", epilog=INFO_EXAMPLE)
def info(image: Annotated[Path, typer.Argument(help="A PNG written by attndistill, or a VAE folder from finetune-vae",
                                               metavar="IMAGE")],
         job: Annotated[bool, typer.Option(
             "--job", help="Print the run as one line for 'attndistill batch' instead (to rerun or vary it; for a "
                           "VAE folder, the finetune-vae command that made it)")] = False,
         ) -> None:
    """Print the parameters embedded in IMAGE (task, inputs, model, seed...) as JSON, or a VAE folder's record."""
    from ..batch.jobs import job_from_parameters
    from ..errors import UserError
    from ..images import load_image, read_parameters

    def body() -> None:
        if image.is_dir():
            recorded = vae_parameters(image)
            made = for_rerun(recorded, image, "weights")
            typer.echo(finetune_command(made, image) if job else json.dumps(recorded, indent=2, sort_keys=True))
            return
        try:
            params = read_parameters(image) if image.is_file() else {}
        except (OSError, ValueError):  # a damaged PNG: load_image below says how
            params = {}
        if not params:
            if not image.is_file() or not _is_image(image):  # a FIFO's open would wait for a writer
                load_image(image, what="image")  # missing, corrupt, not an image: the usual one-line errors
            raise UserError(f"image '{image}' carries no attndistill parameters (was it written by attndistill?)")
        if params == PREVIEW_MARK:
            raise UserError(f"image '{image}' is a --preview of a run, not its result; run info on the result")
        shown = params
        params = for_rerun(params, image, "pixels")
        if job:
            try:
                line = job_from_parameters(params, source=f"image '{image}'")
            except (TypeError, ValueError, AttributeError):  # hand-edited parameters of the wrong types
                raise UserError(f"image '{image}' carries parameters of unexpected types; they cannot be "
                                "turned into a job (was the text chunk edited?)") from None
            typer.echo(json.dumps(line))
        else:
            typer.echo(json.dumps(shown, indent=2, sort_keys=True))

    run_command(body)


def for_rerun(params: dict, made: Path, what: str) -> dict:
    """``params`` as a rerun reads them: inputs gone from their recorded paths found near ``made`` (the result or
    VAE folder), each said on stderr, and a warning for each input file or Hub snapshot that changed since (a rerun
    will not give the same ``what``)."""
    from ..fingerprints import changed_inputs, relocated
    from ..model.hub import changed_commits

    found, said = relocated(params, made.resolve().parent)  # its folders above, too
    for line in said:
        typer.echo(f"note: {line}, which a rerun reads", err=True)
    for change in changed_inputs(found) + changed_commits(found):  # a rerun reads them as they are now
        typer.echo(f"warning: {change} since '{made}' was made; a rerun will not give the same {what}", err=True)
    return found


def _is_image(path: Path) -> bool:
    """An image file Pillow reads, whatever its size: the limits on inputs say nothing of a file to describe."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
        return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # missing, a folder, damaged, not an image: load_image names which
        return False


def vae_parameters(folder: Path) -> dict:
    """How a VAE folder was made: the ``attndistill.json`` that ``finetune-vae`` writes beside its weights."""
    from ..errors import UserError
    from ..tasks.vae_tuning import PARAMETERS_FILE

    path = folder / PARAMETERS_FILE
    if not path.is_file():
        raise UserError(f"folder '{folder}' holds no {PARAMETERS_FILE}, so it is not a VAE made by 'attndistill "
                        "finetune-vae'; pass a PNG result or such a folder")
    try:
        made = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        made = None
    if not isinstance(made, dict) or made.get("task") != "finetune-vae":
        raise UserError(f"'{path}' is not the record finetune-vae writes (was it edited?); nothing to show")
    return made


#: The record's keys that the finetune-vae command takes, and its options for them.
_OPTIONS = (("model", "--model"), ("vae", "--vae"), ("config", "--config"), ("dtype", "--dtype"),
            ("steps", "--steps"), ("lr", "--lr"), ("reference_fit", "--reference-fit"))


def finetune_command(made: dict, folder: Path) -> str:
    """The ``finetune-vae`` command that made ``folder``, writing beside it (``FOLDER-rerun``), never over it."""
    from ..batch.jobs import DTYPE_OPTIONS
    from ..errors import UserError
    from ..model.single_file import CHECKPOINT_SUFFIXES
    from ..presets import REFERENCE_FITS
    from ..tasks.vae_tuning import check_tuning

    references = made.get("reference")
    edited = UserError(f"'{folder}' has an attndistill.json whose settings finetune-vae would not take (was it "
                       "edited?); no command to print")
    if not (isinstance(references, list) and references and all(isinstance(r, str) and r for r in references)):
        raise edited
    if "<image>" in references:
        raise UserError(f"VAE folder '{folder}' was tuned on an image passed in memory, not a file; it cannot be "
                        "rerun from its record")
    if "dtype" not in made:
        raise UserError(f"VAE folder '{folder}' was made before attndistill recorded the dtype, VAE and configs a "
                        "tuning used; its command cannot be told, only its record (run info without --job)")
    if not all(Path(r).is_absolute() for r in references) or not isinstance(made["dtype"], str) \
            or made["dtype"] not in DTYPE_OPTIONS:
        raise edited
    try:
        check_tuning(made.get("steps"), made.get("lr"))
    except (UserError, TypeError):
        raise edited from None
    texts = [made.get(k) for k in ("model", "vae", "config", "dtype") if made.get(k) is not None]
    if (made.get("reference_fit") not in (None, *REFERENCE_FITS)
            or not all(isinstance(t, str) and t and not t.startswith("-") for t in texts)):
        raise edited
    words = ["attndistill", "finetune-vae", *references, "-o", f"{folder.resolve()}-rerun"]
    for key, option in _OPTIONS:
        value = made.get(key)
        if value is not None:
            words += [option, DTYPE_OPTIONS.get(value, value) if key == "dtype" else str(value)]
    suffix = Path(made.get("model") or "").suffix.lower()
    pickled = suffix in CHECKPOINT_SUFFIXES and suffix != ".safetensors"  # a pickle checkpoint loaded: allowed
    if made.get("allow_pickle") is True or pickled:  # or a folder's .bin weights, which the record names
        words.append("--allow-pickle")
    return shlex.join(words)
