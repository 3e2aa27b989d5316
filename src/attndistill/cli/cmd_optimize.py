"""Optimisation tasks: ``style``, ``appearance``, ``texture`` (paper Algorithm 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checks import MAX_SEED
from ..errors import UserError
from ..presets import LAYOUT_STRENGTH, PRESETS
from . import app
from .cmd_sample import StartT
from .cmd_texture import RefLabels, TargetLabels, Tile
from .common import (
    AllowPickle,
    AttentionScale,
    ConfigDir,
    ContentWeight,
    Device,
    Dtype,
    Iters,
    Layers,
    LossLog,
    Lr,
    Model,
    Output,
    Overwrite,
    Preview,
    PreviewEvery,
    Quiet,
    ReferenceFit,
    Seed,
    Size,
    StepLosses,
    Steps,
    TuneVae,
    Vae,
    check_before_load,
    check_command_options,
    finite,
    load,
    losses_kept_if_diverged,
    parse_size_option,
    run_command,
    step_callback,
    write_images,
)

STYLE_EXAMPLE = "Example: attndistill style horse.jpg watercolor.jpg -o horse-watercolor.png --steps 200"
APPEARANCE_EXAMPLE = "Example: attndistill appearance car.jpg gold-statue.jpg -o golden-car.png"
TEXTURE_EXAMPLE = "Example: attndistill texture wood.jpg -o wood.png --num 4 --size 768x512"
STYLE_HELP = (f"Repaint CONTENT in the style of STYLE (optimisation, {PRESETS['style'].steps} steps, "
              f"content weight {PRESETS['style'].content_weight:g}).")
APPEARANCE_HELP = (f"Give STRUCTURE the appearance of APPEARANCE (optimisation, {PRESETS['appearance'].steps} steps, "
                   f"content weight {PRESETS['appearance'].content_weight:g}).")
TEXTURE_HELP = (f"Synthesise new textures like REFERENCE from noise (optimisation, {PRESETS['texture'].steps} "
                "steps; or --mode sample / --layout).")

Style = Annotated[list[Path], typer.Argument(help="Style image(s); several are attended to together", metavar="STYLE")]
TransferSeed = Annotated[int, typer.Option(
    help="Recorded only: a transfer starts from its content image and adds no noise, so every seed gives the "
    "same result", min=0, max=MAX_SEED)]
Mask = Annotated[Path | None, typer.Option(
    help="Image over the content (or structure) image: white where to restyle, black or transparent where to "
         "keep it (beyond the paper)",
    show_default=False)]
TextureAdain = Annotated[bool | None, typer.Option(
    "--adain/--no-adain", help="With --mode sample or --layout: AdaIN of the latent to the noised texture latent "
    "at each step \\[default: off]", show_default=False)]


@app.command("style", epilog=STYLE_EXAMPLE, help=STYLE_HELP)
def style(
    content: Annotated[Path, typer.Argument(help="Content image (its layout is kept)", metavar="CONTENT")],
    style_images: Style,
    output: Output = Path("out.png"),
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, content_weight: ContentWeight = None,
    attention_scale: AttentionScale = None, layers: Layers = None, size: Size = None, seed: TransferSeed = 0,
    tile: Tile = None, tune_vae: TuneVae = False, reference_fit: ReferenceFit = None, mask: Mask = None,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
    preview: Preview = None, preview_every: PreviewEvery = None, loss_log: LossLog = None,
) -> None:
    """The style command; its help is STYLE_HELP, built from the preset."""
    from ..tasks.transfer import style_transfer

    _transfer("style", style_transfer, {"content": content, "style": style_images}, locals())


@app.command("appearance", epilog=APPEARANCE_EXAMPLE, help=APPEARANCE_HELP)
def appearance(
    structure: Annotated[Path, typer.Argument(help="Structure image (its shapes are kept)", metavar="STRUCTURE")],
    appearance_images: Annotated[list[Path], typer.Argument(help="Appearance image(s)", metavar="APPEARANCE")],
    output: Output = Path("out.png"),
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, content_weight: ContentWeight = None,
    attention_scale: AttentionScale = None, layers: Layers = None, size: Size = None, seed: TransferSeed = 0,
    tile: Tile = None, tune_vae: TuneVae = False, reference_fit: ReferenceFit = None, mask: Mask = None,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
    preview: Preview = None, preview_every: PreviewEvery = None, loss_log: LossLog = None,
) -> None:
    """The appearance command; its help is APPEARANCE_HELP, built from the preset."""
    from ..tasks.transfer import appearance_transfer

    _transfer("appearance", appearance_transfer, {"structure": structure, "appearance": appearance_images}, locals())


#: The transfer commands' options that reach check_command_options, check_before_load and the task alike.
_TRANSFER_OPTIONS = ("steps", "iters", "lr", "content_weight", "attention_scale", "layers", "tile", "reference_fit")


def _transfer(task: str, run, inputs: dict, given: dict) -> None:
    """The style and appearance commands' one body: check, load, run ``run(*inputs)``, write.

    ``given``: the command's parameters by name (both commands have the same options)."""
    options = {name: given[name] for name in _TRANSFER_OPTIONS}
    loading = {name: given[name] for name in ("model", "vae", "config", "allow_pickle", "device", "dtype")}
    size, output, overwrite, preview = given["size"], given["output"], given["overwrite"], given["preview"]

    def body() -> None:
        check_command_options(task, size=size, **options)
        check_before_load(task, **loading, size=size, output=output, overwrite=overwrite, preview=preview,
                          preview_every=given["preview_every"], loss_log=given["loss_log"], **inputs,
                          mask=given["mask"], **options)
        m = load(given["model"], **{k: v for k, v in loading.items() if k != "model"})
        losses = StepLosses.of(given["loss_log"])
        with losses_kept_if_diverged(losses, overwrite=overwrite):
            img = run(*inputs.values(), model=m, **options, size=parse_size_option(size), seed=given["seed"],
                      tune_vae=given["tune_vae"], mask=given["mask"], progress=not given["quiet"],
                      callback=step_callback(preview, given["preview_every"], m, losses))
        write_images([img], output, overwrite=overwrite, losses=losses)

    run_command(body)


