"""The web UI's handlers called in-process, as Gradio calls them: numbers, seeds, sizes, cancel, saving."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from attndistill.core.progress import StepInfo
from attndistill.errors import UserError
from attndistill.webui.app import WebUI
from attndistill.webui.wording import page_message

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def no_progress(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def ui(tiny_sd15_dir, tmp_path_factory):
    ui = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path_factory.mktemp("ui-out"))
    ui.demo = ui.build()
    return ui


def handler(ui: WebUI, tab: str):
    return next(f for f in ui.demo.fns.values() if f.api_name == tab)


def run_tab(ui: WebUI, tab: str, values: dict, session: str = "page", ticket: int | None = None) -> list:
    """Every update the tab's Run handler yields, for box values given by elem_id (others: their defaults)."""
    fn = handler(ui, tab)
    inputs = {c: values.get(getattr(c, "elem_id", None), c.value) for c in fn.inputs}
    inputs.update({c: ticket for c in fn.inputs if isinstance(c, gr.State)})
    return list(fn.fn(inputs, SimpleNamespace(session_hash=session), progress=no_progress))


def result_parameters(updates: list[tuple]) -> tuple[dict, str, Image.Image]:
    status, _, _, files, command = updates[-1]
    assert status.startswith("done"), status
    image = Image.open(files[0])
    return json.loads(image.text["attndistill"]), command, image


def test_whole_number_boxes_refuse_fractions_and_seeds_stay_exact(ui, data_dir):
    inputs = {"style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
              "style-size": "64", "style-preview-every": 0}
    for steps in (1.5, float("inf"), float("nan")):  # inf and nan: OverflowError and ValueError before
        with pytest.raises(gr.Error, match="Steps must be a whole number"):
            run_tab(ui, "style", {**inputs, "style-steps": steps})
    with pytest.raises(gr.Error, match="seed -1 is out of range"):
        run_tab(ui, "style", {**inputs, "style-steps": 1, "style-seed": "-1"})
    with pytest.raises(gr.Error, match="seed 4294967296 is out of range"):
        run_tab(ui, "style", {**inputs, "style-steps": 1, "style-seed": str(2**32)})
    seed = 2**32 - 1  # the largest, exactly
    params, command, _ = result_parameters(run_tab(ui, "style", {**inputs, "style-steps": 1, "style-seed": str(seed)}))
    assert params["seed"] == seed and params["steps"] == 1
    words = shlex.split(command)
    assert words[words.index("--seed") + 1] == str(seed) and words[words.index("--steps") + 1] == "1"
    assert params["reference_fit"] == "squash" and "--reference-fit" not in words  # the default goes unsaid
    with pytest.raises(gr.Error, match="seed"):
        run_tab(ui, "style", {**inputs, "style-steps": 1, "style-seed": "1.5"})


def test_expand_keeps_the_size_its_command_says(ui, data_dir):
    """The terminal command reruns the same canvas: the size is rounded to whole latents, as the CLI does."""
    params, command, image = result_parameters(run_tab(ui, "expand", {
        "expand-reference": str(data_dir / "wood-rings.jpg"), "expand-size": "600x520", "expand-steps": 1,
        "expand-iters": 0, "expand-stride": 64, "expand-reference-fit": "keep", "expand-preview-every": 0}))
    assert image.size == (600, 520) and params["size"] == [600, 520] and params["reference_fit"] == "keep"
    words = shlex.split(command)
    assert words[words.index("--size") + 1] == "600x520" and words[words.index("--reference-fit") + 1] == "keep"


def test_expand_makes_a_banner_under_one_default_view(ui, data_dir):
    """A canvas whose short side is under the default view (64 latents, 512 px) was refused with advice to set a
    view that no box set."""
    inputs = {"expand-reference": str(data_dir / "wood-rings.jpg"), "expand-size": "320x128", "expand-steps": 1,
              "expand-iters": 0, "expand-preview-every": 0}
    with pytest.raises(gr.Error, match=r"a View side of at most 16 latents \(128 px\)"):
        run_tab(ui, "expand", inputs)
    params, command, image = result_parameters(run_tab(ui, "expand", {**inputs, "expand-view": 16,
                                                                      "expand-stride": 8}))
    assert image.size == (320, 128) and params["view"] == 16
    words = shlex.split(command)
    assert words[words.index("--view") + 1] == "16"


def test_texture_sampling_honours_tiling(ui, data_dir):
    params, command, _ = result_parameters(run_tab(ui, "texture", {
        "texture-reference": str(data_dir / "wood-rings.jpg"), "texture-mode": "sample", "texture-steps": 1,
        "texture-iters": 1, "texture-size": "64", "texture-tile": "x", "texture-reference-fit": "keep",
        "texture-preview-every": 0}))
    assert params["tile"] == "x" and params["task"] == "texture-sample" and params["reference_fit"] == "keep"
    words = shlex.split(command)
    assert words[words.index("--tile") + 1] == "x" and words[words.index("--mode") + 1] == "sample"
    assert words[words.index("--reference-fit") + 1] == "keep"


