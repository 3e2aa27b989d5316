"""What each task hands the engine: the §6 defaults, the right init and content latents, the seed, tiling axes.

The spec tests check the engine's maths; these check that each task feeds it what ALGORITHM.md §3-§6 say, by
spying on the call into the core (the core itself then runs as usual, or is skipped where only its inputs
matter).
"""

from __future__ import annotations

import json

import pytest
import torch

import attndistill as ad
from attndistill.images import load_image, to_tensor
from attndistill.model.models import resolve_dtype
from attndistill.presets import LAYOUT_STRENGTH, PRESETS, VAE_TUNING_LR, VAE_TUNING_STEPS, VIEW
from attndistill.tasks import generate, textures, transfer

#: ALGORITHM.md §6, written out again from the table: task -> (mode, steps, iters, lr, lambda, guidance, adain,
#: init). Where the table gives a range (texture steps 200-300, T2I iters 2-3, expansion iters 2-3) the
#: preset's choice is pinned here and checked to lie in the range below.
SPEC_TABLE = {
    "style": ("optimize", 200, 1, 0.05, 0.25, 1.0, False, "content"),
    "appearance": ("optimize", 200, 1, 0.05, 0.2, 1.0, False, "content"),
    "texture": ("optimize", 300, 1, 0.05, 0.0, 1.0, False, "random"),
    "texture-masked": ("optimize", 200, 1, 0.05, 0.15, 1.0, False, "labels"),
    "texture-sample": ("sample", 50, 3, 0.05, 0.0, 1.0, False, "random"),
    "t2i": ("sample", 50, 3, 0.015, 0.0, 7.5, True, "random"),
    "t2i-sdxl": ("sample", 50, 2, 0.015, 0.0, 7.0, True, "random"),
    "expand": ("multidiffusion", 50, 2, 0.05, 0.0, 1.0, False, "random"),
}
RANGES = {"texture": ("steps", 200, 300), "t2i": ("iters", 2, 3), "expand": ("iters", 2, 3)}


def test_presets_are_the_spec_table():
    assert set(PRESETS) == set(SPEC_TABLE)
    for task, (mode, steps, iters, lr, lam, guidance, adain, init) in SPEC_TABLE.items():
        p = PRESETS[task]
        assert (p.mode, p.steps, p.iters, p.lr, p.content_weight, p.guidance, p.adain, p.init) == \
            (mode, steps, iters, lr, lam, guidance, adain, init), task
        assert p.attention_scale == 1.0 and p.stride == 8, task  # a = 1 by default; expansion stride 8 latents
    for task, (field, low, high) in RANGES.items():
        assert low <= getattr(PRESETS[task], field) <= high
    assert VIEW == 64 and VAE_TUNING_LR == 1e-4 and VAE_TUNING_STEPS == 75 and 0 < LAYOUT_STRENGTH <= 1


def test_mixed_precision_on_gpus_and_fp32_on_the_cpu():
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


@pytest.mark.parametrize("task", ["style", "appearance"])
def test_transfers_start_from_the_content_and_keep_it_as_the_content_target(tiny_sd15, data_dir, monkeypatch, task):
    """§3: z = z_c at the start, and the content loss scores the queries of that same z_c, weighted by λ."""
    seen = {}

    def spy(distiller, init, ref_latents, **kw):
        seen.update(init=init.clone(), content=kw["content_latents"], weight=distiller.content_weight,
                    steps=kw["steps"], iters=kw["iters"], lr=kw["lr"])
        return init

    monkeypatch.setattr(transfer, "optimize_latents", spy)
    run = ad.style_transfer if task == "style" else ad.appearance_transfer
    out = run(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", model=tiny_sd15, size=64, progress=False)
    z_c = tiny_sd15.encode(to_tensor(load_image(data_dir / "horse.jpg"), out.size))
    torch.testing.assert_close(seen["init"], z_c)
    torch.testing.assert_close(seen["content"], z_c)
    p = PRESETS[task]
    assert (seen["weight"], seen["steps"], seen["iters"], seen["lr"]) == (p.content_weight, p.steps, p.iters, p.lr)


def test_a_layout_is_the_start_and_the_content_of_its_content_loss(tiny_sd15, data_dir, monkeypatch):
    seen = {}

    def spy(distiller, latents, ref_latents, **kw):
        seen.update(content=kw["content_latents"], start_step=kw["start_step"], weight=distiller.content_weight)
        return latents

    monkeypatch.setattr(generate, "sample", spy)
    out = ad.layout_texture(data_dir / "wood-rings.jpg", data_dir / "horse.jpg", model=tiny_sd15, size=64, steps=5,
                            content_weight=0.1, progress=False)[0]
    torch.testing.assert_close(seen["content"], tiny_sd15.encode(to_tensor(load_image(data_dir / "horse.jpg"),
                                                                            out.size)))
    assert seen["weight"] == 0.1 and seen["start_step"] == 1  # strength 0.8 of 5 steps skips the first
    assert json.loads(out.info["parameters"])["init"] == "layout"  # it said "random"


@pytest.mark.parametrize(("tile", "unet_axes", "view_wrap", "decode_wrap"), [
    ("x", None, (False, True), (False, True)),
    ("y", "y", (False, False), (True, False)),
    ("xy", "y", (False, True), (True, True)),
])
def test_expansion_makes_each_asked_axis_periodic_its_own_way(tiny_sd15, data_dir, monkeypatch, tile, unet_axes,
                                                              view_wrap, decode_wrap):
    """A canvas 20 latents wide and one view (8) high: along x the views wrap around; along y, where one view
    covers the canvas, the UNet's convolutions are circular; the decoder wraps every asked axis."""
    seen = {}
    real_seamless, real_decode = textures.seamless, textures.decode_tiled

    def seamless(model, axes, **kw):
        seen.setdefault("unet_axes", axes)
        return real_seamless(model, axes, **kw)

    def multidiffusion(distiller, init, ref_latents, **kw):
        seen["view_wrap"] = kw["wrap"]
        return init

    def decode_tiled(model, z, **kw):
        seen["decode_wrap"] = kw["wrap"]
        return real_decode(model, z, **kw)

    monkeypatch.setattr(textures, "seamless", seamless)
    monkeypatch.setattr(textures, "multidiffusion", multidiffusion)
    monkeypatch.setattr(textures, "decode_tiled", decode_tiled)
    out = ad.expand_texture(data_dir / "wood-rings.jpg", model=tiny_sd15, size=(160, 64), view=8, stride=8,
                            steps=1, tile=tile, progress=False)
    assert out.size == (160, 64)
    assert (seen["unet_axes"], seen["view_wrap"], seen["decode_wrap"]) == (unet_axes, view_wrap, decode_wrap)


def test_a_run_records_every_setting_it_was_given(tiny_sd15, data_dir):
    out = ad.style_transfer(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1,
                            size=64, attention_scale=1.5, lr=0.07, iters=2, content_weight=0.3, layers="3-6",
                            progress=False)
    params = json.loads(out.info["parameters"])
    assert (params["attention_scale"], params["lr"], params["iters"], params["content_weight"], params["steps"]) == \
        (1.5, 0.07, 2, 0.3, 1)
    assert params["layers"] == [3, 4, 5, 6]
