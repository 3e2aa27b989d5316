"""ControlNet in AD-guided sampling: loading, Canny, equality with diffusers' ControlNet pipelines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image

import attndistill as ad
from attndistill.core.features import discover_self_attention_layers
from attndistill.images import load_image
from attndistill.model.controlnet import canny, load_controlnet

PROMPT = "a house by the sea"


@pytest.fixture(scope="module")
def tiny_cn15_dir(tmp_path_factory):
    from attndistill.testing import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("tiny-cn15"), sdxl=False)


@pytest.fixture(scope="module")
def tiny_cnxl_dir(tmp_path_factory):
    from attndistill.testing import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("tiny-cnxl"), sdxl=True)


@pytest.fixture(scope="module")
def edge_map(data_dir) -> Image.Image:
    """A ready-made condition map at the output size (64 x 64), so no resizing happens on either side."""
    return canny(load_image(data_dir / "horse.jpg").resize((64, 64)))


def _final_latents(**kwargs) -> torch.Tensor:
    seen = []
    ad.text_to_image(PROMPT, kwargs.pop("style"), progress=False, callback=seen.append, **kwargs)
    return seen[-1].latents


def _noise(model, seed: int) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))


def _pipeline(cls, model, net):
    pipe = cls(**{**model.pipe.components, "controlnet": net,
                  "scheduler": DDIMScheduler.from_config(model.scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_canny_marks_the_edges_of_a_square():
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    edges = np.asarray(canny(Image.fromarray(img)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[..., 0] > 0
    assert on[15:17, 20:44].any(axis=0).all() and on[47:49, 20:44].any(axis=0).all()  # top and bottom sides
    assert not on[24:40, 24:40].any() and not on[:8].any()  # flat regions stay black


def test_loaded_controlnet_has_non_zero_residuals(tiny_sd15, tiny_cn15_dir):
    net = load_controlnet(tiny_cn15_dir, model=tiny_sd15)
    assert type(net).__name__ == "ControlNetModel" and not any(p.requires_grad for p in net.parameters())
    cond = tiny_sd15.encode_prompt([PROMPT])[0]
    down, mid = net(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=cond.encoder_hidden_states,
                    controlnet_cond=torch.rand(1, 3, 64, 64), return_dict=False)
    assert all(d.abs().max() > 0 for d in down) and mid.abs().max() > 0


def test_iters0_equals_controlnet_pipeline(tiny_sd15, tiny_cn15_dir, edge_map, data_dir):
    ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=3, iters=0, size=64, seed=4,
                          adain=False, controlnet=tiny_cn15_dir, control_image=edge_map, control_scale=0.7)
    pipe = _pipeline(StableDiffusionControlNetPipeline, tiny_sd15, load_controlnet(tiny_cn15_dir, model=tiny_sd15))
    ref = pipe(PROMPT, image=edge_map, height=64, width=64, num_inference_steps=3, controlnet_conditioning_scale=0.7,
               guidance_scale=ad.PRESETS["t2i"].guidance, latents=_noise(tiny_sd15, 4), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and the ControlNet mattered
    plain = _final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=3, iters=0, size=64, seed=4,
                           adain=False)
    assert (plain - ours).abs().max() > 1e-3


def test_a_shuffle_type_controlnet_steers_only_the_conditional_half_as_diffusers_does(tiny_sd15, tiny_cn15_dir,
                                                                                      edge_map, data_dir):
    """Nets that pool their condition (``global_pool_conditions``, content shuffle) run in diffusers' guess
    mode: under CFG the unconditional half gets no residuals."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(tiny_cn15_dir, global_pool_conditions=True)
    assert net.config.global_pool_conditions
    ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=3, iters=0, size=64, seed=4,
                          adain=False, controlnet=net, control_image=edge_map)
    pipe = _pipeline(StableDiffusionControlNetPipeline, tiny_sd15, net)
    ref = pipe(PROMPT, image=edge_map, height=64, width=64, num_inference_steps=3,
               guidance_scale=ad.PRESETS["t2i"].guidance, latents=_noise(tiny_sd15, 4), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_iters0_equals_sdxl_controlnet_pipeline(tiny_sdxl, tiny_cnxl_dir, edge_map, data_dir):
    ours = _final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sdxl, steps=3, iters=0, size=64, seed=6,
                          adain=False, controlnet=tiny_cnxl_dir, control_image=edge_map)
    pipe = _pipeline(StableDiffusionXLControlNetPipeline, tiny_sdxl, load_controlnet(tiny_cnxl_dir, model=tiny_sdxl))
    ref = pipe(PROMPT, image=edge_map, height=64, width=64, num_inference_steps=3,
               guidance_scale=ad.PRESETS["t2i-sdxl"].guidance, latents=_noise(tiny_sdxl, 6),
               output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_residuals_reach_only_the_denoising_call(tiny_sd15, tiny_cn15_dir, data_dir):
    null = tiny_sd15.pipe.encode_prompt([""], "cpu", 1, False)[0]
    pos, neg = tiny_sd15.pipe.encode_prompt([PROMPT], "cpu", 1, True)
    discover_self_attention_layers(tiny_sd15.unet)  # its probe call runs once per model, before the hook counts
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["encoder_hidden_states"].detach().clone(),
                      kwargs.get("down_block_additional_residuals") is not None,
                      kwargs.get("mid_block_additional_residual") is not None))

    handle = tiny_sd15.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=2, iters=2, size=64,
                         controlnet=tiny_cn15_dir, control_image=data_dir / "horse.jpg", control="canny",
                         progress=False)
    finally:
        handle.remove()
    denoising = [c for c in calls if c[1]]
    feature = [c for c in calls if not c[1]]
    assert len(denoising) == 2 and len(feature) == 2 * (1 + 2)
    for hidden, _, mid in denoising:
        assert mid
        torch.testing.assert_close(hidden, torch.cat([neg, pos]))  # the user's prompt, CFG-batched
    for hidden, _, mid in feature:
        assert not mid
        torch.testing.assert_close(hidden, null)  # the empty prompt, no ControlNet


