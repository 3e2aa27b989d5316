"""Every bad input gets one line naming it and the fix, a non-zero exit, no traceback and no output file;
valid but unusual images (16-bit, CMYK, alpha, palette, grayscale, float, EXIF-rotated) are accepted
and converted correctly. The corpus is generated here."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attndistill.cli import app
from attndistill.errors import UserError
from attndistill.images import load_image

CLI = str(Path(sys.executable).parent / "attndistill")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setenv("ATTNDISTILL_DEBUG", "0")  # --debug sets it for the process; keep tests independent


# -- the corpus --------------------------------------------------------------------------------------------

def _photo(data_dir: Path, size=(64, 48)) -> Image.Image:
    return Image.open(data_dir / "horse.jpg").convert("RGB").resize(size)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _truncated_jpeg(path: Path, data_dir: Path) -> None:
    buf = io.BytesIO()
    _photo(data_dir).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


BAD_IMAGES: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("truncated.jpg", _truncated_jpeg, "is truncated or corrupt"),
    ("one-pixel.png", lambda p, d: Image.new("RGB", (1, 1)).save(p), "is only 1x1 pixels"),
    ("bomb-100k.png", lambda p, d: p.write_bytes(_png_header_only(100_000, 100_000)), "too many pixels"),
    ("bomb-96mp.png", lambda p, d: p.write_bytes(_png_header_only(12_000, 8_000)), "too many pixels"),
    ("text.png", lambda p, d: p.write_text("not an image\n"), "is not an image Pillow can read"),
    ("empty.png", lambda p, d: p.write_bytes(b""), "is empty"),
    ("folder.png", lambda p, d: p.mkdir(), "is a directory"),
    ("missing.png", lambda p, d: None, "does not exist"),
    # two a fuzzing helper found: Pillow raised TypeError and RuntimeError, which left the command "unexpected"
    ("no-dimensions.tif", lambda p, d: p.write_bytes((d / "corrupt" / p.name).read_bytes()), "is truncated or corrupt"),
    ("cut-item.avif", lambda p, d: p.write_bytes((d / "corrupt" / p.name).read_bytes()), "is truncated or corrupt"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, make, _ in BAD_IMAGES:
        make(folder / name, data_dir)
    _photo(data_dir).save(folder / "good.png")
    return folder


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_rejected(result, code: int, *fragments: str, out_dir: Path | None = None, before: set | None = None):
    """One ``error:`` line with every fragment, the exit code, no traceback, nothing written."""
    assert isinstance(result.exception, SystemExit), f"escaped exception: {result.exception!r}"
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    if out_dir is not None:
        assert {p.name for p in out_dir.iterdir()} == (before or set()), "an output or temp file was left"


@pytest.mark.parametrize("name,expected", [(n, e) for n, _, e in BAD_IMAGES], ids=[n for n, _, _ in BAD_IMAGES])
@pytest.mark.parametrize("role", ["content", "style"])
def test_bad_image_is_rejected(corpus, tmp_path, tiny_sd15_dir, name, expected, role):
    bad, good = corpus / name, corpus / "good.png"
    content, style = (bad, good) if role == "content" else (good, bad)
    result = invoke("style", content, style, "-o", tmp_path / "out.png", "-m", tiny_sd15_dir, "--steps", "1",
                    "--size", "64", "-q")
    assert_rejected(result, 2, f"{role} image '{bad}'", expected, out_dir=tmp_path)


@pytest.mark.parametrize("command", [
    ["style", "{in}", "{other}", "-o", "{in}"],
    ["style", "{other}", "{other}", "--mask", "{in}", "-o", "{in}"],
    ["t2i", "--prompt", "a fox", "--style", "{other}", "--content", "{in}", "--content-weight", "1", "-o", "{in}"],
    ["t2i", "--prompt", "a fox", "--style", "{out_1}", "--num-images", "2", "-o", "{out}"],
    ["expand", "{in}", "--size", "128", "-o", "{in}"],
])
def test_an_output_never_replaces_an_input_even_with_overwrite(data_dir, tmp_path, tiny_sd15_dir, command):
    """The result's parameters name its inputs for reruns: a result written over one could never be rerun."""
    _photo(data_dir).save(tmp_path / "in.png")
    _photo(data_dir).save(tmp_path / "out-1.png")  # the second of two numbered outputs, made an input below
    _photo(data_dir).save(tmp_path / "other.png")
    paths = {name: tmp_path / f"{name.replace('_', '-')}.png" for name in ("in", "other", "out", "out_1")}
    command = [c.format(**paths) for c in command]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for overwrite in (["--overwrite"], []):  # without it too: "pass --overwrite" would lead nowhere
        result = invoke(*command, *overwrite, "-m", tiny_sd15_dir, "--steps", "1", "--size", "64", "-q")
        assert_rejected(result, 2, "is an input of this run, which its result must not replace; choose another "
                                   "output")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_path_with_a_line_break_is_said_on_one_line(corpus, tmp_path, tiny_sd15_dir):
    result = invoke("style", tmp_path / "missing\nx.png", corpus / "good.png", "-o", tmp_path / "o.png",
                    "-m", tiny_sd15_dir, "--steps", "1", "-q")
    assert_rejected(result, 2, "missing\\nx.png' does not exist")


def test_an_earlier_preview_taken_as_an_input_is_not_replaced_by_this_runs_preview(data_dir, tmp_path,
                                                                                     tiny_sd15_dir):
    """An earlier run's --preview (replaced every N steps, without --overwrite) used as this run's style was
    replaced during the run, and the result recorded the new file's digest: no warning, a rerun of another image."""
    from attndistill.cli.common import PREVIEW_MARK
    from attndistill.images import save_png

    preview = save_png(_photo(data_dir), tmp_path / "peek.png", parameters=PREVIEW_MARK)
    before = preview.read_bytes()
    result = invoke("style", data_dir / "horse.jpg", preview, "-o", tmp_path / "out.png", "--preview", preview,
                    "--preview-every", "1", "-m", tiny_sd15_dir, "--steps", "2", "--size", "64", "-q")
    assert_rejected(result, 2, f"--preview '{preview}' is an input of this run")
    assert preview.read_bytes() == before and not (tmp_path / "out.png").exists()


# -- out-of-range numbers and options --------------------------------------------------------------------

