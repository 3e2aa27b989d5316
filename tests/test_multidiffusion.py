"""MultiDiffusion expansion: view layout, averaging, equivalence with the plain sampler, tiled decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import attndistill as ad
from attndistill.core import multidiffusion as md
from attndistill.core.engine import Distiller
from attndistill.core.multidiffusion import coverage, decode_tiled, multidiffusion, views, window_starts
from attndistill.core.sampling import sample
from attndistill.tasks.textures import expand_texture


@pytest.mark.parametrize(("length", "view", "stride"), [(64, 64, 8), (100, 64, 8), (150, 64, 8), (21, 8, 3)])
def test_windows_cover_the_axis_with_the_last_one_clamped(length, view, stride):
    starts = window_starts(length, view, stride)
    assert starts[0] == 0 and starts[-1] == length - view
    assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))
    assert 0 < starts[-1] - starts[-2] <= stride if len(starts) > 1 else True
    covered = set()
    for s in starts:
        covered |= set(range(s, s + view))
    assert covered == set(range(length))


def test_views_cover_a_non_square_canvas_exactly():
    count = coverage((12, 21), 8, 3)
    assert count.min() >= 1
    assert len(views((12, 21), 8, 3)) == 3 * 6  # rows 0,3,4; columns 0,3,6,9,12,13
    assert count[0, 0] == 1 and count[-1, -1] == 1  # corners: only the clamped edge windows


def test_wrapped_views_cover_a_periodic_axis_uniformly():
    starts = window_starts(24, 8, 4, wrap=True)
    assert starts == [0, 4, 8, 12, 16, 20]
    count = coverage((8, 24), 8, 4, wrap=(False, True))
    assert torch.all(count == 2)  # every column is seen by view/stride windows, edges included


def _setup(model, hw, seed=0, steps=3):
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    init = torch.randn((1, 4, *hw), generator=torch.Generator().manual_seed(seed))
    return scheduler, init


@pytest.mark.parametrize(("iters", "adain"), [(2, False), (0, True)])  # AD; AdaIN alone (ALGORITHM.md §4)
def test_one_window_canvas_equals_the_plain_sampler(tiny_sd15, iters, adain):
    z_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler, init = _setup(tiny_sd15, (8, 8))
    cond = tiny_sd15.null_condition()
    plain = sample(Distiller(tiny_sd15), init, z_ref, cond=cond, steps=3, iters=iters, lr=0.05, adain=adain,
                   generator=torch.Generator().manual_seed(7), progress=False)
    ours = multidiffusion(Distiller(tiny_sd15), init, z_ref, scheduler=scheduler, cond=cond, iters=iters, lr=0.05,
                          adain=adain, view=8, stride=2, generator=torch.Generator().manual_seed(7), progress=False)
    assert not torch.allclose(plain, init)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)


def test_canvas_is_the_per_pixel_average_of_the_views(tiny_sd15, monkeypatch):
    """Each view gets its own offset after guidance; the canvas must be the mean offset of the views over it."""
    hw, view, stride = (8, 14), 8, 3
    scheduler, init = _setup(tiny_sd15, hw, steps=1)
    calls = []
    monkeypatch.setattr(md, "cfg_noise", lambda model, z, *a, **k: (calls.append(z.shape[0]), torch.zeros_like(z))[1])
    counter = iter(range(1000))

    def fake_guide(distiller, z, *a, **k):
        return z + torch.tensor([float(next(counter)) for _ in range(z.shape[0])])[:, None, None, None], []

    monkeypatch.setattr(md, "guide_latents", fake_guide)
    out = multidiffusion(Distiller(tiny_sd15), init, torch.randn(1, 4, 8, 8), scheduler=scheduler,
                         cond=tiny_sd15.null_condition(), iters=1, lr=0.05, view=view, stride=stride, view_batch=2,
                         progress=False)
    # independent oracle: eps = 0 makes the DDIM step a per-pixel scale; offsets averaged with slicing
    t = scheduler.timesteps[0]
    scaled = scheduler.step(torch.zeros_like(init), t, init).prev_sample
    total, count = torch.zeros(hw), torch.zeros(hw)
    for k, (y, x) in enumerate((y, x) for y in (0,) for x in (0, 3, 6)):
        total[y:y + view, x:x + view] += k
        count[y:y + view, x:x + view] += 1
    assert calls == [2, 1]  # 3 views in batches of 2: progress is over timesteps x view batches
    torch.testing.assert_close(out, scaled + total / count, rtol=0, atol=1e-5)


def test_view_batches_are_as_few_as_the_limit_allows_and_even():
    assert [len(b) for b in md._batches(list(range(17)), 8)] == [6, 6, 5]
    assert [len(b) for b in md._batches(list(range(16)), 8)] == [8, 8]
    assert [len(b) for b in md._batches(list(range(3)), 8)] == [3]
    assert [len(b) for b in md._batches(list(range(5)), 1)] == [1] * 5
    assert sum(md._batches(list(range(3249)), 8), []) == list(range(3249))  # 4096²: every view, in order
    assert list(md._batches([], 8)) == []


def test_view_batch_sizes_do_not_change_the_canvas(tiny_sd15):
    """Each view gets the gradient it would get alone, so 5 views in batches of 3+2 equal one by one."""
    scheduler, init = _setup(tiny_sd15, (8, 20), steps=2)
    z_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = [multidiffusion(Distiller(tiny_sd15), init, z_ref, scheduler=scheduler, cond=tiny_sd15.null_condition(),
                          iters=2, lr=0.05, view=8, stride=3, view_batch=batch, adain=True,
                          generator=torch.Generator().manual_seed(7), progress=False) for batch in (1, 4)]
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-4)


def test_a_steps_losses_are_the_canvas_mean_whatever_the_view_batches(tiny_sd15):
    """A loss log of expand compared the last view batch's loss, and one iteration's loss a batch: a memory
    setting (--view-batch) changed the curve. Now each iteration's loss is the mean over all views."""
    scheduler, init = _setup(tiny_sd15, (8, 20), steps=2)
    z_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seen = {}
    for batch in (1, 2, 5):  # 5 views: 1+1+1+1+1, 2+2+1, one batch
        infos = []
        multidiffusion(Distiller(tiny_sd15), init, z_ref, scheduler=scheduler, cond=tiny_sd15.null_condition(),
                       iters=3, lr=0.05, view=8, stride=3, view_batch=batch,
                       generator=torch.Generator().manual_seed(7), progress=False, callback=infos.append)
        seen[batch] = [(info.loss, info.losses) for info in infos]
    for loss, losses in seen[1] + seen[2]:
        assert len(losses) == 3 and loss == losses[-1]  # each Adam iteration's, over the canvas
    for batch in (1, 2):
        for (_, losses), (_, whole_losses) in zip(seen[batch], seen[5], strict=True):
            np.testing.assert_allclose(losses, whole_losses, rtol=1e-4)


