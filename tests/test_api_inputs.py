"""The Python API refuses what it cannot use with one UserError, and keeps no state between calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import attndistill as ad
from attndistill.errors import UserError
from attndistill.generate import text_to_image
from attndistill.perf import PerfOptions
from attndistill.tasks import style_transfer_batch


def _style(model, data_dir, **options):
    options = {"model": model, "steps": 2, "size": 64, "progress": False, **options}
    content = options.pop("content", data_dir / "horse.jpg")
    style = options.pop("style", data_dir / "watercolor-cat.jpg")
    return ad.style_transfer(content, style, **options)


@pytest.mark.parametrize("options,expected", [
    ({"dtype": "bf16"}, "dtype differ from the loaded model"),
    ({"vae": "/no/such/vae"}, "vae differ from the loaded model"),
    ({"size": -64}, "size must be a positive"), ({"size": 0}, "size must be a positive"),
    ({"size": True}, "size must be a positive"), ({"size": (64,)}, "size must be a positive"),
    ({"steps": 2.5}, "steps must be a whole number"), ({"lr": "0.1"}, "lr must be a number"),
    ({"layers": 3}, "layers must be"), ({"layers": [1.5]}, "layers must be"),
    ({"seed": 2**70}, "seed must be a whole number"), ({"seed": 1.5}, "seed must be a whole number"),
    ({"callback": 5}, "callback must be a function"), ({"tune_vae": "no"}, "tune_vae must be True or False"),
    ({"style": []}, "no style image given"), ({"content": np.zeros((64, 64, 3), np.uint8)}, "not a ndarray"),
])
def test_bad_arguments_are_one_user_error(tiny_sd15, data_dir, options, expected):
    with pytest.raises(UserError, match=expected):
        _style(tiny_sd15, data_dir, **options)


@pytest.mark.parametrize("model", [0, {}, "unet"])
def test_a_model_argument_that_is_no_model(tiny_sd15, data_dir, model):
    with pytest.raises(UserError, match="model must be a loaded model"):
        _style(tiny_sd15.unet if model == "unet" else model, data_dir)


@pytest.mark.parametrize("task", ["texture_sampling", "layout_texture", "expand_texture", "masked"])
def test_every_texture_task_refuses_a_tune_vae_that_is_no_bool(tiny_sd15, data_dir, task):
    from attndistill import generate, textures

    ref = data_dir / "wood-rings.jpg"
    calls = {"texture_sampling": lambda: generate.texture_sampling(ref, model=tiny_sd15, tune_vae="no"),
             "layout_texture": lambda: generate.layout_texture(ref, ref, model=tiny_sd15, tune_vae="no"),
             "expand_texture": lambda: textures.expand_texture(ref, size=512, model=tiny_sd15, tune_vae="no"),
             "masked": lambda: textures.masked_texture_synthesis(ref, ref, ref, model=tiny_sd15, tune_vae="no")}
    with pytest.raises(UserError, match="tune_vae must be True or False"):
        calls[task]()


def test_other_bad_arguments(tiny_sd15, data_dir, tmp_path):
    with pytest.raises(UserError, match="negative prompt must be one string"):
        text_to_image("a cat", data_dir / "watercolor-cat.jpg", negative_prompt=5, model=tiny_sd15, steps=1)
    for net in (5, tiny_sd15.unet):
        with pytest.raises(UserError, match="controlnet must be"):
            text_to_image("a cat", data_dir / "watercolor-cat.jpg", controlnet=net,
                          control_image=data_dir / "horse.jpg", model=tiny_sd15, steps=1)
    from attndistill.generate import texture_sampling
    from attndistill.textures import with_texture_options

    with pytest.raises(UserError, match="no texture image given"):
        with_texture_options(texture_sampling, [], model=tiny_sd15, tile="xy")
    with pytest.raises(UserError, match="takes a list of content images"):
        style_transfer_batch(str(data_dir / "horse.jpg"), data_dir / "watercolor-cat.jpg", model=tiny_sd15)
    with pytest.raises(UserError, match="num must be a whole number"):
        ad.texture_synthesis(data_dir / "wood-rings.jpg", num=2.0, model=tiny_sd15, steps=1)
    with pytest.raises(UserError, match="saves a PIL image"):
        ad.save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "x.png")
    with pytest.raises(UserError, match="Distiller needs a model"):
        ad.Distiller("x")
    with pytest.raises(UserError, match="is not a file"):
        ad.read_parameters(tmp_path / "missing.png")
    deep = PngInfo()
    deep.add_text("attndistill", "[" * 100_000 + "]" * 100_000)  # json's RecursionError, not a ValueError
    Image.new("RGB", (8, 8)).save(tmp_path / "deep.png", pnginfo=deep)
    with pytest.raises(UserError, match="not a JSON object of parameters"):
        ad.read_parameters(tmp_path / "deep.png")
    for bad in ({"fused": "no"}, {"lookahead_batch": 0}):
        with pytest.raises(UserError):
            PerfOptions(**bad)
    with pytest.raises(UserError, match="PerfOptions"):
        tiny_sd15.set_perf({"fused": True})
    with pytest.raises(UserError, match="PerfOptions"):
        tiny_sd15.set_perf(bogus=1)


def test_texture_options_take_a_model_path_like_every_task(tiny_sd15_dir, data_dir):
    from attndistill.generate import texture_sampling
    from attndistill.textures import with_texture_options

    images = with_texture_options(texture_sampling, data_dir / "wood-rings.jpg", model=str(tiny_sd15_dir), tile="xy",
                                  steps=1, iters=1, size=64, device="cpu", dtype="fp32", vae=str(tiny_sd15_dir / "vae"))
    assert images[0].size == (64, 64)
    assert json.loads(images[0].info["parameters"])["vae"] == str(tiny_sd15_dir / "vae")


def test_attention_slicing_can_be_turned_off_again(tiny_sd15):
    def processors():
        return {type(p).__name__ for p in tiny_sd15.unet.attn_processors.values()}

    fresh = processors()
    tiny_sd15.set_perf(PerfOptions(attention_slicing=True))
    assert any(name.startswith("Sliced") for name in processors())
    tiny_sd15.set_perf(PerfOptions())
    assert processors() == fresh


def test_callbacks_keep_the_latents_they_are_given(tiny_sd15, data_dir):
    """Each step's latents are the callback's own copy, not the buffer the run goes on in."""
    seen = []
    _style(tiny_sd15, data_dir, steps=3, callback=lambda info: seen.append(info.latents))
    assert len(seen) == 3 and not torch.equal(seen[0], seen[-1])


def test_an_infinite_pixel_does_not_blacken_a_float_image():
    values = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    values[0, 0] = np.inf
    rgb = np.asarray(ad.load_image(Image.fromarray(values, "F")))
    assert rgb.mean() > 50
