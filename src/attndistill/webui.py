"""Web UI (Gradio): every task of the library in the browser, one job at a time.

The page only parses input and calls the public API (``tasks``, ``generate``,
``textures``); those are imported inside the handlers, so a module that fails
to import breaks one tab, not the app. A run executes in a worker thread whose
progress callback feeds the page (loss, a cheap preview every few steps) and
raises to cancel between steps. Results are PNGs carrying their parameters
and a ``attndistill ...`` command that reproduces them from the terminal.

Start it with ``attndistill ui`` or ``WebUI(model=...).launch()``.
"""

import itertools
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image

from .errors import UserError
from .images import save_png
from .models import DEFAULT_MODEL, DiffusionModel
from .perf import pixel_switches
from .presets import PRESETS, Preset
from .webui_fields import (
    api_default,
    blank_number,
    file_name,
    file_paths,
    float_box,
    image_input,
    int_box,
    number_value,
    page_message,
    required,
    seed_box,
    seed_value,
    size_box,
    size_value,
    tile_value,
    upload_check,
    whole,
)
from .webui_jobs import (  # re-exported: the page's building blocks
    Callback,
    Cancelled,
    Job,
    ModelSlot,
    RunBoard,
    Update,
    cli_command,
    error_message,
    preview_image,
)

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).parent / "examples"
#: Concurrency group of every event that touches the model: one job at a time on the device.
DEVICE_QUEUE = "device"
TILE_CHOICES = ["none", "x", "y", "xy"]
#: ``expand --size`` rounds to whole latents (the CLI's rounding), not to the UNet's multiple.
EXPAND_SIZE_MULTIPLE = 8
#: Attempts at a free result name before giving up (two servers may share an outputs folder).
NAME_ATTEMPTS = 1000
TEXTURE_MODES = {"optimise": "texture", "sample": "texture-sample", "layout": "texture-sample",
                 "masked": "texture-masked"}  # UI mode -> preset

__all__ = ["DEVICE_QUEUE", "Cancelled", "Job", "ModelSlot", "Update", "WebUI", "cli_command", "error_message",
           "preview_image"]


@dataclass
class Panel:
    """The output side of a tab: buttons, progress, preview, results and the CLI command."""

    run: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    preview: gr.Image
    gallery: gr.Gallery
    files: gr.File
    cli: gr.Textbox

    @property
    def outputs(self) -> list:
        return [self.status, self.preview, self.gallery, self.files, self.cli]


def _key(request: gr.Request | None, tab: str) -> tuple[str, str]:
    """(page, tab): whose runs a Cancel button acts on."""
    return (request.session_hash if request is not None else "local", tab)


