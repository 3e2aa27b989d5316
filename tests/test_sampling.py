"""AD-guided sampling (Algorithm 2) on the tiny SD 1.5 / SDXL models, checked against diffusers' pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

import attndistill as ad
from attndistill.core import sampling
from attndistill.core.engine import Distiller
from attndistill.core.features import discover_self_attention_layers
from attndistill.core.sampling import prompt_conditioning, sample
from attndistill.images import load_image, to_tensor

PROMPT = "a red deer in the forest"


def _final_latents(**kwargs) -> torch.Tensor:
    """Run text_to_image and return the latents its last callback saw (the final ones)."""
    seen = []
    ad.text_to_image(PROMPT, kwargs.pop("style"), progress=False, callback=lambda info: seen.append(info), **kwargs)
    return seen[-1].latents


def _start_noise(model, num: int, size: int, seed: int) -> torch.Tensor:
    """The documented start: Gaussian latents from a CPU generator seeded with ``seed``."""
    shape = (num, 4, size // model.vae_scale_factor, size // model.vae_scale_factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def _diffusers(pipe_cls, model, **components):
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    pipe = pipe_cls(**{**model.pipe.components, **components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_iters0_equals_stable_diffusion_pipeline(tiny_sd15, data_dir):
    # iters=0 and no AdaIN: every part of AD off
    ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=3, iters=0, adain=False,
                          size=64, num_images=2, seed=3, negative_prompt="blurry")
    pipe = _diffusers(StableDiffusionPipeline, tiny_sd15)
    ref = pipe(PROMPT, negative_prompt="blurry", num_images_per_prompt=2, height=64, width=64,
               num_inference_steps=3, guidance_scale=ad.PRESETS["t2i"].guidance,
               latents=_start_noise(tiny_sd15, 2, 64, 3), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_iters0_equals_stable_diffusion_xl_pipeline(tiny_sdxl, data_dir):
    ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sdxl, steps=3, iters=0, adain=False,
                          size=64, seed=5)
    pipe = _diffusers(StableDiffusionXLPipeline, tiny_sdxl)
    ref = pipe(PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=ad.PRESETS["t2i-sdxl"].guidance,
               latents=_start_noise(tiny_sdxl, 1, 64, 5), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_a_v_prediction_model_from_a_pndm_config_samples_as_diffusers_does(tiny_sd15_dir, tmp_path, data_dir):
    """SD 2.x models predict v and ship PNDM or Euler configs without ``clip_sample``: sampling follows their
    prediction type, and never clips the predicted latent (DDIM's default where the config is silent)."""
    import shutil

    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "v-model")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "clip_sample"}
    config_file.write_text(json.dumps({**config, "_class_name": "PNDMScheduler", "prediction_type": "v_prediction"}))
    model = ad.load_model(str(folder), device="cpu", dtype="fp32")
    ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=model, steps=3, iters=0, adain=False,
                          size=64, seed=3)
    scheduler = DDIMScheduler.from_config(model.scheduler_config, clip_sample=False)
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=ad.PRESETS["t2i"].guidance,
               latents=_start_noise(model, 1, 64, 3), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert scheduler.config.prediction_type == "v_prediction"


def test_guidance_rescale_on_a_zero_snr_v_model_samples_as_diffusers_does(tiny_sd15_dir, tmp_path, data_dir):
    """Zero-terminal-SNR v-prediction models want the guided prediction rescaled (diffusers' guidance_rescale)."""
    import shutil

    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "zsnr")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction",
                                       "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    model = ad.load_model(str(folder), device="cpu", dtype="fp32")
    pipe = _diffusers(StableDiffusionPipeline, model)
    runs = {}
    for rescale in (0.0, 0.7):
        ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=model, steps=3, iters=0, adain=False,
                              size=64, seed=3, guidance_rescale=rescale)
        ref = pipe(PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=ad.PRESETS["t2i"].guidance,
                   guidance_rescale=rescale, latents=_start_noise(model, 1, 64, 3), output_type="latent").images
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        runs[rescale] = ours
    assert (runs[0.0] - runs[0.7]).abs().max() > 1e-3


def test_layout_iters0_equals_img2img_pipeline(tiny_sd15, data_dir):
    layout = load_image(data_dir / "golden-gate.jpg").resize((64, 64))
    seen = []
    ad.layout_texture(data_dir / "wood-rings.jpg", layout, strength=0.6, model=tiny_sd15, steps=5, iters=0,
                      size=64, seed=2, progress=False, callback=seen.append)
    assert len(seen) == int(5 * 0.6)  # SDEdit runs only the last steps
    z_layout = tiny_sd15.encode(to_tensor(layout))
    pipe = _diffusers(StableDiffusionImg2ImgPipeline, tiny_sd15)
    ref = pipe("", image=z_layout, strength=0.6, num_inference_steps=5, guidance_scale=1.0,
               generator=torch.Generator("cpu").manual_seed(2), output_type="latent").images
    torch.testing.assert_close(seen[-1].latents, ref, atol=1e-5, rtol=1e-5)


