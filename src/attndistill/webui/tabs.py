"""The web UI's tabs: one function per task, each building its fields, its Run and Cancel, and the
call of the public API (imported inside the handlers, so a module that fails to import breaks one tab).

Each tab reads its values through :mod:`attndistill.webui.fields` and runs through the app's shared
machinery (:meth:`attndistill.webui.app.WebUI.wire`): a job with progress, saved PNGs with their
parameters, and the same run as a terminal command.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import TYPE_CHECKING

import gradio as gr

from ..batch.jobs import TASKS
from ..errors import UserError
from ..model.models import DiffusionModel
from ..presets import PRESETS, VAE_TUNING_LR
from .fields import (
    FAILED,
    TILE_CHOICES,
    api_default,
    blank_number,
    content_to_paint_on,
    file_name,
    file_paths,
    fit_cli,
    float_box,
    image_input,
    int_box,
    keep_uploads,
    mask_painter,
    number_value,
    reference_fit_radio,
    reference_fit_value,
    required,
    seed_box,
    seed_value,
    size_box,
    size_value,
    text_value,
    tile_value,
    whole,
)
from .jobs import TaskCall, cli_command
from .wording import page_message

if TYPE_CHECKING:
    from .app import WebUI

#: ``expand --size`` rounds to whole latents (the CLI's rounding), not to the UNet's multiple.
EXPAND_SIZE_MULTIPLE = 8
#: UI mode -> the batch task (and the CLI's) that runs it.
TEXTURE_TASKS = {"optimise": "texture", "sample": "texture-sample", "layout": "texture-layout",
                 "masked": "texture-masked"}
TEXTURE_MODES = {mode: TASKS[task].preset for mode, task in TEXTURE_TASKS.items()}  # UI mode -> preset
CONTENT_MODES = ("layout", "masked")  # modes with a content image: the layout, the label map's init
SAMPLING_MODES = ("sample", "layout")  # modes that sample: AdaIN and a start timestep


#: Most images one Run of the page makes (the API's own limit, tasks.setup.MAX_IMAGES, is 256): they run as one
#: batch, and a page's slip (500) would hold the queue for hours.
UI_MAX_IMAGES = 16

#: The AdaIN radio's choices -> text_to_image's ``adain`` (None: the preset's).
ADAIN_CHOICES = {"preset": None, "on": True, "off": False}


def adain_value(choice: str) -> bool | None:
    """The AdaIN radio -> the tasks' ``adain`` (None: the preset's)."""
    if choice not in ADAIN_CHOICES:
        raise UserError(f"AdaIN '{choice}' is not one of {', '.join(ADAIN_CHOICES)}")
    return ADAIN_CHOICES[choice]


def start_t_box(tab: str) -> gr.Textbox:
    return blank_number("Start timestep", tab, "start-t", "blank: every step; else AD only below it (1-1000)")


def _count(value: int | None) -> int:
    """The Images box, already a whole number within 1..UI_MAX_IMAGES (WebUI.wire checks it): blank is one image."""
    return 1 if value is None else value


def transfer_tab(ui: WebUI, tab: str, first: str, second: str, examples: list[list]) -> None:
    """Style or appearance transfer: a target, a reference (and more), the optimisation settings."""
    preset = PRESETS[tab]
    with gr.Row():
        target = image_input(first, f"{tab}-target")
        reference = image_input(second, f"{tab}-reference")
    with gr.Row():
        steps = int_box("Steps", preset.steps, tab, "steps", minimum=1)
        size = size_box(tab)
        seed = seed_box(tab)
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            more = gr.File(label=f"More {second.lower()}s (attended to together)", file_count="multiple",
                           file_types=["image"], elem_id=f"{tab}-more")
            mask = mask_painter(f"Paint over the {first.lower()} what to change (optional; no strokes: all of it)",
                                f"{tab}-mask")
        options = ui.optimise_options(tab, preset, content_weight=True)
        options.update(ui.preview_options(tab))
    panel = ui.panel(tab)
    ui.examples(examples, [target, reference])
    ui.validate_on_upload(target, reference)
    target.change(content_to_paint_on, target, mask, queue=False, show_progress="hidden")
    fields = dict(target=target, reference=reference, more=more, mask=mask, steps=steps, size=size, seed=seed,
                  **options)

    def arguments(s: dict) -> TaskCall:
        target, references = ("content", "style") if tab == "style" else ("structure", "appearance")
        return TaskCall(tab, {
            target: required(s["target"], first.lower()),
            references: [required(s["reference"], second.lower()), *file_paths(s["more"])],
            "steps": whole(s["steps"]), "iters": whole(s["iters"], "Adam iterations per step"), "lr": s["lr"],
            "content_weight": s["content_weight"], "attention_scale": s["attention_scale"],
            "layers": text_value(s["layers"]), "size": size_value(s["size"]), "seed": seed_value(s["seed"]),
            "tile": tile_value(s["tile"]), "tune_vae": bool(s["tune_vae"]),
            "reference_fit": reference_fit_value(s["reference_fit"]), "mask": s["mask"]})

    def command(s: dict, model: DiffusionModel, output: str) -> str:
        words = [tab, file_name(s["target"]), file_name(s["reference"]), *map(file_name, file_paths(s["more"]))]
        return cli_command(words, dict(
            output=output, **ui.common_cli(model, seed_value(s["seed"])), steps=s["steps"], iters=s["iters"],
            lr=s["lr"], content_weight=s["content_weight"], attention_scale=s["attention_scale"],
            layers=text_value(s["layers"]), size=text_value(s["size"]), tile=tile_value(s["tile"]),
            tune_vae=True if s["tune_vae"] else None, reference_fit=fit_cli(s["reference_fit"]),
            mask=s["mask"]))  # the painted mask where it is kept (WebUI.wire)

    ui.wire(tab, panel, fields, arguments, command)


def t2i_tab(ui: WebUI) -> None:
    """Style-specific text-to-image, SD 1.5 or SDXL presets, with ControlNet."""
    tab, sd15, sdxl = "t2i", PRESETS["t2i"], PRESETS["t2i-sdxl"]

    def blank(field: str) -> str:
        return f"blank: preset ({getattr(sd15, field)} SD 1.5, {getattr(sdxl, field)} SDXL)"

    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id=f"{tab}-negative")
        style = image_input("Style image", f"{tab}-style")
    with gr.Row():
        num = int_box("Images", 1, tab, "num", minimum=1, maximum=UI_MAX_IMAGES)
        steps = blank_number("Steps", tab, "steps", blank("steps"))
        guidance = blank_number("Guidance", tab, "guidance", blank("guidance"))
        size = size_box(tab)
        seed = seed_box(tab)
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            iters = blank_number("Adam iterations per step", tab, "iters", blank("iters"))
            lr = blank_number("Learning rate", tab, "lr", blank("lr"))
            adain = gr.Radio(list(ADAIN_CHOICES), value="preset", label="AdaIN", elem_id=f"{tab}-adain")
            start_t = start_t_box(tab)
        with gr.Row():
            guidance_rescale = blank_number("Guidance rescale (0.7 for zero-terminal-SNR models)", tab,
                                            "guidance-rescale", "blank: 0 (off)")
            layers = gr.Textbox("", label="Layers", placeholder="default: the model's last six",
                                elem_id=f"{tab}-layers")
            reference_fit = reference_fit_radio(tab)
            tune_vae = gr.Checkbox(False, label="Fine-tune the VAE decoder on the style images for this run",
                                   elem_id=f"{tab}-tune-vae")
            tile = gr.Dropdown(TILE_CHOICES, value="none", label="Seamless tiling (a pattern)", elem_id=f"{tab}-tile")
        with gr.Row():
            controlnet = gr.Textbox("", label="ControlNet (Hub id, folder or weights file)",
                                    elem_id=f"{tab}-controlnet", placeholder="e.g. lllyasviel/control_v11p_sd15_canny")
            control_image = image_input("Control image", f"{tab}-control-image")
            with gr.Column():
                control = gr.Radio(["none", "canny"], value="none", label="Preprocessor",
                                   elem_id=f"{tab}-control")
                control_scale = float_box("Control scale",
                                          api_default("generate", "text_to_image", "control_scale"),
                                          tab, "control-scale")
        preview = ui.preview_options(tab)
    panel = ui.panel(tab)
    ui.examples([["a deer in a forest", "watercolor-cat.jpg"], ["a lighthouse by the sea", "starry-night.jpg"]],
                   [prompt, style])
    ui.validate_on_upload(style, control_image)
    fields = dict(prompt=prompt, negative=negative, style=style, num=num, steps=steps, guidance=guidance,
                  guidance_rescale=guidance_rescale, size=size, seed=seed, iters=iters, lr=lr, adain=adain,
                  start_t=start_t, layers=layers,
                  reference_fit=reference_fit, tune_vae=tune_vae, tile=tile, controlnet=controlnet,
                  control_image=control_image, control=control, control_scale=control_scale, **preview)

    def options(s: dict) -> dict:
        return dict(steps=number_value(s["steps"], "Steps", int),
                    iters=number_value(s["iters"], "Adam iterations per step", int),
                    lr=number_value(s["lr"], "Learning rate"), guidance=number_value(s["guidance"], "Guidance"),
                    guidance_rescale=number_value(s["guidance_rescale"], "Guidance rescale"),
                    adain=adain_value(s["adain"]), start_t=number_value(s["start_t"], "Start timestep", int),
                    layers=text_value(s["layers"]), reference_fit=reference_fit_value(s["reference_fit"]),
                    tune_vae=bool(s["tune_vae"]), controlnet=text_value(s["controlnet"]),
                    control=s["control"])

    def arguments(s: dict) -> TaskCall:
        # the slider has a value also with no ControlNet chosen, which a run without one refuses
        extra = {"control_scale": s["control_scale"]} if s["control_scale"] is not None and \
            options(s)["controlnet"] else {}
        return TaskCall(tab, dict(prompt=s["prompt"], style=required(s["style"], "style image"),
                                  negative_prompt=s["negative"] or None, num_images=_count(s["num"]),
                                  control_image=s["control_image"], size=size_value(s["size"]),
                                  seed=seed_value(s["seed"]), tile=tile_value(s["tile"]),
                                  allow_pickle=ui.slot.allow_pickle,  # the UI's launch option
                                  **options(s), **extra))

    def command(s: dict, model: DiffusionModel, output: str) -> str:
        o = options(s)
        return cli_command([tab], dict(
            style=file_name(s["style"]), prompt=s["prompt"], output=output, negative_prompt=s["negative"] or None,
            num_images=s["num"] if s["num"] != 1 else None, **ui.common_cli(model, seed_value(s["seed"])),
            steps=o["steps"], iters=o["iters"], lr=o["lr"], guidance=o["guidance"],
            guidance_rescale=o["guidance_rescale"], adain=o["adain"],
            start_t=o["start_t"], layers=o["layers"], reference_fit=fit_cli(o["reference_fit"]),
            tune_vae=True if o["tune_vae"] else None, size=text_value(s["size"]), tile=tile_value(s["tile"]),
            controlnet=o["controlnet"],
            control_image=file_name(s["control_image"]), control=o["control"] if o["control"] != "none" else None,
            control_scale=s["control_scale"] if o["controlnet"] else None))

    ui.wire(tab, panel, fields, arguments, command)


def texture_tab(ui: WebUI) -> None:
    """Texture synthesis in its four modes: optimise, sample, layout (SDEdit), masked."""
    tab = "texture"
    first = PRESETS[TEXTURE_MODES["optimise"]]
    with gr.Row():
        reference = image_input("Texture image", f"{tab}-reference")
        with gr.Column():
            mode = gr.Radio(list(TEXTURE_MODES), value="optimise", label="Mode", elem_id=f"{tab}-mode",
                            info="optimise: Algorithm 1 · sample: AD-guided sampling · layout: SDEdit from a "
                                 "colour layout · masked: label maps")
            with gr.Row():
                num = int_box("Images", 1, tab, "num", minimum=1, maximum=UI_MAX_IMAGES)
                steps = int_box("Steps", first.steps, tab, "steps", minimum=1)
                seed = seed_box(tab)
            size = size_box(tab)
    with gr.Row(visible=False) as layout_row:
        layout = image_input("Layout image", f"{tab}-layout")
        strength = float_box("Strength", api_default("generate", "layout_texture", "strength"), tab, "strength",
                             info="noise to start from, in (0, 1]: 1 ignores the layout")
    with gr.Row(visible=False) as labels_row:
        ref_labels = image_input("Reference label map", f"{tab}-ref-labels")
        target_labels = image_input("Target label map", f"{tab}-target-labels")
    with gr.Accordion("Advanced", open=False):
        more = gr.File(label="More texture images", file_count="multiple", file_types=["image"],
                       elem_id=f"{tab}-more")  # not in masked mode: its one Reference label map is one texture's
        options = ui.optimise_options(tab, first, content_weight=False)
        with gr.Row(visible=False) as content_row:  # layout and masked modes: the layout / label init is a content
            options["content_weight"] = float_box("Content weight", first.content_weight, tab, "content-weight")
        with gr.Row(visible=False) as sampling_row:
            options["adain"] = gr.Radio(list(ADAIN_CHOICES), value="preset", label="AdaIN (preset: off)",
                                        elem_id=f"{tab}-adain")
            options["start_t"] = start_t_box(tab)
        options.update(ui.preview_options(tab))
    panel = ui.panel(tab)

    def on_mode(m: str):
        p = PRESETS[TEXTURE_MODES[m]]
        return (gr.update(visible=m == "layout"), gr.update(visible=m == "masked"),
                gr.update(visible=m in CONTENT_MODES), gr.update(visible=m in SAMPLING_MODES),
                gr.update(visible=m != "masked"), p.steps, p.iters, p.lr, p.content_weight)

    mode.change(on_mode, mode, [layout_row, labels_row, content_row, sampling_row, more, steps, options["iters"],
                                options["lr"], options["content_weight"]], queue=False)
    ui.examples([["wood-rings.jpg", "optimise", None, None, None],
                    ["woven-rattan.jpg", "sample", None, None, None],
                    ["wood-and-rattan.jpg", "layout", "disc-labels.png", None, None],
                    ["wood-and-rattan.jpg", "masked", None, "wood-and-rattan-labels.png", "disc-labels.png"]],
                   [reference, mode, layout, ref_labels, target_labels])
    ui.validate_on_upload(reference, layout, ref_labels, target_labels)
    fields = dict(reference=reference, mode=mode, num=num, steps=steps, seed=seed, size=size, layout=layout,
                  strength=strength, ref_labels=ref_labels, target_labels=target_labels, more=more, **options)

    def more_textures(s: dict) -> list[str]:
        """The hidden box's files are not used: masked mode pairs its one label map with the one texture."""
        return [] if s["mode"] == "masked" else file_paths(s["more"])

    def arguments(s: dict) -> TaskCall:
        if s["mode"] not in TEXTURE_MODES:
            raise UserError(f"texture mode '{s['mode']}' is not one of {', '.join(TEXTURE_MODES)}")
        args = dict(reference=[required(s["reference"], "texture image"), *more_textures(s)],
                    num=_count(s["num"]), steps=whole(s["steps"]), iters=whole(s["iters"], "Adam iterations per step"),
                    lr=s["lr"], attention_scale=s["attention_scale"], layers=text_value(s["layers"]),
                    size=size_value(s["size"]), seed=seed_value(s["seed"]), tile=tile_value(s["tile"]),
                    tune_vae=bool(s["tune_vae"]), reference_fit=reference_fit_value(s["reference_fit"]))
        if s["mode"] in CONTENT_MODES and s["content_weight"] is not None:
            args["content_weight"] = s["content_weight"]
        if s["mode"] in SAMPLING_MODES:
            args.update(adain=adain_value(s["adain"]), start_t=number_value(s["start_t"], "Start timestep", int))
        if s["mode"] == "layout":
            args["layout"] = required(s["layout"], "layout image")
            if s["strength"] is not None:
                args["strength"] = s["strength"]
        if s["mode"] == "masked":
            args.update(ref_labels=required(s["ref_labels"], "reference label map"),
                        target_labels=required(s["target_labels"], "target label map"))
        return TaskCall(TEXTURE_TASKS[s["mode"]], args)

    def command(s: dict, model: DiffusionModel, output: str) -> str:
        m = s["mode"]
        words = [tab, file_name(s["reference"]), *map(file_name, more_textures(s))]
        return cli_command(words, dict(
            output=output, mode="sample" if m == "sample" else None,
            layout=file_name(s["layout"]) if m == "layout" else None,
            strength=s["strength"] if m == "layout" else None,
            ref_labels=file_name(s["ref_labels"]) if m == "masked" else None,
            target_labels=file_name(s["target_labels"]) if m == "masked" else None,
            num=s["num"] if s["num"] != 1 else None, **ui.common_cli(model, seed_value(s["seed"])),
            steps=s["steps"], iters=s["iters"], lr=s["lr"], attention_scale=s["attention_scale"],
            content_weight=s["content_weight"] if m in CONTENT_MODES else None,
            adain=adain_value(s["adain"]) if m in SAMPLING_MODES else None,
            start_t=number_value(s["start_t"], "Start timestep", int) if m in SAMPLING_MODES else None,
            layers=text_value(s["layers"]), size=text_value(s["size"]),
            tile=tile_value(s["tile"]), tune_vae=True if s["tune_vae"] else None,
            reference_fit=fit_cli(s["reference_fit"])))

    ui.wire(tab, panel, fields, arguments, command)


