"""Texture commands: ``expand`` (MultiDiffusion to any size) and ``finetune-vae`` (VAE*).

Also the options the texture suite adds to the optimisation commands
(``--tile``, ``--ref-labels``/``--target-labels``), declared here once and
used by :mod:`.cmd_optimize` (``--tune-vae`` lives in :mod:`.common`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..presets import DECODE_TILE, PRESETS, VAE_TUNING_LR, VAE_TUNING_STEPS, VIEW, VIEW_BATCH
from . import app
from .common import (
    AllowPickle,
    AttentionScale,
    ConfigDir,
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
    StepLosses,
    Steps,
    TuneVae,
    Vae,
    check_before_load,
    check_command_options,
    check_images,
    check_loss_log,
    echo_err,
    finite,
    load,
    losses_kept_if_diverged,
    parse_size_option,
    run_command,
    step_callback,
    write_images,
)

EXPAND_EXAMPLE = "Example: attndistill expand wood.jpg -o wood-wide.png --size 1536x512 --tile x"
FINETUNE_EXAMPLE = ("Example: attndistill finetune-vae wood.jpg -o wood-vae && "
                    "attndistill texture wood.jpg --vae wood-vae -o wood.png")

Tile = Annotated[str | None, typer.Option(
    help="Seamless tiling along x, y or xy, so the result tiles without a seam (circular padding; style and "
         "appearance keep their content: as seamless as it is)",
    show_default=False)]
ExpandTile = Annotated[str | None, typer.Option(
    "--tile", help="Seamless tiling along x, y or xy: views wrap around the canvas's edges, so the result "
                   "tiles without a seam", show_default=False)]
RefLabels = Annotated[list[Path] | None, typer.Option(
    "--ref-labels", help="Colour label map of the reference (one per reference; each colour a region)",
    show_default=False)]
TargetLabels = Annotated[Path | None, typer.Option(
    "--target-labels", help="Colour label map of the result: each region is made of the reference's region of "
    f"the same colour (masked synthesis, {PRESETS['texture-masked'].steps} steps)", show_default=False)]


@app.command("expand", epilog=EXPAND_EXAMPLE)
def expand(
    references: Annotated[list[Path], typer.Argument(help="Texture exemplar(s); several are attended to together",
                                                     metavar="REFERENCE")],
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT in pixels (or one number: a square), at least one view",
                                      show_default=False)],
    output: Output = Path("out.png"),
    stride: Annotated[int | None, typer.Option(
        help=f"View stride in latents \\[default: {PRESETS['expand'].stride}]", show_default=False)] = None,
    view_batch: Annotated[int | None, typer.Option(help=f"Most views per UNet batch (batches split evenly) "
                                                        f"\\[default: {VIEW_BATCH}]",
                                                   show_default=False)] = None,
    view: Annotated[int | None, typer.Option(
        help=f"View side in latents \\[default: {VIEW}, {VIEW * 8} px on SD 1.5]", show_default=False)] = None,
    decode_tile: Annotated[int | None, typer.Option(help=f"Decoder tile side in latents \\[default: {DECODE_TILE}]",
                                                    show_default=False)] = None,
    tile: ExpandTile = None, tune_vae: TuneVae = False, reference_fit: ReferenceFit = None,
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, attention_scale: AttentionScale = None,
    layers: Layers = None, seed: Seed = 0,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
    preview: Preview = None, preview_every: PreviewEvery = None, loss_log: LossLog = None,
) -> None:
    """Grow REFERENCE into a texture of any --size with AD-guided MultiDiffusion (the expand preset)."""
    from ..presets import get_preset
    from ..tasks.textures import check_expansion, expand_texture

    def body() -> None:
        canvas = parse_size_option(size)  # the task rounds it to whole latents, and says so
        optional = {k: v for k, v in dict(view=view, view_batch=view_batch, decode_tile=decode_tile).items()
                    if v is not None}
        check_expansion(get_preset("expand").override(steps=steps, iters=iters, lr=lr,
                                                      attention_scale=attention_scale, stride=stride),
                        canvas, **optional)
        check_command_options("expand", layers=layers, tile=tile, reference_fit=reference_fit)
        check_before_load("expand", model=model, vae=vae, config=config, allow_pickle=allow_pickle,
                          device=device, dtype=dtype, size=size,
                          output=output, overwrite=overwrite, preview=preview, preview_every=preview_every,
                          loss_log=loss_log,
                          reference=references, stride=stride, steps=steps, iters=iters, lr=lr,
                          attention_scale=attention_scale, layers=layers, tile=tile, reference_fit=reference_fit,
                          **optional)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        losses = StepLosses.of(loss_log)
        with losses_kept_if_diverged(losses, overwrite=overwrite):
            img = expand_texture(references, size=canvas, model=m, steps=steps, iters=iters, lr=lr,
                                 attention_scale=attention_scale, layers=layers, stride=stride, tile=tile,
                                 tune_vae=tune_vae, reference_fit=reference_fit, seed=seed, progress=not quiet,
                                 callback=step_callback(preview, preview_every, m, losses), **optional)
        write_images([img], output, overwrite=overwrite, losses=losses)

    run_command(body)


@app.command("finetune-vae", epilog=FINETUNE_EXAMPLE)
def finetune_vae(
    reference: Annotated[list[Path], typer.Argument(help="Image(s) to fit the decoder to (several: all of them)",
                                                    metavar="REFERENCE")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to save the AutoencoderKL in",
                                         show_default=False)],
    steps: Annotated[int | None, typer.Option(help=f"Adam steps \\[default: {VAE_TUNING_STEPS}]",
                                              show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help=f"Adam learning rate \\[default: {VAE_TUNING_LR:g}]",
                                             show_default=False, callback=finite)] = None,
    reference_fit: ReferenceFit = None,
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    device: Device = "auto", dtype: Dtype = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing VAE folder (never a folder of other files)")]
    = False, quiet: Quiet = False,
    loss_log: Annotated[Path | None, typer.Option(
        help="Also write each tuning step's L1 loss to this JSON Lines file (step, timestep 0, loss, stage), "
             "once the tuning is done", show_default=False)] = None,
) -> None:
    """Fine-tune the VAE decoder on REFERENCE (VAE*) and save it as a folder for --vae."""
    from ..images import free_name
    from ..tasks import vae_tuning
    from ..tasks.setup import check_reference_fit

    def body() -> None:
        vae_tuning.check_vae_folder(output, overwrite=overwrite, reads=(model, vae, config))
        settings = {"steps": VAE_TUNING_STEPS if steps is None else steps, "lr": VAE_TUNING_LR if lr is None else lr}
        vae_tuning.check_tuning(**settings)
        fit = None if reference_fit is None else check_reference_fit(reference_fit)
        check_images(reference_image=reference)
        if loss_log is not None:
            check_loss_log(loss_log, [], overwrite=overwrite, folder=output)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        losses = StepLosses.of(loss_log)
        with losses_kept_if_diverged(losses, overwrite=overwrite):
            tuned = vae_tuning.finetune_vae(reference, model=m, reference_fit=fit, progress=not quiet,
                                            callback=losses, **settings)
        target = output
        if not overwrite and output.is_dir() and any(output.iterdir()):  # taken while it ran (checked before)
            target = free_name(output, suffix="")
            echo_err(f"warning: '{output}' appeared while this ran and is left as it is; the tuned VAE is {target}")
        vae_tuning.save_vae(tuned, target, overwrite=overwrite)
        typer.echo(f"wrote {target}")
        if losses is not None:
            losses.save(overwrite=overwrite)

    run_command(body)
