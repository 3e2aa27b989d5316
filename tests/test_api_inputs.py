"""The Python API refuses what it cannot use with one UserError, and keeps no state between calls."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import attndistill as ad
from attndistill.errors import UserError
from attndistill.model.perf import PerfOptions
from attndistill.tasks.generate import text_to_image
from attndistill.tasks.transfer import style_transfer_batch


def _closed(data_dir):
    image = Image.open(data_dir / "horse.jpg")
    image.close()
    return image


def _style(model, data_dir, **options):
    options = {"model": model, "steps": 2, "size": 64, "progress": False, **options}
    content = options.pop("content", data_dir / "horse.jpg")
    style = options.pop("style", data_dir / "watercolor-cat.jpg")
    return ad.style_transfer(content, style, **options)


@pytest.mark.parametrize("options,expected", [
    ({"dtype": "bf16"}, "dtype differs from the loaded model"),
    ({"vae": "/no/such/vae"}, "vae differs from the loaded model"),
    ({"vae": torch.nn.Module()}, r"vae must be a folder or a Hub id, not a Module; save a tuned VAE with save_vae"),
    ({"size": -64}, "size must be a positive"), ({"size": 0}, "size must be a positive"),
    ({"size": True}, "size must be a positive"), ({"size": (64,)}, "size must be a positive"),
    ({"steps": 2.5}, "steps must be a whole number"), ({"lr": "0.1"}, "lr must be a finite number"),
    ({"layers": 3}, "layers must be"), ({"layers": [1.5]}, "layers must be"),
    ({"seed": 2**70}, "seed 1180591620717411303424 is out of range"), ({"seed": 1.5}, "seed must be a whole number"),
    ({"seed": 2**32}, "seed 4294967296 is out of range; a seed must be a whole number from 0 to 4294967295"),
    ({"callback": 5}, "callback must be a function"), ({"tune_vae": "no"}, "tune_vae must be True or False"),
    ({"style": []}, "no style image given"), ({"content": np.zeros((64, 64, 3), np.uint8)}, "not a ndarray"),
])
def test_bad_arguments_are_one_user_error(tiny_sd15, data_dir, options, expected):
    with pytest.raises(UserError, match=expected):
        _style(tiny_sd15, data_dir, **options)


@pytest.mark.parametrize("model", [0, {}, "unet"])
def test_a_model_argument_that_is_no_model(tiny_sd15, data_dir, model):
    with pytest.raises(UserError, match="model must be a loaded model"):
        _style(tiny_sd15.unet if model == "unet" else model, data_dir)


@pytest.mark.parametrize("task", ["texture_sampling", "layout_texture", "expand_texture", "masked"])
def test_every_texture_task_refuses_a_tune_vae_that_is_no_bool(tiny_sd15, data_dir, task):
    from attndistill.tasks import generate, textures

    ref = data_dir / "wood-rings.jpg"
    calls = {"texture_sampling": lambda: generate.texture_sampling(ref, model=tiny_sd15, tune_vae="no"),
             "layout_texture": lambda: generate.layout_texture(ref, ref, model=tiny_sd15, tune_vae="no"),
             "expand_texture": lambda: textures.expand_texture(ref, size=512, model=tiny_sd15, tune_vae="no"),
             "masked": lambda: textures.masked_texture_synthesis(ref, ref, ref, model=tiny_sd15, tune_vae="no")}
    with pytest.raises(UserError, match="tune_vae must be True or False"):
        calls[task]()


@pytest.mark.parametrize("task", ["style", "texture", "texture_sampling", "layout_texture", "t2i", "expand"])
def test_a_bad_seed_is_said_before_any_model_is_loaded(tmp_path, data_dir, task):
    """Checks that need no model come first: a typo in the seed is not reported after minutes of download."""
    from attndistill.tasks import generate, textures

    ref, missing = data_dir / "wood-rings.jpg", str(tmp_path / "no-model")
    calls = {"style": lambda: ad.style_transfer(ref, ref, model=missing, seed=-1),
             "texture": lambda: ad.texture_synthesis(ref, model=missing, seed=-1),
             "texture_sampling": lambda: generate.texture_sampling(ref, model=missing, seed=-1),
             "layout_texture": lambda: generate.layout_texture(ref, ref, model=missing, seed=-1),
             "t2i": lambda: generate.text_to_image("a deer", ref, model=missing, seed=-1),
             "expand": lambda: textures.expand_texture(ref, size=512, model=missing, seed=-1)}
    with pytest.raises(UserError, match="seed must be"):
        calls[task]()


def test_other_bad_arguments(tiny_sd15, data_dir, tmp_path):
    with pytest.raises(UserError, match="negative prompt must be one string"):
        text_to_image("a cat", data_dir / "watercolor-cat.jpg", negative_prompt=5, model=tiny_sd15, steps=1)
    for empty in ("", " \n"):  # refused as jobs files and the web UI refuse it, so results can be rerun
        with pytest.raises(UserError, match="prompt is empty; describe the image to generate"):
            text_to_image(empty, data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1)
    for net in (5, tiny_sd15.unet):
        with pytest.raises(UserError, match="controlnet must be"):
            text_to_image("a cat", data_dir / "watercolor-cat.jpg", controlnet=net,
                          control_image=data_dir / "horse.jpg", model=tiny_sd15, steps=1)
    from attndistill.tasks.generate import texture_sampling
    from attndistill.tasks.textures import with_texture_options

    with pytest.raises(UserError, match="no texture image given"):
        with_texture_options(texture_sampling, [], model=tiny_sd15, tile="xy")
    with pytest.raises(UserError, match="takes a list of content images"):
        style_transfer_batch(str(data_dir / "horse.jpg"), data_dir / "watercolor-cat.jpg", model=tiny_sd15)
    with pytest.raises(UserError, match="num must be a whole number"):
        ad.texture_synthesis(data_dir / "wood-rings.jpg", num=2.0, model=tiny_sd15, steps=1)
    with pytest.raises(UserError, match="saves a PIL image"):
        ad.save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "x.png")
    with pytest.raises(UserError, match="Distiller needs a model"):
        ad.Distiller("x")
    with pytest.raises(UserError, match="is not a file"):
        ad.read_parameters(tmp_path / "missing.png")
    deep = PngInfo()
    deep.add_text("attndistill", "[" * 100_000 + "]" * 100_000)  # json's RecursionError, not a ValueError
    Image.new("RGB", (8, 8)).save(tmp_path / "deep.png", pnginfo=deep)
    with pytest.raises(UserError, match="not a JSON object of parameters"):
        ad.read_parameters(tmp_path / "deep.png")
    whole = (tmp_path / "deep.png").read_bytes()  # cut inside its text chunk: OSError from Pillow, raw
    (tmp_path / "cut.png").write_bytes(whole[:whole.index(b"tEXt") + 6])
    with pytest.raises(UserError, match=r"'.*cut.png' is a damaged PNG \(.*\); its parameters cannot be read"):
        ad.read_parameters(tmp_path / "cut.png")
    for bad, said in ((np.zeros((1, 3, 16, 16), np.float32), "not a ndarray"),  # each a raw error inside before
                      (torch.zeros(1, 1, 16, 16), "not (1, 1, 16, 16)"), (torch.zeros(3, 16, 16), "not (3, 16, 16)"),
                      (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "not torch.uint8; divide 8-bit values by 255"),
                      (torch.full((1, 3, 16, 16), 255.0), "range from 255 to 255; divide 8-bit values by 255")):
        with pytest.raises(UserError, match="^encode takes ") as caught:
            tiny_sd15.encode(bad)
        assert said in str(caught.value)
    image = ad.load_image(Image.new("RGBA", (16, 16), (200, 100, 50, 128)).convert("La"))  # premultiplied grey
    assert image.mode == "RGB" and image.size == (16, 16)  # was Pillow's "conversion from La to RGBA not supported"
    for bad in ({"fused": "no"}, {"lookahead_batch": 0}):
        with pytest.raises(UserError):
            PerfOptions(**bad)
    with pytest.raises(UserError, match="PerfOptions"):
        tiny_sd15.set_perf({"fused": True})
    with pytest.raises(UserError, match="PerfOptions"):
        tiny_sd15.set_perf(bogus=1)


def test_texture_options_take_a_model_path_like_every_task(tiny_sd15_dir, data_dir):
    from attndistill.tasks.generate import texture_sampling
    from attndistill.tasks.textures import with_texture_options

    images = with_texture_options(texture_sampling, data_dir / "wood-rings.jpg", model=str(tiny_sd15_dir), tile="xy",
                                  steps=1, iters=1, size=64, device="cpu", dtype="fp32", vae=str(tiny_sd15_dir / "vae"))
    assert images[0].size == (64, 64)
    assert json.loads(images[0].info["parameters"])["vae"] == str(tiny_sd15_dir / "vae")


def test_attention_slicing_can_be_turned_off_again(tiny_sd15):
    def processors():
        return {type(p).__name__ for p in tiny_sd15.unet.attn_processors.values()}

    fresh = processors()
    tiny_sd15.set_perf(PerfOptions(attention_slicing=True))
    assert any(name.startswith("Sliced") for name in processors())
    tiny_sd15.set_perf(PerfOptions())
    assert processors() == fresh


def test_a_size_well_under_the_models_own_is_said(tiny_sd15, caplog):
    """SDXL at SD 1.5's 512² is a quarter of its area: said once by the run (the tiny model's native size is 256)."""
    from attndistill.tasks.setup import target_size

    with caplog.at_level(logging.WARNING, logger="attndistill"):
        for size in ((256, 160), 192, (128, 128)):  # 0.62, 0.56 (192x192) and 0.25 of the area
            target_size(tiny_sd15, size)
        target_size(tiny_sd15, 64, warn=False)  # a check's call
    assert [r.getMessage() for r in caplog.records] == [
        "size 128x128 is under half the area this model was trained at (256x256): Stable Diffusion's images degrade "
        "well below it; a larger --size does better"]


def test_cuda_switches_asked_for_on_the_cpu_are_said_to_change_nothing_once(tiny_sd15, caplog, monkeypatch):
    """--cpu-offload on a CPU (or a Mac) ran without a word, as if it saved memory."""
    from attndistill.model import perf

    monkeypatch.setattr(perf, "_said_unused", set())
    try:
        with caplog.at_level(logging.WARNING, logger="attndistill"):
            for _ in range(2):  # every run sets its model's switches: said once
                tiny_sd15.set_perf(PerfOptions(cpu_offload=True, cuda_graphs=True))
            tiny_sd15.set_perf(PerfOptions(cuda_graphs=False, offload_text_encoders=False))  # nothing asked for
    finally:
        tiny_sd15.set_perf(PerfOptions())
    assert [r.getMessage() for r in caplog.records] == [
        "--cuda-graphs and --cpu-offload act on CUDA GPUs only: on cpu they change nothing"]


def test_callbacks_keep_the_latents_they_are_given(tiny_sd15, data_dir):
    """Each step's latents are the callback's own copy, not the buffer the run goes on in."""
    seen = []
    _style(tiny_sd15, data_dir, steps=3, callback=lambda info: seen.append(info.latents))
    assert len(seen) == 3 and not torch.equal(seen[0], seen[-1])


def test_an_infinite_pixel_does_not_blacken_a_float_image():
    values = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    values[0, 0] = np.inf
    rgb = np.asarray(ad.load_image(Image.fromarray(values, "F")))
    assert rgb.mean() > 50


def test_wide_integer_images_keep_their_values():
    """Mode "I" holding 8-bit or 16-bit values reads as those values: stretched to its own extremes, a uniform
    white mask turned black and greys of 100 and 200 read as 0 and 255."""
    grey = np.tile(np.array([100, 200], dtype=np.uint8), (16, 8))
    assert np.array_equal(np.asarray(ad.load_image(Image.fromarray(grey, "L").convert("I")))[..., 0], grey)
    white = np.asarray(ad.load_image(Image.new("L", (16, 16), 255).convert("I")))
    assert (white == 255).all()
    deep = Image.fromarray(np.full((16, 16), 32768, dtype=np.int32), "I")
    assert (np.asarray(ad.load_image(deep)) == 128).all()
    floats = Image.fromarray(np.full((16, 16), 51.0, dtype=np.float32), "F")  # 8-bit values stored as floats
    assert (np.asarray(ad.load_image(floats)) == 51).all()


def test_a_target_map_whose_aspect_the_size_cannot_keep_is_said(tiny_sd15, data_dir, caplog):
    """A 2000x40 target map at 64 px is stretched several times: said, as layout_texture says it."""
    def halves(size):
        img = Image.new("RGB", size, (255, 0, 0))
        img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
        return img

    with caplog.at_level(logging.WARNING, logger="attndistill"):
        ad.masked_texture_synthesis(data_dir / "wood-rings.jpg", halves((64, 64)), halves((2000, 40)),
                                    model=tiny_sd15, steps=1, size=64, progress=False)
    assert "target label map" in caplog.text and "stretched" in caplog.text


@pytest.mark.parametrize("size,said", [
    ((100, 70), "size 100x70 is rounded to 96x64: sides are whole multiples of 32 px"),
    (70, "size 70 is rounded to 64x64: sides are whole multiples of 32 px"), (64, None), ((96, 64), None)])
def test_a_size_that_rounding_changes_is_said_by_the_run_not_by_a_check(tiny_sd15, data_dir, caplog, size, said):
    """Only a run's last line showed that the image has another size than the one asked for."""
    from attndistill.tasks.setup import target_size
    from attndistill.tasks.textures import canvas_size

    with caplog.at_level(logging.WARNING, logger="attndistill"):
        target_size(tiny_sd15, size, warn=False)  # a batch check's call, before the run's
        canvas_size(tiny_sd15, size, 4, warn=False)
        assert caplog.text == ""
        ad.texture_synthesis(data_dir / "wood-rings.jpg", model=tiny_sd15, steps=1, size=size, progress=False)
        canvas_size(tiny_sd15, (130, 68), 4)  # expansion: whole latents of 8 px
    lines = [r.getMessage() for r in caplog.records if "rounded" in r.getMessage()]
    assert lines == [*([f"{said} for this model"] if said else []),
                     "size 130x68 is rounded to 128x72: sides are whole multiples of 8 px for this model"]