OPTION_CASES = [
    (["--steps", "0"], "steps must be at least 1 (got 0)"),
    (["--steps", "5000"], "steps must be at most 1000"),
    (["--iters", "99999999999999999999"], "iters must be at most 1000"),  # ran for ever
    (["--lr", "0"], "lr must be positive"),
    (["--lr", "-0.5"], "lr must be positive"),
    (["--content-weight", "-1"], "content weight must be >= 0"),
    (["--attention-scale", "0"], "attention scale must be positive"),
    (["--size", "0"], "size '0' is not understood"),
    (["--size", "big"], "size 'big' is not understood"),
    (["--size", "100000"], "too large for one canvas"),
    (["--size", "1x99999"], "x100000 is over 16384 px on a side"),  # a strip within the area: hours
    (["--layers", "99"], "layers [99] do not exist in this model; it has self-attention layers 0-"),
    (["--layers", "3-x"], "layers '3-x' is not understood"),
    (["--layers", "6-3"], "layers '6-3' is an empty range; write the lower layer first (3-6)"),
    (["--dtype", "fp8"], "dtype 'fp8' is not supported"),
]


@pytest.mark.parametrize("options,expected", OPTION_CASES, ids=[" ".join(o) for o, _ in OPTION_CASES])
def test_out_of_range_option_is_rejected(corpus, tmp_path, tiny_sd15_dir, options, expected):
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "out.png",
                    "-m", tiny_sd15_dir, "--steps", "1", "--size", "64", "-q", *options)
    assert_rejected(result, 2, expected, out_dir=tmp_path)


#: Typos that need no model to be found: reported before the model loads, not after a download.
EARLY_CASES = [
    (["style", "{img}", "{img}", "--steps", "0"], "steps must be at least 1 (got 0)"),
    (["style", "{img}", "{img}", "--size", "abc"], "size 'abc' is not understood"),
    (["appearance", "{img}", "{img}", "--lr", "-1"], "lr must be positive"),
    (["style", "{img}", "{img}", "--layers", "5-2"], "layers '5-2' is an empty range"),
    (["style", "{img}", "{img}", "--layers", "ten"], "layers 'ten' is not understood"),
    (["style", "{img}", "{img}", "--tile", "z"], "tile"),
    (["texture", "{img}", "--num-images", "0"], "num must be a whole number of at least 1"),  # t2i's name too
    (["texture", "{img}", "--layout", "{img}", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["texture", "{img}", "--ref-labels", "{img}", "--target-labels", "{img}", "--iters", "0"],
     "iters must be at least 1"),
    (["t2i", "-s", "{img}", "-p", "x", "--guidance", "0.5"], "guidance must be >= 1"),
    (["t2i", "-s", "{img}", "-p", "x", "--guidance-rescale", "1.5"], "guidance rescale must be between 0 (off) and 1"),
    (["t2i", "-s", "{img}", "-p", "x", "--num", "0"], "number of images must be a whole number"),  # texture's
    (["t2i", "-s", "{img}", "-p", "x", "--controlnet", "cn"], "--controlnet needs a --control-image"),
    (["t2i", "-s", "{img}", "-p", "x", "--control", "canny"], "preprocessing 'canny' prepares a control"),
    (["t2i", "-s", "{img}", "-p", "x", "--control-scale", "0.5"], "control scale 0.5 scales a ControlNet's residuals"),
    (["t2i", "-s", "{img}", "-p", "x", "--control-scale", "0"], "control scale 0 scales a ControlNet's residuals"),
    (["expand", "{img}", "--size", "512", "--layers", "1-"], "layers '1-' is not understood"),
    (["finetune-vae", "{img}", "--steps", "0"], "VAE tuning steps must be at least 1"),
    (["texture", "{img}", "{img}", "--ref-labels", "{img}", "--target-labels", "{img}"],
     "2 texture image(s) but 1 reference label map(s)"),
    (["texture", "{img}", "--reference-fit", "crop"], "reference fit must be one of squash, keep (got 'crop')"),
    (["finetune-vae", "{img}", "--reference-fit", "crop"], "reference fit must be one of squash, keep"),
]


@pytest.mark.parametrize("args,expected", EARLY_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in EARLY_CASES])
def test_typos_are_reported_before_the_model_loads(corpus, tmp_path, args, expected):
    """A model folder that does not exist: the typo is what the one line names, not the model."""
    args = [str(corpus / "good.png") if a == "{img}" else a for a in args]
    output = tmp_path / ("vae" if args[0] == "finetune-vae" else "out.png")
    result = invoke(*args, "-o", output, "-m", tmp_path / "no-such-model", "-q")
    assert_rejected(result, 2, expected, out_dir=tmp_path)


def test_texture_count_and_missing_gpu(corpus, tmp_path, tiny_sd15_dir):
    result = invoke("texture", corpus / "good.png", "-o", tmp_path / "t.png", "-m", tiny_sd15_dir, "--num", "0")
    assert_rejected(result, 2, "num must be a whole number of at least 1", out_dir=tmp_path)
    if not torch.cuda.is_available():
        result = invoke("texture", corpus / "good.png", "-o", tmp_path / "t.png", "-m", tiny_sd15_dir,
                        "--device", "cuda")
        assert_rejected(result, 2, "no CUDA GPU is available; use --device cpu", out_dir=tmp_path)


# -- outputs -----------------------------------------------------------------------------------------------