def test_texture_layout_takes_adain_start_t_and_content_weight_and_the_command_says_so(ui, data_dir):
    from attndistill.webui.app import EXAMPLES

    params, command, _ = result_parameters(run_tab(ui, "texture", {
        "texture-reference": str(data_dir / "wood-rings.jpg"), "texture-mode": "layout", "texture-steps": 2,
        "texture-iters": 1, "texture-size": "64", "texture-layout": str(EXAMPLES / "disc-labels.png"),
        "texture-strength": 1.0, "texture-adain": "on", "texture-start-t": "900", "texture-content-weight": 0.1,
        "texture-preview-every": 0}))
    assert params["adain"] is True and params["start_t"] == 900 and params["content_weight"] == 0.1
    words = shlex.split(command)
    assert "--adain" in words and words[words.index("--start-t") + 1] == "900"
    assert words[words.index("--content-weight") + 1] == "0.1"
    params, command, _ = result_parameters(run_tab(ui, "t2i", {
        "t2i-prompt": "a barn", "t2i-style": str(data_dir / "watercolor-cat.jpg"), "t2i-steps": "2",
        "t2i-iters": "1", "t2i-size": "64", "t2i-preview-every": 0, "t2i-controlnet": None, "t2i-start-t": "700"}))
    assert params["start_t"] == 700 and "--start-t 700" in command


def test_t2i_tab_tunes_the_decoder_and_its_command_says_so(ui, data_dir, monkeypatch):
    from attndistill.tasks import vae_tuning

    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder",  # 3 steps instead of 75: the same mechanics, sooner
                        lambda *a, **kw: real(*a, **{**kw, "steps": 3}))
    params, command, _ = result_parameters(run_tab(ui, "t2i", {
        "t2i-prompt": "a barn", "t2i-style": str(data_dir / "watercolor-cat.jpg"), "t2i-steps": "1",
        "t2i-iters": "1", "t2i-size": "64", "t2i-preview-every": 0, "t2i-controlnet": None, "t2i-tune-vae": True,
        "t2i-control-scale": 0.5,  # a scale moved with no ControlNet chosen: not the run's business
        "t2i-guidance-rescale": "0.7"}))
    assert params["tune_vae"] is True and "--tune-vae" in shlex.split(command)
    assert params["guidance_rescale"] == 0.7 and "--guidance-rescale 0.7" in command
    assert "control_scale" not in params and "--control-scale" not in command


def _slow_task(model, callback, steps: int = 100_000):
    for i in range(steps):
        time.sleep(0.002)
        callback(StepInfo(i, steps, 999, 1.0, torch.zeros(1, 4, 2, 2)))


def test_cancel_acts_on_its_own_tab_and_withdraws_a_waiting_run(ui, data_dir, monkeypatch):
    from attndistill.tasks import transfer as tasks

    monkeypatch.setattr(tasks, "style_transfer", lambda *args, callback, **kwargs: _slow_task(None, callback))
    page = SimpleNamespace(session_hash="cancel-page")
    key = ("cancel-page", "style")
    inputs = {"style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
              "style-preview-every": 0}
    fn = handler(ui, "style")

    def start(ticket):
        values = {c: inputs.get(getattr(c, "elem_id", None), c.value) for c in fn.inputs}
        values.update({c: ticket for c in fn.inputs if isinstance(c, gr.State)})
        return fn.fn(values, page, progress=no_progress)

    # a run that still waits in the queue is withdrawn: its status says so, and nothing runs
    ticket = ui.runs.queued(key)
    ui.cancel("style", page)
    status = next(c for c in fn.outputs if getattr(c, "elem_id", None) == "style-status")
    assert list(start(ticket)) == [{status: "cancelled while it waited in the queue; nothing was run"}]
    # clicks whose run never came (a value the page refused) cannot take a later run's Cancel
    ui.runs.queued(key)
    running = start(ui.runs.queued(key))
    assert next(running)[1] is None  # the last run's live preview goes at once
    assert next(running)[0] in ("starting…", f"loading `{ui.model}`…")  # so does its status line
    assert next(running)[0].startswith("step 1/")
    # Cancel in another tab leaves a running job alone; its own tab's Cancel stops it after a step
    ui.cancel("texture", page)
    assert next(running)[0].startswith("step 2/")
    ui.cancel("style", page)
    last = list(running)[-1][0]
    assert last.startswith("cancelled after step") and "nothing was saved" in last
    assert ui.runs.cancel(key) == "nothing of this tab is running or waiting"


def test_results_go_to_a_folder_where_the_ui_started_unless_told(tmp_path, monkeypatch):
    """Not a temp folder, which a reboot empties; a folder that cannot be made is one line naming --outputs."""
    monkeypatch.chdir(tmp_path)
    ui = WebUI(model="unused")
    assert ui.outputs.resolve() == (tmp_path / "attndistill-outputs").resolve() and ui.outputs.is_dir()
    assert ui.outputs.is_absolute()  # a later chdir does not move the results
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(UserError, match=r"results folder '.*a-file/out' cannot be made .*--outputs"):
        WebUI(model="unused", outputs=blocked / "out")


def test_results_never_overwrite_and_the_folder_comes_back(tmp_path, monkeypatch):
    ui = WebUI(model="unused", outputs=tmp_path / "out")
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261126-120000")
    taken = tmp_path / "out" / "style-20261126-120000-000.png"
    taken.write_bytes(b"someone else's file")  # another server with the same folder, the same second
    saved = ui._save(Image.new("RGB", (8, 8)), "style")
    assert saved.name == "style-20261126-120000-001.png" and taken.read_bytes() == b"someone else's file"
    for png in (tmp_path / "out").iterdir():
        png.unlink()
    (tmp_path / "out").rmdir()  # deleted while the server ran
    assert ui._save(Image.new("RGB", (8, 8)), "style").exists()


