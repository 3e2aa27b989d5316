"""The page's fields: upload boxes and number, seed and size boxes, and what their values mean to the API.

Pure helpers (no app state), so each tab of :mod:`attndistill.webui.app` builds its fields and reads
their values the same way, and errors reach the page as one readable line.
"""

import contextlib
import hashlib
import importlib
import inspect
import io
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ..checks import MAX_SEED
from ..errors import UserError
from ..images import atomic_write, load_image, parse_size
from ..presets import DEFAULT_REFERENCE_FIT, REFERENCE_FITS

TILE_CHOICES = ["none", "x", "y", "xy"]
#: A run's status line when it failed, before or after it started.
FAILED = "failed: {}"
#: Where Gradio keeps uploads (one folder per file hash): kept out of the page's error lines.
GRADIO_UPLOADS = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def api_default(module: str, func: str, name: str) -> object:
    """Default of a keyword of a public task function in ``attndistill.tasks.MODULE`` (None when it or its
    module is missing)."""
    try:
        fn = getattr(importlib.import_module(f"attndistill.tasks.{module}"), func)
    except (ImportError, AttributeError):
        return None
    param = inspect.signature(fn).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def text_value(text: str | None) -> str | None:
    """A free-text box (layers, a size, a folder): blank or only spaces is None, as an empty box."""
    return (text or "").strip() or None


def file_name(path: str | None) -> str | None:
    return None if not path else Path(path).name


def file_paths(files) -> list[str]:
    """Paths of a ``gr.File(file_count="multiple")`` value."""
    return [str(getattr(f, "name", f)) for f in (files or [])]


def keep_uploads(value, folder: Path):
    """Uploads (a path, or a list of paths or file objects) -> copies in ``folder``/inputs; other values as they are.

    A result's parameters name its inputs; Gradio's upload cache does not outlive the server, so they name
    these copies, which sit beside the results (``attndistill info OUT.png --job`` reruns them). A copy is
    named by its content, so one upload used by many runs is one file. For upload boxes only.
    """
    if isinstance(value, list | tuple):
        return [keep_uploads(str(getattr(v, "name", v)), folder) for v in value]
    if not isinstance(value, str) or not value:
        return value
    path = Path(value)
    try:
        if not path.resolve().is_relative_to(GRADIO_UPLOADS.resolve()) or not path.is_file():
            return value
        data = path.read_bytes()
    except (OSError, ValueError):  # gone from Gradio's cache meanwhile, or no path at all: the task says what
        return value
    return keep_input(data, path.name, folder, what="upload")


def keep_input(data: bytes, name: str, folder: Path, *, what: str) -> str:
    """``data`` kept as ``folder``/inputs/<content hash>-``name`` (once, whole or not at all); its path."""
    kept = folder / "inputs" / f"{hashlib.sha256(data).hexdigest()[:12]}-{name}"
    if kept.is_file():
        return str(kept)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(kept, lambda f: f.write(data), overwrite=True)  # whole or not at all, as every output
    except (OSError, UserError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise UserError(f"{what} '{name}' could not be kept beside the results in '{kept.parent}' "
                        f"({reason}); check that folder, or start the UI with another --outputs folder") from None
    return str(kept)


def required(path: str | None, what: str) -> str:
    if not path:
        raise UserError(f"{what} is missing; upload one (or click an example)")
    return path


def size_value(text: str | None, multiple: int = 1):
    """Size box -> None (the model's native size), a long side, or (w, h), parsed as the CLI parses ``--size``.

    Not rounded here (``multiple`` 1, 8 for expansion, as the CLI): the task rounds, so the command the
    page shows makes the same size.
    """
    text = (text or "").strip()
    return parse_size(text, multiple=multiple) if text else None


def reference_fit_radio(tab: str) -> gr.Radio:
    """How the tab's references meet the model (REFERENCE_FITS), the presets' default first."""
    return gr.Radio(list(REFERENCE_FITS), value=DEFAULT_REFERENCE_FIT, label="Reference fit",
                    info="squash: stretched to the model's square (the paper's) · keep: aspect kept",
                    elem_id=f"{tab}-reference-fit", min_width=260)  # narrower, its choices stack


def reference_fit_value(value: str | None) -> str | None:
    """The radio -> the tasks' ``reference_fit`` (None: the preset's); unknown values fail in the task's check."""
    return value or None


def fit_cli(value: str | None) -> str | None:
    """``--reference-fit`` for the page's command: only where it is not the default."""
    return None if value in (None, "", DEFAULT_REFERENCE_FIT) else value


def tile_value(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def whole(value, what: str = "steps", bounds: tuple[int | None, int | None] = (None, None)) -> int | None:
    """A number box's value -> int (None stays None); 1.5 is refused, not rounded, and so is a value
    outside the box's ``bounds`` (the browser does not hold a typed value to them)."""
    if value is None:
        return None
    if not math.isfinite(value) or int(value) != value:
        raise UserError(f"{what} must be a whole number (got {value})")
    low, high = bounds
    if low is not None and value < low:
        raise UserError(f"{what} must be at least {low} (got {int(value)})")
    if high is not None and value > high:
        raise UserError(f"{what} must be at most {high} (got {int(value)})")
    return int(value)


def seed_value(text: str | None) -> int:
    """The seed box -> int, exactly (a blank box is seed 0); the range is the tasks' own check."""
    value = number_value(text, "seed", int)
    return 0 if value is None else value


# -- components --------------------------------------------------------------------------------------

def image_input(label: str, elem_id: str) -> gr.Image:
    """An upload box for one image, handed to the API as a file path."""
    return gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                    elem_id=elem_id, height=280)


def mask_painter(label: str, elem_id: str) -> gr.ImageMask:
    """A brush over the content image (its background, set when the content changes): strokes mark the region."""
    # "upload" as a source: without one (Gradio 6.31) the brush paints nothing on a background set by the app
    return gr.ImageMask(label=label, type="filepath", image_mode="RGBA", sources=["upload"], layers=False,
                        transforms=[], brush=gr.Brush(colors=["#ff3366"], color_mode="fixed", default_size=24),
                        elem_id=elem_id, height=280)


#: Longest side of the picture the mask is painted on: the page uploads it again with each run (twice, with
#: the strokes), and a photo's full size would pass the upload limit, where Gradio waits without a word.
PAINT_SIDE = 512


def content_to_paint_on(path: str | None) -> dict | None:
    """The mask painter's value for a new content image: that image upright and small, and an empty layer to
    paint on (without one the brush paints nothing). The mask is scaled to the content when it is used."""
    try:
        image = load_image(path, what="content image") if path else None
    except UserError:  # the upload box says what is wrong with it
        image = None
    if image is None:
        return None
    # at most PAINT_SIDE a side, but never thinner than 64 px: a mask must stay at the content's aspect
    scale = max(min(1.0, PAINT_SIDE / max(image.size)), min(1.0, 64 / min(image.size)))
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    return {"background": image, "layers": [Image.new("RGBA", image.size, (0, 0, 0, 0))], "composite": image}


def painted_mask(value: dict | None, folder: Path) -> str | None:
    """The strokes of a mask painter -> a white-on-black PNG kept in ``folder``/inputs, by content (None: none).

    A result names its mask like any input, so ``attndistill info OUT.png --job`` reruns it.
    """
    if value is not None and not isinstance(value, dict):  # an API caller's value: the painter sends a dict
        raise UserError("the painted mask must be the mask painter's value (background and layers); paint it again")
    alphas = []
    for layer in (value or {}).get("layers") or []:  # files from the page; images as content_to_paint_on made them
        try:
            with contextlib.nullcontext(layer) if isinstance(layer, Image.Image) else Image.open(layer) as image:
                alphas.append(np.asarray(image.convert("RGBA"))[..., 3])
        except (OSError, ValueError, TypeError, AttributeError):
            raise UserError("the painted mask could not be read; paint it again") from None
    if not alphas or max(int(a.max()) for a in alphas) == 0:
        return None
    strokes = np.maximum.reduce([a for a in alphas if a.shape == alphas[0].shape]) > 0
    buffer = io.BytesIO()
    Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8), "L").save(buffer, format="PNG")
    return keep_input(buffer.getvalue(), "mask.png", folder, what="painted mask")