@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write to, also as root (chmod does not stop root; chattr +i does)."""
    folder = tmp_path / "locked"
    folder.mkdir()

    def writable() -> bool:
        try:
            (folder / "probe").touch()
        except OSError:
            return False
        (folder / "probe").unlink()
        return True

    folder.chmod(0o555)
    immutable = False
    if writable():
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if writable():
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_unwritable_output_folder(corpus, unwritable_dir, tiny_sd15_dir):
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", unwritable_dir / "out.png",
                    "-m", tiny_sd15_dir, "--size", "64", "-q")
    assert_rejected(result, 2, f"output folder '{unwritable_dir}' is not writable", out_dir=unwritable_dir)


def test_output_problems(corpus, tmp_path, tiny_sd15_dir):
    good = corpus / "good.png"
    common = ["-m", tiny_sd15_dir, "--steps", "1", "--size", "64", "-q"]
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep me")
    (tmp_path / "adir.png").mkdir()
    before = {p.name for p in tmp_path.iterdir()}
    cases = [(tmp_path / "exists.png", "already exists; pass --overwrite"),
             (tmp_path / "nowhere" / "out.png", "does not exist; create it first"),
             (existing / "out.png", f"output folder '{existing}' is a file, not a folder; choose another -o path"),
             (tmp_path / "out.jpg", "must end in .png"), ("", "output '.' is the current folder; give a file name"),
             (tmp_path / ".png", "must have a name before .png"),
             (tmp_path / "adir.png", "is a directory"),
             (tmp_path / ("a" * 300 + ".png"), "cannot be written: File name too long; choose a shorter")]
    for output, expected in cases:
        result = invoke("style", good, good, "-o", output, *common)
        assert_rejected(result, 2, expected, out_dir=tmp_path, before=before)
    assert existing.read_bytes() == b"keep me"


# -- models ------------------------------------------------------------------------------------------------

def test_model_problems(corpus, tmp_path, tiny_sd15_dir, monkeypatch):
    not_a_model = tmp_path / "some-folder"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04pickle")
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"not safetensors")
    damaged = {name: tmp_path / name for name in ("bad-index", "list-index", "no-tokenizer", "no-vocabulary",
                                                      "cut-weights", "no weights")}
    for folder in damaged.values():
        shutil.copytree(tiny_sd15_dir, folder)
    (damaged["bad-index"] / "model_index.json").write_text('{"_class_name": ')  # an interrupted download
    (damaged["list-index"] / "model_index.json").write_text("[]")
    shutil.rmtree(damaged["no-tokenizer"] / "tokenizer")
    (damaged["no-vocabulary"] / "tokenizer" / "tokenizer.json").unlink()  # it loaded, and read words as unknown
    weights = damaged["cut-weights"] / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (damaged["no weights"] / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # no pickle files either
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["-m", not_a_model], f"model folder '{not_a_model}' has no model_index.json"),
        (["-m", damaged["bad-index"]], "has a model_index.json that is not a diffusers model index"),
        (["-m", damaged["list-index"]], "has a model_index.json that is not a diffusers model index"),
        (["-m", damaged["no-tokenizer"]], "has no tokenizer/ folder, which a Stable Diffusion pipeline needs"),
        (["-m", damaged["no-vocabulary"]], "has no vocabulary in tokenizer/ (vocab.json and merges.txt, or "
                                           "tokenizer.json)"),
        (["-m", damaged["no weights"]], f"has no weights in {damaged['no weights'] / 'unet'}, neither "
                                        ".safetensors nor pickle files; download it again"),
        (["-m", damaged["cut-weights"]], f"has a damaged weights file: {weights} (cut short"),
        (["-m", other], "is a KandinskyPipeline; attndistill runs Stable Diffusion"),
        (["-m", pickle], "is a pickle file that can run code when loaded; convert it to .safetensors or pass "
                         "--allow-pickle"),
        (["-m", broken], f"checkpoint '{broken}' is not a readable .safetensors file"),
        (["-m", "nobody-xyz/not-cached-model"], "is not in the local Hugging Face cache"),
        (["-m", tiny_sd15_dir, "--vae", tmp_path], "is not a diffusers AutoencoderKL folder"),
    ]
    for options, expected in cases:
        result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", out / "out.png", "--size", "64",
                        "-q", *options)
        assert_rejected(result, 2, expected, out_dir=out)


def test_paths_are_not_taken_for_hub_ids_nor_local_folders_for_uncached_ones(tmp_path, tiny_sd15_dir, monkeypatch):
    """A relative path that does not exist is said to not exist (not "not cached", not a Hub validation error); a
    local folder missing a file is a broken folder, not a model the Hub should have; a single file that will not
    load offers --config only while none was given."""
    import torch
    from safetensors.torch import save_file

    import attndistill as ad

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ad.UserError, match="model 'no/such/folder' does not exist"):
        ad.load_model("no/such/folder")
    with pytest.raises(ad.UserError, match="checkpoint 'models/sd.safetensors' does not exist"):
        ad.load_model("models/sd.safetensors")
    shutil.copytree(tiny_sd15_dir, "copy")
    (tmp_path / "copy" / "unet" / "config.json").unlink()
    with pytest.raises(ad.UserError, match="model 'copy' could not be loaded: .*config.json") as caught:
        ad.load_model("copy")
    assert "Hugging Face cache" not in str(caught.value)
    save_file({"model.diffusion_model.x": torch.zeros(1), "first_stage_model.x": torch.zeros(1)},
              tmp_path / "junk.safetensors")  # a UNet's and a VAE's names only
    with pytest.raises(ad.UserError, match="could not be loaded") as caught:
        ad.load_model("junk.safetensors", config=tiny_sd15_dir)
    assert "--config" not in str(caught.value)
    from diffusers import StableDiffusionPipeline

    def unreachable(cls, *args, **kwargs):  # what loading its configs from the Hub meets offline
        raise OSError("cannot reach the Hub")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(unreachable))
    with pytest.raises(ad.UserError, match="; offline, pass --config /path/to/a/diffusers/folder"):
        ad.load_model("junk.safetensors")

    def no_network(cls, *args, **kwargs):  # as diffusers words it: httpx's error text inside its own
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as exc:
            raise OSError("Got: ConnectError: [Errno -2] Name or service not known") from exc

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(no_network))
    with pytest.raises(ad.UserError) as caught:
        ad.load_model("junk.safetensors")
    assert str(caught.value) == (
        "checkpoint 'junk.safetensors' needs the configs of its architecture, which diffusers fetches from the "
        "Hugging Face Hub, and the Hub cannot be reached; pass --config /path/to/a/diffusers/folder of the same "
        "architecture")


@pytest.mark.parametrize(("part", "holds"), [
    ("unet/diffusion_pytorch_model.safetensors", "a diffusers UNet's weights"),
    ("vae/diffusion_pytorch_model.safetensors", "a VAE's weights"),
    ("text_encoder/model.safetensors", "a text encoder's weights"), (None, "LoRA weights"),
    ("ema", "only the EMA copy of a UNet (model_ema.*), which diffusers does not load")])
def test_a_single_file_that_is_no_whole_checkpoint_is_named(tmp_path, tiny_sd15_dir, part, holds):
    """diffusers would look such a file's configs up on the Hub and fail offline with a connection error."""
    import torch
    from safetensors.torch import save_file

    import attndistill as ad

    file = tmp_path / "weights.safetensors"
    if part is None:
        save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(1)}, file)
    elif part == "ema":  # a training checkpoint's averaged UNet, beside its text encoder
        save_file({"model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
                   "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1)}, file)
    else:
        shutil.copy(tiny_sd15_dir / part, file)
    with pytest.raises(ad.UserError, match=re.escape(f"checkpoint '{file}' holds {holds}, not a whole Stable "
                                                     "Diffusion checkpoint (UNet, VAE and text encoder in one file)")):
        ad.load_model(file)


def test_real_process_offline_hub_id(corpus, tmp_path):
    """In a real process (fresh cache, offline): exit code 2 and one error line, no traceback."""
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([CLI, "style", str(corpus / "good.png"), str(corpus / "good.png"), "-o",
                          str(tmp_path / "o.png"), "-m", "nobody-xyz/not-cached-model"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()  # one line: no warning of the libraries' before it
    assert len(lines) == 1 and lines[0].startswith("error: model 'nobody-xyz/not-cached-model' is not in"), lines
    assert "HF_HUB_OFFLINE is set" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o.png").exists()


def test_a_jpeg_over_the_pixel_limit_is_decoded_smaller(tmp_path, monkeypatch):
    """A phone's 108-megapixel photo is a content image, not a bomb: JPEGs decode at 1/2, 1/4 or 1/8 of their
    size (the pixel limit scaled down here so that the test images stay small); other formats stay refused."""
    from attndistill import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    pixels = np.random.default_rng(0).integers(0, 255, (201, 301, 3), dtype=np.uint8)  # odd sides round up
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees, as a phone held upright writes it
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    Image.fromarray(np.zeros((1000, 1000, 3), np.uint8)).save(tmp_path / "huge.jpg")

    img = load_image(tmp_path / "photo.jpg", what="content image")
    assert img.size == (51, 76)  # 301x201 at 1/4 (at 1/2: 151 x 101 > 10,000), then turned upright
    assert abs(np.asarray(img, np.float32).mean() - pixels.mean()) < 3  # the same picture, smaller
    for name in ("photo.png", "huge.jpg"):  # no scaled decoding / too large even at 1/8
        with pytest.raises(UserError, match=f"'{tmp_path / name}' declares too many pixels"):
            load_image(tmp_path / name, what="content image")
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])  # a download that stopped: damaged, not too large
    with pytest.raises(UserError, match=r"'.*cut\.jpg' is truncated or corrupt"):
        load_image(tmp_path / "cut.jpg", what="content image")
    from attndistill.tasks.textures import _is_jpeg

    with warnings.catch_warnings():  # a label map's JPEG hint: no Pillow warning, and the right answer
        warnings.simplefilter("error")
        assert _is_jpeg(tmp_path / "photo.jpg") and not _is_jpeg(tmp_path / "photo.png")


@pytest.mark.parametrize("network", ["none", "up", "proxy"])
def test_a_hub_that_takes_no_connection_means_the_cache_at_once(monkeypatch, network):
    """No network: the cache is asked at once (one line) instead of half a minute of retries per file;
    a reachable host, or one behind a proxy, is left to huggingface_hub."""
    import socket
    import urllib.request

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from attndistill.model import loading

    class Connection:
        def close(self):
            pass

    def connect(address, timeout=None):
        probes.append(address)
        if network == "none":
            raise OSError("Name or service not known")
        return Connection()

    def download(repo, filename, *, local_files_only=False):
        asked.append(local_files_only)
        raise LocalEntryNotFoundError("not cached")

    probes, asked = [], []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    proxies = {"https": "http://proxy.example:3128"} if network == "proxy" else {}  # env or system settings
    monkeypatch.setattr(urllib.request, "getproxies", lambda: proxies)
    monkeypatch.setattr(loading, "_hub_probe", None)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))])  # each address tried in turn
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for _ in range(2):  # the second load reuses the first look
        with pytest.raises(UserError, match="is not in the local Hugging Face cache and the Hub cannot be reached"):
            loading.load_model("nobody-xyz/not-cached-model")
    assert asked == [network == "none"] * 2
    assert probes == {"none": [("2001:db8::1", 443), ("192.0.2.1", 443)], "up": [("2001:db8::1", 443)],
                      "proxy": []}[network]


