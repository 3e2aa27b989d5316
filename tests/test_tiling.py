"""Seamless tiling: circular convolutions make UNet and decoder commute with circular shifts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attndistill as ad
from attndistill.core.engine import Distiller
from attndistill.core.optimize import optimize_latents
from attndistill.model.tiling import seamless

T = torch.tensor(500)


def _unet(model, z):
    with torch.no_grad():
        return model.predict(z, T, model.null_condition())


def _decode(model, z):
    with torch.no_grad():
        return model.vae.decode(z).sample


def _shift_error(f, z, shift_latent, shift_out):
    """max |f(roll(z)) - roll(f(z))| relative to the output's scale."""
    out = f(z)
    shifted = f(torch.roll(z, shift_latent, dims=(2, 3)))
    return float((shifted - torch.roll(out, shift_out, dims=(2, 3))).abs().max() / out.abs().mean())


def test_xy_unet_and_decoder_commute_with_circular_shift(tiny_sd15):
    z = torch.randn(1, 4, 16, 24)  # non-square latent
    # the tiny UNet halves twice: shifts by whole positions of its coarsest grid (4 latents)
    with seamless(tiny_sd15, "xy"):
        assert _shift_error(lambda x: _unet(tiny_sd15, x), z, (4, 8), (4, 8)) < 1e-4
        assert _shift_error(lambda x: _decode(tiny_sd15, x), z, (3, 5), (24, 40)) < 1e-4
    # control: with zero padding the same shift does not commute (the check can fail)
    assert _shift_error(lambda x: _unet(tiny_sd15, x), z, (4, 8), (4, 8)) > 1e-2
    assert _shift_error(lambda x: _decode(tiny_sd15, x), z, (3, 5), (24, 40)) > 1e-2


def test_decoder_stays_periodic_with_vae_tiling_on(tiny_sd15):
    """diffusers decodes its tiles one by one, each wrapping around on its own: seamless decodes whole images."""
    from attndistill.model.perf import PerfOptions

    z = torch.randn(1, 4, 16, 24)
    tiny_sd15.set_perf(PerfOptions(vae_tiling=True))
    try:
        assert tiny_sd15.vae.tile_sample_min_size < 128  # this latent's image would be decoded in tiles
        with seamless(tiny_sd15, "xy", parts=("decoder",)):
            assert not tiny_sd15.vae.use_tiling
            assert _shift_error(lambda x: _decode(tiny_sd15, x), z, (3, 5), (24, 40)) < 1e-4
        assert tiny_sd15.vae.use_tiling
    finally:
        tiny_sd15.set_perf(PerfOptions())


@pytest.mark.parametrize(("axes", "periodic", "other"), [("x", (0, 8), (4, 0)), ("y", (4, 0), (0, 8))])
def test_single_axis_is_periodic_only_along_that_axis(tiny_sd15, axes, periodic, other):
    z = torch.randn(1, 4, 16, 24)
    with seamless(tiny_sd15, axes):
        assert _shift_error(lambda x: _unet(tiny_sd15, x), z, periodic, periodic) < 1e-4
        assert _shift_error(lambda x: _unet(tiny_sd15, x), z, other, other) > 1e-2


