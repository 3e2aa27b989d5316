"""Library messages in the page's words.

The library speaks to command-line users ("raise --start-t", "use --dtype fp32"). On the page the same
setting is a box with a label, or an option of ``attndistill ui`` that no box sets. :func:`page_text`
rewrites a message accordingly, so every error and note reads as advice an artist can follow there.
"""

from __future__ import annotations

import functools
import re

from . import fields
from .jobs import error_message

#: Commands a message may point to -> the tab that does the same.
TABS = {"style": "Style transfer", "appearance": "Appearance transfer", "t2i": "Text to image",
        "texture": "Texture", "expand": "Expansion", "finetune-vae": "VAE fine-tuning"}
#: The API's names of settings a message may start with -> the boxes' labels.
LABELS = {"iters": "Adam iterations per step", "lr": "Learning rate", "num": "Images", "start-t": "Start timestep",
          "VAE tuning lr": "Learning rate", "VAE tuning steps": "Steps"}  # the VAE tab's boxes
#: CLI options of settings, wherever a message names them -> the labels of the boxes that set them here.
SETTINGS = {"start-t": "Start timestep", "lr": "Learning rate", "iters": "Adam iterations per step", "steps": "Steps",
            "strength": "Strength", "content-weight": "Content weight", "attention-scale": "Attention scale",
            "guidance": "Guidance", "control-scale": "Control scale", "stride": "View stride", "view": "View side",
            "view-batch": "Views per batch", "size": "Size", "tile": "Seamless tiling", "num": "Images",
            "num-images": "Images", "layers": "Layers", "seed": "Seed", "adain": "AdaIN",
            "reference-fit": "Reference fit", "mode": "Mode", "prompt": "Prompt",
            "tune-vae": "Fine-tune the VAE decoder"}
#: CLI options of inputs a message may name -> the boxes that take them here.
BOXES = {"controlnet": "ControlNet box", "control-image": "Control image", "model": "Model box", "vae": "VAE box",
         "layout": "Layout image", "ref-labels": "Reference label map", "target-labels": "Target label map"}
#: Options that take no part in a run's message on the page (the CLI's own: help, version, tracebacks).
NOT_LAUNCH = frozenset({"help", "version", "debug"})


@functools.cache
def launch_options() -> dict[str, bool]:
    """Options of ``attndistill ui`` and the switches every command takes, which no box sets: the page's
    settings made when the UI starts (name -> whether it takes a value)."""
    import typer.main

    from ..cli import app

    group = typer.main.get_command(app)
    options = {}
    for param in [*group.params, *group.commands["ui"].params]:
        for opt in (*param.opts, *getattr(param, "secondary_opts", ())):
            if opt.startswith("--"):
                options[opt[2:]] = not getattr(param, "is_flag", False)
    return {k: v for k, v in options.items() if k not in BOXES and k not in NOT_LAUNCH}


def page_message(exc: BaseException) -> str:
    """:func:`error_message` in the page's words: fields, not CLI flags; uploads by their own names."""
    return page_text(error_message(exc))


def page_text(message: str, *, advice: bool = True) -> str:
    """A library message in the page's words (see :func:`page_message`): boxes and tabs by their labels,
    uploads by their own names (not Gradio's cache, not the copies ``keep_uploads`` made), options of
    ``attndistill ui`` as such (``advice``: said to be set when the UI starts; not for a status naming one)."""
    message = re.sub(re.escape(str(fields.GRADIO_UPLOADS)) + r"/[^/'\"]+/", "", message)
    # a kept upload by its own name: quoted, its folder may hold spaces (the outputs folder is where the UI started)
    message = re.sub(r"(['\"])[^'\"]*/inputs/[0-9a-f]{12}-", r"\1", message)
    message = re.sub(r"[^'\"\s]*/inputs/[0-9a-f]{12}-", "", message)
    message = re.sub(r"--control (none|canny)\b", r"Preprocessor \1", message)
    # every image on the page is an upload (a ControlNet or a checkpoint is a typed path): gone from the cache
    message = re.sub(r"\b(image|map) ('[^']*') does not exist; check the path",
                     r"\1 \2 is no longer on the server; upload it again", message)
    message = re.sub(rf"'attndistill ({'|'.join(TABS)})(?: --mode ([a-z]+))?'",
                     lambda m: f"the {TABS[m[1]]} tab" + (f" in mode {m[2]}" if m[2] else ""), message)
    message = re.sub(rf"^({'|'.join(map(re.escape, LABELS))}) ", lambda m: f"{LABELS[m[1]]} ", message)
    # a quoted name ('/data/--steps/a.png', a file '--x.png', 'attndistill ui --share') is left as it is
    parts = re.split(r"((?<!\w)'[^'\n]*'(?!\w))", message)
    words = [part if i % 2 else _options_in_words(part) for i, part in enumerate(parts)]
    said = "".join(words)
    if not advice or "attndistill ui" in said or "start the UI with" in said:
        return said
    found = [m[1] for part in parts[::2] for m in re.finditer(rf"{_OPTION}({_launch_names()})\b(?!-)", part)]
    if not found:
        return said
    return f"{said} ({'an option' if len(found) == 1 else 'options'} of attndistill ui, set when the UI starts)"


#: Where an option begins: not inside a word (paths and file names are quoted, and left as they are).
_OPTION = r"(?<![\w-])--"


@functools.cache
def _launch_names() -> str:
    """:func:`launch_options` as a regex alternation, longest first (``--compile`` not inside ``--compiled-loss``)."""
    return "|".join(sorted(map(re.escape, launch_options()), key=len, reverse=True))


def _options_in_words(message: str) -> str:
    """Options in the page's words, outside quotes: boxes by their labels, inputs by where to enter them; options
    no box sets keep their dashes (what to start ``attndistill ui`` with), the rest in plain words."""
    message = re.sub(rf"\bpass (--(?:{_launch_names()}))\b(?!-)", r"start the UI with attndistill ui \1", message)
    boxes = "|".join(BOXES)
    message = re.sub(rf"\bpass --({boxes}) ([/~.][^\s,;)]*)", lambda m: f"enter {m[2]} in the {BOXES[m[1]]}", message)
    message = re.sub(rf"\bpass --({boxes}) with\b", lambda m: f"fill the {BOXES[m[1]]} with", message)
    message = re.sub(rf"(?<![\w-])(\b(?:a|an|the) )?--({boxes})\b(?!-)",
                     lambda m: f"{m[1] or 'the '}{BOXES[m[2]]}", message)
    message = re.sub(rf"{_OPTION}({'|'.join(SETTINGS)})\b(?!-)", lambda m: SETTINGS[m[1]], message)
    return re.sub(rf"{_OPTION}([a-z][a-z0-9-]*)",
                  lambda m: m[0] if m[1] in launch_options() else m[1].replace("-", " "), message)