def test_debug_flag_after_the_command_shows_the_traceback(corpus, tmp_path, tiny_sd15_dir):
    result = invoke("style", corpus / "missing.png", corpus / "good.png", "-o", tmp_path / "o.png",
                    "-m", tiny_sd15_dir, "--debug")
    assert result.exit_code == 2 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: content image")


def test_ctrl_c_leaves_no_partial_output(corpus, tmp_path, tiny_sd15_dir):
    """Ctrl-C once the run is optimising: exit 130, nothing left behind (SIGTERM: see test_batch.py)."""
    proc = subprocess.Popen([CLI, "style", str(corpus / "good.png"), str(corpus / "good.png"), "-o",
                             str(tmp_path / "out.png"), "-m", str(tiny_sd15_dir), "--size", "64", "--steps", "1000",
                             "--iters", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    seen: list[bytes] = []
    fd = proc.stderr.fileno()
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: os.read(fd, 4096), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"style:" not in b"".join(seen) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the progress bar has started: the run is in the optimisation loop
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    stderr = b"".join(seen).decode()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: no partial output was left" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reader_gone", [False, True])
def test_a_second_ctrl_c_ends_a_long_native_operation_at_once(tmp_path, reader_gone):
    """Python runs a signal's handler only once a native operation returns: a UNet call on a huge image on the CPU
    kept Ctrl-C and SIGTERM waiting for minutes. A second signal ends the process at once, also where stderr's
    reader is gone (``attndistill … 2>&1 | tee log``, whose tee the first Ctrl-C ends): the failed write of its
    message killed the watcher, and only SIGKILL ended the run (found by a helper's audit)."""
    script = tmp_path / "long.py"
    script.write_text("import torch\nfrom attndistill.cli.common import run_command\n\n\ndef body():\n"
                      "    a = torch.ones(6000, 6000)\n    print('started', flush=True)\n    a @ a  # seconds, native\n"
                      "    print('finished', flush=True)\n\n\nrun_command(body)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "started"
    if reader_gone:
        proc.stderr.close()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    if reader_gone:
        assert proc.wait(timeout=120) == 130 and "finished" not in proc.stdout.read()
        return
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "finished" not in out
    assert err == "interrupted at once (a second signal): no partial output was left\n"


# -- valid but unusual images: accepted and converted correctly ------------------------------------------

def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.int32)


def test_16bit_grayscale_png(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    expected = np.round(values / 65535 * 255).astype(np.int32)
    got = _rgb(tmp_path / "a.png")
    assert got.shape == (64, 64, 3) and np.abs(got - expected[..., None]).max() <= 1


def test_float_tiff(tmp_path):
    values = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    got = _rgb(tmp_path / "f.tif")
    assert got.shape == (32, 64, 3) and np.abs(got - np.round(values * 255)[..., None]).max() <= 1


def test_cmyk_jpeg(tmp_path, data_dir):
    photo = _photo(data_dir)
    photo.convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    got = _rgb(tmp_path / "c.jpg")
    assert got.shape == (48, 64, 3) and np.abs(got - np.asarray(photo, dtype=np.int32)).mean() < 6


def _swapped_primaries_profile() -> bytes:
    """sRGB's ICC profile with its red and green primaries swapped: stored (255, 0, 0) then means sRGB green."""
    from PIL import ImageCms

    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", icc[128:132])
    entries = {bytes(icc[132 + 12 * i:136 + 12 * i]): 136 + 12 * i for i in range(count)}
    r, g = entries[b"rXYZ"], entries[b"gXYZ"]
    icc[r:r + 8], icc[g:g + 8] = icc[g:g + 8], icc[r:r + 8]  # the tags' offsets and sizes
    # its description must not say sRGB (in ASCII or UTF-16), or it would be taken for one
    return bytes(icc).replace(b"sRGB", b"swap").replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be"))


def test_embedded_colour_profiles_are_converted_to_srgb(tmp_path):
    """A wide-gamut photo (Display P3, Adobe RGB) holds its colours in its own space: it comes in as sRGB, in a
    JPEG or a PNG, alpha kept; a label map keeps its stored colours, which are names."""
    from attndistill.images import load_image

    red = Image.new("RGB", (64, 48), (255, 0, 0))
    icc = _swapped_primaries_profile()
    red.save(tmp_path / "p.png", icc_profile=icc)
    red.save(tmp_path / "p.jpg", icc_profile=icc, quality=95)
    red.convert("RGBA").save(tmp_path / "a.png", icc_profile=icc)
    for name in ("p.png", "p.jpg", "a.png"):
        r, g, b = _rgb(tmp_path / name).reshape(-1, 3).mean(0)
        assert g > 200 and r < 60 and b < 60, name
    assert np.asarray(load_image(tmp_path / "p.png", labels=True))[0, 0].tolist() == [255, 0, 0]
    red.save(tmp_path / "broken.png", icc_profile=b"not a profile")
    assert _rgb(tmp_path / "broken.png")[0, 0].tolist() == [255, 0, 0]  # taken as sRGB, with a warning


def test_damaged_exif_is_one_warning_naming_the_file(tmp_path, caplog):
    """Pillow's raw "Truncated File Read" warnings (no file named) become one log line that names the image."""
    from attndistill.images import load_image

    exif = Image.Exif()
    exif[0x0112], exif[0x010E] = 6, "x" * 40
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "cut.jpg", exif=exif.tobytes()[:-20])
    with warnings.catch_warnings(record=True) as raw, caplog.at_level("WARNING", logger="attndistill"):
        warnings.simplefilter("always")
        assert load_image(tmp_path / "cut.jpg", what="content image").size in ((64, 48), (48, 64))
    assert not raw and [r.getMessage() for r in caplog.records] == [
        f"content image '{tmp_path / 'cut.jpg'}': Truncated File Read (Pillow, while reading it)"]


def test_an_animation_or_a_multi_page_image_says_its_first_frame_is_used(tmp_path, caplog):
    from attndistill.images import load_image

    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "pages.tiff", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "one.gif")
    with caplog.at_level("WARNING", logger="attndistill"):
        for name in ("anim.gif", "pages.tiff", "one.gif"):
            assert load_image(tmp_path / name, what="style image").getpixel((0, 0)) == (255, 0, 0)
    assert [r.getMessage() for r in caplog.records] == [
        f"style image '{tmp_path / name}' has 3 frames; its first is used" for name in ("anim.gif", "pages.tiff")]


