"""CLI end to end: expand, tiled and masked textures, finetune-vae, several references (tiny SD 1.5, CPU)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from typer.testing import CliRunner

from attndistill.cli import app
from attndistill.images import read_parameters


@pytest.fixture
def run(tiny_sd15_dir):
    runner = CliRunner()

    def invoke(*args: str, model: bool = True):
        extra = ["-m", str(tiny_sd15_dir), "--device", "cpu", "--dtype", "fp32", "-q"] if model else []
        return runner.invoke(app, [*map(str, args), *extra])

    return invoke


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_expand_any_size_with_several_references(run, data_dir, tmp_path):
    out = tmp_path / "wide.png"
    _ok(run("expand", data_dir / "wood-rings.jpg", data_dir / "watercolor-cat.jpg", "-o", out, "--size", "160x64",
            "--view", 8, "--stride", 2, "--view-batch", 4, "--steps", 2))
    assert Image.open(out).size == (160, 64)
    params = read_parameters(out)
    assert params["task"] == "expand" and len(params["reference"]) == 2 and params["view_batch"] == 4


def test_expand_tiled(run, data_dir, tmp_path):
    out = tmp_path / "tiled.png"
    _ok(run("expand", data_dir / "wood-rings.jpg", "-o", out, "--size", "128x64", "--view", 8, "--stride", 4,
            "--steps", 2, "--tile", "xy", "--decode-tile", 8))
    assert Image.open(out).size == (128, 64) and read_parameters(out)["tile"] == "xy"


def test_texture_tiled_and_several_references(run, data_dir, tmp_path):
    out = tmp_path / "tex.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", data_dir / "horse.jpg", "-o", out, "--size", "64",
            "--steps", 2, "--tile", "x"))
    params = read_parameters(out)
    assert params["tile"] == "x" and len(params["reference"]) == 2


def test_texture_sampling_tiled(run, data_dir, tmp_path):
    out = tmp_path / "sampled.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", "--mode", "sample", "-o", out, "--size", "64", "--steps", 2,
            "--tile", "xy"))
    params = read_parameters(out)
    assert params["task"] == "texture-sample" and params["tile"] == "xy" and params["tune_vae"] is False


def test_texture_sampling_takes_adain_and_start_t_as_batch_lines_do(run, data_dir, tmp_path):
    out = tmp_path / "adain.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", "--mode", "sample", "-o", out, "--size", "64", "--steps", 2,
            "--adain", "--start-t", 900))
    params = read_parameters(out)
    assert params["adain"] is True and params["start_t"] == 900
    refused = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "opt.png", "--size", "64", "--adain")
    assert refused.exit_code == 2 and "--adain is a sampling option; add --mode sample or --layout" in refused.output


def test_style_with_two_style_images(run, data_dir, tmp_path):
    out = tmp_path / "style.png"
    _ok(run("style", data_dir / "golden-gate.jpg", data_dir / "watercolor-cat.jpg", data_dir / "wood-rings.jpg",
            "-o", out, "--size", "64", "--steps", 1, "--tile", "y"))
    params = read_parameters(out)
    assert len(params["style"]) == 2 and params["tile"] == "y"


def test_masked_texture(run, data_dir, tmp_path):
    ref = Image.open(data_dir / "wood-rings.jpg")
    labels = np.zeros((ref.height, ref.width, 3), np.uint8)
    labels[:, ref.width // 2:] = (0, 0, 255)
    Image.fromarray(labels).save(tmp_path / "ref-labels.png")
    target = np.zeros((64, 128, 3), np.uint8)
    target[32:] = (0, 0, 255)
    Image.fromarray(target).save(tmp_path / "target-labels.png")
    out = tmp_path / "masked.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", "--ref-labels", tmp_path / "ref-labels.png",
            "--target-labels", tmp_path / "target-labels.png", "-o", out, "--size", "128x64", "--steps", 2))
    assert Image.open(out).size == (128, 64) and read_parameters(out)["task"] == "texture-masked"
    target[:8] = (0, 255, 0)  # a colour the reference does not have
    Image.fromarray(target).save(tmp_path / "bad-labels.png")
    bad = run("texture", data_dir / "wood-rings.jpg", "--ref-labels", tmp_path / "ref-labels.png",
              "--target-labels", tmp_path / "bad-labels.png", "-o", tmp_path / "bad.png", "--steps", 1)
    assert bad.exit_code == 2 and "#00ff00" in bad.output and "Traceback" not in bad.output
    half = run("texture", data_dir / "wood-rings.jpg", "--target-labels", tmp_path / "target-labels.png",
               "-o", tmp_path / "half.png")
    assert half.exit_code == 2 and "--ref-labels" in half.output


def test_a_vae_folder_taken_while_tuning_keeps_both(run, data_dir, tmp_path, monkeypatch):
    """Another run took the output folder while this one tuned: that folder stays, and this work is saved beside
    it as NAME.new, with a warning, as image results are."""
    from attndistill.tasks import vae_tuning

    folder = tmp_path / "wood-vae"
    real = vae_tuning.finetune_vae

    def tune_while_another_run_finishes(*args, **kwargs):
        tuned = real(*args, **kwargs)
        folder.mkdir()
        (folder / "theirs.txt").write_text("another run's")
        return tuned

    monkeypatch.setattr(vae_tuning, "finetune_vae", tune_while_another_run_finishes)
    result = _ok(run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 1))
    assert f"'{folder}' appeared while this ran and is left as it is; the tuned VAE is {folder}.new" in result.output
    assert [p.name for p in folder.iterdir()] == ["theirs.txt"]
    AutoencoderKL.from_pretrained(tmp_path / "wood-vae.new")


def test_finetune_vae_writes_its_loss_log_beside_the_folder(run, data_dir, tmp_path):
    """``--loss-log``: each tuning step's L1, as ``--tune-vae`` logs them (marked with their stage), and the curve
    falls; a log inside the VAE's folder is refused before any work (that folder holds a VAE's files only)."""
    folder, log = tmp_path / "wood-vae", tmp_path / "tuning.jsonl"
    inside = run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 3, "--loss-log",
                 folder / "losses.jsonl")
    assert inside.exit_code == 2 and "lies in the VAE's folder" in inside.output and not folder.exists()
    result = _ok(run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 3, "--lr", 1e-3,
                     "--loss-log", log))
    assert f"wrote {log} (3 steps of the decoder's tuning)" in result.output
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in rows] == [(i, "tuning the VAE decoder") for i in (1, 2, 3)]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_a_tuned_vae_is_the_same_with_vae_tiling_and_its_record_follows_its_references(run, data_dir, tmp_path):
    """The tuned weights do not depend on --vae-tiling, which their record does not name (they differed by 6e-4);
    the record keeps its references' digests, so info tells when one changed, and finds one moved beside it."""
    import shutil

    from safetensors.torch import load_file

    from attndistill.fingerprints import KEY, file_digest

    project = tmp_path / "project"
    project.mkdir()
    reference = project / "wood.jpg"
    shutil.copy(data_dir / "wood-rings.jpg", reference)
    weights = []
    for switches, name in (([], "plain"), (["--vae-tiling"], "tiled")):
        _ok(run(*switches, "finetune-vae", reference, "-o", project / name, "--steps", 1))
        weights.append(load_file(project / name / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    made = json.loads((project / "plain" / "attndistill.json").read_text())
    assert made[KEY] == {"reference": [file_digest(reference)]} and made["made_with"]["threads"] >= 1
    moved = tmp_path / "moved"
    project.rename(moved)
    shown = run("info", moved / "plain", "--job", model=False)
    assert shown.exit_code == 0 and shlex.split(shown.stdout)[2] == str(moved / "wood.jpg")
    assert f"note: reference '{reference}' is gone; the same file is at '{moved / 'wood.jpg'}'" in shown.stderr
    record = run("info", moved / "plain", model=False)  # the record as written; the note says where the file is
    assert json.loads(record.stdout)["reference"] == [str(reference)] and "note: reference" in record.stderr
    Image.open(data_dir / "horse.jpg").save(moved / "wood.jpg")  # another image under its name: no stand-in
    assert f"warning: reference '{reference}' is gone since" in run("info", moved / "plain", model=False).stderr


def test_finetune_vae_then_use_it(run, data_dir, tmp_path, tiny_sd15_dir):
    folder = tmp_path / "wood-vae"
    result = _ok(run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 3))
    assert "wrote" in result.output
    AutoencoderKL.from_pretrained(folder)
    made = json.loads((folder / "attndistill.json").read_text())  # how it was made, as a result's PNG says
    assert made["task"] == "finetune-vae" and made["steps"] == 3 and made["lr"] == 1e-4
    assert made["reference"] == [str(data_dir / "wood-rings.jpg")] and made["reference_fit"] == "squash"
    assert made["made_with"]["device"] == "cpu"
    again = run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 3)
    assert again.exit_code == 2 and "--overwrite" in again.output
    _ok(run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 2, "--overwrite"))
    assert json.loads((folder / "attndistill.json").read_text())["steps"] == 2
    # --overwrite replaces an earlier tuned VAE, never one the run loads: the model's own, or the --vae folder
    for reads in (["-o", tiny_sd15_dir / "vae"], ["--vae", folder, "-o", folder]):
        refused = run("finetune-vae", data_dir / "wood-rings.jpg", *reads, "--steps", 1, "--overwrite")
        assert refused.exit_code == 2 and "which this run loads; give the tuned VAE a folder of its own" in (
            refused.output)
    assert not (tiny_sd15_dir / "vae" / "attndistill.json").exists()
    linked = tmp_path / "linked-model"  # its vae/ a link to a VAE folder that several models share
    linked.mkdir()
    for part in tiny_sd15_dir.iterdir():
        (linked / part.name).symlink_to(folder if part.name == "vae" else part)
    refused = run("finetune-vae", data_dir / "wood-rings.jpg", "-o", folder, "--steps", 1, "--overwrite", "-m", linked,
                  "-q", model=False)
    assert refused.exit_code == 2 and "which this run loads" in refused.output
    shown = run("info", folder, model=False)  # a VAE folder tells how it was made, as a result's PNG does
    assert shown.exit_code == 0 and json.loads(shown.output)["steps"] == 2
    command = run("info", folder, "--job", model=False)
    words = shlex.split(command.output)
    assert command.exit_code == 0 and words == [
        "attndistill", "finetune-vae", str(data_dir / "wood-rings.jpg"), "-o", f"{folder}-rerun", "--model",
        made["model"], "--dtype", "fp32", "--steps", "2", "--lr", "0.0001", "--reference-fit", "squash"]
    _ok(run(*words[1:], "-q", model=False))  # as printed: the same decoder, beside the first (never over it)
    first, again = (AutoencoderKL.from_pretrained(f).state_dict() for f in (folder, f"{folder}-rerun"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    record = json.loads((folder / "attndistill.json").read_text())
    (folder / "attndistill.json").write_text(json.dumps({**record, "steps": "two"}))
    edited = run("info", folder, "--job", model=False)
    assert edited.exit_code == 2 and "was it edited?" in edited.output
    (folder / "attndistill.json").write_text(json.dumps({k: v for k, v in record.items() if k != "dtype"}))
    older = run("info", folder, "--job", model=False)  # made before the record held dtype, VAE and configs
    assert older.exit_code == 2 and "its command cannot be told" in older.output
    not_vae = run("info", tmp_path, model=False)
    assert not_vae.exit_code == 2 and "holds no attndistill.json" in not_vae.output
    out = tmp_path / "with-vae.png"
    _ok(run("texture", data_dir / "wood-rings.jpg", "--vae", folder, "-o", out, "--size", "64", "--steps", 1))
    assert out.exists()


def test_bad_tile_is_a_one_line_error(run, data_dir, tmp_path):
    result = run("texture", data_dir / "wood-rings.jpg", "-o", tmp_path / "x.png", "--tile", "z")
    assert result.exit_code == 2 and "tile 'z'" in result.output and "Traceback" not in result.output