class WebUI:
    """The Gradio app: one :class:`ModelSlot`, one job at a time, results saved under ``outputs``."""

    def __init__(self, *, model: str | None = None, vae: str | None = None, device: str | None = None,
                 dtype: str | None = None, outputs: str | Path | None = None, perf=None) -> None:
        self.slot = ModelSlot(device=device, dtype=dtype, perf=perf)
        self.model, self.vae = model or DEFAULT_MODEL, vae
        self.outputs = Path(outputs) if outputs else Path(tempfile.mkdtemp(prefix="attndistill-ui-"))
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.runs = RunBoard()  # each page's runs of each tab, for their Cancel buttons
        self._counter = itertools.count()

    # -- running ---------------------------------------------------------------------------------

    def _model(self, model: str | None, vae: str | None) -> DiffusionModel:
        try:
            return self.slot.get(model, vae)
        except Exception as exc:
            raise gr.Error(page_message(exc)) from None

    def _save(self, image: Image.Image, task: str) -> Path:
        """Save under a new name: never over a file, even one another server just wrote to the same folder."""
        self.outputs.mkdir(parents=True, exist_ok=True)  # deleted while the server ran: made again
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for _ in range(NAME_ATTEMPTS):
            path = self.outputs / f"{task}-{stamp}-{next(self._counter):03d}.png"
            if not path.exists():
                try:
                    return save_png(image, path)
                except UserError:
                    if not path.exists():  # not a name taken in the meantime: a real failure
                        raise
        raise UserError(f"no free file name for the result in '{self.outputs}'; clear that folder")

    def _common_cli(self, model: DiffusionModel, seed: int) -> dict:
        options = {"model": model.source if model.source != DEFAULT_MODEL else None,
                   "vae": self.slot.key[1] if self.slot.key else None, "seed": seed}
        for key, value in (("device", self.slot.device), ("dtype", self.slot.dtype)):
            options[key] = None if value in (None, "auto") else value
        return options | pixel_switches(model.perf)  # the server's speed flags that change pixels

    def execute(self, request: gr.Request | None, progress, *, task: str, settings: dict,
                call: Callable[[DiffusionModel, Callback], object],
                command: Callable[[DiffusionModel, str], str]) -> Iterator[tuple]:
        """The generator behind every Run button.

        Loads the model, runs ``call(model, callback)`` as a :class:`Job`, streams progress and previews,
        then saves the images as PNGs and yields them with ``command(model, output_name)``.
        """
        skip = gr.skip()
        every = whole(settings.get("preview_every"), "preview interval") or 0
        side = whole(settings.get("preview_size"), "preview size") or 32
        loaded: list[DiffusionModel] = []

        def work(job: Job, callback: Callback):
            loaded.append(self._load_in_job(job, settings["model"], settings["vae"]))
            return call(loaded[0], callback)

        job = yield from self._follow(request, task, work, progress, every=every,
                                      preview=lambda latents: preview_image(loaded[0], latents, side=side),
                                      line=lambda text, image: (text, skip if image is None else image, skip, skip,
                                                                skip))
        if job is None or job.cancelled:
            return
        try:
            if job.error is not None:
                raise job.error
            images = job.result if isinstance(job.result, list) else [job.result]
            paths = [self._save(img, task) for img in images]
        except Exception as exc:  # the run or saving its result failed: say so, and show no stale results
            message = page_message(exc)
            yield f"failed: {message}", None, None, None, ""
            raise gr.Error(message) from None
        loss = f" · final loss {job.last.loss:.4f}" if job.last else ""
        where = paths[0].parent
        status = f"done in {job.seconds:.1f} s{loss} · saved {', '.join(p.name for p in paths)} in `{where}`"
        output = paths[0].name if len(paths) == 1 else f"{task}.png"
        yield (status, skip, [(str(p), p.name) for p in paths], [str(p) for p in paths],
               command(loaded[0], output))

    def _load_in_job(self, job: Job, model: str | None, vae: str | None) -> DiffusionModel:
        """The model, loaded in the job's thread: Cancel is heard while it loads, and acts right after."""
        loaded = self.slot.get(model, vae)
        job.stop_if_cancelled("cancelled before the first step")
        return loaded

    def _follow(self, request: gr.Request | None, tab: str, work: Callable[[Job, Callback], object], progress, *,
                line: Callable[[str, Image.Image | None], tuple], every: int = 0, preview=None) -> Iterator[tuple]:
        """Run ``work(job, callback)`` as this page's job of ``tab``, yield ``line(status, preview)`` as it
        goes, and return the job (None when Cancel came before it started).

        A cancelled job's last line says so.
        """
        job = Job(lambda callback: work(job, callback), preview=preview, every=every)
        if not self.runs.attach(_key(request, tab), job):
            yield line("cancelled before it started; nothing was run", None)
            return None
        progress(0, desc="loading the model" if self.slot.model is None else "starting")
        try:
            job.start()
            for u in job.updates():
                progress((u.step, u.total), desc=f"loss {u.loss:.4f}")
                yield line(f"step {u.step}/{u.total} · loss {u.loss:.4f}", u.preview)
        finally:
            job.cancel()  # the page went away mid-run: stop the worker at its next step
            job.wait()
        if job.cancelled:
            where = f" after step {job.last.step} of {job.last.total}" if job.last else ""
            yield line(f"cancelled{where}; nothing was saved", None)
        return job

    def cancel(self, tab: str, request: gr.Request | None) -> None:
        """Cancel this page's run of ``tab`` after its current step, and withdraw the ones still waiting."""
        gr.Info(self.runs.cancel(_key(request, tab)))

    def load(self, model: str, vae: str):
        self._model(model, vae)
        return self.slot.describe()

    # -- layout ----------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        """The Blocks app (not launched)."""
        with gr.Blocks(title="attndistill", analytics_enabled=False) as demo:
            gr.Markdown("## Attention Distillation\nTransfer style, appearance and texture with Stable "
                        "Diffusion. One job runs at a time; others wait in the queue. Results are saved in "
                        f"`{self.outputs}`.")
            with gr.Accordion("Model", open=False):
                with gr.Row():
                    self.model_box = gr.Textbox(self.model, label="Model", elem_id="model-box",
                                                info="Hub id, diffusers folder or .safetensors file", scale=3)
                    self.vae_box = gr.Textbox(self.vae or "", label="VAE folder (optional)", elem_id="vae-box",
                                              info="e.g. a decoder fine-tuned in the VAE tab", scale=2)
                    load_btn = gr.Button("Load", scale=0)
                model_status = gr.Markdown(elem_id="model-status")
            load_btn.click(self.load, [self.model_box, self.vae_box], model_status,
                           concurrency_limit=1, concurrency_id=DEVICE_QUEUE)
            demo.load(self.slot.describe, None, model_status, queue=False)
            with gr.Tabs():
                with gr.Tab("Style transfer", id="style"):
                    self._transfer_tab("style", "Content image", "Style image",
                                       [["horse.jpg", "watercolor-cat.jpg"], ["golden-gate.jpg", "starry-night.jpg"]])
                with gr.Tab("Appearance transfer", id="appearance"):
                    self._transfer_tab("appearance", "Structure image", "Appearance image",
                                       [["golden-gate.jpg", "watercolor-cat.jpg"], ["horse.jpg", "wood-rings.jpg"]])
                with gr.Tab("Text to image", id="t2i"):
                    self._t2i_tab()
                with gr.Tab("Texture", id="texture"):
                    self._texture_tab()
                with gr.Tab("Expansion", id="expand"):
                    self._expand_tab()
                with gr.Tab("VAE fine-tuning", id="vae"):
                    self._vae_tab()
        return demo

    def _panel(self, tab: str) -> Panel:
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id=f"{tab}-run")
            cancel = gr.Button("Cancel", variant="stop", elem_id=f"{tab}-cancel")
        status = gr.Markdown(elem_id=f"{tab}-status", min_height=48)  # room for the progress bar
        with gr.Row():
            preview = gr.Image(label="Live preview", interactive=False, elem_id=f"{tab}-preview", height=256)
            gallery = gr.Gallery(label="Results", format="png", elem_id=f"{tab}-gallery", columns=2, height=256,
                                 buttons=["download", "fullscreen"], interactive=False)
        files = gr.File(label="PNG files (with their parameters)", file_count="multiple", interactive=False,
                        elem_id=f"{tab}-files")
        cli = gr.Textbox(label="Same run from the terminal", buttons=["copy"], interactive=False,
                         elem_id=f"{tab}-cli")
        return Panel(run, cancel, status, preview, gallery, files, cli)

    def _preview_options(self, tab: str) -> dict:
        with gr.Row():
            return {"preview_every": int_box("Live preview every N steps (0: off)", 5, tab, "preview-every", minimum=0),
                    "preview_size": int_box("Preview size (latents, decoded by the VAE)", 32, tab, "preview-size",
                                         minimum=4)}

    def _wire(self, tab: str, panel: Panel, fields: dict, call, command) -> None:
        """Run button -> :meth:`execute` with the tab's fields as a dict of values by name."""
        components = dict(fields, model=self.model_box, vae=self.vae_box)
        names = {c: n for n, c in components.items()}

        def run(values: dict, request: gr.Request, progress=gr.Progress()):
            try:  # whole-number boxes: 1.5 steps is an error, not 2 steps
                settings = {names[c]: whole(v, c.whole) if getattr(c, "whole", None) else v
                            for c, v in values.items()}
            except UserError as exc:
                raise gr.Error(str(exc)) from None
            yield from self.execute(request, progress, task=tab, settings=settings,
                                    call=partial(call, settings), command=partial(command, settings))

        self._bind(tab, panel.run, panel.cancel, run, set(components.values()), panel.outputs, panel.status)

    def _bind(self, tab: str, run: gr.Button, cancel: gr.Button, fn: Callable, inputs, outputs: list,
              status: gr.Markdown) -> None:
        """Run -> ``fn`` in the one device queue; Cancel -> this page's run of ``tab``, running or waiting."""

        ticket = gr.State(None)  # this click's place on the run board, handed from the click to its run

        def queued(request: gr.Request) -> int:  # plain functions: Gradio finds the request by annotation
            return self.runs.queued(_key(request, tab))

        def start(values: dict, request: gr.Request, progress=gr.Progress()):
            key = _key(request, tab)
            run = self.runs.start(key, values.pop(ticket, None))
            if run is None:
                yield {status: "cancelled while it waited in the queue; nothing was run"}
                return
            try:
                yield from fn(values, request, progress)
            finally:
                self.runs.finish(key, run)

        def cancel_tab(request: gr.Request) -> None:
            self.cancel(tab, request)

        cancel.click(cancel_tab, None, None, concurrency_limit=None, show_progress="hidden", api_visibility="private")
        # the click first takes a ticket (no queue), so Cancel can withdraw the run before it starts
        run.click(queued, None, ticket, queue=False, show_progress="hidden", api_visibility="private").then(
            start, {*inputs, ticket}, outputs, concurrency_limit=1, concurrency_id=DEVICE_QUEUE,
            show_progress_on=[status], api_name=tab)

    @staticmethod
    def _validate_on_upload(*images: gr.Image) -> None:
        for image in images:
            # queued (messages reach the page only through the queue), never behind a running job
            image.upload(upload_check(str(image.label).lower()), image, image, preprocess=False,
                         concurrency_limit=None, show_progress="hidden", api_visibility="private")

    @staticmethod
    def _examples(rows: list[list], inputs: list) -> None:
        resolved = [[str(EXAMPLES / v) if isinstance(v, str) and v.endswith((".jpg", ".png")) else v
                     for v in row] for row in rows]
        gr.Examples(resolved, inputs, cache_examples=False)

    def _optimise_options(self, tab: str, preset: Preset, *, content_weight: bool) -> dict:
        with gr.Row():
            # 0 is plain DDIM in the texture tab's sampling modes; the tasks refuse it where it means nothing
            fields = {"iters": int_box("Adam iterations per step", preset.iters, tab, "iters",
                                    minimum=0 if tab == "texture" else 1),
                      "lr": float_box("Learning rate", preset.lr, tab, "lr"),
                      "attention_scale": float_box("Attention scale", preset.attention_scale, tab, "attention-scale")}
            if content_weight:
                fields["content_weight"] = float_box("Content weight", preset.content_weight, tab, "content-weight")
        with gr.Row():
            fields.update(
                layers=gr.Textbox("", label="Layers", placeholder="default: the model's last six, e.g. 10-15",
                                  elem_id=f"{tab}-layers"),
                tile=gr.Dropdown(TILE_CHOICES, value="none", label="Seamless tiling", elem_id=f"{tab}-tile"),
                tune_vae=gr.Checkbox(False, label="Fine-tune the VAE decoder on the reference for this run",
                                     elem_id=f"{tab}-tune-vae"))
        return fields

    def _transfer_tab(self, tab: str, first: str, second: str, examples: list[list]) -> None:
        preset = PRESETS[tab]
        with gr.Row():
            target = image_input(first, f"{tab}-target")
            reference = image_input(second, f"{tab}-reference")
        with gr.Row():
            steps = int_box("Steps", preset.steps, tab, "steps", minimum=1)
            size = size_box(tab)
            seed = seed_box(tab)
        with gr.Accordion("Advanced", open=False):
            more = gr.File(label=f"More {second.lower()}s (attended to together)", file_count="multiple",
                           file_types=["image"], elem_id=f"{tab}-more")
            options = self._optimise_options(tab, preset, content_weight=True)
            options.update(self._preview_options(tab))
        panel = self._panel(tab)
        self._examples(examples, [target, reference])
        self._validate_on_upload(target, reference)
        fields = dict(target=target, reference=reference, more=more, steps=steps, size=size, seed=seed, **options)

        def call(s: dict, model: DiffusionModel, callback: Callback):
            from . import tasks

            fn = tasks.style_transfer if tab == "style" else tasks.appearance_transfer
            target = required(s["target"], first.lower())
            refs = [required(s["reference"], second.lower()), *file_paths(s["more"])]
            return fn(target, refs, model=model, steps=whole(s["steps"]),
                      iters=whole(s["iters"], "iterations"), lr=s["lr"], content_weight=s["content_weight"],
                      attention_scale=s["attention_scale"], layers=s["layers"] or None,
                      size=size_value(s["size"]), seed=seed_value(s["seed"]), tile=tile_value(s["tile"]),
                      tune_vae=bool(s["tune_vae"]), progress=False, callback=callback)

        def command(s: dict, model: DiffusionModel, output: str) -> str:
            words = [tab, file_name(s["target"]), file_name(s["reference"]), *map(file_name, file_paths(s["more"]))]
            return cli_command(words, dict(
                output=output, **self._common_cli(model, seed_value(s["seed"])), steps=s["steps"], iters=s["iters"],
                lr=s["lr"], content_weight=s["content_weight"], attention_scale=s["attention_scale"],
                layers=s["layers"] or None, size=(s["size"] or "").strip() or None, tile=tile_value(s["tile"]),
                tune_vae=True if s["tune_vae"] else None))

        self._wire(tab, panel, fields, call, command)

    def _t2i_tab(self) -> None:
        tab, sd15, sdxl = "t2i", PRESETS["t2i"], PRESETS["t2i-sdxl"]

        def blank(field: str) -> str:
            return f"blank: preset ({getattr(sd15, field)} SD 1.5, {getattr(sdxl, field)} SDXL)"

        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id=f"{tab}-negative")
            style = image_input("Style image", f"{tab}-style")
        with gr.Row():
            num = int_box("Images", 1, tab, "num", minimum=1)
            steps = blank_number("Steps", tab, "steps", blank("steps"))
            guidance = blank_number("Guidance", tab, "guidance", blank("guidance"))
            size = size_box(tab)
            seed = seed_box(tab)
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                iters = blank_number("Adam iterations per step", tab, "iters", blank("iters"))
                lr = blank_number("Learning rate", tab, "lr", blank("lr"))
                adain = gr.Radio(["preset", "on", "off"], value="preset", label="AdaIN", elem_id=f"{tab}-adain")
                layers = gr.Textbox("", label="Layers", placeholder="default: the model's last six",
                                    elem_id=f"{tab}-layers")
            with gr.Row():
                controlnet = gr.Textbox("", label="ControlNet (Hub id or folder)", elem_id=f"{tab}-controlnet",
                                        placeholder="e.g. lllyasviel/control_v11p_sd15_canny")
                control_image = image_input("Control image", f"{tab}-control-image")
                with gr.Column():
                    control = gr.Radio(["none", "canny"], value="none", label="Preprocessor",
                                       elem_id=f"{tab}-control")
                    control_scale = float_box("Control scale",
                                              api_default("generate", "text_to_image", "control_scale"),
                                              tab, "control-scale")
            preview = self._preview_options(tab)
        panel = self._panel(tab)
        self._examples([["a deer in a forest", "watercolor-cat.jpg"], ["a lighthouse by the sea", "starry-night.jpg"]],
                       [prompt, style])
        self._validate_on_upload(style, control_image)
        fields = dict(prompt=prompt, negative=negative, style=style, num=num, steps=steps, guidance=guidance,
                      size=size, seed=seed, iters=iters, lr=lr, adain=adain, layers=layers, controlnet=controlnet,
                      control_image=control_image, control=control, control_scale=control_scale, **preview)

        def options(s: dict) -> dict:
            adain_on = {"preset": None, "on": True, "off": False}[s["adain"]]
            return dict(steps=number_value(s["steps"], "steps", int), iters=number_value(s["iters"], "iterations", int),
                        lr=number_value(s["lr"], "learning rate"), guidance=number_value(s["guidance"], "guidance"),
                        adain=adain_on, layers=s["layers"] or None,
                        controlnet=(s["controlnet"] or "").strip() or None, control=s["control"])

        def call(s: dict, model: DiffusionModel, callback: Callback):
            from .generate import text_to_image

            if not (s["prompt"] or "").strip():
                raise UserError("prompt is empty; describe the image to generate")
            extra = {"control_scale": s["control_scale"]} if s["control_scale"] is not None else {}
            return text_to_image(s["prompt"], required(s["style"], "style image"),
                                 negative_prompt=s["negative"] or None, num_images=whole(s["num"], "images") or 1,
                                 model=model, control_image=s["control_image"], size=size_value(s["size"]),
                                 seed=seed_value(s["seed"]), progress=False, callback=callback, **options(s), **extra)

        def command(s: dict, model: DiffusionModel, output: str) -> str:
            o = options(s)
            return cli_command([tab], dict(
                style=file_name(s["style"]), prompt=s["prompt"], output=output, negative_prompt=s["negative"] or None,
                num_images=s["num"] if s["num"] != 1 else None, **self._common_cli(model, seed_value(s["seed"])),
                steps=o["steps"], iters=o["iters"], lr=o["lr"], guidance=o["guidance"], adain=o["adain"],
                layers=o["layers"], size=(s["size"] or "").strip() or None, controlnet=o["controlnet"],
                control_image=file_name(s["control_image"]), control=o["control"] if o["control"] != "none" else None,
                control_scale=s["control_scale"] if o["controlnet"] else None))

        self._wire(tab, panel, fields, call, command)

    def _texture_tab(self) -> None:
        tab = "texture"
        first = PRESETS[TEXTURE_MODES["optimise"]]
        with gr.Row():
            reference = image_input("Texture image", f"{tab}-reference")
            with gr.Column():
                mode = gr.Radio(list(TEXTURE_MODES), value="optimise", label="Mode", elem_id=f"{tab}-mode",
                                info="optimise: Algorithm 1 · sample: AD-guided sampling · layout: SDEdit from a "
                                     "colour layout · masked: label maps")
                with gr.Row():
                    num = int_box("Images", 1, tab, "num", minimum=1)
                    steps = int_box("Steps", first.steps, tab, "steps", minimum=1)
                    seed = seed_box(tab)
                size = size_box(tab)
        with gr.Row(visible=False) as layout_row:
            layout = image_input("Layout image", f"{tab}-layout")
            strength = float_box("Strength", api_default("generate", "layout_texture", "strength"), tab, "strength",
                              minimum=0, maximum=1)
        with gr.Row(visible=False) as labels_row:
            ref_labels = image_input("Reference label map", f"{tab}-ref-labels")
            target_labels = image_input("Target label map", f"{tab}-target-labels")
        with gr.Accordion("Advanced", open=False):
            more = gr.File(label="More texture images", file_count="multiple", file_types=["image"],
                           elem_id=f"{tab}-more")
            options = self._optimise_options(tab, first, content_weight=False)
            options.update(self._preview_options(tab))
        panel = self._panel(tab)

        def on_mode(m: str):
            p = PRESETS[TEXTURE_MODES[m]]
            return (gr.update(visible=m == "layout"), gr.update(visible=m == "masked"), p.steps, p.iters, p.lr)

        mode.change(on_mode, mode, [layout_row, labels_row, steps, options["iters"], options["lr"]], queue=False)
        self._examples([["wood-rings.jpg", "optimise", None, None, None],
                        ["woven-rattan.jpg", "sample", None, None, None],
                        ["wood-and-rattan.jpg", "layout", "disc-labels.png", None, None],
                        ["wood-and-rattan.jpg", "masked", None, "wood-and-rattan-labels.png", "disc-labels.png"]],
                       [reference, mode, layout, ref_labels, target_labels])
        self._validate_on_upload(reference, layout, ref_labels, target_labels)
        fields = dict(reference=reference, mode=mode, num=num, steps=steps, seed=seed, size=size, layout=layout,
                      strength=strength, ref_labels=ref_labels, target_labels=target_labels, more=more, **options)

        def call(s: dict, model: DiffusionModel, callback: Callback):
            refs = [required(s["reference"], "texture image"), *file_paths(s["more"])]
            common = dict(num=whole(s["num"], "images") or 1, model=model, steps=whole(s["steps"]),
                          iters=whole(s["iters"], "iterations"), lr=s["lr"], attention_scale=s["attention_scale"],
                          layers=s["layers"] or None, size=size_value(s["size"]), seed=seed_value(s["seed"]),
                          progress=False, callback=callback)
            looks = dict(tile=tile_value(s["tile"]), tune_vae=bool(s["tune_vae"]))
            if s["mode"] == "optimise":
                from .tasks import texture_synthesis

                return texture_synthesis(refs, **common, **looks)
            if s["mode"] == "sample":
                from .generate import texture_sampling

                return texture_sampling(refs, **common, **looks)
            if s["mode"] == "layout":
                from .generate import layout_texture

                extra = {"strength": s["strength"]} if s["strength"] is not None else {}
                return layout_texture(refs, required(s["layout"], "layout image"), **common, **looks, **extra)
            from .textures import masked_texture_synthesis

            return masked_texture_synthesis(refs, required(s["ref_labels"], "reference label map"),
                                            required(s["target_labels"], "target label map"), **common, **looks)

        def command(s: dict, model: DiffusionModel, output: str) -> str:
            m = s["mode"]
            words = [tab, file_name(s["reference"]), *map(file_name, file_paths(s["more"]))]
            return cli_command(words, dict(
                output=output, mode="sample" if m == "sample" else None,
                layout=file_name(s["layout"]) if m == "layout" else None,
                strength=s["strength"] if m == "layout" else None,
                ref_labels=file_name(s["ref_labels"]) if m == "masked" else None,
                target_labels=file_name(s["target_labels"]) if m == "masked" else None,
                num=s["num"] if s["num"] != 1 else None, **self._common_cli(model, seed_value(s["seed"])),
                steps=s["steps"], iters=s["iters"], lr=s["lr"], attention_scale=s["attention_scale"],
                layers=s["layers"] or None, size=(s["size"] or "").strip() or None,
                tile=tile_value(s["tile"]), tune_vae=True if s["tune_vae"] else None))

        self._wire(tab, panel, fields, call, command)

    def _expand_tab(self) -> None:
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
                stride = int_box("View stride (latents)", preset.stride, tab, "stride", minimum=1)
                view_batch = int_box("Views per batch", api_default("textures", "expand_texture", "view_batch"),
                                  tab, "view-batch", minimum=1)
            preview = self._preview_options(tab)
        panel = self._panel(tab)
        self._examples([["woven-rattan.jpg"], ["wood-rings.jpg"]], [reference])
        self._validate_on_upload(reference)
        fields = dict(reference=reference, size=size, steps=steps, seed=seed, tile=tile, iters=iters, lr=lr,
                      stride=stride, view_batch=view_batch, **preview)

        def call(s: dict, model: DiffusionModel, callback: Callback):
            from .textures import expand_texture

            size = size_value(s["size"], multiple=EXPAND_SIZE_MULTIPLE)
            if size is None:
                raise UserError("size is missing; enter the canvas as WIDTHxHEIGHT, e.g. 1536x512")
            extra = {"view_batch": whole(s["view_batch"], "views per batch")} if s["view_batch"] else {}
            return expand_texture(required(s["reference"], "texture image"),
                                  size=size if isinstance(size, tuple) else (size, size), model=model,
                                  steps=whole(s["steps"]), iters=whole(s["iters"], "iterations"), lr=s["lr"],
                                  stride=whole(s["stride"], "stride"), tile=tile_value(s["tile"]),
                                  seed=seed_value(s["seed"]), progress=False, callback=callback, **extra)

        def command(s: dict, model: DiffusionModel, output: str) -> str:
            return cli_command([tab, file_name(s["reference"])], dict(
                output=output, size=(s["size"] or "").strip(), **self._common_cli(model, seed_value(s["seed"])),
                steps=s["steps"], iters=s["iters"], lr=s["lr"], stride=s["stride"], view_batch=s["view_batch"],
                tile=tile_value(s["tile"])))

        self._wire(tab, panel, fields, call, command)

    def _vae_tab(self) -> None:
        tab = "vae"
        gr.Markdown("Fine-tune only the VAE decoder on a reference (ALGORITHM.md §5). The tuned decoder is saved "
                    "as a diffusers folder and, if you keep the box ticked, used by the next runs.")
        with gr.Row():
            reference = image_input("Reference image", f"{tab}-reference")
            with gr.Column():
                steps = int_box("Steps", api_default("textures", "finetune_vae", "steps"), tab, "steps", minimum=1)
                lr = float_box("Learning rate", api_default("textures", "finetune_vae", "lr"), tab, "lr")
                use = gr.Checkbox(True, label="Use the tuned decoder for the next runs", elem_id=f"{tab}-use")
                with gr.Row():
                    run = gr.Button("Fine-tune decoder", variant="primary", elem_id=f"{tab}-run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id=f"{tab}-cancel")
        status = gr.Markdown(elem_id=f"{tab}-status", min_height=48)
        folder = gr.Textbox(label="Saved VAE folder", interactive=False, elem_id=f"{tab}-folder")
        archive = gr.File(label="Download (zip)", interactive=False, elem_id=f"{tab}-zip")
        cli = gr.Textbox(label="Same run from the terminal", buttons=["copy"], interactive=False,
                         elem_id=f"{tab}-cli")
        self._examples([["wood-rings.jpg"], ["watercolor-cat.jpg"]], [reference])
        self._validate_on_upload(reference)

        def tune(values: dict, request: gr.Request | None, progress):
            from .textures import finetune_vae
            from .vae_tuning import save_vae

            ref, n, rate, use_it = values[reference], values[steps], values[lr], values[use]
            model_id, vae_id = values[self.model_box], values[self.vae_box]
            skip = gr.skip()
            try:
                n = whole(n)
                reference_path = required(ref, "reference image")
            except UserError as exc:
                raise gr.Error(str(exc)) from None
            extra = {k: v for k, v in (("steps", n), ("lr", rate)) if v is not None}
            loaded: list[DiffusionModel] = []

            def work(job: Job, callback: Callback):
                loaded.append(self._load_in_job(job, model_id, vae_id))
                return finetune_vae(reference_path, model=loaded[0], callback=callback, **extra)

            job = yield from self._follow(request, tab, work, progress,
                                          line=lambda text, _: (text, skip, skip, skip, skip))
            if job is None or job.cancelled:
                return
            try:
                if job.error is not None:
                    raise job.error
                out = save_vae(job.result, self.outputs / f"vae-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                          f"{next(self._counter):03d}")
                zipped = shutil.make_archive(str(out), "zip", root_dir=out)
            except Exception as exc:
                message = page_message(exc)
                yield f"failed: {message}", None, None, "", skip
                raise gr.Error(message) from None
            finally:
                job.result = None  # the tuned copy's weights: saved, not kept in memory
            text = f"done in {job.seconds:.1f} s · saved `{out}`"
            text += "; the VAE box (Model) now points to it" if use_it else ""
            options = {k: v for k, v in self._common_cli(loaded[0], 0).items() if k != "seed"}
            command = cli_command(["finetune-vae", file_name(ref)], dict(output=out.name, **options, steps=n, lr=rate))
            yield text, str(out), zipped, command, (str(out) if use_it else skip)

        self._bind(tab, run, cancel, tune, {reference, steps, lr, use, self.model_box, self.vae_box},
                   [status, folder, archive, cli, self.vae_box], status)

    # -- serving ---------------------------------------------------------------------------------

    def launch(self, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
               max_upload_mb: float = 20, block: bool = True, quiet: bool = False) -> gr.Blocks:
        """Build, queue (one job at a time) and serve the app; ``block=False`` returns once it is up."""
        demo = self.build()
        demo.queue(default_concurrency_limit=1)
        if not quiet:
            print(f"attndistill: results are saved in {self.outputs}", file=sys.stderr, flush=True)
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                    max_file_size=int(max_upload_mb * 1024 * 1024), allowed_paths=[str(self.outputs), str(EXAMPLES)],
                    ssr_mode=False, mcp_server=False, pwa=False, show_error=False)
        return demo