def test_controlnet_size_follows_the_control_image(tiny_sd15, tiny_cn15_dir, data_dir):
    control = Image.new("RGB", (200, 100), "white")
    (img,) = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1, iters=0, size=128,
                              controlnet=tiny_cn15_dir, control_image=control, progress=False)
    assert img.size == (128, 64)


def test_a_content_image_of_another_aspect_than_the_control_image_is_said_to_be_stretched(tiny_sd15, tiny_cn15_dir,
                                                                                           data_dir, caplog):
    """The control image sets the size; a square content image beside a 2:1 one was stretched without a word (as
    it is said where it sets the size itself)."""
    control = Image.new("RGB", (200, 100), "white")
    for content, said in ((Image.new("RGB", (100, 100), "gray"), True), (Image.new("RGB", (400, 200), "gray"), False)):
        caplog.clear()
        ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1, iters=0, size=128,
                         controlnet=tiny_cn15_dir, control_image=control, content=content, content_weight=0.2,
                         progress=False)
        stretched = [r.getMessage() for r in caplog.records if "another aspect than the control image" in
                     r.getMessage()]
        assert stretched == (["content image '<image>' is 100x100, another aspect than the control image '<image>' "
                              "(200x100) that sets the size: it is stretched to 128x64; crop it to that aspect"]
                             if said else []), stretched