def upload_check(what: str) -> Callable[[dict | None], object]:
    """Handler that runs :func:`attndistill.images.load_image` on a fresh upload (raw, not preprocessed).

    A text file renamed .png, a truncated JPEG or a decompression bomb is refused with the library's
    one-line message (naming the uploaded file) and the box is cleared; Gradio's own preprocessing
    would only say "Error".
    """

    def check(payload: dict | None):
        path = (payload or {}).get("path")
        if not path:
            return gr.skip()
        name = payload.get("orig_name") or Path(path).name
        try:
            load_image(path, what=what)
        except UserError as exc:
            from .wording import page_text  # (it reads this module's upload folder)

            gr.Warning(page_text(str(exc).replace(str(path), name)), title="Upload refused")
            return None
        return gr.skip()

    return check


def blank_number(label: str, tab: str, key: str, placeholder: str) -> gr.Textbox:
    """A number that may stay blank (the preset decides); ``gr.Number`` sends 0 for an empty box."""
    return gr.Textbox("", label=label, placeholder=placeholder, elem_id=f"{tab}-{key}")


def number_value(text: str | None, what: str, kind: type = float) -> float | int | None:
    """Text of a :func:`blank_number` box -> None (blank) or a number of ``kind``."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{what} '{text}' is not {'a whole number' if kind is int else 'a number'}") from None


def int_box(label: str, value, tab: str, key: str, **kwargs) -> gr.Number:
    """A whole-number box. Not ``precision=0``, which rounds 1.5 to 2: :meth:`WebUI.wire` refuses it."""
    bounds = (kwargs.pop("minimum", None), kwargs.pop("maximum", None))  # not Gradio's: its refusal names no box
    number = gr.Number(value, label=label, elem_id=f"{tab}-{key}", **kwargs)
    number.whole, number.bounds = label, bounds  # read back by WebUI.wire
    return number


def seed_box(tab: str) -> gr.Textbox:
    """Seeds as text, read exactly (a number box would take 1.5 or 1e9 as it pleases); the range is the tasks'."""
    return gr.Textbox("0", label="Seed", elem_id=f"{tab}-seed", max_lines=1, placeholder=f"0 to {MAX_SEED}")


def size_box(tab: str) -> gr.Textbox:
    return gr.Textbox("", label="Size", placeholder="long side or WIDTHxHEIGHT; default: native", elem_id=f"{tab}-size")


def float_box(label: str, value, tab: str, key: str, **kwargs) -> gr.Number:
    return gr.Number(value, label=label, elem_id=f"{tab}-{key}", **kwargs)