def test_error_lines_speak_of_fields_and_uploads_by_their_own_name():
    from attndistill.errors import UserError
    from attndistill.webui.fields import GRADIO_UPLOADS

    error = UserError(f"style image '{GRADIO_UPLOADS}/3f2a9c/corrupt.png' is not an image")
    assert page_message(error) == "style image 'corrupt.png' is not an image"
    error = UserError("--controlnet needs a --control-image; lower --lr or use --dtype fp32 (a-b--c stays)")
    assert page_message(error) == "the ControlNet box needs a Control image; lower Learning rate or use --dtype " \
        "fp32 (a-b--c stays) (an option of attndistill ui, set when the UI starts)"
    error = UserError("checkpoint 'x.safetensors' could not be loaded: offline; pass --config /path/to/a/folder")
    assert page_message(error) == "checkpoint 'x.safetensors' could not be loaded: offline; start the UI with " \
        "attndistill ui --config /path/to/a/folder"
    assert page_message(UserError("start-t must be in 1..1000 (got 0)")) == "Start timestep must be in 1..1000 (got 0)"
    error = UserError("size 8000x8000 is too large for one canvas; use 'attndistill expand' for huge textures")
    assert page_message(error) == "size 8000x8000 is too large for one canvas; use the Expansion tab for huge textures"
    assert page_message(UserError("iters must be at least 1 (got 0)")) == \
        "Adam iterations per step must be at least 1 (got 0)"
    error = UserError("texture image '/srv/out/inputs/5464533c9647-notes.png' is not an image; or set --control none")
    assert page_message(error) == "texture image 'notes.png' is not an image; or set Preprocessor none"
    error = UserError("style image '/home/me/My Projects/attndistill-outputs/inputs/0123456789ab-cat.png' is not an "
                      "image")  # the results folder is where the UI started: its path may hold spaces
    assert page_message(error) == "style image 'cat.png' is not an image"


@pytest.mark.parametrize("message, page", [
    # settings anywhere in a message, by their boxes' labels (a fuzzing helper found "raise start t" on the page)
    ("the last of 1 steps has timestep 1; raise --start-t above 1", "the last of 1 steps has timestep 1; raise "
     "Start timestep above 1"),
    ("stride 100 is larger than the view; use a --stride of at most 64", "stride 100 is larger than the view; use "
     "a View stride of at most 64"),
    ("size 100000x512 is over 16384 px, or tile a smaller texture with --tile xy", "size 100000x512 is over 16384 "
     "px, or tile a smaller texture with Seamless tiling xy"),
    ("prompt is empty ('attndistill texture --mode sample' generates from the style image alone)",
     "prompt is empty (the Texture tab in mode sample generates from the style image alone)"),
    # inputs: where to enter them
    ("model 'a/b' is not cached; check the id, or pass --model /path/to/a/local/diffusers/folder",
     "model 'a/b' is not cached; check the id, or enter /path/to/a/local/diffusers/folder in the Model box"),
    ("checkpoint 'x' has no VAE of its own; pass --vae with an AutoencoderKL folder made for it",
     "checkpoint 'x' has no VAE of its own; fill the VAE box with an AutoencoderKL folder made for it"),
    # options no box sets stay what to start the UI with, every one of them
    ("the GPU ran out of memory; e.g. attndistill ui --gradient-checkpointing --vae-tiling --lookahead-batch 1 "
     "--no-cuda-graphs (or --cpu-offload, or --device cpu)", "the GPU ran out of memory; e.g. attndistill ui "
     "--gradient-checkpointing --vae-tiling --lookahead-batch 1 --no-cuda-graphs (or --cpu-offload, or --device "
     "cpu)"),
    ("compiling failed; run without --compile, --compiled-loss and --compiled-norms", "compiling failed; run "
     "without --compile, --compiled-loss and --compiled-norms (options of attndistill ui, set when the UI starts)"),
    ("could not be kept in 'out/inputs'; start the UI with another --outputs folder", "could not be kept in "
     "'out/inputs'; start the UI with another --outputs folder"),
    ("not a tab: 'attndistill ui --share' or 'attndistill batch'", "not a tab: 'attndistill ui --share' or "
     "'attndistill batch'"),
    # what the page has neither a box nor a launch option for: plain words
    ("'o.png' exists; pass --overwrite", "'o.png' exists; pass overwrite"),
    ("--ref-labels/--target-labels need --mode optimize", "the Reference label map/the Target label map need Mode "
     "optimize"),
    # quoted names are left as they are, options or not (a reviewing helper found paths rewritten)
    ("image '/data/--steps/a.png' and '--lr-test.png' do not exist", "image '/data/--steps/a.png' and "
     "'--lr-test.png' do not exist"),
    ("image '/home/u/--port/a.png' is empty", "image '/home/u/--port/a.png' is empty"),
    ("content image 'horse.jpg' does not exist; check the path", "content image 'horse.jpg' is no longer on the "
     "server; upload it again"),  # an upload box has no path to check; a typed path has
    ("ControlNet '/x/cn' does not exist; check the path", "ControlNet '/x/cn' does not exist; check the path"),
    ("the model's layers and line 27's output; raise --steps", "the model's layers and line 27's output; raise "
     "Steps"),
])
def test_options_in_a_message_become_boxes_or_what_to_start_the_ui_with(message, page):
    assert page_message(UserError(message)) == page


