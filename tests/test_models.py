"""Model loading through the user's path: detection, VAE swap, conditioning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from attndistill import load_model
from attndistill.errors import UserError
from attndistill.model.perf import PerfOptions


def test_kinds_are_detected_from_the_folder(tiny_sd15, tiny_sdxl):
    assert tiny_sd15.kind == "sd15" and tiny_sdxl.kind == "sdxl"
    assert tiny_sd15.vae_scale_factor == 8 and tiny_sd15.latent_multiple == 32


def test_vae_swap_loads_the_other_vae(tiny_sd15_dir, tiny_sdxl_dir):
    swapped = load_model(str(tiny_sd15_dir), vae=tiny_sdxl_dir / "vae", device="cpu")
    other = load_model(str(tiny_sdxl_dir), device="cpu")
    for a, b in zip(swapped.vae.parameters(), other.vae.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="not a diffusers AutoencoderKL folder"):
        load_model(str(tiny_sd15_dir), vae=tiny_sd15_dir / "unet_missing", device="cpu")


def test_a_vae_made_for_another_model_is_named(tiny_sd15_dir, tmp_path, caplog):
    """SDXL's VAE on SD 1.5 has the same shapes but scales latents differently: it loads, with a warning."""
    other = tmp_path / "sdxl-like-vae"
    shutil.copytree(tiny_sd15_dir / "vae", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    with caplog.at_level(logging.WARNING, logger="attndistill.model.loading"):
        load_model(str(tiny_sd15_dir), vae=tiny_sd15_dir / "vae", device="cpu")
        assert "scales its latents" not in caplog.text
        model = load_model(str(tiny_sd15_dir), vae=other, device="cpu")
    assert f"VAE '{other}' scales its latents by 0.13025, the model's own VAE by 0.18215" in caplog.text
    assert model.vae.config.scaling_factor == 0.13025


def test_null_condition_is_the_empty_prompt(tiny_sd15, tiny_sdxl):
    for model in (tiny_sd15, tiny_sdxl):
        null = model.null_condition((256, 256))
        empty, _ = model.encode_prompt([""], None, size=(256, 256))
        assert torch.equal(null.encoder_hidden_states, empty.encoder_hidden_states)
    added = tiny_sdxl.null_condition((256, 192)).added_cond_kwargs
    assert added["time_ids"].tolist() == [[256, 192, 0, 0, 256, 192]]
    assert added["text_embeds"].abs().sum() > 0  # the empty prompt's pooled embedding, not zeros


def test_round_trip_encode_decode_shapes(tiny_sd15):
    x = torch.rand(2, 3, 64, 96)
    z = tiny_sd15.encode(x)
    assert z.shape == (2, 4, 8, 12)
    y = tiny_sd15.decode(z)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_a_preview_shows_each_image_of_a_small_batch_side_by_side(tiny_sd15):
    """A run of several images previews all of them (up to PREVIEW_IMAGES), each as it would be alone."""
    import numpy as np

    from attndistill.model.models import PREVIEW_IMAGES

    z = torch.randn(PREVIEW_IMAGES + 2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    alone = [np.asarray(tiny_sd15.preview(z[k:k + 1], side=12), dtype=np.int16) for k in range(PREVIEW_IMAGES)]
    assert alone[0].shape == (64, 96, 3)  # 16x24 latents scaled to 8x12, decoded
    row = np.asarray(tiny_sd15.preview(z, side=12), dtype=np.int16)
    assert row.shape == (64, 96 * PREVIEW_IMAGES, 3)
    for k, image in enumerate(alone):
        assert np.abs(row[:, 96 * k:96 * (k + 1)] - image).max() <= 1
    assert np.abs(alone[0] - alone[1]).max() > 10  # the tiles are not one image repeated
    assert tiny_sd15.preview(z[:1], side=12).size == (96, 64)


def test_text_encoder_offload_keeps_the_conditioning(tiny_sdxl):
    before = tiny_sdxl.encode_prompt(["a b c"], None)[0].encoder_hidden_states
    tiny_sdxl.set_perf(PerfOptions(offload_text_encoders=True))
    try:
        after = tiny_sdxl.encode_prompt(["a b c"], None)[0].encoder_hidden_states
    finally:
        tiny_sdxl.set_perf(PerfOptions())
    assert torch.equal(before, after)


def test_text_encoders_offload_by_default_on_small_cards_only(tiny_sd15, monkeypatch):
    """``offload_text_encoders=None``: on for CUDA cards under 16 GiB (to help 12 GB cards hold SDXL), off elsewhere."""
    from types import SimpleNamespace

    from attndistill.model import perf

    def card(gib):
        return lambda device: SimpleNamespace(total_memory=gib * 2**30)

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", card(12))
    assert perf.small_card(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_properties", card(80))
    assert not perf.small_card(cuda)
    assert not perf.small_card(torch.device("cpu"))
    tiny_sd15.set_perf(PerfOptions())
    assert tiny_sd15.perf.offload_text_encoders is False  # resolved on the CPU


@pytest.mark.parametrize("kind,small,expected", [("sdxl", True, True), ("sdxl", False, False), ("sd15", True, False)])
def test_gradient_checkpointing_by_default_for_sdxl_on_small_cards_only(tiny_sd15, tiny_sdxl, monkeypatch, kind,
                                                                         small, expected):
    """``gradient_checkpointing=None``: on for SDXL on cards under 16 GiB, whose AD iteration graph would keep
    4.6 GiB of activations (a CPU count); an explicit choice wins."""
    from attndistill.model import perf

    model = tiny_sdxl if kind == "sdxl" else tiny_sd15
    monkeypatch.setattr(perf, "small_card", lambda device: small)
    try:
        model.set_perf(PerfOptions())
        assert model.perf.gradient_checkpointing is expected
        assert bool(getattr(model.unet, "is_gradient_checkpointing", False)) is expected
        model.set_perf(PerfOptions(gradient_checkpointing=False))
        assert not model.unet.is_gradient_checkpointing
    finally:
        monkeypatch.undo()
        model.set_perf(PerfOptions())


def test_pickle_weights_need_allow_pickle_also_for_a_vae_and_safetensors_load_with_it(tiny_sd15_dir, tmp_path):
    """``--allow-pickle`` lets pickle weights in where there are no safetensors; it never keeps safetensors out."""
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(tiny_sd15_dir / "vae").save_pretrained(tmp_path / "vae-bin", safe_serialization=False)
    with pytest.raises(UserError, match="no .safetensors weights"):
        load_model(str(tiny_sd15_dir), vae=tmp_path / "vae-bin", device="cpu", dtype="fp32")
    model = load_model(str(tiny_sd15_dir), vae=tmp_path / "vae-bin", device="cpu", dtype="fp32", allow_pickle=True)
    assert model.vae_source == str(tmp_path / "vae-bin")
    for component in ("unet", "text_encoder"):  # a folder of another component is no VAE
        with pytest.raises(UserError, match="not an AutoencoderKL"):
            load_model(str(tiny_sd15_dir), vae=tiny_sd15_dir / component, device="cpu", dtype="fp32")


def test_a_relative_model_name_means_the_folder_it_names_now(tiny_sd15_dir, tiny_sdxl_dir, tmp_path, monkeypatch):
    """The API's model cache is keyed by the folder a name leads to, not by the name: after a change of folder
    the same relative name is another model."""
    from attndistill.model.loading import as_model

    for place, target in (("a", tiny_sd15_dir), ("b", tiny_sdxl_dir)):
        (tmp_path / place).mkdir()
        (tmp_path / place / "m").symlink_to(target)
    monkeypatch.chdir(tmp_path / "a")
    assert as_model("m", device="cpu").kind == "sd15"
    monkeypatch.chdir(tmp_path / "b")
    assert as_model("m", device="cpu").kind == "sdxl"


def test_a_home_folder_spelled_with_a_tilde_is_found(tiny_sd15_dir, tmp_path, monkeypatch, data_dir):
    """A shell expands ``~`` for the CLI; the web UI's boxes, the API and batch files get it as typed."""
    from attndistill.batch.jobs import ModelSpec, parse_job
    from attndistill.model.loading import ModelSlot

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd").symlink_to(tiny_sd15_dir)
    shutil.copy(data_dir / "horse.jpg", tmp_path / "horse.jpg")
    monkeypatch.setenv("HOME", str(tmp_path))
    model = load_model("~/models/sd", vae="~/models/sd/vae", device="cpu", dtype="fp32")
    assert model.source == str(tmp_path / "models" / "sd") and model.vae_source == str(tmp_path / "models/sd/vae")
    assert ModelSlot(device="cpu", dtype="fp32").get(" ~/models/sd ").source == model.source  # the UI's box
    job = parse_job({"task": "texture", "reference": "~/horse.jpg", "model": "~/models/sd"}, line=1,
                    base=tmp_path / "elsewhere", out_dir=tmp_path / "out", defaults=ModelSpec())
    assert job.model.source == str((tmp_path / "models" / "sd").resolve())
    assert job.args["reference"] == str(tmp_path / "horse.jpg")


def test_models_named_in_api_calls_are_reused_and_the_old_one_freed_before_the_next_loads(tiny_sd15_dir,
                                                                                          tiny_sdxl_dir, monkeypatch):
    """Two SDXL models may not fit on one GPU: the API keeps one model by name, as the web UI does."""
    import gc
    import weakref

    from attndistill.model import loading

    first = loading.as_model(str(tiny_sd15_dir), device="cpu", dtype="fp32")
    assert loading.as_model(str(tiny_sd15_dir), device="cpu", dtype="fp32") is first
    unet = weakref.ref(first.unet)
    del first
    gc.collect()
    held = []  # whether the first model was still alive when the next one began to load
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: held.append(unet() is not None) or real(*a, **kw))
    assert loading.as_model(str(tiny_sdxl_dir), device="cpu", dtype="fp32").kind == "sdxl"
    assert held == [False]


def test_a_named_model_whose_files_changed_is_loaded_again(tiny_sd15_dir, tmp_path):
    """A VAE folder saved again under the same name (finetune-vae --overwrite) is reloaded: the named model's
    cache kept decoding with the old weights while results recorded the folder."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    from attndistill.model.loading import as_model

    vae = tmp_path / "vae"
    shutil.copytree(tiny_sd15_dir / "vae", vae)
    first = as_model(str(tiny_sd15_dir), vae=vae, device="cpu", dtype="fp32")
    assert as_model(str(tiny_sd15_dir), vae=vae, device="cpu", dtype="fp32") is first  # unchanged: reused
    tuned = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        tuned.decoder.conv_out.bias.add_(0.5)
    tuned.save_pretrained(vae)
    second = as_model(str(tiny_sd15_dir), vae=vae, device="cpu", dtype="fp32")
    assert second is not first
    assert torch.allclose(second.vae.decoder.conv_out.bias, tuned.decoder.conv_out.bias)


def test_fp16_weights_are_asked_for_where_half_precision_runs_on_a_gpu():
    """REAL-MODELS.md: the fp16 variant halves a GPU download; CPUs and fp32 take the default files."""
    from attndistill.model.loading import default_variant

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_variant(None, cuda, torch.bfloat16) == default_variant(None, cuda, torch.float16) == "fp16"
    assert default_variant(None, cuda, torch.float32) is None and default_variant(None, cpu, torch.float32) is None
    assert default_variant("ema", cuda, torch.bfloat16) == "ema"  # asked for: kept


def test_a_long_prompt_is_warned_about_with_the_words_clip_drops(tiny_sd15, caplog):
    """Named as the prompt or the negative prompt (a long negative prompt was called "prompt"), once per prompt."""
    long = " ".join(["a"] * 75 + ["b"] * 5)
    with caplog.at_level(logging.WARNING, logger="attndistill.model.models"):
        tiny_sd15.encode_prompt(["a barn", "a barn"], negative=[long, long])
    said = [r.getMessage() for r in caplog.records if r.name.startswith("attndistill")]
    assert said == ["negative prompt has 82 tokens; CLIP keeps the first 77, so its end is ignored: 'b b b b b'"]


def test_steps_read_timesteps_on_the_cpu_and_unet_calls_get_them_made_on_the_device(tiny_sd15):
    """A step reads its timestep (``int(t)``, the scheduler's own step logic): from a device tensor that read
    waits for the GPU. The scheduler keeps them on the CPU; the UNet gets a copy made on the device (a fill,
    not a host-to-device copy). The meta device stands in for a GPU here."""
    from dataclasses import replace

    model = replace(tiny_sd15, device=torch.device("meta"))
    scheduler = model.ddim_scheduler(5)
    assert scheduler.timesteps.device.type == "cpu"
    t = model.timestep(scheduler.timesteps[1])
    assert (t.device.type, t.dtype, t.dim()) == ("meta", torch.long, 0)
    here = tiny_sd15.timestep(scheduler.timesteps[1])
    assert int(here) == int(scheduler.timesteps[1]) and here.dtype == torch.long


@pytest.fixture
def model(tiny_sd15_dir, tmp_path):
    """A copy of the tiny SD 1.5 folder that a test may change."""
    return Path(shutil.copytree(tiny_sd15_dir, tmp_path / "model"))


def test_a_stamp_covers_the_files_of_a_models_component_folders(model):
    """A UNet saved again inside a model folder changes the folder's stamp, as a top-level file does."""
    import os

    from attndistill.model.loading import files_stamp

    before = files_stamp(str(model))
    weights = next((model / "unet").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert files_stamp(str(model)) != before and files_stamp("owner/hub-id") == ()


@pytest.mark.parametrize("pipeline", ["StableDiffusionInpaintPipeline", "StableDiffusionUpscalePipeline",
                                      "StableDiffusionDepth2ImgPipeline", "StableDiffusionXLRefinerPipeline"])
def test_models_of_other_pipelines_are_named_and_refused(model, pipeline):
    """An inpainting or upscaling UNet takes other inputs: it would fail deep inside the first UNet call."""
    from attndistill.model.loading import pipeline_kind

    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    with pytest.raises(UserError, match="SDXL refiner" if "Refiner" in pipeline else f"is a {pipeline}"):
        pipeline_kind(str(model))


def test_an_sdxl_folder_without_its_first_text_encoder_is_named_for_what_it_lacks(model):
    """A refiner saved under the base pipeline's class name is no "refiner (StableDiffusionXLPipeline)"."""
    from attndistill.model.loading import pipeline_kind

    index = json.loads((model / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLPipeline", text_encoder=[None, None],
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"has no first text encoder \(text_encoder\), as an SDXL refiner has none"):
        pipeline_kind(str(model))


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "EulerDiscreteScheduler"])
def test_sampling_never_clips_the_predicted_latent_whatever_scheduler_the_model_ships(model, scheduler):
    """Most SD checkpoints ship a PNDM or Euler config, often without ``clip_sample``: DDIM's own default (True)
    would clip every predicted clean latent to ±1. The rest of the model's config still holds."""
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("clip_sample", "thresholding")}
    config.update(_class_name=scheduler, prediction_type="v_prediction", timestep_spacing="trailing")
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    ddim = load_model(str(model), device="cpu", dtype="fp32").ddim_scheduler(4).config
    assert (ddim.clip_sample, ddim.thresholding) == (False, False)
    assert (ddim.prediction_type, ddim.timestep_spacing) == ("v_prediction", "trailing")


def test_a_model_with_an_edm_noise_schedule_is_refused(model):
    """Playground v2.5 is an SDXL UNet trained on EDM sigmas: DDIM from its config would take default betas."""
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
        "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    with pytest.raises(UserError, match="is trained with an EDM noise schedule \\(its scheduler config gives sigmas"):
        load_model(str(model), device="cpu", dtype="fp32")


@pytest.mark.parametrize("channels", [9, 8])
def test_an_inpainting_or_editing_unet_in_a_plain_pipeline_folder_is_named_and_refused(model, channels):
    """Community inpainting (9 input channels) and InstructPix2Pix-like (8) UNets often sit in folders indexed
    as a plain StableDiffusionPipeline: the first UNet call would fail with a shape error."""
    from diffusers import UNet2DConditionModel

    from attndistill.testing import TINY_UNET

    shutil.rmtree(model / "unet")
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": channels}).save_pretrained(model / "unet")
    with pytest.raises(UserError, match=f"UNet takes {channels} input channels where its VAE's latents have 4"):
        load_model(str(model), device="cpu", dtype="fp32")


def test_a_vae_of_another_latent_width_is_refused(tiny_sd15_dir, tmp_path):
    from diffusers import AutoencoderKL

    from attndistill.testing import TINY_VAE

    AutoencoderKL(**{**TINY_VAE, "latent_channels": 16}).save_pretrained(tmp_path / "vae16")
    with pytest.raises(UserError, match="VAE '.*vae16' makes latents of 16 channels where the UNet takes 4"):
        load_model(str(tiny_sd15_dir), vae=tmp_path / "vae16", device="cpu", dtype="fp32")


def test_a_folder_of_fp16_variant_weights_only_loads_on_the_cpu(tiny_sd15_dir, tmp_path):
    """Some folders hold only ``*.fp16.safetensors``: they are safetensors, and load (as fp32 on the CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True)
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))
    model = load_model(str(tmp_path / "fp16"), device="cpu", dtype="fp32")
    assert model.unet.dtype == torch.float32
    own = load_model(str(tiny_sd15_dir), device="cpu", dtype="fp32")
    assert torch.equal(model.unet.conv_in.weight, own.unet.conv_in.weight.half().float())
    # beside the default files (a full Hub download), the CPU keeps taking the default, full-precision ones
    both = shutil.copytree(tiny_sd15_dir, tmp_path / "both")
    pipe.save_pretrained(both, variant="fp16", safe_serialization=True)
    assert torch.equal(load_model(str(both), device="cpu", dtype="fp32").unet.conv_in.weight,
                       own.unet.conv_in.weight)


def test_a_component_whose_weights_lack_tensors_of_its_config_is_named(model):
    """diffusers leaves such tensors on the meta device: the move to a device failed with "Cannot copy out of
    meta tensor"."""
    from safetensors.torch import load_file, save_file

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("conv_out.")}, weights)
    with pytest.raises(UserError, match=r"the weights in unet/ lack 2 tensors of its config \(conv_out\.(weight|bias), "
                                        r"conv_out\.(weight|bias)\); download it again \(or copy unet/"):
        load_model(str(model), device="cpu", dtype="fp32")


def test_a_component_whose_weights_hold_tensors_its_config_has_no_place_for_is_said(model, caplog):
    """diffusers drops them with a warning that the load hides: a fine-tune of another variant would run wrongly
    without a word."""
    from safetensors.torch import load_file, save_file

    with caplog.at_level(logging.WARNING, logger="attndistill"):
        load_model(str(model), device="cpu", dtype="fp32")
    assert not caplog.records
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "extra.weight": torch.zeros(2)}, weights)
    with caplog.at_level(logging.WARNING, logger="attndistill"):
        load_model(str(model), device="cpu", dtype="fp32")
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"model '{model}' holds 1 UNet2DConditionModel weights its config has no place for (extra.weight), left out"]


