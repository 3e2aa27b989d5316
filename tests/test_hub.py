"""Models by Hub id, loaded from a Hugging Face cache laid out as huggingface_hub writes it (offline): results
record the snapshot each Hub input came from, and info says when the cache holds another one now."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from attndistill.cli import app
from attndistill.images import read_parameters

MODEL, VAE = "tiny-org/tiny-sd15", "tiny-org/tiny-vae"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class HubCache:
    """A cache folder of ``models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}``, as huggingface_hub keeps it."""

    def __init__(self, root):
        self.root = root

    def publish(self, repo: str, files, commit: str) -> None:
        """``files`` (a folder) as the snapshot ``commit`` of ``repo``, which ``main`` now names."""
        folder = self.root / ("models--" + repo.replace("/", "--"))
        shutil.copytree(files, folder / "snapshots" / commit, ignore=shutil.ignore_patterns("_tokenizer*"))
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_sd15_dir):
    from huggingface_hub import constants

    cache = HubCache(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache.root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache.publish(MODEL, tiny_sd15_dir, "a" * 40)
    cache.publish(VAE, tiny_sd15_dir / "vae", "c" * 40)
    return cache


def test_a_result_records_the_hub_snapshots_it_was_made_from_and_info_says_when_they_change(
        hub, tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "out.png"
    result = run("style", data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", "-o", out, "--model", MODEL,
                 "--vae", VAE, "--steps", 1, "--size", 64, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    params = read_parameters(out)
    assert params["model"] == MODEL and params["vae"] == VAE
    assert params["made_with"]["hub_commits"] == {"model": "a" * 40, "vae": "c" * 40}
    said = run("info", out)
    assert said.exit_code == 0 and "warning" not in said.output

    hub.publish(MODEL, tiny_sd15_dir, "b" * 40)  # the repository changed, and the cache followed it
    said = run("info", out, "--job")
    assert said.exit_code == 0
    assert (f"warning: model '{MODEL}' changed on the Hub (commit aaaaaaa then, bbbbbbb in the cache now) since "
            f"'{out}' was made; a rerun will not give the same pixels") in said.output
    assert "vae '" not in said.output


def test_local_models_record_no_hub_snapshot(tmp_path, data_dir, tiny_sd15_dir):
    out = tmp_path / "out.png"
    result = run("texture", data_dir / "wood-rings.jpg", "-o", out, "--model", tiny_sd15_dir, "--steps", 1,
                 "--size", 64, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert "hub_commits" not in read_parameters(out)["made_with"]


def test_a_hub_vae_the_cache_lacks_offline_is_one_line_naming_the_option(hub, tmp_path, data_dir):
    result = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "out.png", "--model", MODEL, "--vae",
                 "tiny-org/no-such-vae", "--steps", 1, "--size", 64, "--device", "cpu", "--quiet")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: VAE 'tiny-org/no-such-vae' is not in the local Hugging Face cache and the Hub cannot be reached "
        "(HF_HUB_OFFLINE is set); check the id and download it once online, or pass --vae "
        "/path/to/a/local/diffusers/folder"]
    assert not (tmp_path / "out.png").exists()


def test_a_hub_controlnet_is_recorded_with_its_snapshot(hub, tmp_path, data_dir, tiny_sd15_dir):
    from attndistill.testing import build_tiny_controlnet

    hub.publish("tiny-org/tiny-controlnet", build_tiny_controlnet(tmp_path / "cn"), "d" * 40)
    out = tmp_path / "cn.png"
    result = run("t2i", "-s", data_dir / "watercolor-cat.jpg", "-p", "a horse", "-o", out, "--controlnet",
                 "tiny-org/tiny-controlnet", "--control-image", data_dir / "horse.jpg", "-m", tiny_sd15_dir,
                 "--steps", 2, "--size", 64, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert read_parameters(out)["made_with"]["hub_commits"] == {"controlnet": "d" * 40}


def test_a_missing_folder_that_is_no_hub_id_is_named_as_a_folder(tmp_path, data_dir, tiny_sd15_dir):
    """A path huggingface_hub refuses as a repository id (a space, '..') raised its raw HFValidationError."""
    from attndistill.model.hub import cached_commit, changed_commits

    for vae in ("my vaes/wood", "vaes/../wood"):
        result = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "out.png", "--vae", vae,
                     "--model", tiny_sd15_dir, "--steps", 1, "--size", 64, "--device", "cpu", "--quiet")
        assert result.exit_code == 2 and f"VAE '{vae}' is not a diffusers AutoencoderKL folder" in result.output
    assert cached_commit("my nets/canny", "controlnet") is None
    assert changed_commits({"model": "a b/c", "made_with": {"hub_commits": {"model": "a" * 40}}}) == []


def test_a_controlnet_its_first_run_downloads_is_kept_for_the_next(hub, tmp_path, tiny_sd15, monkeypatch):
    """The kept net's key holds the snapshot the load left in the cache, not the empty cache before the download
    (the next run found them different and loaded 1.4 GB again)."""
    from attndistill.model import controlnet as controlnet_module
    from attndistill.testing import build_tiny_controlnet

    files, loads = build_tiny_controlnet(tmp_path / "cn"), []
    load = controlnet_module.load_controlnet

    def download_then_load(source, **kwargs):
        loads.append(source)
        hub.publish("tiny-org/tiny-controlnet", files, "e" * 40)  # what a download leaves in the cache
        return load(source, **kwargs)

    monkeypatch.setattr(controlnet_module, "load_controlnet", download_then_load)
    tiny_sd15.kept_controlnet = None
    try:
        for _ in range(2):
            controlnet_module.kept_controlnet("tiny-org/tiny-controlnet", model=tiny_sd15)
        assert len(loads) == 1
    finally:
        tiny_sd15.kept_controlnet = None


def test_a_hub_snapshot_holding_only_fp16_weights_loads_in_fp32(hub, tmp_path, tiny_sd15_dir):
    """A GPU run in half precision downloads the fp16 files only; a CPU or fp32 run of the same id then said the
    repository had "no .safetensors weights", where the same files in a folder loaded."""
    import attndistill as ad

    half = shutil.copytree(tiny_sd15_dir, tmp_path / "half")
    for weights in half.rglob("*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    hub.publish("testorg/fp16-only", half, "d" * 40)
    model = ad.load_model("testorg/fp16-only", device="cpu", dtype="fp32")
    plain = ad.load_model(str(tiny_sd15_dir), device="cpu", dtype="fp32")
    assert model.dtype == torch.float32
    for (name, a), (_, b) in zip(model.unet.state_dict().items(), plain.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
