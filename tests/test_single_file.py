"""Single-file checkpoints (original Stable Diffusion key names), loaded offline with ``--config``."""

from __future__ import annotations

import pytest
import torch
from ldm_checkpoint import open_clip_to_ldm, unet_to_ldm, vae_to_ldm, write_ldm_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

import attndistill as ad
from attndistill.cli import app
from attndistill.images import read_parameters


@pytest.fixture(scope="module")
def checkpoint(tiny_sd15_dir, tmp_path_factory):
    return write_ldm_checkpoint(tiny_sd15_dir, tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_test_converter_is_the_inverse_of_diffusers(kind, request):
    """The helper's own check: diffusers' LDM->diffusers conversion gives back every tensor."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    model = request.getfixturevalue(f"tiny_{kind}")
    for module, to_ldm, convert in ((model.unet, unet_to_ldm, convert_ldm_unet_checkpoint),
                                    (model.vae, vae_to_ldm, convert_ldm_vae_checkpoint)):
        state = module.state_dict()
        back = convert(to_ldm(state, dict(module.config)), dict(module.config))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k].reshape(state[k].shape), state[k]) for k in state)
    if kind == "sdxl":
        encoder = model.pipe.text_encoder_2
        state = encoder.state_dict()
        ldm = {"conditioner.embedders.1.model." + k: v for k, v in open_clip_to_ldm(state).items()}
        back = convert_open_clip_checkpoint(encoder, ldm, prefix="conditioner.embedders.1.model.")
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_loads_offline_with_the_same_weights(kind, request, tmp_path, monkeypatch):
    folder, reference = request.getfixturevalue(f"tiny_{kind}_dir"), request.getfixturevalue(f"tiny_{kind}")
    checkpoint = write_ldm_checkpoint(folder, tmp_path / f"tiny-{kind}.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ad.load_model(checkpoint, config=folder, device="cpu", dtype="fp32")
    assert model.kind == kind
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ())
    for name in names:
        ours, theirs = getattr(model.pipe, name).state_dict(), getattr(reference.pipe, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_cli_style_transfer_from_a_single_file(checkpoint, tiny_sd15_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["style", str(data_dir / "horse.jpg"), str(data_dir / "watercolor-cat.jpg"),
                                      "-o", str(out), "--model", str(checkpoint), "--config", str(tiny_sd15_dir),
                                      "--steps", "2", "--size", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    params = read_parameters(out)
    assert params["model"] == str(checkpoint)
    assert params["steps"] == 2


def test_config_with_a_folder_model_is_refused(tiny_sd15_dir, data_dir, tmp_path):
    """--config describes a single file; a folder's own configs would win while the result recorded the config."""
    result = CliRunner().invoke(app, ["style", str(data_dir / "horse.jpg"), str(data_dir / "watercolor-cat.jpg"),
                                      "-o", str(tmp_path / "out.png"), "--model", str(tiny_sd15_dir),
                                      "--config", str(tiny_sd15_dir), "--steps", "1", "--size", "64"])
    assert result.exit_code == 2 and "drop --config" in result.output and not (tmp_path / "out.png").exists()
    with pytest.raises(ad.UserError, match="with configs of its own; drop --config"):
        ad.load_model(tiny_sd15_dir, config=tiny_sd15_dir)


def test_a_pickled_sdxl_checkpoint_loads_as_sdxl(tiny_sdxl_dir, tiny_sdxl, tmp_path, monkeypatch):
    """A .ckpt is read for its tensor names as a .safetensors file is (it was taken for SD 1.5 and failed deep
    in the UNet); Lightning's {"state_dict": ...} wrapping included."""

    state = load_file(write_ldm_checkpoint(tiny_sdxl_dir, tmp_path / "xl.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "xl.ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ad.load_model(tmp_path / "xl.ckpt", config=tiny_sdxl_dir, allow_pickle=True, device="cpu", dtype="fp32")
    assert model.kind == "sdxl" and model.pipe.text_encoder_2 is not None
    assert torch.equal(model.unet.conv_in.weight, tiny_sdxl.unet.conv_in.weight)


def test_a_checkpoint_and_a_config_of_other_families_are_named(checkpoint, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    xl = write_ldm_checkpoint(tiny_sdxl_dir, tmp_path / "xl.safetensors")
    with pytest.raises(ad.UserError, match=r"is an SDXL checkpoint but --config '.*' describes an SD 1.x/2.x model"):
        ad.load_model(xl, config=tiny_sd15_dir, device="cpu")
    with pytest.raises(ad.UserError, match=r"is an SD 1.x/2.x checkpoint but --config '.*' describes an SDXL model"):
        ad.load_model(checkpoint, config=tiny_sdxl_dir, device="cpu")


def test_a_checkpoint_pruned_of_its_vae_takes_one_from_vae(checkpoint, tiny_sd15_dir, tiny_sd15, tmp_path,
                                                           monkeypatch):
    from safetensors.torch import save_file

    state = {k: v for k, v in load_file(checkpoint).items() if not k.startswith("first_stage_model.")}
    save_file(state, tmp_path / "pruned.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ad.UserError, match="has no VAE of its own .*; pass --vae"):
        ad.load_model(tmp_path / "pruned.safetensors", config=tiny_sd15_dir, device="cpu")
    model = ad.load_model(tmp_path / "pruned.safetensors", config=tiny_sd15_dir, vae=tiny_sd15_dir / "vae",
                          device="cpu", dtype="fp32")
    assert model.vae_source == str(tiny_sd15_dir / "vae")
    assert torch.equal(model.vae.decoder.conv_out.weight, tiny_sd15.vae.decoder.conv_out.weight)


class _Payload:
    """Unpickling this with a loader that runs code would touch ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickles_tensor_names_are_read_without_running_its_code(tiny_sdxl_dir, tmp_path):
    """Reading a .ckpt's names for its family must not run what the pickle holds; and a batch check reads none
    where the job does not allow pickles."""
    from attndistill.batch.check import _kind
    from attndistill.batch.jobs import ModelSpec
    from attndistill.model.single_file import checkpoint_keys

    marker = tmp_path / "ran"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": _Payload(marker)},
               tmp_path / "evil.ckpt")
    assert checkpoint_keys(tmp_path / "evil.ckpt") is None and not marker.exists()  # unreadable: left to the load
    xl = tmp_path / "xl.ckpt"
    torch.save(load_file(write_ldm_checkpoint(tiny_sdxl_dir, tmp_path / "xl.safetensors")), xl)
    assert _kind(ModelSpec(source=str(xl), allow_pickle=True)) == "sdxl"
    assert _kind(ModelSpec(source=str(xl))) == "sd15"  # not opened: the load refuses it without allow_pickle


def test_an_sdxl_single_file_loads_as_sdxl_without_a_config(tiny_sdxl_dir, tmp_path, monkeypatch):
    """Online, diffusers fetches the configs of the family the file's names say: an SDXL file must reach SDXL's
    pipeline also without --config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    used = []

    def record(cls, *args, **kwargs):
        used.append(cls.__name__)
        raise OSError("cannot reach the Hub")

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(record))
    xl = write_ldm_checkpoint(tiny_sdxl_dir, tmp_path / "xl.safetensors")
    torch.save(load_file(xl), tmp_path / "xl.ckpt")
    for path, pickle in ((xl, False), (tmp_path / "xl.ckpt", True)):
        with pytest.raises(ad.UserError, match="could not be loaded"):
            ad.load_model(path, allow_pickle=pickle, device="cpu")
    assert used == ["StableDiffusionXLPipeline"] * 2
