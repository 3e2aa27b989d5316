"""Sampling tasks: ``t2i`` (style-specific text-to-image, optionally under a ControlNet; paper Algorithm 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..presets import PRESETS
from . import app
from .cmd_texture import Tile
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

T2I_EXAMPLE = ("Example: attndistill t2i --style watercolor.png --prompt 'a deer in a forest' -o deer.png "
               "--num-images 4 --grid")

Guidance = Annotated[float | None, typer.Option(
    help="Classifier-free guidance scale; 1 turns it off "
    f"\\[default: {PRESETS['t2i'].guidance:g} SD 1.5, {PRESETS['t2i-sdxl'].guidance:g} SDXL]", show_default=False,
    callback=finite)]
GuidanceRescale = Annotated[float | None, typer.Option(
    help="Rescale of the guided prediction, 0 (off) to 1, as diffusers' guidance_rescale: for zero-terminal-SNR "
         "models (v-prediction fine-tunes), where 0.7 is usual \\[default: 0]", show_default=False, callback=finite)]
Adain = Annotated[bool | None, typer.Option(
    "--adain/--no-adain", help="AdaIN of the latent to the noised style latent \\[default: on]", show_default=False)]
StartT = Annotated[int | None, typer.Option(
    help="Apply AD only at steps whose timestep is below this (1-1000) \\[default: every step]", show_default=False)]


T2I_HELP = (f"Generate PROMPT in the style of STYLE (AD-guided sampling: {PRESETS['t2i'].steps} steps, "
            f"lr {PRESETS['t2i'].lr:g}, AdaIN).")


@app.command("t2i", epilog=T2I_EXAMPLE, help=T2I_HELP)
def t2i(
    style: Annotated[list[Path], typer.Option("--style", "-s", help="Style image; repeat for several")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw")],
    output: Output = Path("out.png"),
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid (CFG negative prompt)")] = None,
    num_images: Annotated[int, typer.Option("--num-images", "--num",
                                            help="Images to generate; written as OUT-0.png, OUT-1.png...")] = 1,
    grid: Annotated[bool, typer.Option("--grid", help="Write the images as one grid to OUT.png")] = False,
    controlnet: Annotated[str | None, typer.Option(
        help="ControlNet Hub id, folder or single weights file (a .safetensors, or a .pth with --allow-pickle), "
             "e.g. lllyasviel/control_v11p_sd15_canny")] = None,
    control_image: Annotated[Path | None, typer.Option(
        help="Condition image for the ControlNet: a photo with --control canny, or a ready depth/edge/pose map"
    )] = None,
    control: Annotated[str, typer.Option(help="Preprocess the control image: canny or none")] = "none",
    control_scale: Annotated[float, typer.Option(help="Strength of the ControlNet residuals", callback=finite)] = 1.0,
    guidance: Guidance = None, guidance_rescale: GuidanceRescale = None, adain: Adain = None, start_t: StartT = None,
    reference_fit: ReferenceFit = None,
    content: Annotated[Path | None, typer.Option(help="Content image for the content loss (needs --content-weight)"
                                                 )] = None,
    content_weight: ContentWeight = None,
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    steps: Steps = None, iters: Iters = None, lr: Lr = None, attention_scale: AttentionScale = None,
    layers: Layers = None, size: Size = None, seed: Seed = 0, tune_vae: TuneVae = False, tile: Tile = None,
    device: Device = "auto", dtype: Dtype = "auto", overwrite: Overwrite = False, quiet: Quiet = False,
    preview: Preview = None, preview_every: PreviewEvery = None, loss_log: LossLog = None,
) -> None:
    """Style-specific text-to-image; see :data:`T2I_HELP`."""
    from ..images import image_grid
    from ..tasks.generate import text_to_image

    def body() -> None:
        check_command_options("t2i", size=size, steps=steps, iters=iters, lr=lr, guidance=guidance,
                              guidance_rescale=guidance_rescale, adain=adain,
                              attention_scale=attention_scale, layers=layers, controlnet=controlnet,
                              control_image=control_image, control=control, control_scale=control_scale,
                              content=content, content_weight=content_weight, reference_fit=reference_fit,
                              tile=tile, num=num_images, what="number of images")
        check_before_load("t2i", model=model, vae=vae, config=config, allow_pickle=allow_pickle,
                          device=device, dtype=dtype, size=size,
                          output=output, count=1 if grid else num_images, overwrite=overwrite, preview=preview,
                          preview_every=preview_every, loss_log=loss_log, prompt=prompt, style=style, content=content,
                          control_image=control_image,
                          controlnet=controlnet, control=control, control_scale=control_scale, guidance=guidance,
                          guidance_rescale=guidance_rescale, adain=adain, start_t=start_t,
                          content_weight=content_weight, num_images=num_images,
                          steps=steps, iters=iters, lr=lr, attention_scale=attention_scale, layers=layers,
                          reference_fit=reference_fit, tile=tile)
        m = load(model, vae=vae, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)
        losses = StepLosses.of(loss_log)
        with losses_kept_if_diverged(losses, overwrite=overwrite):
            images = text_to_image(
                prompt, style, negative_prompt=negative_prompt, num_images=num_images, model=m, steps=steps,
                iters=iters, lr=lr, guidance=guidance, guidance_rescale=guidance_rescale, adain=adain,
                start_t=start_t, content=content, content_weight=content_weight, controlnet=controlnet,
                control_image=control_image, control=control, control_scale=control_scale,
                attention_scale=attention_scale, layers=layers, size=parse_size_option(size), seed=seed,
                allow_pickle=allow_pickle, reference_fit=reference_fit, tune_vae=tune_vae, tile=tile,
                progress=not quiet, callback=step_callback(preview, preview_every, m, losses))
        write_images([image_grid(images)] if grid else images, output, overwrite=overwrite, losses=losses)

    run_command(body)