def expand_tab(ui: WebUI) -> None:
    """Texture expansion (MultiDiffusion) to any canvas size."""
    tab, preset = "expand", PRESETS["expand"]
    with gr.Row():
        reference = image_input("Texture image", f"{tab}-reference")
        with gr.Column():
            size = gr.Textbox("", label="Size (WIDTHxHEIGHT)", placeholder="e.g. 1536x512",
                              elem_id=f"{tab}-size")
            with gr.Row():
                steps = int_box("Steps", preset.steps, tab, "steps", minimum=1)
                seed = seed_box(tab)
            tile = gr.Dropdown(TILE_CHOICES, value="none", label="Seamless tiling", elem_id=f"{tab}-tile")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            iters = int_box("Adam iterations per step", preset.iters, tab, "iters", minimum=0)
            lr = float_box("Learning rate", preset.lr, tab, "lr")
            view = int_box("View side (latents)", api_default("textures", "expand_texture", "view"), tab, "view",
                           minimum=1)
            stride = int_box("View stride (latents)", preset.stride, tab, "stride", minimum=1)
            view_batch = int_box("Views per batch", api_default("textures", "expand_texture", "view_batch"),
                              tab, "view-batch", minimum=1)
            reference_fit = reference_fit_radio(tab)
        preview = ui.preview_options(tab)
    panel = ui.panel(tab)
    ui.examples([["woven-rattan.jpg"], ["wood-rings.jpg"]], [reference])
    ui.validate_on_upload(reference)
    fields = dict(reference=reference, size=size, steps=steps, seed=seed, tile=tile, iters=iters, lr=lr,
                  view=view, stride=stride, view_batch=view_batch, reference_fit=reference_fit, **preview)

    def arguments(s: dict) -> TaskCall:
        size = size_value(s["size"], multiple=EXPAND_SIZE_MULTIPLE)
        if size is None:
            raise UserError("size is missing; enter the canvas as WIDTHxHEIGHT, e.g. 1536x512")
        extra = {"view_batch": whole(s["view_batch"], "views per batch")} if s["view_batch"] is not None else {}
        if s["view"] is not None:  # a canvas whose short side is under one view of the default (a banner)
            extra["view"] = whole(s["view"], "view side")
        return TaskCall(tab, dict(reference=required(s["reference"], "texture image"),
                                  size=size if isinstance(size, tuple) else (size, size), steps=whole(s["steps"]),
                                  iters=whole(s["iters"], "Adam iterations per step"), lr=s["lr"],
                                  stride=whole(s["stride"], "stride"),
                                  tile=tile_value(s["tile"]), seed=seed_value(s["seed"]),
                                  reference_fit=reference_fit_value(s["reference_fit"]), **extra))

    def command(s: dict, model: DiffusionModel, output: str) -> str:
        return cli_command([tab, file_name(s["reference"])], dict(
            output=output, size=(s["size"] or "").strip(), **ui.common_cli(model, seed_value(s["seed"])),
            steps=s["steps"], iters=s["iters"], lr=s["lr"], view=s["view"], stride=s["stride"],
            view_batch=s["view_batch"],
            tile=tile_value(s["tile"]), reference_fit=fit_cli(s["reference_fit"])))

    ui.wire(tab, panel, fields, arguments, command)


