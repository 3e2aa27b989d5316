"""Optimisation mode (Algorithm 1) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attndistill as ad
from attndistill.core import optimize as opt_mod
from attndistill.core.engine import Distiller
from attndistill.core.features import discover_self_attention_layers
from attndistill.core.optimize import optimize_latents


def test_inner_iterations_reduce_the_loss(tiny_sd15):
    z_ref = torch.randn(1, 4, 8, 8)
    init = torch.randn(1, 4, 8, 8)
    seen = []
    optimize_latents(Distiller(tiny_sd15), init, z_ref, steps=1, iters=40, lr=0.05, progress=False,
                     callback=lambda info: seen.extend(info.losses))
    assert len(seen) == 40
    assert seen[-1] < 0.7 * seen[0]


def test_optimisation_lowers_total_loss_over_the_schedule(tiny_sd15):
    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    distiller = Distiller(tiny_sd15, content_weight=0.25)
    out = optimize_latents(distiller, z_c, z_ref, content_latents=z_c, steps=30, iters=1, lr=0.05, progress=False)

    def total(z, t):
        with torch.no_grad(), Distiller(tiny_sd15, content_weight=0.25) as d:
            d.begin_timestep(torch.tensor(t), z_ref, z_c)
            return d.loss(z).item()

    for t in (1, 300, 600):
        assert total(out, t) < total(z_c, t)


def test_adam_state_persists_across_timesteps(tiny_sd15, monkeypatch):
    created = []

    class SpyAdam(torch.optim.Adam):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            created.append(self)

    monkeypatch.setattr(opt_mod.torch.optim, "Adam", SpyAdam)
    optimize_latents(Distiller(tiny_sd15), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), steps=4, iters=2,
                     lr=0.05, progress=False)
    assert len(created) == 1
    (state,) = created[0].state.values()
    assert int(state["step"]) == 8


def test_texture_seed_reproducible_and_seeds_differ(tiny_sd15, data_dir):
    ref = data_dir / "wood-rings.jpg"
    kw = dict(model=tiny_sd15, steps=3, size=64, progress=False)
    a = np.asarray(ad.texture_synthesis(ref, seed=1, **kw)[0])
    b = np.asarray(ad.texture_synthesis(ref, seed=1, **kw)[0])
    c = np.asarray(ad.texture_synthesis(ref, seed=2, **kw)[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_texture_num_variations_in_one_batch(tiny_sd15, data_dir):
    imgs = ad.texture_synthesis(data_dir / "wood-rings.jpg", num=3, model=tiny_sd15, steps=2, size=(128, 64),
                                progress=False)
    assert [i.size for i in imgs] == [(128, 64)] * 3
    arrays = [np.asarray(i) for i in imgs]
    assert not np.array_equal(arrays[0], arrays[1])


def test_style_transfer_keeps_aspect_and_records_parameters(tiny_sd15, data_dir):
    # horse.jpg is 768x754: long side 128 -> 128x128 after rounding to 32 (the tiny UNet's multiple)
    out = ad.style_transfer(data_dir / "golden-gate.jpg", data_dir / "watercolor-cat.jpg", model=tiny_sd15,
                            steps=2, size=(128, 64), progress=False)
    assert out.size == (128, 64)
    import json

    params = json.loads(out.info["parameters"])
    assert params["task"] == "style" and params["steps"] == 2 and params["content_weight"] == 0.25
    assert params["layers"] == [1, 2, 3, 4, 5, 6]


def test_appearance_transfer_uses_its_preset(tiny_sd15, data_dir):
    import json

    out = ad.appearance_transfer(data_dir / "horse.jpg", data_dir / "wood-rings.jpg", model=tiny_sd15, steps=1,
                                 size=64, progress=False)
    assert json.loads(out.info["parameters"])["content_weight"] == ad.PRESETS["appearance"].content_weight


@pytest.mark.parametrize("task", ["style", "texture"])
def test_sdxl_optimisation_features_use_the_output_size(tiny_sdxl, data_dir, task):
    """The null conditioning of every feature call carries the output's size (ALGORITHM.md §1), not the native one."""
    discover_self_attention_layers(tiny_sdxl.unet)  # its probe call runs once per model, with zeros
    time_ids = []
    handle = tiny_sdxl.unet.register_forward_pre_hook(
        lambda m, a, kw: time_ids.append(kw["added_cond_kwargs"]["time_ids"][0].tolist()), with_kwargs=True)
    try:
        if task == "style":
            ad.style_transfer(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", model=tiny_sdxl, steps=1,
                              size=(96, 64), progress=False)
        else:
            ad.texture_synthesis(data_dir / "wood-rings.jpg", model=tiny_sdxl, steps=1, size=(96, 64), progress=False)
    finally:
        handle.remove()
    assert time_ids and all(ids == [64, 96, 0, 0, 64, 96] for ids in time_ids)  # (h, w) of the output


