"""Every performance switch keeps results: fast path == plain path (fp32, tiny model, CPU).

CUDA graphs need a GPU: their equality is checked by ``benchmarks/bench.py --compare``.
A note on tolerances: all switches give the same loss and gradient to float rounding (1e-7),
but Adam normalises gradients per element and the L1 losses have kinks, so over many steps
rounding differences grow; the latent comparisons therefore use schedules of a few dozen steps.
Content-initialised runs start on the content L1's kink; the engine gives targets that equal their
content latent an exactly-zero content term there, so the batch layout cannot pick its sign at the
first step. Later steps can still cross a kink by chance, which is why these checks use fixed seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attndistill as ad
from attndistill.engine import Distiller
from attndistill.optimize import optimize_latents
from attndistill.perf import PerfOptions


@pytest.fixture
def model(tiny_sd15):
    yield tiny_sd15
    tiny_sd15.set_perf(PerfOptions())


def _run(model, perf, init, z_ref, z_c, steps=30, iters=1):
    model.set_perf(perf)
    return optimize_latents(Distiller(model, content_weight=0.25), init, z_ref, content_latents=z_c, steps=steps,
                            iters=iters, lr=0.05, progress=False)


def test_one_batched_call_gives_the_same_loss_and_gradient(model):
    z_ref, z_c, z0 = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    grads, losses = [], []
    for fused in (False, True):
        with Distiller(model, content_weight=0.25, fused=fused) as d:
            d.begin_timestep(torch.tensor(500), z_ref, z_c)
            z = z0.clone().requires_grad_(True)
            loss = d.loss(z)
            loss.backward()
            grads.append(z.grad)
            losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-6
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_fused_switch_keeps_the_optimised_latent_and_image(model):
    z_ref, z_c, init = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model, PerfOptions.plain(), init, z_ref, z_c)
    fast = _run(model, PerfOptions(fused=True, early_exit=False), init, z_ref, z_c)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.decode(fast), model.decode(plain), atol=1e-4, rtol=0)


def test_early_exit_is_exact(model):
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model, PerfOptions.plain(), z_c, z_ref, z_c, steps=10, iters=2)
    fast = _run(model, PerfOptions(fused=False, early_exit=True), z_c, z_ref, z_c, steps=10, iters=2)
    assert torch.equal(fast, plain)


def test_default_cpu_fast_path_gives_the_same_style_transfer_image(model, data_dir):
    images = {}
    for name, perf in (("plain", PerfOptions.plain()), ("fast", PerfOptions())):
        model.set_perf(perf)
        img = ad.style_transfer(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", model=model, steps=20,
                                size=64, progress=False)
        images[name] = np.asarray(img, np.float32) / 255
    assert np.abs(images["fast"] - images["plain"]).max() <= 1e-4


def test_fused_texture_synthesis_gives_the_same_image(model, data_dir):
    images = {}
    for name, perf in (("plain", PerfOptions.plain()), ("fast", PerfOptions(fused=True))):
        model.set_perf(perf)
        img = ad.texture_synthesis(data_dir / "wood-rings.jpg", model=model, steps=20, size=64, progress=False)[0]
        images[name] = np.asarray(img, np.float32) / 255
    assert np.abs(images["fast"] - images["plain"]).max() <= 1e-4


def test_batched_targets_equal_one_by_one(model):
    """Several targets of one reference optimised in one batch == each optimised alone."""
    model.set_perf(PerfOptions.plain())
    z_ref, contents = torch.randn(1, 4, 8, 8), torch.randn(3, 4, 8, 8)
    batched = _run(model, PerfOptions.plain(), contents, z_ref, contents, steps=10)
    for i in range(3):
        single = _run(model, PerfOptions.plain(), contents[i:i + 1], z_ref, contents[i:i + 1], steps=10)
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-4, rtol=0)


def test_perf_switches_apply_and_revert(model):
    model.set_perf(PerfOptions(gradient_checkpointing=True, vae_tiling=True))
    assert model.unet.is_gradient_checkpointing and model.vae.use_tiling
    model.set_perf(PerfOptions())
    assert not model.unet.is_gradient_checkpointing and not model.vae.use_tiling


def test_style_transfer_batch_returns_one_image_per_content(model, data_dir):
    import json

    contents = [data_dir / "horse.jpg", data_dir / "golden-gate.jpg"]
    images = ad.style_transfer_batch(contents, data_dir / "watercolor-cat.jpg", model=model, steps=2, size=64,
                                     progress=False)
    assert [img.size for img in images] == [(64, 64)] * 2
    assert [json.loads(img.info["parameters"])["content"] for img in images] == [str(c) for c in contents]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
