"""CLI end to end for sampling: ``t2i`` (SD 1.5 / SDXL, ControlNet + Canny), texture sampling, SDEdit layout."""

from __future__ import annotations

import logging

import pytest
from PIL import Image
from typer.testing import CliRunner

from attndistill.cli import app
from attndistill.images import read_parameters

FAST = ["--steps", "2", "--iters", "1", "--size", "64", "--device", "cpu", "--dtype", "fp32", "-q"]


@pytest.fixture(scope="module")
def cn_dirs(tmp_path_factory):
    from attndistill.testing import build_tiny_controlnet

    return {kind: build_tiny_controlnet(tmp_path_factory.mktemp(f"cn-{kind}"), sdxl=kind == "sdxl")
            for kind in ("sd15", "sdxl")}


@pytest.fixture
def models(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_t2i_writes_numbered_images_with_parameters(kind, models, data_dir, tmp_path):
    out = tmp_path / "deer.png"
    _ok(run("t2i", "--style", data_dir / "watercolor-cat.jpg", "--prompt", "a deer", "-o", out, "--num-images", 2,
            "-m", models[kind], *FAST))
    paths = [tmp_path / "deer-0.png", tmp_path / "deer-1.png"]
    assert all(p.is_file() for p in paths) and not out.exists()
    params = read_parameters(paths[1])
    assert params["task"] == "t2i" and params["prompt"] == "a deer" and params["index"] == 1
    assert params["guidance"] == (7.0 if kind == "sdxl" else 7.5) and params["steps"] == 2
    assert Image.open(paths[0]).size == (64, 64)


def test_t2i_tunes_the_decoder_on_its_style_images(models, data_dir, tmp_path, monkeypatch):
    """VAE* from text-to-image too (ALGORITHM.md §5: usable from every task): fitted to the style images."""
    from attndistill.tasks import vae_tuning

    tuned_on = []
    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder",  # 3 steps instead of 75: the same mechanics, sooner
                        lambda vae, images, **kw: tuned_on.append(images.shape) or real(vae, images, **{**kw,
                                                                                                  "steps": 3}))
    out = tmp_path / "deer.png"
    _ok(run("t2i", "--style", data_dir / "watercolor-cat.jpg", "-p", "a deer", "-o", out, "--tune-vae",
            "-m", models["sd15"], *FAST))
    assert read_parameters(out)["tune_vae"] is True and len(tuned_on) == 1 and tuned_on[0][0] == 1


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_t2i_with_controlnet_canny(kind, models, cn_dirs, data_dir, tmp_path):
    out = tmp_path / "cn.png"
    _ok(run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-s", data_dir / "wood-rings.jpg", "-p", "a horse",
            "-o", out, "--controlnet", cn_dirs[kind], "--control-image", data_dir / "horse.jpg", "--control",
            "canny", "--control-scale", "0.5", "--negative-prompt", "blurry", "-m", models[kind], *FAST))
    params = read_parameters(out)
    assert params["control"] == "canny" and params["control_scale"] == 0.5 and len(params["style"]) == 2
    assert params["controlnet"] == str(cn_dirs[kind]) and params["negative_prompt"] == "blurry"


def test_t2i_with_a_single_file_controlnet_in_the_original_layout(models, cn_dirs, data_dir, tmp_path):
    """ControlNet 1.1's own files (one pickle, original tensor names) run with --allow-pickle, and the result
    names the file."""
    import json

    import torch
    from ldm_checkpoint import controlnet_to_ldm
    from safetensors.torch import load_file

    folder = cn_dirs["sd15"]
    net = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save(controlnet_to_ldm(load_file(folder / "diffusion_pytorch_model.safetensors"),
                                 json.loads((folder / "config.json").read_text())), net)
    out = tmp_path / "cn.png"
    args = ["t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a horse", "-o", out, "--controlnet", net,
            "--control-image", data_dir / "horse.jpg", "--control", "canny", "-m", models["sd15"], *FAST]
    refused = run(*args)
    assert refused.exit_code == 2 and "is a pickle file that can run code when loaded" in refused.output
    _ok(run(*args, "--allow-pickle"))
    assert read_parameters(out)["controlnet"] == str(net)