def test_the_out_of_memory_advice_on_the_page_keeps_every_switch_it_names():
    from attndistill.errors import MEMORY_SWITCHES

    text = page_message(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert all(switch in text for switch in (*MEMORY_SWITCHES, "--cpu-offload", "--device cpu")), text


def test_vae_tuning_shows_its_steps_and_saves_a_folder(ui, data_dir):
    updates = run_tab(ui, "vae", {"vae-reference": str(data_dir / "wood-rings.jpg"), "vae-steps": 2,
                                  "vae-more": [str(data_dir / "horse.jpg")], "vae-reference-fit": "keep",
                                  "vae-use": False, "vae-box": ""}, session="vae-page")
    lines = [u[0].split(" · ")[0] for u in updates[:-1]]  # then the result
    assert lines[0] in ("starting…", f"loading `{ui.model}`…") and lines[1:] == ["step 1/2", "step 2/2"]
    status, folder, archive, command, _ = updates[-1]
    assert status.startswith("done") and (Path(folder) / "config.json").exists() and Path(archive).exists()
    words = shlex.split(command)
    assert words[:4] == ["attndistill", "finetune-vae", "wood-rings.jpg", "horse.jpg"]
    assert words[words.index("--reference-fit") + 1] == "keep"
    made = json.loads((Path(folder) / "attndistill.json").read_text())
    assert len(made["reference"]) == 2 and made["reference_fit"] == "keep"
    # a tuned VAE in the VAE box changes every tab's results: each result says it was decoded with it
    done = run_tab(ui, "style", {"style-target": str(data_dir / "horse.jpg"), "vae-box": folder,
                                 "style-reference": str(data_dir / "watercolor-cat.jpg"), "style-steps": 1,
                                 "style-size": "64", "style-preview-every": 0}, session="vae-page")[-1][0]
    assert f"decoded with the VAE in `{folder}`" in done


def test_a_tuned_vae_takes_a_free_folder_name(ui, data_dir, monkeypatch):
    """Two servers sharing an outputs folder pick the same name in the same second: the VAE tab takes the next
    free one, as results do, instead of refusing after the tuning with a fix the page does not offer."""
    import itertools

    from attndistill.webui import app

    monkeypatch.setattr(app.time, "strftime", lambda *args: "20990101-000000")
    monkeypatch.setattr(ui, "counter", itertools.count())
    taken = ui.outputs / "vae-20990101-000000-000"
    taken.mkdir()
    (taken / "config.json").write_text("{}")  # the other server's tuned VAE
    status, folder, *_ = run_tab(ui, "vae", {"vae-reference": str(data_dir / "wood-rings.jpg"), "vae-steps": 1,
                                             "vae-use": False, "vae-box": ""}, session="vae-names")[-1]
    assert status.startswith("done") and Path(folder).name == "vae-20990101-000000-001"
    assert (taken / "config.json").read_text() == "{}"


def test_the_terminal_command_carries_the_servers_pixel_changing_flags(tiny_sd15_dir, tmp_path, data_dir):
    from attndistill.model.perf import PerfOptions

    ui = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path,
               perf=PerfOptions(vae_tiling=True))
    ui.demo = ui.build()
    params, command, _ = result_parameters(run_tab(ui, "style", {
        "style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
        "style-size": "64", "style-steps": 1, "style-preview-every": 0}))
    assert params["perf"] == {"vae_tiling": True} and "--vae-tiling" in shlex.split(command)


def test_text_to_image_and_appearance_tabs_run_and_say_how_to_rerun(ui, data_dir):
    params, command, _ = result_parameters(run_tab(ui, "t2i", {
        "t2i-prompt": "a red barn", "t2i-style": str(data_dir / "watercolor-cat.jpg"), "t2i-steps": "1",
        "t2i-iters": "1", "t2i-size": "64", "t2i-preview-every": 0, "t2i-controlnet": None,  # None: API callers
        "t2i-tile": "x"}))
    assert params["task"] == "t2i" and params["prompt"] == "a red barn" and params["steps"] == 1
    assert shlex.split(command)[:2] == ["attndistill", "t2i"] and params["tile"] == "x"
    assert shlex.split(command)[shlex.split(command).index("--tile") + 1] == "x"
    params, command, _ = result_parameters(run_tab(ui, "appearance", {
        "appearance-target": str(data_dir / "golden-gate.jpg"),
        "appearance-reference": str(data_dir / "wood-rings.jpg"), "appearance-steps": 1, "appearance-size": "64",
        "appearance-preview-every": 0}))
    assert params["task"] == "appearance" and shlex.split(command)[:2] == ["attndistill", "appearance"]


def test_a_results_parameters_name_copies_of_its_uploads_that_outlive_the_server(ui, data_dir, monkeypatch,
                                                                                   tmp_path):
    """Gradio's upload cache goes with the server: a result names copies kept beside the results, so
    ``attndistill info OUT.png --job`` can rerun it later; the terminal command keeps the upload's name."""
    from attndistill.batch.jobs import job_from_parameters
    from attndistill.webui import fields as webui_fields

    uploads = tmp_path / "gradio"
    monkeypatch.setattr(webui_fields, "GRADIO_UPLOADS", uploads)
    for name in ("horse.jpg", "watercolor-cat.jpg"):
        (uploads / f"hash-{name}").mkdir(parents=True)
        (uploads / f"hash-{name}" / name).write_bytes((data_dir / name).read_bytes())
    values = {"style-target": str(uploads / "hash-horse.jpg" / "horse.jpg"), "style-steps": 1, "style-size": "64",
              "style-reference": str(uploads / "hash-watercolor-cat.jpg" / "watercolor-cat.jpg"),
              "style-preview-every": 0}
    params, command, _ = result_parameters(run_tab(ui, "style", values))
    again, _, _ = result_parameters(run_tab(ui, "style", values))
    kept = Path(params["content"])
    assert kept.parent == ui.outputs / "inputs" and kept.name.endswith("-horse.jpg")
    assert kept.read_bytes() == (data_dir / "horse.jpg").read_bytes() and again["content"] == str(kept)  # one copy
    assert Path(params["style"][0]).parent == ui.outputs / "inputs"
    assert shlex.split(command)[2:4] == ["horse.jpg", "watercolor-cat.jpg"]
    folder = run_tab(ui, "vae", {"vae-reference": values["style-target"], "vae-steps": 1, "vae-use": False,
                                 "vae-box": ""})[-1][1]
    made = json.loads((Path(folder) / "attndistill.json").read_text())  # so does a tuned VAE folder
    assert made["reference"] == [str(kept)]
    shutil.rmtree(uploads)  # the server has gone: the rerun line still names files that exist
    assert Path(job_from_parameters(params)["content"]).is_file()