def test_wrong_controlnet_for_the_model(tiny_sdxl, tiny_cn15_dir, tmp_path):
    with pytest.raises(ad.UserError, match="does not fit the sdxl model"):
        load_controlnet(tiny_cn15_dir, model=tiny_sdxl)
    with pytest.raises(ad.UserError, match="no config.json"):
        load_controlnet(tmp_path, model=tiny_sdxl)
    with pytest.raises(ad.UserError, match="does not exist"):
        load_controlnet(tmp_path / "missing", model=tiny_sdxl)
    # a relative file path of one slash has the shape of a Hub id (owner/name), but a weights file's suffix
    with pytest.raises(ad.UserError, match="'models/control_canny.safetensors' does not exist; check the path"):
        load_controlnet("models/control_canny.safetensors", model=tiny_sdxl)
    (tmp_path / "control_canny.safetensors").write_bytes(b"x")
    with pytest.raises(ad.UserError, match=r"'.*control_canny.safetensors' is not a readable \.safetensors file "
                                           r"\(cut short, or another format under this suffix\); download it again"):
        load_controlnet(tmp_path / "control_canny.safetensors", model=tiny_sdxl)
    with pytest.raises(ad.UserError, match="is a file but no weights file .*; pass one, or the folder that holds the "
                                           "ControlNet's config.json"):
        load_controlnet(tiny_cn15_dir / "config.json", model=tiny_sdxl)
    (tmp_path / "folder.safetensors").mkdir()  # a folder, whatever its name: not "does not exist"
    with pytest.raises(ad.UserError, match="'.*folder.safetensors' is not a diffusers ControlNet folder "
                                           r"\(no config.json\)"):
        load_controlnet(tmp_path / "folder.safetensors", model=tiny_sdxl)


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_another_component_as_controlnet_is_named(tiny_sd15, tiny_sd15_dir, part):
    """A model's unet/ fits the model's widths, so it passed every check and failed in diffusers (a meta tensor
    that cannot be copied); a VAE failed with a misleading error about its widths."""
    with pytest.raises(ad.UserError, match="holds a .*, not a ControlNetModel"):
        load_controlnet(tiny_sd15_dir / part, model=tiny_sd15)
    with pytest.raises(ad.UserError, match="is a whole Stable Diffusion model .*; pass it as the model"):
        load_controlnet(tiny_sd15_dir, model=tiny_sd15)


@pytest.mark.parametrize("change,expected", [
    ({"block_out_channels": [16, 64, 64]}, "has block widths (16, 64, 64) where model"),
    ({"cross_attention_dim": 48}, "has text embedding width 48 where model"),
    ({"conditioning_channels": 1}, "takes a condition of 1 channels; attndistill gives a ControlNet its control "
                                   "image in RGB"),
    ({"conditioning_embedding_out_channels": [8, 16]}, "shrinks its condition 2x where model"),
])
def test_a_controlnet_of_the_right_family_that_still_does_not_fit_is_named(tiny_sd15, tiny_cn15_dir, change,
                                                                           expected):
    """Checked on the configs (as a dry run does) and on a net passed in, before a convolution fails on shapes."""
    import json

    from diffusers import ControlNetModel

    from attndistill.model.controlnet import check_compatible, check_configs_fit

    config = {**json.loads((tiny_cn15_dir / "config.json").read_text()), **change}
    with pytest.raises(ad.UserError, match=re.escape(expected)):
        check_configs_fit(config, tiny_sd15.unet.config, "net", "m", tiny_sd15.vae_scale_factor)
    with pytest.raises(ad.UserError, match=re.escape(expected)):
        check_compatible(ControlNetModel.from_config(config), tiny_sd15, "net")


def test_a_controlnet_loaded_by_the_caller_runs_in_the_models_dtype(tiny_sd15_dir, tiny_cn15_dir, edge_map, data_dir):
    """``from_pretrained`` gives float32 on the CPU; beside a bfloat16 model its residuals crashed the UNet."""
    from diffusers import ControlNetModel

    model = ad.load_model(str(tiny_sd15_dir), device="cpu", dtype="bf16")
    net = ControlNetModel.from_pretrained(tiny_cn15_dir)
    assert net.dtype == torch.float32
    (img,) = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", model=model, steps=2, iters=1, size=64,
                              controlnet=net, control_image=edge_map, progress=False)
    assert img.size == (64, 64) and net.dtype == torch.bfloat16


def test_a_controlnet_not_cached_offline_is_one_line_and_no_warning(tiny_sd15, tmp_path, monkeypatch):
    """diffusers' ControlNet loader makes huggingface_hub warn of a deprecated argument; users see our line only."""
    import warnings

    from attndistill.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError, match="not in the local Hugging "
                                                                                             "Face cache"):
        warnings.simplefilter("always")
        load_controlnet("nobody/not-cached-controlnet", model=tiny_sd15)
    assert [str(w.message) for w in caught] == []
    with pytest.raises(UserError, match="or pass --controlnet /path/to/a/local/diffusers/folder"):
        load_controlnet("nobody/not-cached-controlnet", model=tiny_sd15)