def test_alpha_is_composited_on_white_and_said(tmp_path, data_dir, caplog):
    """Transparent pixels become white, which a texture run then learns: said, naming the image (a control
    image's black is its "nothing here", as documented, and goes unsaid)."""
    from attndistill.images import BLACK

    rgb = np.asarray(_photo(data_dir), dtype=np.float64)
    alpha = np.tile(np.linspace(0, 255, 64), (48, 1)).round()
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(tmp_path / "a.png")
    expected = rgb * alpha[..., None] / 255 + 255 * (1 - alpha[..., None] / 255)
    with caplog.at_level("WARNING", logger="attndistill"):
        assert np.abs(_rgb(tmp_path / "a.png") - expected).max() <= 1
        load_image(tmp_path / "a.png", what="control image", background=BLACK)
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{tmp_path / 'a.png'}' is 98% transparent; those pixels are taken on white, which the run then sees "
        "as part of the image: crop or fill them where they should not count"]
    gray = np.full((48, 64), 100.0)
    Image.fromarray(np.dstack([gray, alpha]).astype(np.uint8), "LA").save(tmp_path / "la.png")
    expected = gray * alpha / 255 + 255 * (1 - alpha / 255)
    assert np.abs(_rgb(tmp_path / "la.png") - expected[..., None]).max() <= 1