def test_keep_uploads_leaves_what_is_no_upload_alone(tmp_path, monkeypatch):
    from attndistill.webui import fields as webui_fields

    monkeypatch.setattr(webui_fields, "GRADIO_UPLOADS", tmp_path / "gradio")
    gone = str(tmp_path / "gradio" / "h" / "gone.png")  # removed by Gradio's cache cleanup meanwhile
    for value in (gone, "a\x00b", None, "", str(tmp_path / "elsewhere.png")):
        assert webui_fields.keep_uploads(value, tmp_path / "out") == value
    assert not (tmp_path / "out").exists()


def test_a_refused_run_clears_the_last_runs_status_and_results(ui, data_dir):
    """Steps 1.5 is refused before the run starts: the page must not keep the last run's 'done' and images."""
    fn = handler(ui, "style")
    inputs = {"style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
              "style-steps": 1.5, "style-preview-every": 0}
    values = {c: inputs.get(getattr(c, "elem_id", None), c.value) for c in fn.inputs}
    values.update({c: None for c in fn.inputs if isinstance(c, gr.State)})
    updates = fn.fn(values, SimpleNamespace(session_hash="refused-page"), progress=no_progress)
    assert next(updates) == ("failed: Steps must be a whole number (got 1.5)", None, None, None, "")
    with pytest.raises(gr.Error, match=r"Steps must be a whole number \(got 1.5\)"):
        next(updates)


def test_plain_sampling_shows_steps_without_a_loss_and_the_runs_warnings(ui, data_dir):
    """0 AD iterations (a plain-sampling baseline) have no loss: the page shows none, not 'nan'. What the run
    warned of (here a negative prompt that guidance 1 leaves unused) is said beside the result."""
    updates = run_tab(ui, "t2i", {
        "t2i-prompt": "a red barn", "t2i-style": str(data_dir / "watercolor-cat.jpg"), "t2i-steps": "2",
        "t2i-iters": "0", "t2i-size": "64", "t2i-preview-every": 0, "t2i-controlnet": None,
        "t2i-negative": "blurry", "t2i-guidance": "1"})
    lines = [u[0] for u in updates if isinstance(u[0], str)]  # not the first update (the preview's)
    assert any(line.startswith("step 2/2") for line in lines) and lines[-1].startswith("done")
    assert not any("nan" in line or "loss" in line for line in lines), lines
    assert lines[-1].endswith("\n\nnote: the negative prompt is not used: guidance 1 turns classifier-free "
                              "guidance off (raise Guidance above 1 to use it)")


def test_a_run_out_of_memory_says_what_helps_and_frees_the_models_graphs(ui, data_dir, monkeypatch):
    from attndistill.model.models import DiffusionModel
    from attndistill.tasks import transfer as tasks

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    released = []
    monkeypatch.setattr(tasks, "style_transfer", out_of_memory)
    monkeypatch.setattr(DiffusionModel, "release_graphs", lambda self: released.append(self))
    inputs = {"style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
              "style-preview-every": 0}
    with pytest.raises(gr.Error, match="ran out of memory"):
        run_tab(ui, "style", inputs)
    assert len(released) == 1


def test_text_number_boxes_name_their_own_label_when_refused(ui, data_dir):
    t2i = {"t2i-prompt": "a", "t2i-style": str(data_dir / "watercolor-cat.jpg"), "t2i-size": "64",
           "t2i-preview-every": 0, "t2i-controlnet": None}
    for box, label in (("iters", "Adam iterations per step"), ("start-t", "Start timestep"), ("steps", "Steps")):
        with pytest.raises(gr.Error, match=rf"{label} '1.5' is not a whole number"):
            run_tab(ui, "t2i", {**t2i, f"t2i-{box}": "1.5"})
    with pytest.raises(gr.Error, match=r"Learning rate 'fast' is not a number"):
        run_tab(ui, "t2i", {**t2i, "t2i-lr": "fast"})