def test_results_record_where_the_model_and_controlnet_were_loaded_from(tiny_sd15_dir, tiny_cn15_dir, edge_map,
                                                                        data_dir, tmp_path, monkeypatch, caplog):
    """Relative paths are made absolute while they still mean something; what cannot be rerun says so at once."""
    import json

    from diffusers import ControlNetModel

    from attndistill.batch.jobs import job_from_parameters

    monkeypatch.chdir(tiny_sd15_dir.parent)
    model = ad.load_model(tiny_sd15_dir.name, device="cpu", dtype="fp32")
    monkeypatch.chdir(tiny_cn15_dir.parent.parent)  # a name of two parts, such as a Hub id has
    relative = ControlNetModel.from_pretrained(tiny_cn15_dir.relative_to(tiny_cn15_dir.parent.parent))
    monkeypatch.chdir(tmp_path)  # the names given above lead nowhere from here
    run = dict(model=model, steps=1, iters=1, size=64, control_image=edge_map, progress=False)
    (img,) = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg",
                              controlnet=ControlNetModel.from_pretrained(tiny_cn15_dir), **run)
    params = json.loads(img.info["parameters"])
    assert (params["model"], params["controlnet"]) == (str(tiny_sd15_dir), str(tiny_cn15_dir))
    assert "cannot rerun" not in caplog.text
    for made, recorded in ((relative, str(tiny_cn15_dir.relative_to(tiny_cn15_dir.parent.parent))),
                           (ControlNetModel.from_unet(model.unet), "<ControlNetModel made in memory>")):
        caplog.clear()
        (img,) = ad.text_to_image(PROMPT, data_dir / "watercolor-cat.jpg", controlnet=made, **run)
        assert json.loads(img.info["parameters"])["controlnet"] == recorded
        assert "info --job cannot rerun it" in caplog.text
    with pytest.raises(ad.UserError, match=r"made with a controlnet passed in memory \(<ControlNetModel made in "):
        job_from_parameters(json.loads(img.info["parameters"]))


def test_a_pickled_controlnet_needs_allow_pickle(tiny_sd15, tiny_cn15_dir, tmp_path):
    """Pickle files can run code when loaded: a ControlNet saved as .bin is refused unless asked for, as a model is."""
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(tiny_cn15_dir).save_pretrained(tmp_path / "cn", safe_serialization=False)
    assert not list((tmp_path / "cn").glob("*.safetensors"))
    with pytest.raises(ad.UserError, match="safetensors"):
        load_controlnet(tmp_path / "cn", model=tiny_sd15)
    assert type(load_controlnet(tmp_path / "cn", model=tiny_sd15, allow_pickle=True)).__name__ == "ControlNetModel"


def test_canny_edges_are_found_at_the_output_size(tiny_sd15, tiny_cn15_dir, data_dir):
    """Edges detected after the resize are thin black-and-white lines; detected before, resampling would grey them
    (and a photo given without Canny is no edge map at all)."""
    from attndistill.model.controlnet import prepare_control

    control = prepare_control(tiny_cn15_dir, data_dir / "horse.jpg", model=tiny_sd15, size=(64, 48),
                              preprocess="canny")
    assert control.image.shape == (1, 3, 48, 64)
    assert set(control.image.unique().tolist()) == {0.0, 1.0}
    assert control.image.mean() < 0.5  # edges on black, not the photo


def test_scale_zero_turns_the_controlnet_off_and_a_net_passed_in_is_checked(tiny_sd15, tiny_cn15_dir, tiny_cnxl_dir,
                                                                           edge_map):
    from diffusers import ControlNetModel

    from attndistill.model.controlnet import prepare_control

    assert prepare_control(tiny_cn15_dir, edge_map, model=tiny_sd15, size=(64, 64), scale=0).scale == 0.0
    with pytest.raises(ad.UserError, match="does not fit the sd15 model"):
        prepare_control(ControlNetModel.from_pretrained(tiny_cnxl_dir), edge_map, model=tiny_sd15, size=(64, 64))