def test_a_diverging_run_names_its_step_as_the_progress_bar_counts(tiny_sd15, data_dir):
    import attndistill as ad
    from attndistill.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"became NaN/Inf at step 2 of 3 \(timestep \d+\)"):
        ad.texture_synthesis(data_dir / "wood-rings.jpg", model=tiny_sd15, steps=3, lr=1e30, size=64, progress=False)


@pytest.mark.parametrize(("task", "raised"), [
    ("texture", "attention_scale="),
    ("style", "content_weight= or attention_scale="),
    ("t2i", "attention_scale= or guidance="),
    ("expand", "attention_scale=")])
def test_a_diverging_runs_advice_names_only_its_own_settings(tiny_sd15, data_dir, task, raised):
    """A style run was told to lower --guidance or --control-scale, which it does not have; a Python caller is
    told the keyword arguments (the CLI's words: tests/test_cli.py)."""
    import attndistill as ad
    from attndistill.errors import NonFiniteError

    ref, common = data_dir / "wood-rings.jpg", dict(model=tiny_sd15, steps=3, lr=1e30, progress=False)
    run = {"texture": lambda: ad.texture_synthesis(ref, size=64, **common),
           "style": lambda: ad.style_transfer(data_dir / "horse.jpg", ref, size=64, **common),
           "t2i": lambda: ad.text_to_image("a barn", ref, size=64, iters=1, **common),
           "expand": lambda: ad.expand_texture(ref, size=(48, 32), view=4, stride=2, **common)}[task]
    with pytest.raises(NonFiniteError) as error:
        run()
    assert f"; lower lr= (or a raised {raised}), or check the input images" in str(error.value)


@pytest.mark.parametrize(("loss", "latent", "what"), [(float("nan"), 0.0, "loss"), (1.0, float("inf"), "latent")])
def test_the_nan_guard_says_which_went_bad_and_where(loss, latent, what):
    """The advice differs: a bad loss with finite latents points at the loss; bad latents at the update."""
    from attndistill.core.progress import _FiniteGuard
    from attndistill.errors import NonFiniteError

    guard = _FiniteGuard(torch.device("cpu"), total=3)
    guard.update(0, 999, torch.zeros(1), [torch.tensor(1.0)])
    guard.update(1, 666, torch.full((1,), latent), [torch.tensor(loss)])
    guard.update(2, 333, torch.full((1,), float("nan")), [torch.tensor(float("nan"))])  # a later bad step: not it
    guard.check(1)  # not a checking step
    with pytest.raises(NonFiniteError, match=rf"the {what} became NaN/Inf at step 2 of 3 \(timestep 666\)") as error:
        guard.check(2, final=True)
    assert "--dtype fp32" not in str(error.value)  # the run was fp32 already: no advice in a circle


def test_the_nan_advice_names_fp32_only_for_half_precision_runs():
    from attndistill.core.progress import _FiniteGuard
    from attndistill.errors import NonFiniteError

    for dtype, advised in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False),
                           (torch.float64, False)):
        guard = _FiniteGuard(torch.device("cpu"), total=1, dtype=dtype)
        guard.update(0, 999, torch.zeros(1), [torch.tensor(float("nan"))])
        with pytest.raises(NonFiniteError) as error:
            guard.check(0, final=True)
        assert ("use --dtype fp32" in str(error.value)) == advised, (dtype, str(error.value))


def test_each_steps_loss_is_its_last_iterations(tiny_sd15):
    seen = []
    optimize_latents(Distiller(tiny_sd15), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), steps=3, iters=3,
                     lr=0.05, progress=False, callback=seen.append)
    assert len(seen) == 3 and all(len(info.losses) == 3 and info.loss == info.losses[-1] for info in seen)
    assert any(info.losses[0] != info.losses[-1] for info in seen)


def test_the_bar_shows_the_loss_every_ten_steps_and_at_the_last():
    """Reading the loss syncs a GPU, so the bar shows it every 10 steps, counted from 1 as the bar counts, and at
    the end; a loop that moves the bar itself (advance=0, MultiDiffusion's view batches) is not moved twice."""
    from attndistill.core.progress import StepLoop

    shown = []
    with StepLoop(torch.device("cpu"), 12, desc="t", progress=True, callback=None) as loop:
        loop.bar.set_postfix = lambda **kw: shown.append(kw.get("loss"))
        for i in range(12):
            loop.done(i, 1000 - i, torch.zeros(1), [torch.tensor(float(i))])
        assert loop.bar.n == 12
    assert shown == ["9.0000", "11.0000"]
    with StepLoop(torch.device("cpu"), 2, desc="t", progress=True, callback=None, bar_total=6, advance=0) as loop:
        for i in range(2):
            for _ in range(3):
                loop.tick()
            loop.done(i, 500, torch.zeros(1), [torch.tensor(1.0)])
        assert loop.bar.n == 6