def test_texture_options_keep_references_given_by_a_generator(tiny_sd15, data_dir):
    """with_texture_options read a generator for itself and handed the task the used-up one ("no texture
    image given"), for tasks without tile/tune_vae options of their own."""
    def task(reference, *, model, progress=True, **kwargs):
        return ad.texture_synthesis(reference, model=model, progress=progress, **kwargs)

    (image,) = ad.with_texture_options(task, (r for r in [data_dir / "wood-rings.jpg"]), model=tiny_sd15,
                                       tile="xy", steps=1, size=64, progress=False)
    assert image.size == (64, 64)


def test_numpy_numbers_run_and_are_recorded_as_plain_numbers(tiny_sd15, data_dir):
    """A seed or count drawn with NumPy: the run works and its PNG's parameters are plain JSON (this failed
    after the whole run, in json.dumps, or in torch's generator)."""
    from attndistill.tasks.generate import layout_texture

    ref = data_dir / "wood-rings.jpg"
    out = _style(tiny_sd15, data_dir, steps=1, seed=np.int64(3))
    assert json.loads(out.info["parameters"])["seed"] == 3
    outs = ad.texture_synthesis(ref, model=tiny_sd15, steps=np.int64(1), size=64, seed=np.int64(1), num=np.int64(2),
                                lr=np.float32(0.05), progress=False)
    recorded = json.loads(outs[0].info["parameters"])
    assert len(outs) == 2 and (recorded["num"], recorded["steps"], recorded["lr"]) == (2, 1, float(np.float32(0.05)))
    out = layout_texture(ref, data_dir / "horse.jpg", model=tiny_sd15, steps=2, iters=1, size=64,
                         strength=np.float32(1.0), progress=False)[0]
    assert json.loads(out.info["parameters"])["strength"] == 1.0
    out = ad.expand_texture(ref, model=tiny_sd15, size=(96, 64), view=np.int64(8), steps=1, progress=False)
    assert json.loads(out.info["parameters"])["view"] == 8
    torch.testing.assert_close(  # and the same image as with plain numbers
        torch.from_numpy(np.asarray(_style(tiny_sd15, data_dir, steps=1, seed=3), np.float32)),
        torch.from_numpy(np.asarray(_style(tiny_sd15, data_dir, steps=1, seed=np.int64(3)), np.float32)))