def test_values_the_page_never_sends_are_refused_not_replaced(ui, data_dir):
    """API callers can send what the page's widgets cannot: 0 images was one image, an unknown mode ran
    masked synthesis, an unknown AdaIN choice was a KeyError."""
    texture = {"texture-reference": str(data_dir / "wood-rings.jpg"), "texture-steps": 1, "texture-iters": 1,
               "texture-size": "64", "texture-preview-every": 0}
    with pytest.raises(gr.Error, match=r"Images must be at least 1 \(got 0\)"):
        run_tab(ui, "texture", {**texture, "texture-mode": "sample", "texture-num": 0})
    with pytest.raises(gr.Error, match=r"Images must be at most 16 \(got 500\)"):  # a slip, not a plan
        run_tab(ui, "texture", {**texture, "texture-mode": "sample", "texture-num": 500})
    box = next(c for c in handler(ui, "texture").inputs if getattr(c, "elem_id", None) == "texture-num")
    assert box.preprocess(500) == 500  # the served page reaches that check: Gradio's own would name no box
    with pytest.raises(gr.Error, match="texture mode 'bogus' is not one of"):
        run_tab(ui, "texture", {**texture, "texture-mode": "bogus"})
    with pytest.raises(gr.Error, match="the painted mask must be the mask painter's value"):  # was AttributeError
        run_tab(ui, "style", {"style-target": str(data_dir / "horse.jpg"), "style-mask": "junk",
                              "style-reference": str(data_dir / "watercolor-cat.jpg"), "style-preview-every": 0})
    with pytest.raises(gr.Error, match="AdaIN 'maybe' is not one of preset, on, off"):
        run_tab(ui, "t2i", {"t2i-prompt": "a", "t2i-style": str(data_dir / "watercolor-cat.jpg"), "t2i-steps": "1",
                            "t2i-size": "64", "t2i-preview-every": 0, "t2i-controlnet": None, "t2i-adain": "maybe"})


def test_masked_texture_mode_leaves_out_the_hidden_more_textures_box(ui, data_dir, tmp_path):
    """Masked mode has one Reference label map box, for one texture: files left in "More texture images" (a box
    that mode hides) made every run fail with a message about the command line."""
    labels = Image.new("RGB", (64, 64), (0, 0, 0))
    labels.paste((255, 0, 0), (0, 0, 32, 64))
    labels.save(tmp_path / "labels.png")
    params, command, _ = result_parameters(run_tab(ui, "texture", {
        "texture-reference": str(data_dir / "wood-rings.jpg"), "texture-mode": "masked", "texture-steps": 1,
        "texture-size": "64", "texture-preview-every": 0, "texture-more": [str(data_dir / "horse.jpg")],
        "texture-ref-labels": str(tmp_path / "labels.png"), "texture-target-labels": str(tmp_path / "labels.png")}))
    assert [Path(r).name for r in params["reference"]] == ["wood-rings.jpg"], params["reference"]
    assert "horse.jpg" not in command and "--ref-labels" in command


def test_strokes_painted_over_the_content_restyle_that_part_and_the_command_says_so(ui, data_dir, tmp_path):
    """The mask painter: strokes (alpha) on a layer over the content become a white-on-black mask kept beside
    the results, which the result and the terminal command name; no strokes, no mask."""
    from attndistill.webui.fields import content_to_paint_on

    w, h = Image.open(data_dir / "horse.jpg").size
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, w // 2, h))
    layer.save(tmp_path / "layer.png")
    painted = {**content_to_paint_on(str(data_dir / "horse.jpg")), "layers": [str(tmp_path / "layer.png")]}
    inputs = {"style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
              "style-steps": 1, "style-size": "64", "style-preview-every": 0}
    params, command, image = result_parameters(run_tab(ui, "style", {**inputs, "style-mask": painted}))
    kept = Path(params["mask"])
    assert kept.parent == ui.outputs / "inputs" and kept.name.endswith("-mask.png")
    assert np.asarray(Image.open(kept)).tolist()[0][: w // 2] == [255] * (w // 2)
    words = shlex.split(command)
    assert words[words.index("--mask") + 1] == str(kept)
    params, command, _ = result_parameters(run_tab(ui, "style", {**inputs, "style-mask": content_to_paint_on(
        str(data_dir / "horse.jpg"))}))
    assert "mask" not in params and "--mask" not in command


def test_a_failed_load_says_what_is_loaded_now(tiny_sd15_dir, tmp_path):
    """A Load refused by the model's configs (a mistyped path, an empty VAE folder) keeps the loaded model, as a
    run's check does: it unloaded it first, and the next run loaded it again (minutes for SDXL). A load that
    fails on the weights has freed the previous model: the status must not still say it is loaded."""
    import shutil

    ui = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path)
    assert ui.load(str(tiny_sd15_dir), "").startswith(f"loaded `{tiny_sd15_dir}`")
    loaded = ui.slot.model
    (tmp_path / "not-a-vae").mkdir()
    for model, vae in ((str(tiny_sd15_dir) + "y", ""), (str(tiny_sd15_dir), str(tmp_path / "not-a-vae"))):
        status = ui.load(model, vae)
        assert status.startswith("failed: ") and status.endswith(f"loaded `{tiny_sd15_dir}` (sd15, cpu, float32)")
        assert ui.slot.model is loaded
    broken = shutil.copytree(tiny_sd15_dir, tmp_path / "broken")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    status = ui.load(str(broken), "")
    assert status.startswith("failed: ") and status.endswith("no model loaded: the next run loads it")


def test_every_default_the_page_reads_from_the_api_exists():
    """The page's boxes read some defaults from the task functions by module name: a renamed module or
    option would leave a box blank (api_default answers None) instead of failing."""
    import re

    from attndistill.webui import fields, tabs

    calls = re.findall(r'api_default\("(\w+)", "(\w+)", "(\w+)"\)', Path(tabs.__file__).read_text())
    assert len(calls) >= 5
    for module, func, name in calls:
        assert fields.api_default(module, func, name) is not None, (module, func, name)