def _sampling_setup(model, size=64):
    """A small random reference latent (cheap on CPU) and the prompt's CFG conditioning."""
    z_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    cond, uncond = prompt_conditioning(model, PROMPT, guidance=7.5, size=(size, size))
    return z_ref, cond, uncond


def test_inner_adam_steps_lower_the_loss_at_every_step(tiny_sd15):
    z_ref, cond, uncond = _sampling_setup(tiny_sd15)
    distiller = Distiller(tiny_sd15, condition_size=(64, 64))
    before, after = [], []

    def record(info):
        before.append(info.losses[0])
        with torch.no_grad():  # the loss of the returned latents against the same noised reference
            after.append(float(distiller.loss(info.latents)))

    sample(distiller, _start_noise(tiny_sd15, 1, 64, 0), z_ref, cond=cond, uncond=uncond, guidance=7.5, steps=3,
           iters=3, lr=0.015, adain=True, generator=torch.Generator().manual_seed(0), progress=False,
           callback=record)
    assert len(after) == 3
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_adam_state_is_fresh_at_every_step(tiny_sd15, monkeypatch):
    # One Adam step from a fresh state moves every element by lr * g / (|g| + eps) ~ lr; from a kept
    # state (moments of the previous steps) it would not.
    moves = []
    original = sampling.guide_latents

    def spy(distiller, latents, *args, **kwargs):
        out, losses = original(distiller, latents, *args, **kwargs)
        moves.append((out - latents).abs().flatten())
        return out, losses

    monkeypatch.setattr(sampling, "guide_latents", spy)
    z_ref, cond, uncond = _sampling_setup(tiny_sd15)
    lr = 0.02
    sample(Distiller(tiny_sd15, condition_size=(64, 64)), _start_noise(tiny_sd15, 1, 64, 0), z_ref, cond=cond,
           uncond=uncond, guidance=7.5, steps=3, iters=1, lr=lr, adain=False, progress=False)
    assert len(moves) == 3
    for move in moves:
        assert (move - lr).abs().le(1e-3 * lr).float().mean() > 0.9  # a kept state: under 0.1


def _run(model, *, iters: int, **kwargs) -> tuple[torch.Tensor, list]:
    z_ref, cond, uncond = _sampling_setup(model)
    seen = []
    out = sample(Distiller(model, condition_size=(64, 64)), _start_noise(model, 1, 64, 0), z_ref, cond=cond,
                 uncond=uncond, guidance=7.5, iters=iters, lr=0.05, progress=False, callback=seen.append, **kwargs)
    return out, seen


@pytest.mark.parametrize("start_t", [500, 501])  # 501 is one of the 4 steps' timesteps: "t < start_t" skips it
def test_start_t_limits_ad_to_late_steps(tiny_sd15, start_t):
    _, seen = _run(tiny_sd15, steps=4, iters=1, start_t=start_t)
    guided = [bool(info.losses) for info in seen]
    assert guided == [info.timestep < start_t for info in seen] and any(guided) and not all(guided)
    assert start_t == 500 or start_t in [info.timestep for info in seen]


def test_ad_changes_the_result(tiny_sd15):
    assert not torch.allclose(_run(tiny_sd15, steps=2, iters=0)[0], _run(tiny_sd15, steps=2, iters=1)[0])


def test_same_seed_same_images_and_parameters(tiny_sd15, data_dir):
    kw = dict(model=tiny_sd15, steps=1, iters=1, size=64, progress=False)
    first = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", seed=1, num_images=2, **kw)
    a = [np.asarray(i) for i in first]
    b = [np.asarray(i) for i in ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", seed=1, num_images=2,
                                                 **kw)]
    c, _ = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", seed=2, num_images=2, **kw)  # as many images
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], np.asarray(c)) and not np.array_equal(a[0], a[1])
    params = json.loads(first[1].info["parameters"])
    assert params["task"] == "t2i" and params["prompt"] == PROMPT and params["lr"] == ad.PRESETS["t2i"].lr
    assert params["guidance"] == 7.5 and params["adain"] is True and params["steps"] == 1 and params["index"] == 1


def test_sdxl_feature_calls_use_the_null_conditioning(tiny_sdxl, data_dir):
    pipe = tiny_sdxl.pipe
    null, _, null_pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    discover_self_attention_layers(tiny_sdxl.unet)  # its one-off numbering call, made before the hook counts
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["encoder_hidden_states"].detach().clone(),
                      {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()}))

    handle = tiny_sdxl.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sdxl, steps=2, iters=1,
                         size=(96, 64), progress=False)
    finally:
        handle.remove()
    feature = [c for c in calls if c[0].shape[0] == 1]  # denoising calls carry the CFG batch of 2
    assert len(calls) - len(feature) == 2
    assert len(feature) == 2 * (1 + 1)  # per step: the reference, then one call per Adam iteration
    for hidden, added in feature:
        torch.testing.assert_close(hidden, null)
        torch.testing.assert_close(added["text_embeds"], null_pooled)
        assert added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]]  # (h, w) of the output