def test_padded_view_batches_give_the_same_canvas_in_one_batch_shape(tiny_sd15, monkeypatch):
    """With CUDA graphs a smaller last batch is filled up with copies of its last view (one graph, one memory
    pool, for every batch); the copies' results are dropped, so the canvas is the unpadded one."""
    scheduler, init = _setup(tiny_sd15, (8, 20), steps=2)
    z_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg_noise, sizes = md.cfg_noise, []

    def recording(model, z, *args, **kwargs):
        sizes.append(z.shape[0])
        return cfg_noise(model, z, *args, **kwargs)

    monkeypatch.setattr(md, "cfg_noise", recording)
    out = []
    for pad in (False, True):
        sizes.clear()
        out.append(multidiffusion(Distiller(tiny_sd15), init, z_ref, scheduler=scheduler,
                                  cond=tiny_sd15.null_condition(), iters=2, lr=0.05, view=8, stride=3, view_batch=4,
                                  adain=True, generator=torch.Generator().manual_seed(7), progress=False, pad=pad))
        assert sizes == ([3, 2] if not pad else [3, 3]) * 2  # 5 views, two timesteps
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-4)


def test_wrapped_views_make_the_canvas_shift_equivariant(tiny_sd15):
    """Periodic x: rolling the start canvas by a stride rolls the result (no seam at the edge)."""
    hw = (8, 16)
    scheduler, init = _setup(tiny_sd15, hw, steps=2)
    kw = dict(scheduler=scheduler, cond=tiny_sd15.null_condition(), iters=0, lr=0.05, view=8, stride=4,
              view_batch=8, wrap=(False, True), progress=False)
    a = multidiffusion(Distiller(tiny_sd15), init, torch.randn(1, 4, 8, 8), **kw)
    b = multidiffusion(Distiller(tiny_sd15), torch.roll(init, 4, dims=3), torch.randn(1, 4, 8, 8), **kw)
    torch.testing.assert_close(b, torch.roll(a, 4, dims=3), rtol=0, atol=1e-4)


