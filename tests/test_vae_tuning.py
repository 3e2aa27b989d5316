"""VAE*: decoder-only fine-tuning on the reference, saved as a diffusers AutoencoderKL folder."""

from __future__ import annotations

import json
import os
import stat
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

import attndistill as ad
from attndistill.images import load_image, to_tensor
from attndistill.tasks import vae_tuning
from attndistill.tasks.vae_tuning import finetune_vae, reconstruction_l1, save_vae, tune_decoder


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tuned(tiny_sd15, data_dir):
    """The tiny model's VAE tuned on the wood texture (64 px, 20 steps, the default lr)."""
    before = _state(tiny_sd15.vae)
    images = to_tensor(load_image(data_dir / "wood-rings.jpg"), (64, 64))
    losses = []
    vae = tune_decoder(tiny_sd15.vae, images, steps=20, callback=lambda step, loss: losses.append(loss))
    return vae, before, images, losses


def test_tuning_lowers_the_reconstruction_l1(tiny_sd15, tuned):
    vae, _, images, losses = tuned
    x = images * 2 - 1
    assert len(losses) == 20
    assert reconstruction_l1(vae, x) < 0.9 * reconstruction_l1(tiny_sd15.vae, x)


def test_only_the_decoder_changes(tiny_sd15, tuned):
    vae, before, _, _ = tuned
    after = vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    for name in ("encoder.", "quant_conv.", "post_quant_conv."):
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(name))
    # the model's own VAE is untouched, and nothing trains by accident
    assert all(torch.equal(before[k], v) for k, v in tiny_sd15.vae.state_dict().items())
    assert not any(p.requires_grad for p in vae.parameters())