def test_options_of_the_wrong_type_are_one_user_error(tiny_sd15, data_dir):
    from attndistill.tasks.generate import layout_texture
    from attndistill.tasks.textures import expand_texture, masked_texture_synthesis
    from attndistill.tasks.vae_tuning import finetune_vae

    ref, style = data_dir / "wood-rings.jpg", data_dir / "watercolor-cat.jpg"
    common = {"model": tiny_sd15, "steps": 1, "size": 64, "progress": False}
    cases = [
        (lambda: text_to_image("a", style, start_t="5", **common), "start-t must be a finite number"),
        (lambda: text_to_image("a", style, content=ref, content_weight="0.2", **common),
         "content weight must be a finite number"),
        (lambda: text_to_image("a", style, adain="no", **common), "adain must be True or False"),
        (lambda: text_to_image("a", style, fused="yes", **common), "fused must be True or False"),
        (lambda: _style(tiny_sd15, data_dir, progress="no"), "progress must be True or False"),
        (lambda: _style(tiny_sd15, data_dir, seed=-1), "seed -1 is out of range"),
        (lambda: layout_texture(ref, ref, strength="0.5", **common), "strength must be a finite number"),
        (lambda: expand_texture(ref, size=512, model=tiny_sd15, view_batch=1.5), "view batch must be a whole"),
        (lambda: expand_texture(ref, size=512, model=tiny_sd15, decode_tile=8.5), "decode tile must be a whole"),
        (lambda: finetune_vae(ref, model=tiny_sd15, steps=1.5), "VAE tuning steps must be a whole number"),
        (lambda: finetune_vae(ref, model=tiny_sd15, lr=float("inf")), "VAE tuning lr must be a finite number"),
        (lambda: finetune_vae(ref, model=tiny_sd15, steps=2, lr=1e30), "VAE tuning diverged"),
        # one step of a huge lr leaves finite weights that decode to NaN: it was saved as a VAE
        (lambda: finetune_vae(ref, model=tiny_sd15, steps=1, lr=1e30), "VAE tuning diverged in its last step"),
        (lambda: finetune_vae(ref, model=tiny_sd15, steps=10**20), "VAE tuning steps must be at most 10000"),
        (lambda: ad.style_transfer_batch(np.zeros((2, 64, 64, 3), np.uint8), style, **common),
         "takes a list of content images .* not a ndarray"),
        (lambda: masked_texture_synthesis([], [], ref, **common), "no texture image given"),
        (lambda: ad.Distiller(tiny_sd15, layers="99"), r"layers \[99\] do not exist"),
        # a power user's slips ended in tracebacks (an API audit): a closed image, swapped arguments, a task's name
        (lambda: ad.style_transfer(_closed(data_dir), style, **common), r"content image \(a PIL image\) cannot be "
                                                                         r"read \(Operation on closed image\)"),
        (lambda: ad.save_vae("wood-vae", "folder"), "save_vae takes the VAE that finetune_vae returned, then the "
                                                     "folder: not a str first"),
        (lambda: ad.with_texture_options("texture", ref, model=tiny_sd15), "with_texture_options takes a task "
                                                                            "function such as ad.texture_sampling"),
        # as the tasks check them: a negative or NaN weight dropped the content term silently, "2" a TypeError
        (lambda: ad.Distiller(tiny_sd15, content_weight=-5), r"content weight must be >= 0 \(got -5.0\)"),
        (lambda: ad.Distiller(tiny_sd15, content_weight=float("nan")), "content weight must be a finite number"),
        (lambda: ad.Distiller(tiny_sd15, attention_scale=0), r"attention scale must be positive \(got 0.0\)"),
        (lambda: ad.Distiller(tiny_sd15, attention_scale="2"), "attention scale must be a finite number"),
        (lambda: ad.load_image("/tmp/" + "a" * 300 + ".png"), "cannot be opened"),
        (lambda: ad.load_image(""), "is an empty path"),
        (lambda: ad.read_parameters(Image.new("RGB", (8, 8))), "not a Image; pass the path of a PNG"),
        (lambda: ad.read_parameters(b"/tmp/x.png"), "takes a path as a str or Path, not a bytes"),
        (lambda: ad.get_preset("nope"), "unknown task 'nope'"),
    ]
    for call, expected in cases:
        with pytest.raises(UserError, match=expected):
            call()