def test_texture_sampling_uses_its_preset(tiny_sd15, data_dir):
    imgs = ad.texture_sampling(data_dir / "wood-rings.jpg", num=2, model=tiny_sd15, steps=1, size=(96, 64),
                               progress=False)
    assert [i.size for i in imgs] == [(96, 64)] * 2
    params = json.loads(imgs[0].info["parameters"])
    assert params["guidance"] == 1.0 and params["iters"] == ad.PRESETS["texture-sample"].iters


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance=0.5), "guidance"), (dict(num_images=0), "at least 1"), (dict(start_t=2000), "start-t"),
    (dict(content="horse.jpg"), "content_weight="), (dict(control_image="horse.jpg"), "needs both controlnet="),
])
def test_bad_settings_are_user_errors(tiny_sd15, data_dir, kwargs, message):
    kwargs = {k: data_dir / v if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ad.UserError, match=message):
        ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1, size=64, progress=False,
                         **kwargs)


def test_strength_out_of_range(tiny_sd15, data_dir):
    with pytest.raises(ad.UserError, match="strength"):
        ad.layout_texture(data_dir / "wood-rings.jpg", data_dir / "horse.jpg", strength=0.0, model=tiny_sd15,
                          steps=2, size=64, progress=False)


def test_content_image_adds_lambda_times_the_content_loss(tiny_sd15, data_dir):
    # same seed, same noise: only lambda changes, so the first loss is L_AD + lambda * L_content, linear in lambda
    first = {}
    for weight in (0.1, 1.0, 2.0):
        seen = []
        (img,) = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1, iters=1, size=64,
                                  content=data_dir / "horse.jpg", content_weight=weight, progress=False,
                                  callback=seen.append)
        first[weight] = seen[0].losses[0]
    slope = first[1.0] - first[0.1]
    assert slope > 0
    assert first[2.0] - first[0.1] == pytest.approx(slope * 1.9 / 0.9, rel=1e-4)
    assert json.loads(img.info["parameters"])["content"].endswith("horse.jpg")


@pytest.mark.parametrize("error,for_good", [(torch.cuda.OutOfMemoryError("CUDA out of memory"), False),
                                            (RuntimeError("operation not permitted when stream is capturing"), True)])
def test_a_denoising_call_that_cannot_be_captured_runs_eagerly(monkeypatch, error, for_good):
    """Out of memory while capturing: eager for that shape until the model's graphs are dropped (the next job
    tries again); any other capture failure: graphs off for the model."""
    from types import SimpleNamespace

    from attndistill.core import guidance
    from attndistill.model.models import Conditioning
    from attndistill.model.perf import PerfOptions

    captures = []

    def capture(*args):
        captures.append(args)
        raise error

    monkeypatch.setattr(guidance, "GraphedPredict", capture)
    model = SimpleNamespace(perf=PerfOptions(), asked=PerfOptions(), device=torch.device("cuda"), graphs={},
                            predict=lambda x, t, cond, **kwargs: x * 2)  # the capture path, without a GPU
    x, cond = torch.ones(1, 4, 8, 8), Conditioning(torch.zeros(1, 77, 32), None)
    for _ in range(2):
        torch.testing.assert_close(guidance._predict(model, x, 500, cond, {}), x * 2)
    assert len(captures) == 1  # not tried again at every step
    assert (model.perf.cuda_graphs is False) == for_good == (model.asked.cuda_graphs is False)  # set_perf keeps it
    assert (guidance.EAGER in model.graphs.values()) != for_good


def test_a_start_t_that_leaves_no_step_for_ad_is_refused(tiny_sd15, data_dir):
    """AD runs at steps whose timestep is below start-t: at or under the last timestep it would never run."""
    from attndistill.errors import UserError
    from attndistill.tasks.generate import texture_sampling

    ref = data_dir / "wood-rings.jpg"
    with pytest.raises(UserError, match="start-t 1 leaves no step for AD.* the last of 2 steps has timestep 1"):
        texture_sampling(ref, model=tiny_sd15, steps=2, start_t=1, size=64, progress=False)
    assert texture_sampling(ref, model=tiny_sd15, steps=2, start_t=2, size=64, progress=False)  # AD at t=1
    assert texture_sampling(ref, model=tiny_sd15, steps=2, start_t=1, iters=0, adain=False, size=64,
                            progress=False)  # plain DDIM: start-t has nothing to gate


def test_a_guidance_rescale_without_guidance_is_said_to_be_unused(tiny_sd15, data_dir, caplog):
    with caplog.at_level("WARNING", logger="attndistill.core.sampling"):
        ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1, iters=0, size=64,
                         guidance=1, guidance_rescale=0.7, progress=False)
    assert "guidance rescale 0.7 is not used: guidance 1 turns classifier-free guidance off" in caplog.text