def check_vae_tab(references: list[str], steps: int, lr: float | None, reference_fit: str | None) -> None:
    """What the tuning refuses that needs no model, refused before the model loads (as the other tabs' checks)."""
    from ..images import load_image
    from ..tasks.setup import check_reference_fit
    from ..tasks.vae_tuning import check_tuning

    for path in references:
        load_image(path, what="reference image")
    check_tuning(steps, VAE_TUNING_LR if lr is None else lr)
    if reference_fit is not None:
        check_reference_fit(reference_fit)


def vae_tab(ui: WebUI) -> None:
    """VAE*: fine-tune the decoder on a reference, save it, use it for the next runs."""
    tab = "vae"
    gr.Markdown("Fine-tune only the VAE decoder on a reference (ALGORITHM.md §5). The tuned decoder is saved "
                "as a diffusers folder and, if you keep the box ticked, used by the next runs.")
    with gr.Row():
        reference = image_input("Reference image", f"{tab}-reference")
        with gr.Column():
            steps = int_box("Steps", api_default("vae_tuning", "finetune_vae", "steps"), tab, "steps", minimum=1)
            lr = float_box("Learning rate", api_default("vae_tuning", "finetune_vae", "lr"), tab, "lr")
            fit = reference_fit_radio(tab)
            use = gr.Checkbox(True, label="Use the tuned decoder for the next runs", elem_id=f"{tab}-use")
            with gr.Row():
                run = gr.Button("Fine-tune decoder", variant="primary", elem_id=f"{tab}-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id=f"{tab}-cancel")
    more = gr.File(label="More reference images (the decoder fits them all)", file_count="multiple",
                   file_types=["image"], elem_id=f"{tab}-more")
    status = gr.Markdown(elem_id=f"{tab}-status", min_height=48)
    folder = gr.Textbox(label="Saved VAE folder", interactive=False, elem_id=f"{tab}-folder")
    archive = gr.File(label="Download (zip)", interactive=False, elem_id=f"{tab}-zip")
    cli = gr.Textbox(label="Same run from the terminal", buttons=["copy"], interactive=False,
                     elem_id=f"{tab}-cli")
    ui.examples([["wood-rings.jpg"], ["watercolor-cat.jpg"]], [reference])
    ui.validate_on_upload(reference)

    def tune(values: dict, request: gr.Request | None, progress):
        from ..tasks.vae_tuning import finetune_vae, save_vae

        ref, n, rate, use_it = values[reference], values[steps], values[lr], values[use]
        model_id, vae_id = values[ui.model_box], values[ui.vae_box]
        skip = gr.skip()
        try:
            n = whole(n, "Steps", steps.bounds)
            given = [required(ref, "reference image"), *file_paths(values[more])]
            check_vae_tab(given, n, rate, reference_fit_value(values[fit]))  # before the model loads and any copy
            # the copies kept beside the results: the folder's attndistill.json names them for reruns
            references = keep_uploads(given, ui.outputs)
        except UserError as exc:
            message = page_message(exc)  # an upload by its own name, not Gradio's cache
            yield FAILED.format(message), None, None, "", skip  # not the last tuning's "done" beside this error
            raise gr.Error(message) from None
        extra = {k: v for k, v in (("steps", n), ("lr", rate), ("reference_fit", reference_fit_value(values[fit])))
                 if v is not None}
        job, model = yield from ui.follow(
            request, tab, model_id, vae_id,
            # the tab's whole run is the tuning: its steps are the run's own, not a stage of it
            lambda model, callback: finetune_vae(references, model=model, progress=False,
                                                 callback=lambda info: callback(replace(info, stage="")), **extra),
            progress, line=lambda text, _: (text, skip, skip, skip, skip))
        if job is None or job.cancelled:
            return
        try:
            if job.error is not None:
                raise job.error
            # a free name, as for images: two servers sharing the outputs folder pick the same one in a second
            out = ui.save_new("vae", "", lambda path: save_vae(job.result, path))
            zipped = shutil.make_archive(str(out), "zip", root_dir=out)
        except Exception as exc:
            message = page_message(exc)
            yield FAILED.format(message), None, None, "", skip
            raise gr.Error(message) from None
        finally:
            job.result = None  # the tuned copy's weights: saved, not kept in memory
        text = f"done in {job.seconds:.1f} s · saved `{out}`"
        text += "; the VAE box (Model) now points to it" if use_it else ""
        options = {k: v for k, v in ui.common_cli(model, 0).items() if k != "seed"}
        words = ["finetune-vae", file_name(ref), *map(file_name, file_paths(values[more]))]
        command = cli_command(words, dict(output=out.name, **options, steps=n, lr=rate,
                                          reference_fit=fit_cli(values[fit])))
        yield text, str(out), zipped, command, (str(out) if use_it else skip)

    ui.bind(tab, run, cancel, tune, {reference, more, fit, steps, lr, use, ui.model_box, ui.vae_box},
               [status, folder, archive, cli, ui.vae_box], status)