def test_palette_gif_with_transparency(tmp_path):
    palette = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [0, 0, 0]], dtype=np.uint8)
    index = (np.arange(32 * 32).reshape(32, 32) // 7 % 4).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    img.save(tmp_path / "p.gif", transparency=3)
    expected = palette[index].astype(np.int32)
    expected[index == 3] = 255  # the transparent entry lands on white
    assert np.array_equal(_rgb(tmp_path / "p.gif"), expected)


def test_grayscale_jpeg(tmp_path, data_dir):
    gray = _photo(data_dir).convert("L")
    gray.save(tmp_path / "g.png")
    got = _rgb(tmp_path / "g.png")
    assert np.array_equal(got, np.repeat(np.asarray(gray, dtype=np.int32)[..., None], 3, axis=2))


def test_exif_orientation_is_honoured(tmp_path):
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = (255, 0, 0)  # left half red, right half blue as stored
    img[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored left edge becomes the top
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=95)
    got = _rgb(tmp_path / "r.jpg")
    assert got.shape == (64, 32, 3)
    assert got[:28, :, 0].mean() > 200 and got[:28, :, 2].mean() < 50  # top red
    assert got[36:, :, 2].mean() > 200 and got[36:, :, 0].mean() < 50  # bottom blue


def test_unusual_modes_run_end_to_end(tmp_path, data_dir, tiny_sd15_dir):
    """The CLI takes them as content and (several) style images and writes a normal RGB result."""
    photo = _photo(data_dir)
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "c16.png")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    photo.convert("RGBA").save(tmp_path / "rgba.png")
    photo.convert("P").save(tmp_path / "pal.gif")
    result = invoke("style", tmp_path / "c16.png", tmp_path / "cmyk.jpg", tmp_path / "rgba.png",
                    tmp_path / "pal.gif", "-o", tmp_path / "out.png", "-m", tiny_sd15_dir, "--steps", "1",
                    "--size", "64", "-q")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGB" and out.size == (64, 64)


def _out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_options_that_help(corpus, tmp_path, tiny_sd15_dir, monkeypatch):
    """A GPU out-of-memory error in the middle of a run: one line with the memory switches, exit 4, no output."""
    from attndistill.model.models import DiffusionModel

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(DiffusionModel, "predict", _out_of_memory)
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", out_dir / "o.png", "-m", tiny_sd15_dir,
                    "--steps", "2", "--size", "64", "-q")
    assert_rejected(result, 4, "ran out of memory", "--gradient-checkpointing", "--offload-text-encoders",
                    "--view-batch", "--lookahead-batch 1", "--no-cuda-graphs", out_dir=out_dir)


def test_out_of_memory_in_the_batch_runner_and_the_web_ui():
    from attndistill.batch.runner import _describe
    from attndistill.webui.jobs import error_message

    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "--gradient-checkpointing" in _describe(exc)
    ui = error_message(exc)  # the page's own fields by their labels; the server's switches with its command
    assert "ran out of memory" in ui and "fewer Images" in ui and "Views per batch" in ui
    assert "attndistill ui --gradient-checkpointing" in ui and "--num" not in ui and "--view-batch" not in ui


@pytest.mark.parametrize("exc", [
    MemoryError("Unable to allocate 488. MiB for an array with shape (8000, 8000) and data type float64"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")])
def test_the_machine_running_out_of_memory_is_said_so(exc, corpus, tmp_path, tiny_sd15_dir, monkeypatch):
    """A CPU run (or a huge image's conversion) out of RAM was an "unexpected" error, exit 1, with no advice."""
    from attndistill.batch.runner import _describe
    from attndistill.model.models import DiffusionModel
    from attndistill.webui.jobs import error_message

    def fails(*args, **kwargs):
        raise exc

    monkeypatch.setattr(DiffusionModel, "predict", fails)
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png", "-m", tiny_sd15_dir,
                    "--steps", "2", "--size", "64", "-q")
    assert_rejected(result, 4, "the machine ran out of memory (RAM)", "--gradient-checkpointing")
    assert "GPU" not in result.output and not (tmp_path / "o.png").exists()
    assert _describe(exc).startswith("the machine ran out of memory (RAM)")
    ui = error_message(exc)
    assert "(Images, Views per batch)" in ui and "attndistill ui --gradient-checkpointing" in ui


@pytest.mark.parametrize("preview,expected", [("{tmp}/missing/peek.png", "does not exist; create it first"),
                                              ("{tmp}/peek.jpg", "must end in .png"),
                                              ("{tmp}/o.png", "is an output file")])
def test_bad_preview_path_fails_before_the_model_loads(corpus, tmp_path, preview, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png",
                    "-m", "nobody/not-cached-model", "--preview", preview.format(tmp=tmp_path))
    assert_rejected(result, 2, expected)
    assert "not-cached-model" not in result.output


def test_preview_never_replaces_an_input_an_output_or_any_other_file(corpus, tmp_path, monkeypatch):
    """Only a preview of an earlier run may be replaced, and that is known before any model work."""
    from PIL import Image

    from attndistill.cli.common import PREVIEW_MARK
    from attndistill.images import save_png

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ("-m", "nobody/not-cached-model")
    result = invoke("texture", corpus / "good.png", "--num", "2", "-o", tmp_path / "n.png", *model,
                    "--preview", tmp_path / "n-1.png")
    assert_rejected(result, 2, "is an output file")
    before = (corpus / "good.png").read_bytes()
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png", *model,
                    "--preview", corpus / "good.png", "--overwrite")
    assert_rejected(result, 2, "--preview '", "good.png' is an input of this run")
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png", *model,
                    "--preview", corpus / "one-pixel.png", "--overwrite")  # another file: no earlier preview
    assert_rejected(result, 2, "is not a preview")
    assert (corpus / "good.png").read_bytes() == before
    save_png(Image.new("RGB", (16, 16)), tmp_path / "peek.png", parameters=PREVIEW_MARK)
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png", *model,
                    "--preview", tmp_path / "peek.png")
    assert "not a preview" not in result.output and "not-cached-model" in result.output  # got to the model


@pytest.mark.parametrize("option,value,expected", [
    ("--lr", "inf", "inf is not a finite number"), ("--content-weight", "nan", "nan is not a finite number"),
    ("--attention-scale", "inf", "--attention-scale"), ("--seed", "99999999999999999999", "--seed"),
    ("--seed", "4294967296", "less than or equal to 4294967295"),
    ("--device", "bogus", "device 'bogus' is not supported")])
def test_out_of_range_numbers_and_devices_fail_before_the_model_loads(corpus, tmp_path, monkeypatch, option, value,
                                                                     expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png",
                    "-m", "nobody/not-cached-model", option, value)
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "not-cached-model" not in result.output and "Traceback" not in result.output