def test_saved_folder_loads_with_from_pretrained_and_with_vae_option(tiny_sd15, tiny_sd15_dir, tuned, tmp_path):
    vae = tuned[0]
    folder = ad.save_vae(vae, tmp_path / "wood-vae")  # public, as finetune_vae's docstring has it
    loaded = AutoencoderKL.from_pretrained(folder)
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    model = ad.load_model(str(tiny_sd15_dir), vae=folder, device="cpu", dtype="fp32")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(model.decode(z), expected)
    with pytest.raises(ad.UserError, match="already exists"):
        save_vae(vae, folder)
    save_vae(vae, folder, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    umask = os.umask(0o022)
    os.umask(umask)  # others may read what was saved, as they may any new file (a shared cluster's users)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~umask}


def test_an_interrupt_while_a_vae_is_replaced_keeps_the_old_one(tuned, tmp_path, monkeypatch):
    """overwrite removed the old folder, then moved the new one in: an interrupt between the two lost both."""
    vae = tuned[0]
    folder = save_vae(vae, tmp_path / "wood-vae")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = os.replace

    def interrupted_once_the_old_is_aside(src, dst):
        if str(dst) == str(folder) and str(src).endswith(".partial"):  # the new one's move, not the old one's back
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(vae_tuning.os, "replace", interrupted_once_the_old_is_aside)
    with pytest.raises(KeyboardInterrupt):
        save_vae(vae, folder, overwrite=True)
    monkeypatch.setattr(vae_tuning.os, "replace", real)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wood-vae"]
    save_vae(vae, folder, overwrite=True)  # and a replacement that ends leaves nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wood-vae"]


def test_finetune_vae_api_defaults_follow_the_spec(tiny_sd15, data_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(vae_tuning, "tune_decoder",
                        lambda vae, images, **kw: (seen.update(kw, shape=images.shape), SimpleNamespace())[1])
    finetune_vae(data_dir / "wood-rings.jpg", model=tiny_sd15)
    assert seen["steps"] == 75 and seen["lr"] == 1e-4
    assert seen["shape"] == (1, 3, tiny_sd15.native_size, tiny_sd15.native_size)


def test_tune_vae_option_decodes_with_a_tuned_copy_for_that_run_only(tiny_sd15, data_dir, monkeypatch):
    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder", lambda vae, images, **kw: real(vae, images, steps=5, lr=1e-3))
    original = tiny_sd15.vae
    kw = dict(model=tiny_sd15, steps=2, size=64, seed=3, progress=False)
    plain = ad.texture_synthesis(data_dir / "wood-rings.jpg", **kw)[0]
    tuned = ad.texture_synthesis(data_dir / "wood-rings.jpg", tune_vae=True, **kw)[0]
    assert tiny_sd15.vae is original
    assert not np.array_equal(np.asarray(plain), np.asarray(tuned))
    assert json.loads(tuned.info["parameters"])["tune_vae"] is True


def test_a_tuned_copy_decodes_in_tiles_where_the_run_asked_for_them(tiny_sd15, data_dir):
    """The decoder is tuned on whole decodes (its weights must not depend on --vae-tiling), but a run's own decodes
    with the tuned copy keep the run's tiling: --tune-vae dropped it, and with it the memory it saves."""
    from attndistill.model.perf import PerfOptions

    images = to_tensor(load_image(data_dir / "wood-rings.jpg"), (64, 64))
    try:
        for tiling in (False, True):
            tiny_sd15.set_perf(PerfOptions(vae_tiling=tiling))
            assert tune_decoder(tiny_sd15.vae, images, steps=1).use_tiling is tiling
    finally:
        tiny_sd15.set_perf(PerfOptions())


@pytest.mark.parametrize("how", ["wrapper", "own options"])
def test_sampling_tasks_get_tiling_and_tuned_vae(tiny_sd15, data_dir, monkeypatch, how):
    from attndistill.tasks.generate import texture_sampling
    from attndistill.tasks.textures import with_texture_options

    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder", lambda vae, images, **kw: real(vae, images, steps=5, lr=1e-3))
    sampling, decoding = [], []

    def spy(info):  # at each step: the UNet is circular
        sampling.append(len(tiny_sd15.unet.conv_in._forward_pre_hooks))

    def decode(latents):  # at the result's decoding: the tuned decoder, circular; the encoder keeps zero padding
        vae = tiny_sd15.vae
        decoding.append((vae is not original, len(vae.decoder.conv_in._forward_pre_hooks),
                         len(vae.encoder.conv_in._forward_pre_hooks)))
        return real_decode(latents)

    original, real_decode = tiny_sd15.vae, tiny_sd15.decode
    monkeypatch.setattr(tiny_sd15, "decode", decode)
    def without_options(reference, **kwargs):  # a task of the user's: the wrapper brings tiling and VAE*
        return texture_sampling(reference, **kwargs)

    task = texture_sampling if how == "own options" else partial(with_texture_options, without_options)
    out = task(data_dir / "wood-rings.jpg", model=tiny_sd15, tile="xy", tune_vae=True, steps=2, size=64,
               progress=False, callback=spy)
    assert sampling == [1, 1] and decoding == [(True, 1, 0)]
    assert tiny_sd15.vae is original and not tiny_sd15.unet.conv_in._forward_pre_hooks
    assert not original.decoder.conv_in._forward_pre_hooks
    params = json.loads(out[0].info["parameters"])
    assert params["tile"] == "xy" and params["tune_vae"] is True


def test_the_wrapper_gives_a_tasks_own_pixels_in_bf16_and_takes_one_image_results(tiny_sd15_dir, data_dir,
                                                                                      monkeypatch):
    """A tuned VAE only decodes: a task the wrapper runs encodes its references with the model's own encoder, as
    a task's own ``tune_vae`` does (in bf16 the tuned float32 copy encoded them 5/255 apart). A task with the
    options of its own gets them passed, so expansion, which returns one image, keeps its own wrapped views."""
    from attndistill.tasks.generate import texture_sampling
    from attndistill.tasks.textures import expand_texture, with_texture_options

    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder", lambda vae, images, **kw: real(vae, images, steps=5, lr=1e-2))
    model = ad.load_model(str(tiny_sd15_dir), device="cpu", dtype="bf16")
    reference = data_dir / "wood-rings.jpg"
    settings = dict(model=model, steps=2, iters=1, size=64, progress=False, tune_vae=True)

    def without_options(reference, **kwargs):
        return texture_sampling(reference, **kwargs)

    own = np.asarray(texture_sampling(reference, **settings)[0])
    wrapped = with_texture_options(without_options, reference, **settings)[0]
    assert np.array_equal(np.asarray(wrapped), own)
    assert json.loads(wrapped.info["parameters"])["tune_vae"] is True and model.encoding_vae is None

    expand = dict(model=model, size=(96, 64), view=8, steps=1, iters=1, progress=False, tile="x")
    image = with_texture_options(expand_texture, reference, **expand)
    assert np.array_equal(np.asarray(image), np.asarray(expand_texture(reference, **expand)))
    assert json.loads(image.info["parameters"])["tile"] == "x"


def test_bad_settings_are_user_errors(tiny_sd15):
    with pytest.raises(ad.UserError, match="steps"):
        tune_decoder(tiny_sd15.vae, torch.rand(1, 3, 64, 64), steps=0)


@pytest.mark.parametrize("task", ["style", "texture-sample"])
def test_a_runs_callback_sees_its_decoder_tuning_and_may_stop_it_there(tiny_sd15, data_dir, monkeypatch, task):
    """--tune-vae tunes for a while: the run's callback sees those steps (their stage named, their latents
    empty), so a page can show them and its Cancel can stop there."""
    from attndistill.tasks.generate import texture_sampling

    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder", lambda vae, images, **kw: real(vae, images, **{**kw, "steps": 3}))
    stages = []
    run = dict(model=tiny_sd15, steps=2, size=64, progress=False, tune_vae=True,
               callback=lambda info: stages.append((info.stage, info.latents.numel() > 0)))
    call = (partial(ad.style_transfer, data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg") if task == "style"
            else partial(texture_sampling, data_dir / "wood-rings.jpg"))
    call(**run)
    tuning, steps = [(vae_tuning.TUNING_STAGE, False)] * 3, [("", True)] * 2
    assert stages == (tuning + steps if task == "style" else steps + tuning)  # tuned before or after the steps

    class Stop(Exception):
        pass

    def stop_in_tuning(info):
        if info.stage:
            raise Stop

    original = tiny_sd15.vae
    with pytest.raises(Stop):
        call(**{**run, "callback": stop_in_tuning})
    assert tiny_sd15.vae is original


def test_tune_vae_that_diverges_names_the_command_whose_lr_can_be_lowered(tiny_sd15, data_dir, monkeypatch):
    """--tune-vae tunes at the default lr and has no option to lower it: "lower its lr" was advice no command
    line or page could follow; the VAE command can, and its folder goes to --vae."""
    from attndistill.batch.jobs import job_words
    from attndistill.errors import CLI_WORDS
    from attndistill.webui.wording import page_message

    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder", lambda vae, images, **kw: real(vae, images, **{**kw, "steps": 3}))
    monkeypatch.setattr(vae_tuning, "VAE_TUNING_LR", 1e30)  # what only a broken decoder would need to diverge

    def diverged(cli_words: bool) -> ad.UserError:
        words = CLI_WORDS.set(cli_words)  # as the command line and the web UI run it, or a Python caller
        try:
            with pytest.raises(ad.UserError) as error:
                ad.style_transfer(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1,
                                  size=64, progress=False, tune_vae=True)
        finally:
            CLI_WORDS.reset(words)
        return error.value

    said, api = diverged(True), str(diverged(False))
    assert str(said).startswith("VAE tuning (--tune-vae) diverged at step 2 (loss ")
    assert str(said).endswith("at lr 1e+30; make the decoder with 'attndistill finetune-vae' and a lower "
                              "learning rate, then pass --vae with the folder it writes instead of --tune-vae")
    assert api.startswith("VAE tuning (tune_vae=True) diverged") and api.endswith(
        "then pass vae= with the folder it writes instead of tune_vae=True")
    assert page_message(said).endswith("make the decoder with the VAE fine-tuning tab and a lower learning "
                                       "rate, then fill the VAE box with the folder it writes instead of "
                                       "Fine-tune the VAE decoder")
    # a jobs file's 'lr' is the AD's: the advice must not name it
    assert job_words(str(said)).endswith("a lower learning rate, then pass 'vae' with the folder it writes "
                                         "instead of 'tune_vae'")


def test_a_decoder_that_decodes_nan_before_tuning_is_not_blamed_on_the_lr(tiny_sd15_dir, data_dir):
    model = ad.load_model(str(tiny_sd15_dir), device="cpu", dtype="fp32")  # its own copy: its VAE is broken below
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.fill_(float("nan"))
    with pytest.raises(ad.UserError, match="the VAE decodes the reference to NaN/Inf before any tuning: its "
                                           "decoder's weights are broken; load the model again or pass a working "
                                           "VAE with vae="):
        finetune_vae(data_dir / "wood-rings.jpg", model=model, steps=2)


def test_a_tuning_that_starts_over_logs_each_step_once(tiny_sd15, data_dir, monkeypatch):
    """Out of memory beside cached CUDA graphs, the tuning starts over without them: its loss log holds the
    second attempt's steps, once each, not the first one's too (they were logged twice)."""
    from attndistill.loss_log import LossLog

    tune, failed = vae_tuning.tune_decoder, []

    def short_of_memory_once(vae, images, *, callback, **kwargs):
        def report(step, loss):
            callback(step, loss)
            if step == 1 and not failed:
                failed.append(step)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return tune(vae, images, callback=report, **kwargs)

    monkeypatch.setattr(vae_tuning, "tune_decoder", short_of_memory_once)
    monkeypatch.setitem(tiny_sd15.graphs, ("stepper", "cached"), object())  # a graph the retry drops
    log = LossLog()
    finetune_vae(data_dir / "wood-rings.jpg", model=tiny_sd15, steps=3, callback=log)
    assert failed and ("stepper", "cached") not in tiny_sd15.graphs
    assert [row["step"] for row in log.rows] == [1, 2, 3]