def test_a_decimal_start_t_and_a_falsy_progress_still_run(tiny_sd15, data_dir):
    """What worked before the type checks still works: start_t is a threshold (batch lines take decimals),
    and progress only switches a bar."""
    from attndistill.tasks.generate import texture_sampling

    out = texture_sampling(data_dir / "wood-rings.jpg", model=tiny_sd15, steps=2, iters=1, size=64,
                           start_t=600.5, progress=None)
    assert len(out) == 1 and json.loads(out[0].info["parameters"])["start_t"] == 600.5


def test_a_layer_range_is_checked_before_it_is_expanded(tiny_sd15):
    from attndistill.core.engine import parse_layers

    with pytest.raises(UserError) as err:
        parse_layers("0-20000000", tiny_sd15)  # expanded: 20 million numbers, a 189-million-character message
    assert "layers 0-20000000 do not exist" in str(err.value) and len(str(err.value)) < 200
    with pytest.raises(UserError) as err:
        parse_layers(list(range(100_000)), tiny_sd15)
    assert len(str(err.value)) < 200
    assert parse_layers(np.array([2, 1]), tiny_sd15) == parse_layers(torch.tensor([1, 2]), tiny_sd15) == (1, 2)
    with pytest.raises(UserError, match="a list of whole numbers"):
        parse_layers(np.array([1.5]), tiny_sd15)