def test_free_text_boxes_holding_only_spaces_are_empty_boxes(ui, data_dir):
    """Spaces in the Layers or VAE box mean what an empty box means: the default layers, the model's VAE."""
    inputs = {"style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
              "style-size": "64", "style-preview-every": 0, "style-steps": 1}
    spaced = run_tab(ui, "style", {**inputs, "style-layers": "  ", "vae-box": "  "})
    params, _, image = result_parameters(spaced)
    _, _, plain = result_parameters(run_tab(ui, "style", inputs))
    assert np.array_equal(np.asarray(image), np.asarray(plain)) and "vae" not in params
    assert "decoded with the VAE" not in spaced[-1][0]


def test_the_vae_tabs_errors_name_its_boxes():
    assert page_message(UserError("VAE tuning lr must be positive (got -1)")) == \
        "Learning rate must be positive (got -1)"
    assert page_message(UserError("VAE tuning steps must be at least 1 (got 0)")).startswith("Steps must be")


#: per tab: its inputs, and number boxes set to values that differ from every preset and from each other
TYPED = {
    "style": ({"style-target": "horse.jpg", "style-reference": "watercolor-cat.jpg", "style-size": "64"},
              {"steps": 2, "iters": 2, "lr": 0.0123, "attention-scale": 1.7, "content-weight": 0.37}),
    "appearance": ({"appearance-target": "horse.jpg", "appearance-reference": "wood-rings.jpg",
                    "appearance-size": "64"},
                   {"steps": 2, "iters": 2, "lr": 0.0134, "attention-scale": 1.6, "content-weight": 0.31}),
    "texture": ({"texture-reference": "wood-rings.jpg", "texture-size": "64"},
                {"steps": 2, "iters": 2, "lr": 0.0234, "attention-scale": 1.3}),
    "t2i": ({"t2i-prompt": "a barn", "t2i-style": "watercolor-cat.jpg", "t2i-size": "64", "t2i-controlnet": None},
            {"steps": "2", "iters": "2", "lr": "0.0345", "guidance": "3.5"}),
    "expand": ({"expand-reference": "wood-rings.jpg", "expand-size": "512"},
               {"steps": 1, "iters": 1, "lr": 0.0456, "stride": 32}),
}


@pytest.mark.parametrize("tab", list(TYPED))
def test_every_number_typed_reaches_the_run_and_its_command(ui, data_dir, tab):
    inputs, numbers = TYPED[tab]
    values = {key: str(data_dir / value) if value and value.endswith(".jpg") else value
              for key, value in inputs.items()}
    values |= {f"{tab}-{name}": value for name, value in numbers.items()} | {f"{tab}-preview-every": 0}
    params, command, _ = result_parameters(run_tab(ui, tab, values))
    words = shlex.split(command)
    for name, value in numbers.items():
        assert params[name.replace("-", "_")] == float(value), name
        assert float(words[words.index(f"--{name}") + 1]) == float(value), name
    assert words[words.index("--dtype") + 1] == "fp32"  # the server's own dtype, as the ui fixture set it


def test_the_terminal_command_says_every_switch_turned_off():
    from attndistill.webui.jobs import cli_command

    assert cli_command(["t2i"], {"adain": False, "fused": False, "grid": True, "steps": None, "style": ["a b", "c"]}) \
        == "attndistill t2i --no-adain --no-fused --grid --style 'a b' --style c"


def test_every_run_refreshes_what_the_model_accordion_says_is_loaded(ui):
    """A run may load another model, or free the loaded one when the new one is refused: the Model accordion
    must not keep naming the old one."""
    refreshers = [f for f in ui.demo.fns.values() if f.fn == ui.slot.describe]
    assert len(refreshers) == 1 + len({f.api_name for f in ui.demo.fns.values()} & {
        "style", "appearance", "t2i", "texture", "expand", "vae"})  # the page load, then every tab's Run
    assert all(ui.model_status in f.outputs for f in refreshers)


def test_the_ui_loads_single_files_with_its_launch_config_and_its_commands_say_so(tiny_sd15_dir, tmp_path,
                                                                                    monkeypatch):
    """``attndistill ui --config DIR --allow-pickle``: single files entered in the Model box load offline (a
    folder still loads as itself), and the command a result shows carries both."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from ldm_checkpoint import write_ldm_checkpoint
    from safetensors.torch import load_file

    checkpoint = tmp_path / "sd.ckpt"
    torch.save(load_file(write_ldm_checkpoint(tiny_sd15_dir, tmp_path / "sd.safetensors")), checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    web = WebUI(model=str(checkpoint), device="cpu", dtype="fp32", outputs=tmp_path / "out",
                config=str(tiny_sd15_dir), allow_pickle=True)
    model = web.slot.get(str(checkpoint))
    assert model.config_source == str(tiny_sd15_dir) and "sd15" in web.slot.describe()
    options = web.common_cli(model, seed=0)
    assert options["config"] == str(tiny_sd15_dir) and options["allow_pickle"] is True
    assert web.slot.get(str(tiny_sd15_dir)).config_source is None  # a folder has configs of its own


def test_a_ui_started_with_a_config_still_runs_folders_entered_in_the_model_box(tiny_sd15_dir, tmp_path, data_dir):
    """``--config`` is for single files: the check before a load must not refuse a folder (it did: "drop
    --config", on every run of a folder not loaded yet) that the load itself takes without it."""
    web = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path, config=str(tiny_sd15_dir))
    web.demo = web.build()
    params, _, _ = result_parameters(run_tab(web, "style", {
        "style-target": str(data_dir / "horse.jpg"), "style-reference": str(data_dir / "watercolor-cat.jpg"),
        "style-size": "64", "style-steps": 1, "style-preview-every": 0}))
    assert params["steps"] == 1 and "config" not in params["model"]


