"""Web UI (Gradio): every task of the library in the browser, one job at a time.

This module is the app: the model slot, the run machinery and the shared layout.
The tabs are in :mod:`attndistill.webui.tabs`, their fields in
:mod:`attndistill.webui.fields`, and jobs, progress and cancel in
:mod:`attndistill.webui.jobs`. The page only parses input and calls the public
API (the modules of :mod:`attndistill.tasks`). A run executes in a worker thread whose
progress callback feeds the page (loss, a cheap preview every few steps) and
raises to cancel between steps. Results are PNGs carrying their parameters
and a ``attndistill ...`` command that reproduces them from the terminal.

Start it with ``attndistill ui`` or ``WebUI(model=...).launch()``.
"""

import itertools
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image

from ..batch.jobs import ModelSpec
from ..errors import UserError, is_out_of_memory
from ..images import save_png
from ..model.loading import DEFAULT_MODEL, ModelSlot, home
from ..model.models import DiffusionModel
from ..model.perf import pixel_switches
from ..model.single_file import is_checkpoint_path
from ..presets import Preset
from .fields import (
    FAILED,
    TILE_CHOICES,
    float_box,
    int_box,
    keep_uploads,
    painted_mask,
    reference_fit_radio,
    text_value,
    upload_check,
    whole,
)
from .jobs import COMPILING_LOG, Callback, Cancelled, Job, RunBoard, TaskCall, Update, cli_command, error_message
from .tabs import expand_tab, t2i_tab, texture_tab, transfer_tab, vae_tab
from .wording import page_message, page_text

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).parent / "examples"
#: Concurrency group of every event that touches the model: one job at a time on the device.
DEVICE_QUEUE = "device"
#: Where results go unless ``outputs`` says otherwise: this folder under the directory the UI starts in.
DEFAULT_OUTPUTS = "attndistill-outputs"
#: Attempts at a free result name before giving up (two servers may share an outputs folder).
NAME_ATTEMPTS = 1000