def test_a_generator_of_contents_keeps_each_content_in_the_parameters(tiny_sd15, data_dir, tmp_path):
    """Each result names its own content and mask, with their digests (info could not tell when a batch's content
    changed), and how many results shared the optimisation (rerun alone, one matches to rounding only)."""
    from attndistill.fingerprints import KEY, file_digest

    contents = [data_dir / "horse.jpg", data_dir / "wood-rings.jpg"]
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    outs = ad.style_transfer_batch((c for c in contents), data_dir / "watercolor-cat.jpg", model=tiny_sd15,
                                   steps=1, size=64, progress=False, masks=[None, mask])
    params = [json.loads(o.info["parameters"]) for o in outs]
    assert [p["content"] for p in params] == [str(c) for c in contents] and [p["batched"] for p in params] == [2, 2]
    assert [p[KEY] for p in params] == [
        {"style": [file_digest(data_dir / "watercolor-cat.jpg")], "content": file_digest(c), **extra}
        for c, extra in zip(contents, [{}, {"mask": file_digest(mask)}], strict=True)]
    alone = ad.style_transfer_batch([contents[0]], data_dir / "watercolor-cat.jpg", model=tiny_sd15, steps=1,
                                    size=64, progress=False)
    assert "batched" not in json.loads(alone[0].info["parameters"])