def test_each_callback_gets_the_latents_of_its_own_step(tiny_sd15):
    """The run goes on in one buffer (a static one under CUDA graphs): a callback keeping latents (history, the
    web UI's preview) must get a copy, or every step it kept would show the last."""
    seen = []
    optimize_latents(Distiller(tiny_sd15), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), steps=3, iters=1,
                     lr=0.05, progress=False, callback=lambda info: seen.append(info.latents))
    assert len(seen) == 3 and not torch.equal(seen[0], seen[-1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize("task", ["texture", "t2i"])
def test_a_task_neither_needs_nor_moves_torchs_global_random_state(tiny_sd15, data_dir, task):
    """Its noise comes from generators of its seed: the caller's torch.rand draws after it are their own (a task
    reseeded the global generator with its seed), and the caller's state does not change its pixels."""
    import attndistill as ad

    ref = data_dir / "wood-rings.jpg"
    run = {"texture": lambda: ad.texture_synthesis(ref, model=tiny_sd15, steps=2, size=64, seed=5, progress=False),
           "t2i": lambda: ad.text_to_image("a barn", ref, model=tiny_sd15, steps=2, iters=1, size=64, seed=5,
                                           progress=False)}[task]
    results = []
    for caller_seed in (123, 999):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        results.append(np.asarray(run()[0]))
        assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("task", ["style", "t2i", "finetune-vae"])
def test_tasks_run_inside_inference_mode_as_outside_it(tiny_sd15, data_dir, task):
    """A server wraps its handlers in torch.inference_mode(): every task ended in an autograd traceback there."""
    import attndistill as ad

    ref = data_dir / "wood-rings.jpg"
    run = {"style": lambda: np.asarray(ad.style_transfer(data_dir / "horse.jpg", ref, model=tiny_sd15, steps=2,
                                                         size=64, progress=False)),
           "t2i": lambda: np.asarray(ad.text_to_image("a barn", ref, model=tiny_sd15, steps=2, iters=1, size=64,
                                                      progress=False)[0]),
           "finetune-vae": lambda: ad.finetune_vae(ref, model=tiny_sd15, steps=2).decoder.conv_out.weight.detach()}
    outside = run[task]()
    with torch.inference_mode():
        inside = run[task]()
    assert np.array_equal(np.asarray(inside), np.asarray(outside))


def test_a_model_loaded_inside_inference_mode_still_runs_tasks(tiny_sd15_dir, data_dir):
    """A server that loads its model lazily inside its handler's inference_mode made weights that can take no
    part in a backward: load_model makes them outside it; weights made there another way are named."""
    import attndistill as ad
    from attndistill.core.engine import Distiller

    with torch.inference_mode():
        model = ad.load_model(str(tiny_sd15_dir), device="cpu", dtype="fp32")
        out = ad.texture_synthesis(data_dir / "wood-rings.jpg", model=model, steps=2, size=64, progress=False)[0]
    assert out.size == (64, 64)
    with torch.inference_mode():
        model.unet.conv_in.weight = torch.nn.Parameter(model.unet.conv_in.weight.clone(), requires_grad=False)
    with pytest.raises(ad.UserError, match="weights were made inside torch.inference_mode"):
        Distiller(model)


def test_direct_use_of_a_distiller_says_what_it_cannot_do_in_one_line(tiny_sd15):
    """A loop of one's own: the loss of target latents that require grad inside torch.inference_mode (their
    backward then failed far away, "element 0 of tensors does not require grad"), and content latents of a
    batch that fits neither one for all targets nor one for each (a raw size mismatch)."""
    z_ref, z = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8).requires_grad_(True)
    with Distiller(tiny_sd15, content_weight=0.25) as distiller:
        distiller.begin_timestep(500, z_ref, torch.randn(3, 4, 8, 8))
        with pytest.raises(ad.UserError, match="^3 content latents for 2 target latents; give one content"):
            distiller.loss(z)
        distiller.begin_timestep(500, z_ref, torch.randn(1, 4, 8, 8))
        with torch.inference_mode(), pytest.raises(ad.UserError, match="torch.inference_mode forbids"):
            distiller.loss(z)
        with torch.inference_mode(), pytest.raises(ad.UserError, match="torch.inference_mode forbids"):
            distiller.adam_steps(z.detach(), torch.tensor(500), z_ref, None, iters=1, lr=0.05, fresh=True)
        assert torch.isfinite(distiller.loss(z))  # outside it, as ever


def test_the_presets_cannot_be_changed_by_accident():
    """One source of defaults for the whole process: a notebook's ``ad.PRESETS["style"] = ...`` would have changed
    every later run, CLI and web UI alike, without a word."""
    with pytest.raises(TypeError):
        ad.PRESETS["style"] = ad.PRESETS["texture"]
    assert ad.get_preset("style").override(steps=5).steps == 5 and ad.PRESETS["style"].steps == 200