def test_a_map_drawn_over_transparency_reads_as_drawn_over_black(tiny_sd15, tiny_cn15_dir, edge_map, data_dir,
                                                                  tmp_path):
    """Pose and line-art editors export their lines over transparency; on white (as photos are flattened) the
    lines would vanish into a blank map."""
    lines = np.asarray(edge_map.convert("L"))
    rgba = np.dstack([np.full(lines.shape + (3,), 255, np.uint8), lines])  # white, opaque only on the lines
    Image.fromarray(rgba, "RGBA").save(tmp_path / "lines.png")
    runs = [_final_latents(style=data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=3, iters=0, size=64, seed=4,
                           adain=False, controlnet=tiny_cn15_dir, control_image=image)
            for image in (tmp_path / "lines.png", edge_map, Image.new("RGB", (64, 64), "white"),
                          Image.open(tmp_path / "lines.png"))]  # the API takes the RGBA image in memory too
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(runs[3], runs[1], atol=1e-6, rtol=0)
    assert (runs[0] - runs[2]).abs().max() > 1e-5  # a blank map is another condition (to the tiny net, a weak one)


def test_a_controlnet_whose_weights_lack_tensors_is_named(tiny_sd15, tiny_cn15_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from attndistill.errors import UserError

    folder = shutil.copytree(tiny_cn15_dir, tmp_path / "cn")
    weights = next(folder.glob("*.safetensors"))
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("controlnet_mid_block.")}, weights)
    with pytest.raises(UserError, match=r"ControlNet '.*cn': the weights in it lack 2 tensors of its config"):
        load_controlnet(folder, model=tiny_sd15)