def test_a_tokenizer_folder_without_merges_is_named(model):
    from attndistill.model.loading import pipeline_kind

    (model / "tokenizer" / "tokenizer.json").unlink()
    (model / "tokenizer" / "vocab.json").write_text("{}")  # half of a slow tokenizer's vocabulary
    with pytest.raises(UserError, match="has no vocabulary in tokenizer/"):
        pipeline_kind(str(model))


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_mode_is_read_as_the_hub_reads_it(monkeypatch, value):
    from attndistill.model import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert loading._offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not loading._offline()


@pytest.mark.parametrize(("prompt", "found"), [
    ("a house, (best quality:1.2), sunset", "(best quality:1.2)"),
    ("a cat <lora:ink_style:0.8>", "<lora:ink_style:0.8>"),
    ("a fox (red) at 3:30", None), ("a map (scale 1:50)", None), ("((masterpiece:1.4))", "(masterpiece:1.4)"),
    ("a fox (red:2)", "(red:2)"), ("a boat <LyCo:sails:1>", "<LyCo:sails:1>"),
    ("(best quality:1.2), a barn <lora:foo:0.8>", "(best quality:1.2)', '<lora:foo:0.8>")])
def test_prompt_syntax_of_other_tools_is_warned_about(tiny_sd15, caplog, prompt, found):
    """A1111 and ComfyUI prompts carry weights and tags that CLIP would read as words; each is named, and which
    prompt has it."""
    for what, prompts in (("prompt", {"prompts": [prompt, prompt]}),
                          ("negative prompt", {"prompts": ["a cat"], "negative": [prompt]})):  # A1111 negatives
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="attndistill.model.models"):
            tiny_sd15.encode_prompt(**prompts)
        said = f" {what} has '{found}', syntax of other tools"
        assert (caplog.text.count(said) == 1) if found else "syntax" not in caplog.text


def test_null_conditionings_are_one_for_sd15_and_bounded_for_sdxl(tiny_sd15, tiny_sdxl):
    """SD 1.5's empty prompt does not depend on the size (each entry cost a text-encoder call); SDXL's does, and a
    long-lived process meeting many sizes keeps the latest few."""
    from attndistill.model.models import MAX_CACHED_NULLS

    tiny_sd15._null.clear()
    nulls = {id(tiny_sd15.null_condition((64 * i, 64))) for i in range(1, 4)} | {id(tiny_sd15.null_condition())}
    assert len(nulls) == 1 and len(tiny_sd15._null) == 1
    for i in range(MAX_CACHED_NULLS + 3):
        tiny_sdxl.null_condition((64, 64 + 8 * i))
    assert len(tiny_sdxl._null) == MAX_CACHED_NULLS and (64, 64 + 8 * (MAX_CACHED_NULLS + 2)) in tiny_sdxl._null


def test_a_step_info_prints_without_its_latents():
    from attndistill.core.progress import StepInfo

    info = StepInfo(0, 10, 981, 0.5, torch.zeros(1, 4, 64, 64))
    assert "latents" not in repr(info) and "loss=0.5" in repr(info)