def _spy_decoder(model):
    shapes = []
    handle = model.vae.decoder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_tiled_decode_matches_whole_decode_one_tile_per_call(tiny_sd15):
    z = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0))
    whole = tiny_sd15.decode(z)
    shapes, handle = _spy_decoder(tiny_sd15)
    try:
        tiled = decode_tiled(tiny_sd15, z, tile=16, overlap=4)
    finally:
        handle.remove()
    assert tiled.shape == whole.shape
    # rows start at 0, 12, 16; columns at 0, 12, 24, 32: 12 decoder calls, none larger than a tile
    assert len(shapes) == 12 and all(s[-2:] == (16, 16) for s in shapes)
    diff = (tiled - whole).abs()
    # GroupNorm statistics and the mid-block attention are per tile: close, not identical
    assert diff.mean() < 0.03 and torch.quantile(diff.flatten(), 0.99) < 0.12


def test_wrapped_tiled_decode_is_periodic(tiny_sd15):
    z = torch.randn(1, 4, 16, 36, generator=torch.Generator().manual_seed(1))
    a = decode_tiled(tiny_sd15, z, tile=16, overlap=4, wrap=(True, True))
    b = decode_tiled(tiny_sd15, torch.roll(z, (12, 12), dims=(2, 3)), tile=16, overlap=4, wrap=(True, True))
    torch.testing.assert_close(b, torch.roll(a, (96, 96), dims=(2, 3)), rtol=0, atol=1e-5)


def test_expand_texture_any_size_reproducible(tiny_sd15, data_dir):
    ref = data_dir / "wood-rings.jpg"
    kw = dict(model=tiny_sd15, size=(160, 64), steps=2, view=8, stride=2, view_batch=4, decode_tile=8,
              progress=False)
    a = expand_texture(ref, **kw)
    b = expand_texture(ref, **kw)
    assert a.size == (160, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    params = json.loads(a.info["parameters"])
    assert params["task"] == "expand" and params["stride"] == 2 and params["view"] == 8 and params["steps"] == 2
    assert params["decode_tile"] == 8  # the decoder's tiles shape the pixels: a rerun needs them


def test_views_that_do_not_overlap_are_said(tiny_sd15, data_dir, caplog):
    """``--view 8`` keeps the default stride of 8: views side by side, each denoised alone (hard seams with real
    weights). Said where the canvas has more than one view; a stride below the view is not."""
    kw = dict(model=tiny_sd15, steps=1, view=8, view_batch=4, decode_tile=8, progress=False)
    said = []
    for size, stride in (((160, 64), 8), ((160, 64), 4), ((64, 64), 8)):  # the last: one view, nothing to join
        caplog.clear()
        expand_texture(data_dir / "wood-rings.jpg", size=size, stride=stride, **kw)
        said.append("stride 8 is the view's width (8 latents): the views do not overlap" in caplog.text)
    assert said == [True, False, False]


def test_expand_texture_rejects_a_canvas_smaller_than_a_view(tiny_sd15, data_dir):
    with pytest.raises(ad.UserError, match=r"smaller than one view \(512 px\); use a larger size=, a view= of at "
                                           r"most 32 latents \(256 px\), or"):
        expand_texture(data_dir / "wood-rings.jpg", model=tiny_sd15, size=(512, 256), progress=False)
    for view, near in ((5, "4 or 8"), (3, "4")):  # the UNet's latent multiple is 4 latents here
        with pytest.raises(ad.UserError, match=f"^view={view} must be a multiple of 4 latents for this UNet; use "
                                               f"{near}$"):
            expand_texture(data_dir / "wood-rings.jpg", model=tiny_sd15, size=(96, 64), view=view, stride=2,
                           progress=False)


def test_the_reference_noise_does_not_repeat_the_start_canvas(tiny_sd15, data_dir, monkeypatch):
    """Expansion draws its start canvas and then its reference noise from one generator, as sampling does: a
    second generator of the same seed would hand the reference the canvas's own first noise values."""
    from attndistill.tasks import textures

    seen = {}

    def capture(distiller, init, z_ref, *, generator, **kwargs):
        seen.update(init=init.clone(), ref_noise=torch.randn(z_ref.shape, generator=generator))
        return init

    monkeypatch.setattr(textures, "multidiffusion", capture)
    expand_texture(data_dir / "wood-rings.jpg", model=tiny_sd15, size=(96, 64), steps=2, view=8, decode_tile=8,
                   seed=3, progress=False)
    fresh = torch.Generator().manual_seed(3)
    start = torch.randn(seen["init"].shape, generator=fresh)
    torch.testing.assert_close(seen["init"] / seen["init"].flatten()[0] * start.flatten()[0], start)  # seed 3's start
    n = min(start.numel(), seen["ref_noise"].numel())
    assert not torch.allclose(seen["ref_noise"].flatten()[:n], start.flatten()[:n])