__all__ = ["DEVICE_QUEUE", "Cancelled", "Job", "ModelSlot", "Update", "WebUI", "cli_command", "error_message"]


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
                 dtype: str | None = None, outputs: str | Path | None = None, perf=None, config: str | None = None,
                 allow_pickle: bool = False) -> None:
        self.slot = ModelSlot(device=device, dtype=dtype, perf=perf, config=config, allow_pickle=allow_pickle)
        self.model, self.vae = model or DEFAULT_MODEL, vae
        logging.getLogger(COMPILING_LOG).setLevel(logging.INFO)  # its lines become the page's status while it waits
        # results outlive the server (a temp folder would not outlive a reboot), where it was started
        self.outputs = (Path(outputs) if outputs else Path.cwd() / DEFAULT_OUTPUTS).absolute()
        self._make_outputs()
        self.runs = RunBoard()  # each page's runs of each tab, for their Cancel buttons
        self.counter = itertools.count()

    # -- running ---------------------------------------------------------------------------------

    def _model(self, model: str | None, vae: str | None) -> DiffusionModel:
        try:
            return self.slot.get(model, vae)
        except Exception as exc:
            raise gr.Error(page_message(exc)) from None

    def _make_outputs(self) -> None:
        try:
            self.outputs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"results folder '{self.outputs}' cannot be made ({exc.strerror or exc}); pass "
                            "--outputs (outputs= in Python) with a folder you can write to") from None

    def _save(self, image: Image.Image, task: str) -> Path:
        return self.save_new(task, ".png", lambda path: save_png(image, path))

    def save_new(self, task: str, suffix: str, write: Callable[[Path], Path]) -> Path:
        """``write(path)`` under a new name in the outputs folder (``TASK-TIME-N`` + ``suffix``): never over a
        file or folder, even one another server sharing the folder just wrote under the same name."""
        self._make_outputs()  # deleted while the server ran: made again
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for _ in range(NAME_ATTEMPTS):
            path = self.outputs / f"{task}-{stamp}-{next(self.counter):03d}{suffix}"
            if not path.exists():
                try:
                    return write(path)
                except UserError:
                    if not path.exists():  # not a name taken in the meantime: a real failure
                        raise
        raise UserError(f"no free name for the result in '{self.outputs}'; clear that folder")

    def common_cli(self, model: DiffusionModel, seed: int) -> dict:
        options = {"model": model.source if model.source != DEFAULT_MODEL else None,
                   "vae": self.slot.key[1] if self.slot.key else None, "config": model.config_source,
                   "allow_pickle": True if model.allow_pickle else None, "seed": seed}
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
        yield skip, None, skip, skip, skip  # the last run's preview goes; its results stay until new ones come
        job, model = yield from self.follow(
            request, task, settings["model"], settings["vae"], call, progress,
            every=settings.get("preview_every") or 0, preview_side=settings.get("preview_size") or 32,
            line=lambda text, image: (text, skip if image is None else image, skip, skip, skip))
        if job is None or job.cancelled:
            return
        try:
            if job.error is not None:
                raise job.error
            images = job.result if isinstance(job.result, list) else [job.result]
            paths = [self._save(img, task) for img in images]
        except Exception as exc:  # the run or saving its result failed: say so, and show no stale results
            if model is not None and is_out_of_memory(exc):  # the next run needs the memory they hold
                traceback.clear_frames(exc.__traceback__)  # the failed run's tensors, held by its frames
                model.release_graphs()
            message = page_message(exc)
            yield FAILED.format(message), None, None, None, ""
            raise gr.Error(message) from None
        loss = f" · final loss {job.last.loss:.4f}" if job.last and not math.isnan(job.last.loss) else ""
        where = paths[0].parent
        status = f"done in {job.seconds:.1f} s{loss} · saved {', '.join(p.name for p in paths)} in `{where}`"
        if text_value(settings.get("vae")):  # set by hand or by the VAE tab: it changes every tab's results
            status += f" · decoded with the VAE in `{text_value(settings['vae'])}`"
        status += "".join(f"\n\nnote: {page_text(note)}" for note in job.notes)  # else only the server log says
        output = paths[0].name if len(paths) == 1 else f"{task}.png"
        yield (status, skip, [(str(p), p.name) for p in paths], [str(p) for p in paths],
               command(model, output))

    def follow(self, request: gr.Request | None, tab: str, model: str | None, vae: str | None,
               call: Callable[[DiffusionModel, Callback], object], progress, *,
               line: Callable[[str, Image.Image | None], tuple], every: int = 0,
               preview_side: int = 32) -> Iterator[tuple]:
        """Load (``model``, ``vae``) and run ``call(model, callback)`` as this page's job of ``tab``, in a
        worker thread; yield ``line(status, preview)`` as it goes; return (job, the loaded model).

        The model loads in the job's thread, so Cancel is heard while it loads and acts right after.
        The job is None when Cancel came before it started; a cancelled job's last line says so.
        """
        loaded: list[DiffusionModel] = []

        def work(callback: Callback):
            loaded.append(self.slot.get(model, vae))
            job.stop_if_cancelled("cancelled before the first step")
            return call(loaded[0], callback)

        job = Job(work, preview=lambda latents: loaded[0].preview(latents, side=preview_side),
                  every=every)
        if not self.runs.attach(_key(request, tab), job):
            yield line("cancelled before it started; nothing was run", None)
            return None, None
        starting = "starting" if self.slot.holds(model, vae) else \
            f"loading `{text_value(model) or DEFAULT_MODEL}`"  # its load is the first wait, seconds to minutes
        yield line(f"{starting}…", None)  # not the last run's "failed" or "done" while this one starts
        progress(0, desc=starting)
        try:
            job.start()
            for u in job.updates():
                if not u.total:  # no step yet: what the run waits for (a program compiling)
                    progress(0, desc=page_text(u.stage, advice=False))  # what runs: a switch it was started with
                    yield line(page_text(u.stage, advice=False) + "…", None)
                    continue
                # NaN: no AD iterations (AdaIN alone, or plain sampling)
                loss = "" if math.isnan(u.loss) else f"loss {u.loss:.4f}"
                progress((u.step, u.total), desc=loss or None)
                yield line((f"{u.stage}: " if u.stage else "") + f"step {u.step}/{u.total}"
                           + (f" · {loss}" if loss else ""), u.preview)
        finally:
            job.cancel()  # the page went away mid-run: stop the worker at its next step
            job.wait()
        if job.cancelled:
            where = "" if not job.last else (f" while {job.last.stage}," if job.last.stage else "") + \
                f" after step {job.last.step} of {job.last.total}"
            yield line(f"cancelled{where}; nothing was saved", None)
        return job, (loaded[0] if loaded else None)

    def cancel(self, tab: str, request: gr.Request | None) -> None:
        """Cancel this page's run of ``tab`` after its current step, and withdraw the ones still waiting."""
        gr.Info(self.runs.cancel(_key(request, tab)))

    def load(self, model: str, vae: str) -> str:
        """The Load button: the status says what is loaded now, also after a failed load (which has freed the
        previous model before it failed). A model that would not load (a mistyped path, a Hub id not cached
        offline) is refused by its configs first, as a run's is, so the loaded one stays."""
        from ..batch.check import check_model

        try:
            if not self.slot.holds(model, vae):
                check_model(self.model_spec({"model": model, "vae": vae}), pickle_option="--allow-pickle")
            self.slot.get(model, vae)
        except Exception as exc:
            message = page_message(exc)
            gr.Warning(message)
            return f"{FAILED.format(message)} · {self.slot.describe()}"
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
                    self.vae_box = gr.Textbox(self.vae or "", label="VAE (optional)", elem_id="vae-box",
                                              info="a folder (e.g. a decoder fine-tuned in the VAE tab) or a Hub id",
                                              scale=2)
                    load_btn = gr.Button("Load", scale=0)
                model_status = self.model_status = gr.Markdown(elem_id="model-status")
            load_btn.click(self.load, [self.model_box, self.vae_box], model_status,
                           concurrency_limit=1, concurrency_id=DEVICE_QUEUE)
            demo.load(self.slot.describe, None, model_status, queue=False)
            with gr.Tabs():
                with gr.Tab("Style transfer", id="style"):
                    transfer_tab(self, "style", "Content image", "Style image",
                                       [["horse.jpg", "watercolor-cat.jpg"], ["golden-gate.jpg", "starry-night.jpg"]])
                with gr.Tab("Appearance transfer", id="appearance"):
                    transfer_tab(self, "appearance", "Structure image", "Appearance image",
                                       [["golden-gate.jpg", "watercolor-cat.jpg"], ["horse.jpg", "wood-rings.jpg"]])
                with gr.Tab("Text to image", id="t2i"):
                    t2i_tab(self)
                with gr.Tab("Texture", id="texture"):
                    texture_tab(self)
                with gr.Tab("Expansion", id="expand"):
                    expand_tab(self)
                with gr.Tab("VAE fine-tuning", id="vae"):
                    vae_tab(self)
        return demo

    def panel(self, tab: str) -> Panel:
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

    def preview_options(self, tab: str) -> dict:
        with gr.Row():
            return {"preview_every": int_box("Live preview every N steps (0: off)", 5, tab, "preview-every", minimum=0),
                    "preview_size": int_box("Preview size (latents, decoded by the VAE)", 32, tab, "preview-size",
                                         minimum=4, maximum=128)}

    def model_spec(self, settings: dict) -> ModelSpec:
        """The model a run of the page's ``settings`` loads, as the checks before a load name it."""
        model, vae = text_value(settings["model"]), text_value(settings["vae"])
        source = home(model) if model else None
        single = source is not None and is_checkpoint_path(Path(source))  # the launch config is for files only
        return ModelSpec(source=source, vae=home(vae) if vae else None,
                         config=self.slot.config if single else None, allow_pickle=self.slot.allow_pickle)

    def wire(self, tab: str, panel: Panel, fields: dict, arguments: Callable[[dict], TaskCall], command) -> None:
        """Run button -> :meth:`execute` with the tab's fields as a dict of values by name; ``arguments`` makes
        them the run's :class:`TaskCall`, checked before the model loads."""
        components = dict(fields, model=self.model_box, vae=self.vae_box)
        names = {c: n for n, c in components.items()}

        def run(values: dict, request: gr.Request, progress=gr.Progress()):
            try:  # whole-number boxes: 1.5 steps is an error, not 2 steps
                settings = {names[c]: whole(v, c.whole, c.bounds) if getattr(c, "whole", None) else v
                            for c, v in values.items()}
                masks = [k for k in settings if isinstance(components[k], gr.ImageMask)]
                with tempfile.TemporaryDirectory(prefix="attndistill-check-") as scratch:  # a refused run keeps none
                    trial = dict(settings, **{k: painted_mask(settings[k], Path(scratch)) for k in masks})
                    arguments(trial).check(self.model_spec(settings),  # before the uploads are copied, the model loads
                                           loaded=self.slot.holds(settings["model"], settings["vae"]))
                # painted masks become files once, which the run and the command both name where they are kept
                settings.update({k: painted_mask(settings[k], self.outputs) for k in masks})
                kept = {k: keep_uploads(v, self.outputs) if isinstance(components[k], gr.Image | gr.File) else v
                        for k, v in settings.items()}  # the uploads a result names
                call = arguments(kept)
            except UserError as exc:
                message = page_message(exc)
                yield FAILED.format(message), None, None, None, ""  # no earlier run's "done" and results beside it
                raise gr.Error(message) from None
            yield from self.execute(request, progress, task=tab, settings=settings, call=call.run,
                                    command=partial(command, settings))  # the command names uploads as the page does

        self.bind(tab, panel.run, panel.cancel, run, set(components.values()), panel.outputs, panel.status)

    def bind(self, tab: str, run: gr.Button, cancel: gr.Button, fn: Callable, inputs, outputs: list,
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
            show_progress_on=[status], api_name=tab).then(  # a run loads or frees models: say which is loaded now
            self.slot.describe, None, self.model_status, queue=False, show_progress="hidden",
            api_visibility="private")

    @staticmethod
    def validate_on_upload(*images: gr.Image) -> None:
        for image in images:
            # queued (messages reach the page only through the queue), never behind a running job
            image.upload(upload_check(str(image.label).lower()), image, image, preprocess=False,
                         concurrency_limit=None, show_progress="hidden", api_visibility="private")

    @staticmethod
    def examples(rows: list[list], inputs: list) -> None:
        resolved = [[str(EXAMPLES / v) if isinstance(v, str) and v.endswith((".jpg", ".png")) else v
                     for v in row] for row in rows]
        gr.Examples(resolved, inputs, cache_examples=False)

    def optimise_options(self, tab: str, preset: Preset, *, content_weight: bool) -> dict:
        with gr.Row():
            # 0 is AdaIN alone (AdaIN off: plain DDIM) in the texture tab's sampling modes; the tasks refuse it
            # where it means nothing
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
                tune_vae=gr.Checkbox(False, label="Fine-tune the VAE decoder on the references for this run",
                                     elem_id=f"{tab}-tune-vae"),
                reference_fit=reference_fit_radio(tab))
        return fields

    # -- serving ---------------------------------------------------------------------------------

    def launch(self, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
               max_upload_mb: float = 20, block: bool = True, quiet: bool = False) -> gr.Blocks:
        """Build, queue (one job at a time) and serve the app; ``block=False`` returns once it is up."""
        demo = self.build()
        demo.queue(default_concurrency_limit=1)
        if not quiet:
            print(f"attndistill: results are saved in {self.outputs}", file=sys.stderr, flush=True)
        # Gradio's own lines speak of launch() arguments; ours of the command's options
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                    max_file_size=int(max_upload_mb * 1024 * 1024), allowed_paths=[str(self.outputs), str(EXAMPLES)],
                    ssr_mode=False, mcp_server=False, pwa=False, show_error=False)
        if not quiet:
            print(f"attndistill: open {demo.local_url} in a browser"
                  + (f", or the public link {demo.share_url}" if demo.share_url else "")
                  + ("; Ctrl-C stops the server" if block else ""), file=sys.stderr, flush=True)
        if block:
            demo.block_thread()
        return demo