def _conv_state(model):
    return [(m.padding, len(m._forward_pre_hooks), m.padding_mode)
            for module in (model.unet, model.vae) for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_models_behave_as_before_after_the_context(tiny_sd15):
    z = torch.randn(1, 4, 16, 16)
    before_unet, before_vae = _unet(tiny_sd15, z), _decode(tiny_sd15, z)
    state = _conv_state(tiny_sd15)
    with seamless(tiny_sd15, "xy"):
        inside = _unet(tiny_sd15, z)
        assert any(n for _, n, _ in _conv_state(tiny_sd15))  # hooks are installed inside
    assert not torch.allclose(inside, before_unet)
    with pytest.raises(RuntimeError), seamless(tiny_sd15, "x"):
        raise RuntimeError("boom")  # an error inside still restores everything
    assert _conv_state(tiny_sd15) == state
    tiny_sd15.graphs["stale"] = object()  # a CUDA graph replays the padding it was captured with: dropped
    with seamless(tiny_sd15, "xy"):
        assert not tiny_sd15.graphs
        tiny_sd15.graphs["circular"] = object()  # and one captured inside would replay it outside
    assert not tiny_sd15.graphs
    assert torch.equal(_unet(tiny_sd15, z), before_unet)
    assert torch.equal(_decode(tiny_sd15, z), before_vae)


def test_decoder_part_leaves_the_encoder_as_it_is(tiny_sd15):
    """Textures encode their references inside seamless(parts=("unet", "decoder")): those stay uncircular."""
    encoder = [m for m in tiny_sd15.vae.encoder.modules() if isinstance(m, nn.Conv2d)]
    decoder = [m for m in tiny_sd15.vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    x = torch.rand(1, 3, 64, 64)
    before = tiny_sd15.encode(x)
    with seamless(tiny_sd15, "xy", parts=("decoder",)):
        assert not any(m._forward_pre_hooks for m in encoder)
        assert all(m._forward_pre_hooks for m in decoder if m.kernel_size[0] > 1)
        assert torch.equal(tiny_sd15.encode(x), before)


@pytest.mark.parametrize(("given", "axes"), [(None, None), ("", None), ("none", None), ("x", "x"), ("Y", "y"),
                                             ("xy", "xy"), ("yx", "xy"), ("xyx", "xy")])
def test_axes_are_read_in_any_order_and_none_means_no_tiling(given, axes):
    from attndistill.model.tiling import check_axes

    assert check_axes(given) == axes


def test_bad_axes_is_a_user_error(tiny_sd15):
    with pytest.raises(ad.UserError, match="tile 'z'"), seamless(tiny_sd15, "z"):
        pass


def test_optimisation_under_xy_tiling_is_shift_equivariant(tiny_sd15):
    """The whole AD optimisation on a torus: rolling the start rolls the result (no seam anywhere)."""
    init, z_ref = torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 8)

    def run(start):
        with seamless(tiny_sd15, "xy"):
            return optimize_latents(Distiller(tiny_sd15), start, z_ref, steps=3, iters=2, lr=0.05, progress=False)

    a = run(init)
    b = run(torch.roll(init, (4, 8), dims=(2, 3)))
    assert not torch.allclose(a, init)
    assert torch.allclose(b, torch.roll(a, (4, 8), dims=(2, 3)), atol=1e-3)


def test_texture_task_runs_seamless_and_records_it(tiny_sd15, data_dir):
    hooked = []

    def spy(info):
        hooked.append(len(tiny_sd15.unet.conv_in._forward_pre_hooks))

    before = _conv_state(tiny_sd15)
    img = ad.texture_synthesis(data_dir / "wood-rings.jpg", model=tiny_sd15, steps=2, size=(96, 64), tile="xy",
                               progress=False, callback=spy)[0]
    assert hooked == [1, 1]
    assert _conv_state(tiny_sd15) == before
    assert img.size == (96, 64)
    assert json.loads(img.info["parameters"])["tile"] == "xy"


def test_text_to_image_makes_a_pattern_with_its_controlnet_circular_too(tiny_sd15, data_dir, tmp_path):
    """t2i's tile: the UNet and a ControlNet (whose residuals join the UNet's) circular during sampling, the decoder
    while decoding; every module as before after the run; the result records it."""
    from attndistill.model.controlnet import load_controlnet
    from attndistill.testing import build_tiny_controlnet

    net = load_controlnet(build_tiny_controlnet(tmp_path / "cn"), model=tiny_sd15)
    seen = []

    def spy(info):
        seen.append((len(tiny_sd15.unet.conv_in._forward_pre_hooks), len(net.conv_in._forward_pre_hooks),
                     len(tiny_sd15.vae.decoder.conv_in._forward_pre_hooks)))

    before = _conv_state(tiny_sd15) + [(m.padding, len(m._forward_pre_hooks)) for m in net.modules()
                                       if isinstance(m, nn.Conv2d)]
    img = ad.text_to_image("a pattern", data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=2, iters=1, size=64,
                           tile="x", controlnet=net, control_image=data_dir / "horse.jpg", control="canny",
                           progress=False, callback=spy)[0]
    assert seen == [(1, 1, 0), (1, 1, 0)]
    assert before == _conv_state(tiny_sd15) + [(m.padding, len(m._forward_pre_hooks)) for m in net.modules()
                                               if isinstance(m, nn.Conv2d)]
    assert json.loads(img.info["parameters"])["tile"] == "x"
    plain = ad.text_to_image("a pattern", data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=2, iters=1,
                             size=64, progress=False)[0]
    assert "tile" not in json.loads(plain.info["parameters"]) or json.loads(plain.info["parameters"])["tile"] is None