def test_a_controlnet_whose_weights_hold_more_than_its_config_says_so(tiny_sd15, tiny_cn15_dir, tmp_path, caplog):
    """A variant its config does not describe (a union ControlNet's extra heads) loads without those tensors and
    steers wrongly: diffusers only warns, and its warnings are hidden, so the load says it in one line."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    with caplog.at_level(logging.WARNING, logger="attndistill"):
        load_controlnet(tiny_cn15_dir, model=tiny_sd15)
    assert not caplog.records
    folder = shutil.copytree(tiny_cn15_dir, tmp_path / "cn")
    weights = next(folder.glob("*.safetensors"))
    extra = {f"task_embedding.{i}": torch.zeros(4) for i in range(3)}
    save_file({**load_file(weights), **extra}, weights)
    with caplog.at_level(logging.WARNING, logger="attndistill"):
        load_controlnet(folder, model=tiny_sd15)
    [record] = caplog.records
    assert re.fullmatch(r"ControlNet '.*cn' holds 3 ControlNetModel weights its config has no place for "
                        r"\(task_embedding\.\d, task_embedding\.\d, \.\.\.\), left out; .*", record.getMessage())


def _weights(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors"), json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("layout", ["diffusers", "original", "original, prefixed"])
def test_a_single_file_controlnet_loads_as_its_folder_does(tiny_sd15, tiny_cn15_dir, tmp_path, layout):
    """One weights file, as ControlNet 1.1's files (original layout) or a diffusers file saved alone: its config
    comes from the model's UNet and the file's condition encoder, so no Hub is asked; every tensor as in the
    folder, and the same config but what only a config can say."""
    from ldm_checkpoint import controlnet_to_ldm
    from safetensors.torch import save_file

    state, config = _weights(tiny_cn15_dir)
    if layout != "diffusers":
        state = controlnet_to_ldm(state, config, prefix="control_model." if "prefixed" in layout else "")
    save_file(state, tmp_path / "control.safetensors")
    net = load_controlnet(tmp_path / "control.safetensors", model=tiny_sd15)
    folder = load_controlnet(tiny_cn15_dir, model=tiny_sd15)
    assert net.state_dict().keys() == folder.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), folder.state_dict().values()))
    assert {k: v for k, v in net.config.items() if not k.startswith("_")} == \
        {k: v for k, v in folder.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("sdxl", [False, True])
def test_a_single_file_in_the_original_layout_loads_as_its_folder_does_sd15_and_sdxl(
        tiny_sd15, tiny_sdxl, tiny_cn15_dir, tiny_cnxl_dir, tmp_path, sdxl):
    """diffusers' conversion of the original layout leaves SDXL's added embedding (label_emb) out; it is mapped
    by diffusers' own table. An SD 2.1 ControlNet's .ckpt nests its tensors under "state_dict" twice."""
    from ldm_checkpoint import controlnet_to_ldm

    folder, model = (tiny_cnxl_dir, tiny_sdxl) if sdxl else (tiny_cn15_dir, tiny_sd15)
    torch.save({"state_dict": {"state_dict": controlnet_to_ldm(*_weights(folder))}}, tmp_path / "control.ckpt")
    net = load_controlnet(tmp_path / "control.ckpt", model=model, allow_pickle=True)
    expected = load_controlnet(folder, model=model).state_dict()
    assert net.state_dict().keys() == expected.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())


def test_a_single_file_named_shuffle_pools_its_condition_as_webui_and_comfyui_read_it(tiny_sd15, tiny_cn15_dir,
                                                                                      tmp_path):
    import shutil

    for name, pooled in (("control_v11e_sd15_shuffle.safetensors", True), ("control_canny.safetensors", False)):
        shutil.copy(tiny_cn15_dir / "diffusion_pytorch_model.safetensors", tmp_path / name)
        assert load_controlnet(tmp_path / name, model=tiny_sd15).config.global_pool_conditions is pooled


def test_a_single_file_sdxl_controlnet_steers_as_its_folder_does(tiny_sdxl, tiny_cnxl_dir, edge_map, data_dir,
                                                                 tmp_path):
    import shutil

    shutil.copy(tiny_cnxl_dir / "diffusion_pytorch_model.safetensors", tmp_path / "canny-sdxl.safetensors")
    run = dict(model=tiny_sdxl, style=data_dir / "watercolor-cat.jpg", steps=2, iters=1, size=64,
               control_image=edge_map)
    assert torch.equal(_final_latents(controlnet=str(tmp_path / "canny-sdxl.safetensors"), **run),
                       _final_latents(controlnet=str(tiny_cnxl_dir), **run))


def test_a_single_file_controlnet_that_does_not_fit_is_named(tiny_sd15, tiny_sdxl, tiny_cn15_dir, tiny_cnxl_dir,
                                                             tiny_sd15_dir, tmp_path):
    import shutil

    from ldm_checkpoint import controlnet_to_ldm
    from safetensors.torch import save_file

    shutil.copy(tiny_cnxl_dir / "diffusion_pytorch_model.safetensors", tmp_path / "xl.safetensors")
    with pytest.raises(ad.UserError, match=r"'.*xl.safetensors' \(for SDXL\) does not fit the sd15 model .*; use an "
                                           "SD 1.5 ControlNet"):
        load_controlnet(tmp_path / "xl.safetensors", model=tiny_sd15)
    state, _ = _weights(tiny_cn15_dir)
    original = controlnet_to_ldm(*_weights(tiny_cn15_dir), prefix="control_model.")
    for marker, what in (("difference", r"a \"difference\" ControlNet .*; use the full ControlNet file"),
                         ("lora_controlnet", "a Control-LoRA, which attndistill does not load")):
        save_file({**original, marker: torch.zeros(0)}, tmp_path / f"{marker}.safetensors")
        with pytest.raises(ad.UserError, match=f"'.*{marker}.safetensors' is {what}"):
            load_controlnet(tmp_path / f"{marker}.safetensors", model=tiny_sd15)
    save_file({k: v for k, v in state.items() if not k.startswith("mid_block.attentions.")},
              tmp_path / "mid.safetensors")
    with pytest.raises(ad.UserError, match=r"is not built like the UNet of model .*: \d+ of its tensors are missing "
                                           r"and 0 have no place \(mid_block\.attentions.*; pass its diffusers folder"):
        load_controlnet(tmp_path / "mid.safetensors", model=tiny_sd15)
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ad.UserError, match=r"0 of its tensors are missing and 1 have no place \(extra\.weight\)"):
        load_controlnet(tmp_path / "extra.safetensors", model=tiny_sd15)
    wide = {k: torch.zeros(v.shape[0] * 2, *v.shape[1:]) if k == "time_embedding.linear_1.weight" else v
            for k, v in state.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ad.UserError, match=r"'.*wide.safetensors' does not fit the UNet of model .*: its "
                                           r"time_embedding\.linear_1\.weight is of shape \(256, 32\) where this "
                                           r"model's architecture has \(128, 32\); use a ControlNet made for this"):
        load_controlnet(tmp_path / "wide.safetensors", model=tiny_sd15)
    shutil.copy(tiny_sd15_dir / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet.safetensors")
    with pytest.raises(ad.UserError, match="holds a diffusers UNet's weights, not a ControlNet"):
        load_controlnet(tmp_path / "unet.safetensors", model=tiny_sd15)


def test_a_pickled_single_file_controlnet_needs_allow_pickle(tiny_sd15, tiny_cn15_dir, tmp_path):
    from ldm_checkpoint import controlnet_to_ldm

    torch.save(controlnet_to_ldm(*_weights(tiny_cn15_dir)), tmp_path / "control_v11p_sd15_canny.pth")
    with pytest.raises(ad.UserError, match="is a pickle file that can run code when loaded; .* pass --allow-pickle"):
        load_controlnet(tmp_path / "control_v11p_sd15_canny.pth", model=tiny_sd15)
    net = load_controlnet(tmp_path / "control_v11p_sd15_canny.pth", model=tiny_sd15, allow_pickle=True)
    assert torch.equal(net.controlnet_mid_block.weight, _weights(tiny_cn15_dir)[0]["controlnet_mid_block.weight"])


def test_a_single_file_controlnet_in_the_original_layout_lacking_a_tensor_is_named(tiny_sd15, tiny_cn15_dir,
                                                                                   tmp_path):
    from ldm_checkpoint import controlnet_to_ldm
    from safetensors.torch import save_file

    state = controlnet_to_ldm(*_weights(tiny_cn15_dir))
    save_file({k: v for k, v in state.items() if not k.startswith("zero_convs.1.")}, tmp_path / "cut.safetensors")
    with pytest.raises(ad.UserError, match=r"2 of its tensors are missing and 0 have no place "
                                           r"\(controlnet_down_blocks\.1\.(bias|weight), "):
        load_controlnet(tmp_path / "cut.safetensors", model=tiny_sd15)


def test_canny_asked_of_an_edge_map_says_it_doubles_the_lines(tiny_sd15, tiny_cn15_dir, edge_map, data_dir,
                                                              tmp_path, caplog):
    """An edge map given with --control canny gets each line traced on both sides: a run does it, but says so;
    a photo, and a drawing on white, are what Canny is for."""
    import logging

    from attndistill.model.controlnet import looks_like_line_art, prepare_control

    edge_map.save(tmp_path / "edges.png")
    photo, drawing = load_image(data_dir / "horse.jpg"), Image.fromarray(255 - np.asarray(edge_map))
    assert looks_like_line_art(edge_map) and not looks_like_line_art(photo) and not looks_like_line_art(drawing)
    for image, warned in ((tmp_path / "edges.png", True), (data_dir / "horse.jpg", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="attndistill"):
            prepare_control(tiny_cn15_dir, image, model=tiny_sd15, size=(64, 64), preprocess="canny")
        assert ("edges.png' looks like an edge map already" in caplog.text) == warned
        assert "--control none" in caplog.text or not warned


def test_a_damaged_single_file_controlnet_is_named_not_a_traceback_nor_a_diverging_run(tiny_sd15, tiny_cn15_dir,
                                                                                       tmp_path):
    """What a fuzzing helper found: entries that are no tensors, integer weights, a flat condition encoder and NaN
    weights each failed deep in the load (AttributeError, IndexError), loaded, or diverged with advice about the
    learning rate; a text file named .pth said only "(101)"."""
    from safetensors.torch import save_file

    state, _ = _weights(tiny_cn15_dir)
    first = "controlnet_cond_embedding.conv_in.weight"
    cases = {
        "ints.pth": ({**state, first: 5}, "holds 1 entries that are not tensors"),
        "int32.safetensors": ({k: v.to(torch.int32) for k, v in state.items()},
                              "integer or boolean tensors where weights are floating-point"),
        "flat.safetensors": ({**state, first: torch.zeros(16)}, rf"condition encoder whose convolution {first} is "
                                                                r"of shape \(16,\)"),
        "nan.safetensors": ({**state, first: torch.full_like(state[first], float("nan"))},
                            "holds 1 weights that are NaN or infinite"),
    }
    for name, (weights, message) in cases.items():
        if name.endswith(".pth"):
            torch.save(weights, tmp_path / name)
        else:
            save_file(weights, tmp_path / name)
        with pytest.raises(ad.UserError, match=message):
            load_controlnet(tmp_path / name, model=tiny_sd15, allow_pickle=True)
    (tmp_path / "text.pth").write_text("ControlNet, honest")
    with pytest.raises(ad.UserError, match=r"'.*text.pth' is not a readable PyTorch pickle \(.pth, .ckpt, .bin\) "
                                           "file"):
        load_controlnet(tmp_path / "text.pth", model=tiny_sd15, allow_pickle=True)


def test_runs_naming_one_controlnet_load_it_once_until_it_changes(tiny_sd15, tiny_cn15_dir, data_dir, tmp_path,
                                                                   monkeypatch):
    """A notebook's or a batch's runs with the same ControlNet reuse the one loaded (each loaded it again), with the
    same pixels; changed files under its name, or running out of memory (release_graphs), load it again."""
    import shutil

    from attndistill.model import controlnet as controlnet_module

    folder = tmp_path / "cn"
    shutil.copytree(tiny_cn15_dir, folder)
    loads = []
    load = controlnet_module.load_controlnet
    monkeypatch.setattr(controlnet_module, "load_controlnet", lambda *a, **k: loads.append(1) or load(*a, **k))
    tiny_sd15.kept_controlnet = None

    def run():
        return np.asarray(ad.text_to_image("a horse", data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=2,
                                           iters=1, size=64, controlnet=folder, control_image=data_dir / "horse.jpg",
                                           control="canny", progress=False)[0])

    first = run()
    assert np.array_equal(run(), first) and len(loads) == 1
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # saved again under the same name
    run()
    tiny_sd15.release_graphs()
    run()
    assert len(loads) == 3 and tiny_sd15.kept_controlnet is not None
    tiny_sd15.kept_controlnet = None


def test_a_kept_controlnet_waits_in_cpu_memory_after_each_task_on_a_gpu():
    """On a GPU the kept net's gigabytes would stay beside every later run, also those without a ControlNet, which
    the out-of-memory remedies (they know CUDA graphs only) could not free: it goes to CPU memory when the task
    that held the model returns, also when it fails (after the net went to the device, before its steps)."""
    import threading
    from types import SimpleNamespace

    from attndistill.tasks.setup import held, public_task

    class Net:
        def __init__(self):
            self.moves = []

        def to(self, device):
            self.moves.append(device)
            return self

    @public_task
    def task(model, fail: bool):
        held(model)
        model.kept_controlnet[1].to("cuda")  # as prepare_control does
        if fail:
            raise ad.UserError("no style image given")

    for device, fail, moves in (("cuda", False, ["cuda", "cpu"]), ("cuda", True, ["cuda", "cpu"]),
                                ("cpu", False, ["cuda"])):
        net = Net()
        model = SimpleNamespace(device=torch.device(device), kept_controlnet=(("key",), net), lock=threading.RLock())
        try:
            task(model, fail)
        except ad.UserError:
            assert fail
        assert net.moves == moves, (device, fail)