def test_a_v_prediction_model_is_described_as_one(tiny_sd15_dir, tmp_path):
    from attndistill.model.loading import ModelSlot

    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "v")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    slot = ModelSlot(device="cpu", dtype="fp32")
    slot.get(str(folder))
    assert "(sd15, v-prediction, cpu, float32)" in slot.describe()
    assert slot.holds(str(folder)) and not slot.holds(str(tiny_sd15_dir))


def test_the_status_says_when_a_run_waits_for_a_program_to_compile(tiny_sd15_dir, tmp_path, data_dir, untraced):
    """Started with --compiled-loss, a first run compiles for minutes before its first step: the status line
    says so instead of standing at "starting…", and the run's own steps and result follow as usual."""
    from attndistill.model.perf import PerfOptions

    ui = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path,
               perf=PerfOptions(compiled_loss=True))
    ui.demo = ui.build()
    updates = run_tab(ui, "style", {"style-target": str(data_dir / "horse.jpg"), "style-size": "64",
                                    "style-reference": str(data_dir / "watercolor-cat.jpg"), "style-steps": 2,
                                    "style-preview-every": 0})
    statuses = [u[0] for u in updates if isinstance(u[0], str)]
    waits = [s for s in statuses if s.startswith("compiling")]
    assert len(waits) == 1 and "the AD loss and its backward (--compiled-loss) for latents of 1×4×8×8" in waits[0]
    steps = [i for i, s in enumerate(statuses) if s.startswith("step ")]
    assert steps and statuses.index(waits[0]) < steps[0], statuses  # before the first step, not after
    assert [statuses[i].split(" · ")[0] for i in steps] == ["step 1/2", "step 2/2"], statuses
    result_parameters(updates)  # done, with its result


@pytest.mark.parametrize("tab, values, message", [
    ("style", {"style-layers": "90-95"}, r"layers .*90"),  # the model's configs say how many it has
    ("texture", {"texture-mode": "masked", "texture-ref-labels": "black.png", "texture-target-labels": "red.png"},
     r"label map 'red.png' uses colour\(s\) #ff0000 that no reference"),
    ("expand", {"expand-size": "100000x512"}, r"size 100000x512 is over"),
    # what a fuzzing helper found accepted before the load, or kept for a refused run:
    ("style", {"style-layers": "90-95", "style-mask": "painted"}, r"layers .*90"),  # the painted mask: not kept
    ("t2i", {"t2i-prompt": "   "}, r"prompt is empty"),
    ("t2i", {"t2i-steps": "5000"}, r"steps must be at most 1000, the model's training timesteps"),
    ("t2i", {"t2i-start-t": "1"}, r"Start timestep 1 leaves no step for AD|start t 1 leaves no step for AD"),
    ("vae", {"vae-reference": "notes.png"}, r"reference image 'notes.png'"),
    ("style", {"model-box": "{tmp}/no-model"}, r"no-model"),  # the Model and VAE boxes, by their configs
    ("style", {"vae-box": "{tmp}/gradio"}, r"VAE .*gradio"),
])
def test_a_mistake_fails_before_the_model_loads_and_its_uploads_are_not_kept(tiny_sd15_dir, tmp_path, data_dir,
                                                                             monkeypatch, tab, values, message):
    """What a batch dry run would refuse, the page refuses before loading a model (seconds to minutes the first
    time), and before copying the uploads beside the results, which a refused run never names."""
    from attndistill.webui import fields as webui_fields

    uploads = tmp_path / "gradio"
    monkeypatch.setattr(webui_fields, "GRADIO_UPLOADS", uploads)
    upload = {}
    for name in ("horse.jpg", "watercolor-cat.jpg", "wood-rings.jpg", "black.png", "red.png", "notes.png"):
        (uploads / name).mkdir(parents=True)
        upload[name] = str(uploads / name / name)
        if name.endswith(".jpg"):
            Path(upload[name]).write_bytes((data_dir / name).read_bytes())
        elif name == "notes.png":
            Path(upload[name]).write_text("not an image")
        else:
            Image.new("RGB", Image.open(data_dir / "wood-rings.jpg").size, name[:-4]).save(upload[name])
    ui = WebUI(model=str(tiny_sd15_dir), device="cpu", dtype="fp32", outputs=tmp_path / "out")
    ui.demo = ui.build()
    monkeypatch.setattr(ui.slot, "get", lambda *a, **k: pytest.fail("the model loaded before the check"))
    given = {"style-target": upload["horse.jpg"], "style-reference": upload["watercolor-cat.jpg"],
             "texture-reference": upload["wood-rings.jpg"], "expand-reference": upload["wood-rings.jpg"],
             "t2i-style": upload["watercolor-cat.jpg"], "t2i-prompt": "a deer", "t2i-controlnet": None,
             f"{tab}-steps": "1" if tab == "t2i" else 1, f"{tab}-preview-every": 0}
    given.update({k: upload.get(v, v.replace("{tmp}", str(tmp_path))) if isinstance(v, str) else v
                  for k, v in values.items()})
    if given.get("style-mask") == "painted":  # strokes over the left half
        from attndistill.webui.fields import content_to_paint_on

        painted = content_to_paint_on(upload["horse.jpg"])
        layer = Image.new("RGBA", painted["background"].size, (0, 0, 0, 0))
        layer.paste((255, 255, 255, 255), (0, 0, layer.width // 2, layer.height))
        given["style-mask"] = {**painted, "layers": [layer]}
    with pytest.raises(gr.Error, match=message):
        run_tab(ui, tab, given)
    assert not (ui.outputs / "inputs").exists()