def test_save_png_refuses_what_png_cannot_hold(tmp_path):
    img = Image.new("RGB", (8, 8))
    cases = [(img.convert("F"), tmp_path / "f.png", None, "cannot store a mode F image"),
             (img.convert("CMYK"), tmp_path / "c.png", None, "cannot store a mode CMYK image"),
             (Image.new("RGB", (0, 0)), tmp_path / "e.png", None, "empty image"),
             (img, b"/tmp/x.png", None, "needs a path as a str or Path"),
             (img, tmp_path / "s.png", {"a": {1, 2}}, "parameters hold a set"),
             (img, tmp_path / "n.png", 5, "parameters must be a dict"),
             (img, tmp_path / "t.png", "not json", "parameters text must be a JSON object"),
             (img, tmp_path / "l.png", "[1, 2]", "parameters text must be a JSON object"),
             (img, tmp_path / "d.png", "[" * 100_000, "parameters text must be a JSON object")]
    for image, path, params, expected in cases:
        with pytest.raises(UserError, match=expected):
            ad.save_png(image, path, parameters=params)
    assert list(tmp_path.iterdir()) == []
    ad.save_png(img, tmp_path / "ok.png", parameters={"seed": np.uint64(2**64 - 1)})
    assert ad.read_parameters(tmp_path / "ok.png") == {"seed": 2**64 - 1}


@pytest.mark.parametrize("text, size", [("512", 512), ("768x512", (768, 512)), ("768×512", (768, 512)),
                                        ("768*512", (768, 512)), (" 768 X 512 ", (768, 512)), ("512px", 512),
                                        ("768px x 512px", (768, 512)), ("0768", 768)])
def test_sizes_as_people_write_them(text, size):
    from attndistill.images import parse_size

    assert parse_size(text, multiple=1) == size


def test_sizes_round_to_the_nearest_multiple_and_halves_up(tiny_sd15):
    """Halves go one way, not to the even multiple: 80 and 112 both round up, by 16 px, as 96 and 128."""
    from attndistill.images import parse_size
    from attndistill.tasks.setup import target_size

    assert [parse_size(t, multiple=32) for t in ("80", "112", "79", "100x70")] == [96, 128, 64, (96, 64)]
    assert [target_size(tiny_sd15, s) for s in (80, 112, (80, 48))] == [(96, 96), (128, 128), (96, 64)]