def test_finetune_vae_overwrite_replaces_a_vae_folder_only(tmp_path, monkeypatch):
    from attndistill.tasks.vae_tuning import check_vae_folder

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a saved VAE"):
        check_vae_folder(notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(notes)
    with pytest.raises(UserError, match="current folder"):
        check_vae_folder(".", overwrite=True)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert check_vae_folder(vae, overwrite=True) == vae
    with pytest.raises(UserError, match="not writable"):
        check_vae_folder("/proc/vae")
    with pytest.raises(UserError, match=r"output folder '.*nowhere' does not exist; create it first"):
        check_vae_folder(tmp_path / "nowhere" / "vae")
    with pytest.raises(UserError, match=r"output '.*vae\.PNG' is named like an image, but the tuned VAE is a folder"):
        check_vae_folder(tmp_path / "vae.PNG")
    assert not (tmp_path / "vae.PNG").exists()
    with pytest.raises(UserError, match=r"output '.*vae\.safetensors' is named like a weights file, but the tuned"):
        check_vae_folder(tmp_path / "vae.safetensors")
    (tmp_path / "v1.5").mkdir()  # a dot in a folder's name is no image suffix
    assert check_vae_folder(tmp_path / "v1.5") == tmp_path / "v1.5"
    link = tmp_path / "link"
    link.symlink_to(vae)  # refused before the fine-tune runs: rmtree would refuse it only after
    with pytest.raises(UserError, match="is a symbolic link"):
        check_vae_folder(link, overwrite=True)


def test_a_vae_that_cannot_be_saved_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk while saving a fine-tuned VAE: one line, no partial folder, the old VAE kept."""
    from safetensors import SafetensorError

    from attndistill.tasks.vae_tuning import save_vae

    class FullDisk:
        def __init__(self, error):
            self.error = error

        def save_pretrained(self, folder, **_):
            (Path(folder) / "config.json").write_text("{}")
            raise self.error

    # the OS's own error, and the one safetensors' writer turns it into
    for error in (OSError(28, "No space left on device"), SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")):
        with pytest.raises(UserError, match=r"could not be written \(No space left on device\); free space"):
            save_vae(FullDisk(error), tmp_path / "vae")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expected", [(["--size", "1088x512", "--stride", "65"], "leaves gaps"),
                                           (["--size", "512x128", "--view", "16", "--stride", "17"], "leaves gaps"),
                                           (["--size", "100000x100000"], "over 16384 px")])
def test_expansions_that_cannot_work_fail_before_the_model_loads(corpus, tmp_path, monkeypatch, args, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("expand", corpus / "good.png", "-o", tmp_path / "o.png", "-m", "nobody/not-cached-model", *args)
    assert_rejected(result, 2, expected)


def test_a_vae_folder_without_weights_is_one_line(corpus, tmp_path, tiny_sd15_dir):
    """diffusers logs the failed fetch before raising it; the user sees our line only (a real process, whose
    stderr the logging handlers write to)."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "vae").mkdir()
    shutil.copy(tiny_sd15_dir / "vae" / "config.json", tmp_path / "vae" / "config.json")
    script = Path(sys.executable).parent / "attndistill"  # the console script beside this interpreter
    done = subprocess.run([script, "style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png",
                           "-m", tiny_sd15_dir, "--vae", tmp_path / "vae", "--device", "cpu", "-q"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: VAE"), done.stderr


def test_a_typos_million_images_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    """One run makes at most MAX_IMAGES: --num 1000000 filled 24 GiB of host memory and was killed without a
    word; a batch line is refused by its line."""
    import json

    from attndistill.tasks.setup import MAX_IMAGES

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ("-m", "nobody/not-cached-model")
    for command in (["texture", corpus / "good.png", "--num"], ["t2i", "--style", corpus / "good.png", "--prompt",
                                                                  "a b", "--num-images"]):
        result = invoke(*command, "1000000", "-o", tmp_path / "o.png", *model)
        assert_rejected(result, 2, f"1000000 is more than one run makes (at most {MAX_IMAGES})")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"task": "texture", "reference": str(corpus / "good.png"), "num": 10**6}) + "\n")
    result = invoke("batch", jobs, "--out", tmp_path / "out", "--dry-run", *model)
    assert result.exit_code == 2 and "line 1: 'num' 1000000 is more than one job makes" in result.output


def test_a_tokenizer_must_fit_its_text_encoder(tiny_sd15, tmp_path):
    """Where no folder can be checked first (the Hub's cache, a checkpoint's configs), loading checks the tokenizer:
    a vocabulary of special tokens only is refused; a missing length limit becomes the text encoder's."""
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from attndistill.model.loading import _check_tokenizers

    tiny_sd15.pipe.tokenizer.save_pretrained(tmp_path / "whole")
    (tmp_path / "whole" / "tokenizer_config.json").unlink()
    whole = CLIPTokenizer.from_pretrained(tmp_path / "whole")
    assert whole.model_max_length > 10**6
    _check_tokenizers(SimpleNamespace(tokenizer=whole, text_encoder=tiny_sd15.pipe.text_encoder), "m")
    assert whole.model_max_length == 77 and whole("a fox", truncation=True).input_ids[-1] == whole.eos_token_id
    (tmp_path / "whole" / "tokenizer.json").unlink()
    specials = CLIPTokenizer.from_pretrained(tmp_path / "whole")
    with pytest.raises(UserError, match=r"model 'm': its tokenizer knows 2 tokens where its text_encoder has \d+"):
        _check_tokenizers(SimpleNamespace(tokenizer=specials, text_encoder=tiny_sd15.pipe.text_encoder), "m")


def test_an_output_written_atomically_never_half_and_never_over_another(tmp_path):
    """A failed write leaves nothing; a file that appears at the output's name while it is written is kept."""
    from attndistill.errors import UserError
    from attndistill.images import atomic_write

    out = tmp_path / "out.bin"

    def disk_full(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="could not be written \\(No space left on device\\)"):
        atomic_write(out, disk_full)
    assert list(tmp_path.iterdir()) == []

    def intruder(f):
        f.write(b"ours")
        out.write_bytes(b"theirs")  # another process takes the name meanwhile

    with pytest.raises(UserError, match="already exists"):
        atomic_write(out, intruder)
    assert out.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [out]
    assert atomic_write(out, lambda f: f.write(b"ours"), overwrite=True) == out
    assert out.read_bytes() == b"ours" and list(tmp_path.iterdir()) == [out]


# -- pipes, devices and loops of links (a fuzzing helper found each one hanging or a RuntimeError) -------------

@pytest.fixture
def specials(tmp_path) -> dict[str, Path]:
    fifo, loop = tmp_path / "fifo.png", tmp_path / "loop.png"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    return {"fifo": fifo, "loop": loop}