@app.command("texture", epilog=TEXTURE_EXAMPLE, help=TEXTURE_HELP)
def texture(
    references: Annotated[list[Path], typer.Argument(help="Texture exemplar(s)", metavar="REFERENCE")],
    output: Output = Path("out.png"),
    num: Annotated[int, typer.Option("--num", "--num-images", help="Number of variations, optimised in one batch"
                                     )] = 1,
    grid: Annotated[bool, typer.Option("--grid", help="Write the variations as one grid to OUT.png")] = False,
    mode: Annotated[str | None, typer.Option(
        help=f"optimize ({PRESETS['texture'].steps} steps) or sample (AD-guided sampling, "
        f"{PRESETS['texture-sample'].steps} steps) \\[default: optimize; sample with --layout]",
        show_default=False)] = None,
    layout: Annotated[Path | None, typer.Option(help="Colour layout image to start from (SDEdit; sampling)")] = None,
    strength: Annotated[float | None, typer.Option(
        help=f"With --layout: noise level to start from, in (0, 1]; 1 ignores the layout "
        f"\\[default: {LAYOUT_STRENGTH}]",
        show_default=False, callback=finite)] = None,
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, content_weight: ContentWeight = None,
    attention_scale: AttentionScale = None, layers: Layers = None, size: Size = None, seed: Seed = 0,
    tile: Tile = None, tune_vae: TuneVae = False, ref_labels: RefLabels = None, target_labels: TargetLabels = None,
    adain: TextureAdain = None, start_t: StartT = None, reference_fit: ReferenceFit = None,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
    preview: Preview = None, preview_every: PreviewEvery = None, loss_log: LossLog = None,
) -> None:
    """The texture command; its help is TEXTURE_HELP, built from the preset."""
    from ..batch.jobs import TASKS, texture_task
    from ..images import image_grid

    def body() -> None:
        job_task = texture_task(mode, layout=layout is not None, labels=(bool(ref_labels), target_labels is not None),
                                strength=strength is not None, option=lambda key: "--" + key.replace("_", "-"))
        if content_weight is not None and job_task not in ("texture-layout", "texture-masked"):
            raise UserError("--content-weight needs a content: use it with --layout or with label maps")
        extra = {} if content_weight is None else {"content_weight": content_weight}
        sampling = {k: v for k, v in dict(adain=adain, start_t=start_t).items() if v is not None}
        if sampling and job_task in ("texture", "texture-masked"):
            names = " and ".join("--no-adain" if value is False else f"--{key.replace('_', '-')}"
                                 for key, value in sampling.items())
            raise UserError(f"{names} {'is a sampling option' if len(sampling) == 1 else 'are sampling options'}; "
                            "add --mode sample or --layout")
        extra.update(sampling)
        inputs = {"texture-masked": dict(ref_labels=ref_labels and list(ref_labels), target_labels=target_labels),
                  "texture-layout": dict(layout=layout, **({} if strength is None else {"strength": strength}))
                  }.get(job_task, {})
        check_command_options(TASKS[job_task].preset, size=size, steps=steps, iters=iters, lr=lr,
                              content_weight=content_weight, attention_scale=attention_scale, layers=layers,
                              tile=tile, strength=strength, num=num, adain=adain, reference_fit=reference_fit)
        check_before_load(job_task, model=model, vae=vae, config=config, allow_pickle=allow_pickle,
                          device=device, dtype=dtype, size=size,
                          output=output, count=1 if grid else num, overwrite=overwrite, preview=preview,
                          preview_every=preview_every, loss_log=loss_log, reference=references, ref_labels=ref_labels,
                          target_labels=target_labels, layout=layout, strength=strength, num=num, steps=steps,
                          iters=iters, lr=lr, attention_scale=attention_scale, layers=layers, tile=tile,
                          reference_fit=reference_fit, **extra)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        losses = StepLosses.of(loss_log)
        with losses_kept_if_diverged(losses, overwrite=overwrite):
            imgs = TASKS[job_task].resolve()(
                references, num=num, model=m, steps=steps, iters=iters, lr=lr, attention_scale=attention_scale,
                layers=layers, size=parse_size_option(size), seed=seed, reference_fit=reference_fit, tile=tile,
                tune_vae=tune_vae, progress=not quiet, callback=step_callback(preview, preview_every, m, losses),
                **inputs, **extra)
        write_images([image_grid(imgs)] if grid else imgs, output, overwrite=overwrite, losses=losses)

    run_command(body)