@pytest.mark.parametrize("text", ["abc", "0", "1x", "5x5x5", "-3", "5.5", "x512", "512 512", "96 64", "5 12x64"])
def test_sizes_that_are_no_size(text):
    from attndistill.images import parse_size

    with pytest.raises(UserError, match=f"size '{text}' is not understood"):
        parse_size(text)


def test_a_size_of_another_aspect_than_the_content_is_said(tiny_sd15, data_dir, caplog):
    """A (width, height) that stretches the content, structure, layout or control image is named in a warning;
    the content's own aspect (to the 2% a resize leaves), or a long side alone, says nothing."""
    from attndistill.tasks.generate import layout_texture

    def said() -> list[str]:  # the tiny model's native size is 256²: these sizes are said to be small, too
        return [r.getMessage() for r in caplog.records if "under half the area" not in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="attndistill"):
        _style(tiny_sd15, data_dir, steps=1, size=(64, 64))  # horse.jpg is 768x754
        _style(tiny_sd15, data_dir, steps=1, size=64)
        assert not said()
        _style(tiny_sd15, data_dir, steps=1, size=(128, 64))
        layout_texture(data_dir / "wood-rings.jpg", data_dir / "horse.jpg", model=tiny_sd15, steps=2, iters=1,
                       size=(64, 128), progress=False)
    said = said()
    assert len(said) == 2 and all("768x754 but the size asked for is" in m and "stretched" in m for m in said)
    assert said[0].startswith("content image '") and said[1].startswith("layout image '")


def test_an_aspect_too_extreme_for_the_size_is_said(tiny_sd15, caplog):
    """Sides are whole multiples of the UNet's: a 100:1 image at 256 px becomes 8:1, which is said."""
    from attndistill.tasks.setup import target_size

    with caplog.at_level(logging.WARNING, logger="attndistill.tasks.setup"):
        target_size(tiny_sd15, 768, like=Image.new("RGB", (768, 401)), like_name="content image 'a'")  # rounding
        assert not caplog.text
        w, h = target_size(tiny_sd15, 256, like=Image.new("RGB", (4000, 40)), like_name="content image 'wide.png'")
    assert "content image 'wide.png' is 4000x40, an aspect that" in caplog.text and f"{w}x{h}" in caplog.text
    assert "stretched 12.5 times" in caplog.text


@pytest.mark.parametrize("like", [(128, 96), (4000, 40)])
def test_a_rerun_of_the_recorded_size_says_what_the_run_said(tiny_sd15, caplog, like):
    """A result records (width, height), also where only the long side was given: its rerun warned that the
    image is stretched to another aspect where the run itself had said nothing (a 128x96 layout at 64 px is
    64x64 in the tiny model's multiples of 32), or said it in other words."""
    from attndistill.tasks.setup import target_size

    image = Image.new("RGB", like)
    with caplog.at_level(logging.WARNING, logger="attndistill.tasks.setup"):
        recorded = target_size(tiny_sd15, 64, like=image, like_name="layout image 'a'")
        said = caplog.text
        caplog.clear()
        assert target_size(tiny_sd15, recorded, like=image, like_name="layout image 'a'") == recorded
    assert caplog.text == said and ("stretched" in said) is (like == (4000, 40))


def test_a_file_name_of_the_longest_length_the_file_system_takes_is_written(tmp_path):
    """The temp file beside an output has a longer name than the output: it is cut so that it fits too."""
    path = tmp_path / ("b" * 251 + ".png")
    ad.save_png(Image.new("RGB", (8, 8)), path)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_references_may_come_from_a_generator_as_contents_do(tiny_sd15, data_dir):
    style = [data_dir / "watercolor-cat.jpg", data_dir / "wood-rings.jpg"]
    as_list_run = _style(tiny_sd15, data_dir, steps=1, style=style)
    as_generator = _style(tiny_sd15, data_dir, steps=1, style=(s for s in style))
    assert np.array_equal(np.asarray(as_list_run), np.asarray(as_generator))