def test_a_pipe_as_an_input_is_refused_not_waited_on(corpus, tmp_path, tiny_sd15_dir, specials):
    result = invoke("style", specials["fifo"], corpus / "good.png", "-o", tmp_path / "o.png", "-m", tiny_sd15_dir,
                    "--size", "64", "--steps", "1", "-q")
    assert_rejected(result, 2, "content image", "is not a regular file (a pipe or a device)")
    assert_rejected(invoke("info", specials["fifo"]), 2, "is not a regular file")


@pytest.mark.parametrize("option", ["--loss-log", "--preview"])
@pytest.mark.parametrize("kind, message", [("fifo", "is not a regular file (a pipe or a device)"),
                                           ("loop", "is a broken symbolic link (or a loop of them)")])
def test_a_pipe_or_a_loop_of_links_as_a_side_output_is_refused(corpus, tmp_path, tiny_sd15_dir, specials, option,
                                                               kind, message):
    result = invoke("style", corpus / "good.png", corpus / "good.png", "-o", tmp_path / "o.png", "-m", tiny_sd15_dir,
                    "--size", "64", "--steps", "1", "-q", option, specials[kind], "--overwrite")
    assert_rejected(result, 2, f"{option} '{specials[kind]}' {message}")
    assert not (tmp_path / "o.png").exists()


def test_a_loop_of_links_as_a_vae_folder_or_batch_folder_is_refused(corpus, tmp_path, tiny_sd15_dir, specials):
    result = invoke("finetune-vae", corpus / "good.png", "-m", tiny_sd15_dir, "--steps", "1", "-o", specials["loop"])
    assert_rejected(result, 2, "is a symbolic link")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"task": "style", "content": str(corpus / "good.png"),
                                "style": str(corpus / "good.png"), "size": 64, "steps": 1}) + "\n")
    for out, message in ((specials["loop"], "is a broken symbolic link (or a loop of them)"),
                         (jobs / "sub", f"cannot be made: '{jobs}' is a file")):
        result = invoke("batch", jobs, "--out", out, "--dry-run", "-m", tiny_sd15_dir)
        assert_rejected(result, 2, message)


def test_a_batch_folder_this_user_cannot_write_is_refused_by_a_dry_run_too(corpus, tmp_path, tiny_sd15_dir,
                                                                          monkeypatch):
    """A dry run said "1 ready" for --out in a read-only folder, and the run failed at once."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"task": "style", "content": str(corpus / "good.png"),
                                "style": str(corpus / "good.png"), "size": 64, "steps": 1}) + "\n")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as a user without rights there
    result = invoke("batch", jobs, "--out", tmp_path / "o", "--dry-run", "-m", tiny_sd15_dir)
    assert_rejected(result, 2, f"output folder '{tmp_path}' cannot be written by this user")


def test_a_results_file_that_is_a_folder_is_refused_by_name(corpus, tmp_path, tiny_sd15_dir):
    """It was an unexpected IsADirectoryError, after the jobs were read."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"task": "style", "content": str(corpus / "good.png"),
                                "style": str(corpus / "good.png"), "size": 64, "steps": 1}) + "\n")
    (tmp_path / "out" / "results.jsonl").mkdir(parents=True)
    for dry in ([], ["--dry-run"]):
        result = invoke("batch", jobs, "--out", tmp_path / "out", "-m", tiny_sd15_dir, *dry)
        assert_rejected(result, 2, f"'{tmp_path / 'out' / 'results.jsonl'}' is not a file")


def test_messages_say_what_they_found_in_words_that_fit(tmp_path, tiny_sd15_dir):
    """One pixel at alpha 254 was "(0.0% of it)"; a model_index.json without a class was "a unknown pipeline"."""
    from attndistill.model.loading import load_model

    labels = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    labels.putpixel((3, 3), (255, 0, 0, 254))
    labels.save(tmp_path / "labels.png")
    with pytest.raises(UserError, match=r"has transparent pixels \(1 of its pixels\)"):
        load_image(tmp_path / "labels.png", what="label map", labels=True)
    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "model")
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="names no pipeline in its model_index.json"):
        load_model(str(folder), device="cpu", dtype="fp32")


@pytest.mark.parametrize("part, key, value, message", [
    ("scheduler/scheduler_config.json", "num_train_timesteps", 0, "could not be built from its configs (IndexError"),
    ("unet/config.json", "sample_size", -5, "has unet/ config sample_size -5, not a positive whole number"),
    # three more a helper found, which were unexpected errors or diffusers' advice to pass ignore_mismatched_sizes
    ("scheduler/scheduler_config.json", "beta_schedule", "bogus", "could not be built from its configs "
                                                                  "(NotImplementedError: bogus is not implemented"),
    ("text_encoder/config.json", "hidden_size", 64, "a config.json does not fit its weights; one of them may be "
                                                    "damaged or from another model"),
    ("vae/config.json", "latent_channels", 8, "a config.json does not fit its weights (decoder.conv_in.weight: the "
                                              "config makes torch.Size([16, 8, 3, 3]), the weights hold "
                                              "torch.Size([16, 4, 3, 3]))"),
])
def test_a_hand_edited_config_is_a_user_error(tmp_path, tiny_sd15_dir, part, key, value, message):
    """Each was an unexpected error (IndexError in the load, ValueError in the first resize)."""
    from attndistill.model.loading import load_model

    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "model")
    config = folder / part
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    with pytest.raises(UserError, match=re.escape(message)):
        load_model(str(folder), device="cpu", dtype="fp32")


def test_a_damaged_tokenizer_file_is_said_to_be_damaged(tmp_path, tiny_sd15_dir):
    from attndistill.model.loading import load_model

    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "model")
    tokenizer = folder / "tokenizer" / "tokenizer.json"
    tokenizer.write_text("{\n oops" + tokenizer.read_text()[1:])  # was an unnamed "could not be loaded: Expecting..."
    with pytest.raises(UserError, match=r"has a damaged JSON file \(Expecting property name .*, line 2\); download"):
        load_model(str(folder), device="cpu", dtype="fp32")


def test_the_expansion_side_limit_is_on_the_canvas_as_it_is_rounded():
    """16385 px becomes a 16384 px canvas (whole latents), which the limit allows; 16388 becomes 16392."""
    from attndistill.presets import get_preset
    from attndistill.tasks.textures import check_expansion

    check_expansion(get_preset("expand"), (16385, 512))
    with pytest.raises(UserError, match="size 16388x512 is over 16384 px on a side"):
        check_expansion(get_preset("expand"), (16388, 512))
