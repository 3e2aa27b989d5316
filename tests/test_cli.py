"""The core commands end to end on the saved tiny model, as a user runs them."""

from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attndistill import __version__
from attndistill.cli import app
from attndistill.images import read_parameters


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_style_writes_a_png_with_its_parameters(tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "out.png"
    result = run("style", data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", "-o", out,
                 "--model", tiny_sd15_dir, "--steps", 10, "--size", 128, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "loss=" in result.output  # the progress bar shows the loss
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (128, 128)
    assert f"wrote {out} (128x128)" in result.output  # the size --size was rounded to
    params = read_parameters(out)
    assert params["task"] == "style" and params["steps"] == 10 and params["version"] == __version__
    assert params["model"] == str(tiny_sd15_dir) and params["content_weight"] == 0.25
    assert params["content"].endswith("horse.jpg") and params["style"][0].endswith("watercolor-cat.jpg")
    assert not {"guidance", "adain", "stride"} & set(params)  # settings optimisation has no use for
    assert params["made_with"] == {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                                   "diffusers": diffusers.__version__}


def test_appearance_and_layers_option(tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "app.png"
    result = run("appearance", data_dir / "golden-gate.jpg", data_dir / "wood-rings.jpg", "-o", out, "--model",
                 tiny_sd15_dir, "--steps", 2, "--size", 64, "--layers", "2-4", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    params = read_parameters(out)
    assert params["layers"] == [2, 3, 4] and params["content_weight"] == 0.2


def test_texture_variations_are_numbered(tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "tex.png"
    result = run("texture", data_dir / "wood-rings.jpg", "-o", out, "--num", 2, "--size", "96x64", "--model",
                 tiny_sd15_dir, "--steps", 2, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    for i in range(2):
        with Image.open(tmp_path / f"tex-{i}.png") as img:
            assert img.size == (96, 64)
        assert read_parameters(tmp_path / f"tex-{i}.png")["index"] == i
    assert not out.exists()
    grid = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "grid.png", "--num", 2, "--grid", "--size",
               "96x64", "--model", tiny_sd15_dir, "--steps", 2, "--device", "cpu", "--quiet")
    assert grid.exit_code == 0, grid.output
    with Image.open(tmp_path / "grid.png") as img, Image.open(tmp_path / "tex-1.png") as second:
        assert img.size == (192, 64) and img.crop((96, 0, 192, 64)).tobytes() == second.convert("RGB").tobytes()
    assert read_parameters(tmp_path / "grid.png")["grid"] == 2 and not (tmp_path / "grid-0.png").exists()


def test_existing_output_is_never_overwritten_silently(tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "out.png"
    shutil.copy(data_dir / "horse.jpg", out)  # any bytes: they must survive
    before = out.read_bytes()
    args = ("style", data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", "-o", out, "--model", tiny_sd15_dir,
            "--steps", 1, "--size", 64, "--device", "cpu", "--quiet")
    result = run(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_bytes() == before
    assert run(*args, "--overwrite").exit_code == 0
    assert read_parameters(out)["task"] == "style"


def test_version_and_help_examples():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output
    for command in ("style", "appearance", "texture", "t2i", "expand", "finetune-vae", "batch"):
        text = run(command, "--help").output
        assert "Example" in text, command


def test_python_dash_m_runs_the_command_line():
    """``python -m attndistill`` where the console script is not on PATH (a source tree on PYTHONPATH)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "attndistill", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"attndistill {__version__}", done.stderr


@pytest.mark.parametrize("flags", [  # every speed flag, in as few runs as go together
    ["--no-cuda-graphs", "--vae-tiling", "--gradient-checkpointing", "--lookahead-batch", "4",
     "--no-offload-text-encoders", "--cudnn-benchmark", "--no-channels-last", "--lookahead-overlap",
     "--no-feed-forward-chunks"],
    ["--lookahead-batch=4", "--channels-last", "--channels-last-norms", "--no-gradient-checkpointing"],
    ["--compiled-norms"], ["--compiled-loss", "--compiled-calls"]])
def test_speed_flags_work_after_the_command(tmp_path, data_dir, tiny_sd15_dir, flags, request):
    import torch

    from attndistill.cli import common

    if any(flag.startswith("--compiled") for flag in flags):
        request.getfixturevalue("untraced")

    out = tmp_path / "out.png"
    result = run("texture", data_dir / "wood-rings.jpg", "-o", out, "--model", tiny_sd15_dir, "--steps", 2,
                 "--size", 64, "--device", "cpu", "--quiet", *flags)
    assert result.exit_code == 0, result.output
    assert out.exists()
    perf = common.PERF
    expected = {"--no-cuda-graphs": perf.cuda_graphs is False, "--vae-tiling": perf.vae_tiling is True,
                "--gradient-checkpointing": perf.gradient_checkpointing is True,
                "--lookahead-batch": perf.lookahead_batch == 4, "--lookahead-batch=4": perf.lookahead_batch == 4,
                "--no-offload-text-encoders": perf.offload_text_encoders is False,
                "--no-channels-last": perf.channels_last is False, "--lookahead-overlap": perf.lookahead_overlap,
                "--no-feed-forward-chunks": perf.feed_forward_chunks is False,
                "--no-gradient-checkpointing": perf.gradient_checkpointing is False,
                "--channels-last-norms": perf.channels_last and perf.channels_last_norms,
                "--compiled-norms": perf.compiled_norms and "compiles a few small programs" in result.output,
                "--compiled-loss": perf.compiled_loss and "compile whole UNet calls" in result.output,
                "--compiled-calls": perf.compiled_calls and "--compiled-calls compile" in result.output,
                # a CUDA setting: a CPU run leaves the process's own alone
                "--cudnn-benchmark": perf.cudnn_benchmark is True and torch.backends.cudnn.benchmark is False}
    assert all(expected[f] for f in flags if f in expected), {f: expected[f] for f in flags if f in expected}


def test_a_speed_option_without_its_value_says_so(data_dir):
    result = run("texture", data_dir / "wood-rings.jpg", "--lookahead-batch")
    assert result.exit_code == 2
    assert "--lookahead-batch needs a value" in result.output and "integer" not in result.output


@pytest.mark.parametrize("command", [["style", "{bad}", "{good}"], ["appearance", "{good}", "{bad}"],
                                     ["texture", "{bad}"], ["t2i", "--style", "{bad}", "--prompt", "a b"],
                                     ["expand", "{bad}", "--size", "1024x512"]])
def test_bad_images_fail_before_the_model_loads(tmp_path, data_dir, command, monkeypatch):
    """The model named here is not cached and offline: only an image check can answer first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    args = [a.format(bad=bad, good=data_dir / "horse.jpg") for a in command]
    result = run(*args, "-o", tmp_path / "out.png", "--model", "nobody/not-cached-model")
    assert result.exit_code == 2
    assert "broken.png" in result.output and "not-cached-model" not in result.output


def test_mistakes_that_need_the_models_sizes_fail_before_its_weights_load(tmp_path, data_dir, tiny_sd15_dir,
                                                                          monkeypatch):
    """A mask with too little white, a reference that reference fit keep would cut to a sliver, --layers past
    the model's count: its configs answer these, as a batch dry run does, before a load or a download."""
    from attndistill.model import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    content = data_dir / "horse.jpg"
    w, h = Image.open(content).size
    dot = Image.new("L", (w, h))
    dot.paste(255, (w // 2, h // 2, w // 2 + 2, h // 2 + 2))  # under one 8x8 latent cell at 64 px
    dot.save(tmp_path / "dot.png")
    Image.new("RGB", (20, 2000)).save(tmp_path / "tall.png")
    Image.new("RGB", (2000, 20)).save(tmp_path / "thin.png")
    common = ("-o", tmp_path / "out.png", "--model", tiny_sd15_dir)
    for args, message in (
            (("style", content, data_dir / "watercolor-cat.jpg", "--mask", tmp_path / "dot.png", "--size", 64),
             "marks no region of at least 8x8 px"),
            (("texture", tmp_path / "tall.png", tmp_path / "thin.png", "--reference-fit", "keep"), "keeps only"),
            (("t2i", "--style", content, "--prompt", "a b", "--layers", "40-45"),
             "layers 40-45 do not exist in this model")):
        result = run(*args, *common)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "the model was loaded" not in result.output and not (tmp_path / "out.png").exists()


def test_info_prints_the_parameters_of_a_result(tmp_path, data_dir, tiny_sd15_dir):
    import json

    out = tmp_path / "tex.png"
    assert run("texture", data_dir / "wood-rings.jpg", "-o", out, "--model", tiny_sd15_dir, "--steps", 1,
               "--size", 64, "--device", "cpu", "--quiet", "--seed", 7).exit_code == 0
    result = run("info", out)
    assert result.exit_code == 0
    params = json.loads(result.output)
    assert params["task"] == "texture" and params["seed"] == 7 and params["steps"] == 1
    plain = run("info", data_dir / "horse.jpg")
    assert plain.exit_code == 2 and "carries no attndistill parameters" in plain.output
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "icon.png")  # too small to be an input, not to be described
    icon = run("info", tmp_path / "icon.png")
    assert icon.exit_code == 2 and "carries no attndistill parameters" in icon.output


@pytest.mark.parametrize("command", [
    ["style", "{data}/horse.jpg", "{data}/watercolor-cat.jpg", "--size", "64"],
    ["texture", "{data}/wood-rings.jpg", "--mode", "sample", "--size", "64"],
    ["t2i", "--style", "{data}/watercolor-cat.jpg", "--prompt", "a barn", "--size", "64", "--iters", "1"],
])
def test_preview_writes_a_small_look_at_the_running_job(tmp_path, data_dir, tiny_sd15_dir, command):
    from PIL import Image

    preview = tmp_path / "peek.png"
    args = [a.replace("{data}", str(data_dir)) for a in command]
    result = run(*args, "-o", tmp_path / "out.png", "--model", tiny_sd15_dir, "--steps", 3, "--quiet",
                 "--preview", preview, "--preview-every", 2)
    assert result.exit_code == 0, result.output
    with Image.open(preview) as img:
        assert img.format == "PNG" and img.size == (64, 64)
    assert not list(tmp_path.glob(".*partial"))
    if command[0] == "style":  # what a preview is, and a preview name that is no PNG, said by their own name
        shown = run("info", preview, "--job")
        assert shown.exit_code == 2 and "is a --preview of a run, not its result" in shown.output
        bad = run(*args, "-o", tmp_path / "out2.png", "--model", tiny_sd15_dir, "--preview", tmp_path / "peek.jpg")
        assert bad.exit_code == 2 and f"--preview '{tmp_path / 'peek.jpg'}' must end in .png" in bad.output


@pytest.mark.parametrize("command", [
    ["style", "{data}/horse.jpg", "{data}/watercolor-cat.jpg"],
    ["appearance", "{data}/horse.jpg", "{data}/watercolor-cat.jpg"],
    ["texture", "{data}/wood-rings.jpg"],
    ["t2i", "--style", "{data}/watercolor-cat.jpg", "--prompt", "a barn"],
    ["expand", "{data}/wood-rings.jpg", "--size", "1024x512"],
])
def test_preview_every_without_preview_is_refused_before_the_model_loads(tmp_path, data_dir, command):
    """It wrote nothing and said nothing: a user who asked for a look every 5 steps waited for none."""
    args = [a.replace("{data}", str(data_dir)) for a in command]
    result = run(*args, "-o", tmp_path / "out.png", "--model", tmp_path / "no-model", "--preview-every", 5)
    assert result.exit_code == 2, result.output
    assert "--preview-every 5 writes nothing without --preview; add --preview peek.png" in result.output
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("command, iters", [
    (["style", "{data}/horse.jpg", "{data}/watercolor-cat.jpg"], 1),
    (["t2i", "--style", "{data}/watercolor-cat.jpg", "--prompt", "a barn", "--iters", "2"], 2),
    (["expand", "{data}/wood-rings.jpg", "--size", "96x64", "--view", "4", "--stride", "4", "--iters", "2"], 2),
])
def test_loss_log_has_a_line_per_step_with_its_timestep_and_losses(tmp_path, data_dir, tiny_sd15_dir, command,
                                                                  iters):
    import json

    log = tmp_path / "losses.jsonl"
    args = [a.replace("{data}", str(data_dir)) for a in command]
    size = [] if command[0] == "expand" else ["--size", 64]
    result = run(*args, *size, "-o", tmp_path / "out.png", "--model", tiny_sd15_dir, "--steps", 3, "--quiet",
                 "--loss-log", log)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and f"wrote {log} (3 steps)" in result.output
    timesteps = [r["timestep"] for r in rows]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    if command[0] == "style":  # optimisation: the loss is of the step's own timestep
        assert not any("ad_timestep" in r for r in rows)
    else:  # AD-guided sampling: of t', the next step's (ALGORITHM.md §4), 0 after the last
        assert [r["ad_timestep"] for r in rows] == [*timesteps[1:], 0]
    assert all(r["loss"] is not None and r["loss"] >= 0 for r in rows)
    assert all(len(r.get("losses", [r["loss"]])) == iters for r in rows)
    if command[0] == "style":  # a content loss: its terms, which add up to the loss at the preset's weight 0.25
        assert all(r["ad"] > 0 and r["content"] > 0 for r in rows[1:])
        assert all(r["loss"] == pytest.approx(r["ad"] + 0.25 * r["content"], rel=1e-5) for r in rows), rows
    else:  # no content term: the loss is the AD loss
        assert not any({"ad", "content"} & set(r) for r in rows), rows
    again = run(*args, *size, "-o", tmp_path / "out2.png", "--model", tiny_sd15_dir, "--steps", 3, "--quiet",
                "--loss-log", log)
    assert again.exit_code == 2 and f"--loss-log '{log}' already exists; pass --overwrite" in again.output
    assert not (tmp_path / "out2.png").exists()
    same = run(*args, *size, "-o", tmp_path / "out3.png", "--model", tiny_sd15_dir, "--loss-log", tmp_path / "out3.png")
    assert same.exit_code == 2 and "is an output or preview file" in same.output
    if command[0] != "style":
        return
    # an earlier loss log is replaced with --overwrite; an input never is, nor is a model's file (a fuzzing
    # helper found both replaced by JSON lines), and "-" or "" name no file
    replaced = run(*args, *size, "-o", tmp_path / "out4.png", "--model", tiny_sd15_dir, "--steps", 2, "--quiet",
                   "--loss-log", log, "--overwrite")
    assert replaced.exit_code == 0 and len(log.read_text().splitlines()) == 2
    content = data_dir / "horse.jpg"
    for victim in (content, tiny_sd15_dir / "model_index.json"):
        before = victim.read_bytes()
        refused = run(*args, *size, "-o", tmp_path / "out5.png", "--model", tiny_sd15_dir, "--loss-log", victim,
                      "--overwrite")
        said = "is an input of this run" if victim == content else "exists and is not the loss log of an earlier run"
        assert refused.exit_code == 2 and said in refused.output, refused.output
        assert victim.read_bytes() == before and not (tmp_path / "out5.png").exists()
    for nothing in ("-", ""):
        refused = run(*args, *size, "-o", tmp_path / "out6.png", "--model", tiny_sd15_dir, "--loss-log", nothing)
        assert refused.exit_code == 2 and "names no file" in refused.output


def test_several_images_are_written_all_or_none(tmp_path, monkeypatch):
    """A full disk at the second image left the first, and a rerun then refused it as an existing output."""
    import attndistill.images as images
    from attndistill.cli.common import StepLosses, write_images
    from attndistill.errors import UserError

    real, calls = images.save_result, []

    def second_fails(img, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise UserError(f"output '{path}' could not be written (No space left on device); free space")
        return real(img, path, **kwargs)

    monkeypatch.setattr(images, "save_result", second_fails)
    with pytest.raises(UserError, match="No space left"):
        write_images([Image.new("RGB", (8, 8))] * 3, tmp_path / "t.png", overwrite=False)
    assert len(calls) == 2 and not list(tmp_path.iterdir())
    earlier = tmp_path / "t-0.png"  # with --overwrite, a new result that replaced an earlier one stays
    Image.new("RGB", (4, 4)).save(earlier)
    calls.clear()
    with pytest.raises(UserError, match="No space left"):
        write_images([Image.new("RGB", (8, 8))] * 3, tmp_path / "t.png", overwrite=True)
    assert Image.open(earlier).size == (8, 8) and sorted(p.name for p in tmp_path.iterdir()) == ["t-0.png"]
    earlier.unlink()
    monkeypatch.setattr(images, "save_result", real)
    losses = StepLosses(tmp_path / "gone" / "losses.jsonl")  # its folder went: the images stay, and it says so
    with pytest.raises(UserError, match=r"--loss-log .* \(the images were written: .*t-0.png, .*t-1.png\)"):
        write_images([Image.new("RGB", (8, 8))] * 2, tmp_path / "t.png", overwrite=False, losses=losses)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-0.png", "t-1.png"]


def test_a_progress_bar_written_to_a_log_is_a_line_now_and_then(tmp_path, data_dir, tiny_sd15_dir):
    """stderr to a file or a pipe (a Slurm job's log): the bar drew a line every 10 steps and at each update tqdm
    chose; now it draws one at the start, at the end and every 30 s between, each with the loss."""
    result = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "t.png", "--model", tiny_sd15_dir,
                 "--steps", 30, "--size", 64)
    assert result.exit_code == 0, result.output
    drawn = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("texture:")]
    assert len(drawn) <= 3 and "30/30" in drawn[-1] and "loss=" in drawn[-1], drawn


def test_a_preview_that_cannot_be_written_does_not_end_the_run(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """A full disk under --preview ended the run (exit 2, no result) with a message about an "output"."""
    import attndistill.images as images
    from attndistill.errors import UserError

    real, preview = images.save_png, tmp_path / "peek.png"

    def disk_full_for_previews(image, path, **kwargs):
        if str(path) == str(preview):
            raise UserError(f"output '{path}' could not be written (No space left on device); free space")
        return real(image, path, **kwargs)

    monkeypatch.setattr(images, "save_png", disk_full_for_previews)
    result = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "t.png", "--model", tiny_sd15_dir,
                 "--steps", 4, "--size", 64, "--preview", preview, "--preview-every", 1)
    assert result.exit_code == 0, result.output
    assert result.stderr.count(f"warning: --preview '{preview}' could not be written (No space left on device); "
                               "free space; the run goes on without previews") == 1
    assert (tmp_path / "t.png").exists()


def test_an_interrupt_between_images_leaves_none_of_the_set(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, raised as Terminated) after the first image left it, and said no partial output was
    left; the rerun then refused it as an existing output."""
    import attndistill.images as images
    from attndistill.cli.common import Terminated, write_images

    real, calls = images.save_result, []

    def interrupted_at_second(img, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise Terminated()
        return real(img, path, **kwargs)

    monkeypatch.setattr(images, "save_result", interrupted_at_second)
    with pytest.raises(Terminated):
        write_images([Image.new("RGB", (8, 8))] * 3, tmp_path / "t.png", overwrite=False)
    assert len(calls) == 2 and not list(tmp_path.iterdir())
    for i in range(3):  # with --overwrite, a result that replaced an earlier one stays, and is said
        Image.new("RGB", (4, 4)).save(tmp_path / f"t-{i}.png")
    calls.clear()
    with pytest.raises(Terminated):
        write_images([Image.new("RGB", (8, 8))] * 3, tmp_path / "t.png", overwrite=True)
    assert [Image.open(tmp_path / f"t-{i}.png").size for i in range(3)] == [(8, 8), (4, 4), (4, 4)]
    assert f"note: {tmp_path / 't-0.png'} already replaced the earlier result of that name" in capsys.readouterr().err


def test_an_output_that_appears_during_the_run_is_kept_and_so_is_the_result(tmp_path, capsys):
    """Outputs are checked before the work; a file another process writes meanwhile is never replaced, and the
    finished result is not thrown away either: it goes beside it, with a warning that names both."""
    from attndistill.cli.common import write_images

    (tmp_path / "out-1.png").write_bytes(b"someone else's")
    (tmp_path / "out-1.new.png").write_bytes(b"and another")
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    written = write_images(images, tmp_path / "out.png", overwrite=False)
    assert written == [tmp_path / "out-0.png", tmp_path / "out-1.new-2.png"]
    assert (tmp_path / "out-1.png").read_bytes() == b"someone else's"
    assert Image.open(written[1]).getpixel((0, 0)) == (0, 0, 255)
    assert "'" + str(tmp_path / "out-1.png") + "' appeared while this ran" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "line"), [
    (["style", "c.png", "s.png", "--lr", "nan"], "error: Invalid value for '--lr': nan is not a finite number (see "
                                                 "'attndistill style -h')"),
    (["style", "c.png"], "error: Missing argument 'STYLE' (see 'attndistill style -h')"),
    (["style", "c.png", "s.png", "-m", " "], "error: Invalid value for '--model' / '-m': is empty; give a Hub id, a "
                                             "folder or a weights file, or leave it out for SD 1.5 (see 'attndistill "
                                             "style -h')"),  # it loaded (or, offline, named) the default
    (["--bogus"], "error: No such option: --bogus (see 'attndistill -h')"),
    (["style", "--steps"], "error: Option '--steps' requires an argument (see 'attndistill style -h')")])
def test_usage_errors_are_one_line(argv, line, monkeypatch, capsys):
    """The console script turns click's usage text and boxed message into the one line every error is."""
    from attndistill.cli import main

    monkeypatch.setattr("sys.argv", ["attndistill", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize(("args", "message"), [(["--max-upload-mb", "nan"], "--max-upload-mb must be a positive"),
                                               (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive"),
                                               (["--port", "0"], "port 0 is not a TCP port"),
                                               # without --model these started the server, refused at a first run
                                               (["--dtype", "fp8"], "dtype 'fp8' is not supported"),
                                               (["--device", "tpu"], "device 'tpu' is not supported")])
def test_ui_options_are_checked_before_anything_loads(args, message):
    result = CliRunner().invoke(app, ["ui", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_an_unexpected_error_is_one_line_and_a_failing_exit(tmp_path, data_dir, tiny_sd15_dir, monkeypatch):
    """A bug inside a task must not look like success to a script: exit 1, one line, no traceback."""
    import attndistill.tasks.transfer as transfer

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(transfer, "style_transfer", boom)
    result = run("style", data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", "-o", tmp_path / "out.png",
                 "--model", tiny_sd15_dir, "--steps", 1, "--size", 64, "--device", "cpu")
    assert result.exit_code == 1
    assert "error: unexpected RuntimeError: boom (rerun with --debug for the traceback)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.png").exists()


def test_a_preview_is_written_every_few_steps_and_at_the_last(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import attndistill.images as images
    from attndistill.cli.common import step_callback

    written = []
    monkeypatch.setattr(images, "save_png", lambda image, path, **kw: written.append(image))
    model = SimpleNamespace(preview=lambda latents, side: latents)
    callback = step_callback(tmp_path / "preview.png", 2, model)
    for step in range(5):
        callback(SimpleNamespace(step=step, total=5, stage="", latents=step + 1))
    callback(SimpleNamespace(step=0, total=75, stage="tuning the VAE decoder", latents=None))  # nothing to show
    assert written == [2, 4, 5]
    assert step_callback(None, 2, model) is None


def test_info_warns_when_an_input_changed_since_the_result_was_made(tmp_path, data_dir, tiny_sd15_dir):
    """Results record inputs by path: an image saved again under its name would make a rerun give other pixels
    without a word, so results keep the files' digests and info compares them with the files as they are now."""
    import shutil

    from attndistill.fingerprints import KEY, file_digest

    texture = tmp_path / "texture.jpg"
    shutil.copy(data_dir / "wood-rings.jpg", texture)
    out = tmp_path / "out.png"
    made = run("texture", texture, "-o", out, "--model", tiny_sd15_dir, "--steps", 1, "--size", 64, "--quiet")
    assert made.exit_code == 0, made.output
    params = read_parameters(out)
    assert params[KEY] == {"reference": [file_digest(texture)]}  # the model's folder is not read
    assert "warning" not in run("info", out, "--job").stderr
    Image.open(data_dir / "horse.jpg").save(texture)  # another image under the same name
    shown = run("info", out, "--job")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["reference"] == [str(texture)]
    assert shown.stderr == (f"warning: reference '{texture}' has changed since '{out}' was made; a rerun will not "
                            "give the same pixels\n")
    texture.unlink()
    assert f"reference '{texture}' is gone since" in run("info", out).stderr


def test_commands_show_this_packages_info_lines_and_not_other_libraries():
    """A compiled program says "compiling …" at INFO (minutes of a still progress bar): commands show it."""
    import logging

    from attndistill.cli.common import quiet_libraries

    quiet_libraries()
    assert logging.getLogger("attndistill.model.compiling").isEnabledFor(logging.INFO)
    assert not logging.getLogger("diffusers.models").isEnabledFor(logging.INFO)


def test_a_warning_about_an_input_is_printed_once(tmp_path, data_dir, tiny_sd15_dir, bare_root_logger):
    """The check before the model loads and the run both read the content image: its warning came twice."""
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with bare_root_logger():
        result = run("style", tmp_path / "anim.gif", data_dir / "watercolor-cat.jpg", "-o", tmp_path / "out.png",
                     "--model", tiny_sd15_dir, "--steps", 1, "--size", 64, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"content image '{tmp_path / 'anim.gif'}' has 2 frames; its first is used") == 1


@pytest.mark.parametrize("command", [["style", "{data}/horse.jpg", "{data}/watercolor-cat.jpg"],
                                     ["t2i", "--style", "{data}/watercolor-cat.jpg", "--prompt", "a barn"]])
def test_a_run_that_diverges_still_writes_the_losses_before_it(tmp_path, data_dir, tiny_sd15_dir, command):
    """The curve a learning-rate sweep wants most is the one that blows up: it was never written. It ends at the
    step that diverged, though the NaN watch saw it only at step 10 (it reads its flag every 10 steps). Its last
    row says, as the others do, the timestep AD-guided sampling's iterations ran at (t', the next step's)."""
    import json

    log = tmp_path / "losses.jsonl"
    args = [a.replace("{data}", str(data_dir)) for a in command]
    result = run(*args, "-o", tmp_path / "out.png", "--model", tiny_sd15_dir, "--steps", 12, "--size", 64, "--lr",
                 1e30, "--loss-log", log, "-q")
    assert result.exit_code == 3 and "became NaN/Inf at step" in result.output, result.output
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    bad = len(rows)
    assert f"at step {bad} of 12" in result.output and f"wrote {log} ({bad} steps)" in result.output
    assert [r["step"] for r in rows] == list(range(1, bad + 1)) and rows[-1]["loss"] is None  # JSON has no NaN
    assert all(isinstance(r["loss"], float) for r in rows[:-1]) and bad == (2 if command[0] == "style" else 1)
    assert all(("ad_timestep" in r) == (command[0] == "t2i") for r in rows), rows
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("once", [True, False])
def test_the_terminal_says_a_warning_once_but_every_info_line_and_a_servers_every_line(once):
    """INFO lines (a program compiling, once per shape) are always said; a UI server's jobs each have their say."""
    import io
    import logging

    from attndistill.cli.common import Terminal

    terminal, stream = Terminal(once=once), io.StringIO()
    terminal.setStream(stream)
    logger = logging.getLogger("attndistill.test-terminal")
    logger.addHandler(terminal)
    logger.propagate, logger.level = False, logging.INFO
    try:
        for _ in range(2):
            logger.warning("style image 'a.gif' has 2 frames; its first is used")
            logger.info("compiling the AD loss")
    finally:
        logger.removeHandler(terminal)
    assert stream.getvalue().count("WARNING: style image") == (1 if once else 2)
    assert stream.getvalue().count("INFO: compiling the AD loss") == 2