def test_true_is_no_number_and_out_of_memory_is_found_in_any_case():
    from attndistill.checks import number, whole
    from attndistill.errors import is_out_of_memory

    for check in (whole, number):
        with pytest.raises(ad.UserError, match="seed must be a"):
            check("seed", True)
    assert whole("steps", np.int64(3)) == 3 and number("lr", np.float32(0.5)) == 0.5
    assert is_out_of_memory(RuntimeError("HIP error: Out Of Memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_unet_with_fewer_than_six_self_attention_layers_uses_all_and_says_so(caplog):
    """The default is the last six; a model with fewer uses all it has, with a word, and its errors name a range
    that exists."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from attndistill.core.engine import parse_layers
    from attndistill.testing import TINY_UNET

    unet = UNet2DConditionModel(**{**TINY_UNET, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D",
                                                                     "DownBlock2D"),
                                   "up_block_types": ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")})
    model = SimpleNamespace(unet=unet)
    with caplog.at_level("WARNING", logger="attndistill.core.engine"):
        assert parse_layers(None, model) == parse_layers("", model) == (0, 1, 2, 3)
    assert caplog.text.count("has only 4 self-attention layers; all of them are used") == 1  # once a model
    with pytest.raises(UserError, match=r"layers 10-15 do not exist .* layers 0-3 \(default: the last six, 0-3\)"):
        parse_layers("10-15", model)
    caplog.clear()
    six = SimpleNamespace(unet=UNet2DConditionModel(**{**TINY_UNET, "down_block_types": (
        "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"), "up_block_types": (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}))  # 1 down, 1 mid, 4 up: six, nothing to say
    with caplog.at_level("WARNING", logger="attndistill.core.engine"):
        assert parse_layers(None, six) == tuple(range(6))
    assert "self-attention layers" not in caplog.text
    plain = SimpleNamespace(unet=UNet2DConditionModel(**{**TINY_UNET, "down_block_types": ("DownBlock2D",) * 3,
                                                         "up_block_types": ("UpBlock2D",) * 3,
                                                         "mid_block_type": None}))
    with pytest.raises(UserError, match="this model's UNet has no self-attention layers"):
        parse_layers(None, plain)


def test_numpy_booleans_are_taken_as_numpy_numbers_are(tiny_sd15, data_dir):
    """NumPy ints and floats were welcome everywhere and NumPy's bools refused: a sweep over np.array([True,
    False]) met "adain must be True or False (got np.True_)"."""
    from attndistill.tasks.generate import texture_sampling

    run = dict(model=tiny_sd15, steps=2, iters=1, size=64, progress=False)
    plain = texture_sampling(data_dir / "wood-rings.jpg", adain=False, tune_vae=False, **run)[0]
    numpy = texture_sampling(data_dir / "wood-rings.jpg", adain=np.bool_(False), tune_vae=np.bool_(False), **run)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(numpy))
    assert json.loads(numpy.info["parameters"])["adain"] is False


@pytest.mark.parametrize("said, api", [
    ("lower --lr or raise --start-t", "lower lr= or raise start_t="),
    ("--view 6 must be a multiple", "view=6 must be a multiple"),
    ("lower --lr 1e-3.", "lower lr=1e-3."),
    ('use --device cpu (device="cpu" from Python)', 'use device=\'cpu\' (device="cpu" from Python)'),
    ("--tile xy needs", "tile='xy' needs"),
    ("pass --overwrite or --vae-tiling", "pass --overwrite or --vae-tiling"),  # no keyword argument of the task
    ("image '/tmp/run--seed/wood.png' does not exist", "image '/tmp/run--seed/wood.png' does not exist"),
    ("a run--seed path, x--lr", "a run--seed path, x--lr"),
    ("or pass --model /path/to/a/folder", "or pass model='/path/to/a/folder'"),
    ("instead of --tune-vae", "instead of tune_vae=True"),
])
def test_messages_name_the_keyword_arguments_a_python_caller_passes(said, api):
    from attndistill.errors import in_api_words

    assert in_api_words(said, {"lr", "start_t", "view", "device", "tile", "seed", "model", "tune_vae"},
                        {"tune_vae"}) == api


def test_a_file_name_in_a_message_keeps_its_dashes(tmp_path, tiny_sd15):
    (tmp_path / "run--seed").mkdir()
    with pytest.raises(UserError, match=r"'.*run--seed/wood\.png' does not exist"):
        ad.texture_synthesis(tmp_path / "run--seed" / "wood.png", model=tiny_sd15, progress=False)