def test_t2i_tile_makes_a_pattern_and_a_bad_axis_fails_before_the_model_loads(models, data_dir, tmp_path):
    out = tmp_path / "pattern.png"
    _ok(run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a floral pattern", "-o", out, "--tile", "xy",
            "-m", models["sd15"], *FAST))
    assert read_parameters(out)["tile"] == "xy"
    bad = run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a", "-o", tmp_path / "b.png", "--tile", "z",
              "-m", tmp_path / "no-model")
    assert bad.exit_code == 2 and "tile 'z' is not understood; use x, y or xy" in bad.output


def test_t2i_grid_and_overwrite_rules(models, data_dir, tmp_path):
    out = tmp_path / "grid.png"
    args = ["t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a cat", "-o", out, "--num-images", 3, "--grid",
            "--iters", "0", "-m", models["sd15"], *FAST]
    _ok(run(*args))
    assert Image.open(out).size == (128, 128)  # 3 images of 64 x 64 in a 2 x 2 grid
    assert read_parameters(out)["grid"] == 3
    again = run(*args)
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output


def test_t2i_warns_about_long_prompts(models, data_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _ok(run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a deer " * 60, "-o", tmp_path / "long.png",
                "--iters", "0", "-m", models["sd15"], *FAST))
    assert "CLIP keeps the first 77, so its end is ignored: '" in caplog.text


def test_plain_sampling_shows_no_loss(models, data_dir, tmp_path):
    """--iters 0 is plain sampling (a baseline): the bar has no loss to show, rather than 'loss=nan'."""
    result = run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a cat", "-o", tmp_path / "plain.png",
                 "--iters", "0", "--steps", "2", "--size", "64", "--device", "cpu", "-m", models["sd15"])
    _ok(result)
    assert "t=" in result.output and "loss=" not in result.output


def test_t2i_says_a_negative_prompt_without_guidance_is_not_used(models, data_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _ok(run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a cat", "--negative-prompt", "blurry",
                "--guidance", "1", "-o", tmp_path / "neg.png", "--iters", "0", "-m", models["sd15"], *FAST))
    assert "the negative prompt is not used: guidance 1 turns classifier-free guidance off" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--control-image", "horse.jpg"], "--controlnet"),
    (["--control", "depth", "--controlnet", "x/y", "--control-image", "horse.jpg"], "control 'depth'"),
    (["--content", "horse.jpg"], "--content-weight"),
    (["--guidance", "0.5"], "guidance"),
])
def test_t2i_bad_options_are_one_line_errors(extra, message, models, data_dir, tmp_path):
    extra = [data_dir / e if e.endswith(".jpg") else e for e in extra]
    result = run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a deer", "-o", tmp_path / "x.png",
                 "-m", models["sd15"], *FAST, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_texture_sample_mode(models, data_dir, tmp_path):
    out = tmp_path / "tex.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", "--mode", "sample", "--num", 2, "-o", out,
            "-m", models["sd15"], *FAST))
    params = read_parameters(tmp_path / "tex-1.png")
    assert params["task"] == "texture-sample" and params["mode"] == "sample" and params["guidance"] == 1.0


def test_texture_layout_sdedit(models, data_dir, tmp_path):
    layout = tmp_path / "layout.png"
    img = Image.new("RGB", (128, 64), (200, 40, 40))
    img.paste((40, 40, 200), (64, 0, 128, 64))
    img.save(layout)
    out = tmp_path / "laid.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", "--layout", layout, "--strength", "0.5", "-o", out,
            "-m", models["sd15"], "--steps", "4", "--iters", "1", "--size", "128", "--device", "cpu", "-q"))
    assert Image.open(out).size == (128, 64)  # the layout's aspect
    params = read_parameters(out)
    assert params["task"] == "texture-layout" and params["strength"] == 0.5 and params["layout"] == str(layout)


def test_texture_strength_needs_layout(models, data_dir, tmp_path):
    result = run("texture", data_dir / "wood-rings.jpg", "--strength", "0.5", "-o", tmp_path / "x.png",
                 "-m", models["sd15"], *FAST)
    assert result.exit_code == 2 and "--layout" in result.output
