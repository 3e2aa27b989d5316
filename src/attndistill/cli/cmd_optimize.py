"""Optimisation tasks: ``style``, ``appearance``, ``texture`` (paper Algorithm 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import (
    AllowPickle,
    AttentionScale,
    ConfigDir,
    ContentWeight,
    Device,
    Dtype,
    Iters,
    Layers,
    Lr,
    Model,
    Output,
    Overwrite,
    Quiet,
    Seed,
    Size,
    Steps,
    Vae,
    check_outputs,
    load,
    parse_size_option,
    run_command,
    write_images,
)

STYLE_EXAMPLE = "Example: attndistill style horse.jpg watercolor.jpg -o horse-watercolor.png --steps 200"
APPEARANCE_EXAMPLE = "Example: attndistill appearance car.jpg gold-statue.jpg -o golden-car.png"
TEXTURE_EXAMPLE = "Example: attndistill texture wood.jpg -o wood.png --num 4 --size 768x512"

Style = Annotated[list[Path], typer.Argument(help="Style image(s); several are attended to together")]


@app.command("style", epilog=STYLE_EXAMPLE)
def style(
    content: Annotated[Path, typer.Argument(help="Content image (its layout is kept)")],
    style_images: Style,
    output: Output = Path("out.png"),
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, content_weight: ContentWeight = None,
    attention_scale: AttentionScale = None, layers: Layers = None, size: Size = None, seed: Seed = 0,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
) -> None:
    """Repaint CONTENT in the style of STYLE (optimisation, 200 steps, content weight 0.25)."""
    from ..tasks import style_transfer

    def body() -> None:
        check_outputs(output, 1, overwrite=overwrite)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        img = style_transfer(content, style_images, model=m, steps=steps, iters=iters, lr=lr,
                             content_weight=content_weight, attention_scale=attention_scale, layers=layers,
                             size=parse_size_option(size), seed=seed, progress=not quiet)
        write_images([img], output, overwrite=overwrite)

    run_command(body)


@app.command("appearance", epilog=APPEARANCE_EXAMPLE)
def appearance(
    structure: Annotated[Path, typer.Argument(help="Structure image (its shapes are kept)")],
    appearance_images: Annotated[list[Path], typer.Argument(help="Appearance image(s)")],
    output: Output = Path("out.png"),
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, content_weight: ContentWeight = None,
    attention_scale: AttentionScale = None, layers: Layers = None, size: Size = None, seed: Seed = 0,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
) -> None:
    """Give STRUCTURE the appearance of APPEARANCE (optimisation, content weight 0.2)."""
    from ..tasks import appearance_transfer

    def body() -> None:
        check_outputs(output, 1, overwrite=overwrite)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        img = appearance_transfer(structure, appearance_images, model=m, steps=steps, iters=iters, lr=lr,
                                  content_weight=content_weight, attention_scale=attention_scale,
                                  layers=layers, size=parse_size_option(size), seed=seed, progress=not quiet)
        write_images([img], output, overwrite=overwrite)

    run_command(body)


@app.command("texture", epilog=TEXTURE_EXAMPLE)
def texture(
    references: Annotated[list[Path], typer.Argument(help="Texture exemplar(s)")],
    output: Output = Path("out.png"),
    num: Annotated[int, typer.Option(help="Number of variations, optimised in one batch")] = 1,
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, attention_scale: AttentionScale = None,
    layers: Layers = None, size: Size = None, seed: Seed = 0,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
) -> None:
    """Synthesise new textures like REFERENCE from noise (optimisation, 300 steps)."""
    from ..tasks import texture_synthesis

    def body() -> None:
        check_outputs(output, num, overwrite=overwrite)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        imgs = texture_synthesis(references, num=num, model=m, steps=steps, iters=iters, lr=lr,
                                 attention_scale=attention_scale, layers=layers, size=parse_size_option(size),
                                 seed=seed, progress=not quiet)
        write_images(imgs, output, overwrite=overwrite)

    run_command(body)
