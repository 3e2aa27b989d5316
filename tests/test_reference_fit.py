"""``reference_fit``: how reference images meet the model ("squash" as the paper's code, or "keep" their aspect)."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import attndistill as ad
from attndistill.errors import UserError
from attndistill.images import kept_size, reference_boxes
from attndistill.presets import PRESETS, REFERENCE_FITS
from attndistill.tasks import vae_tuning


def test_squash_stretches_every_reference_to_the_native_square():
    size, boxes = reference_boxes([(900, 300), (300, 600)], "squash", 512, 64)
    assert size == (512, 512) and boxes == [(0, 0, 900, 300), (0, 0, 300, 600)]


def test_squash_says_which_references_it_stretches_or_enlarges_far_once_per_run(caplog):
    """A 12000x300 strip squashed 40 times, or a 16 px swatch blown up to 512, ran without a word."""
    sizes, names = [(900, 300), (1000, 400), (3000, 300), (100, 100), (128, 128)], list("abcde")
    with caplog.at_level(logging.WARNING, logger="attndistill"):
        reference_boxes(sizes, "squash", 512, 64, names)  # a check's call: says nothing
        assert not caplog.records
        reference_boxes(sizes, "squash", 512, 64, names, warn=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"reference '{name}' is {size}, squashed {times} times to the model's 512x512 square (reference fit "
        "squash); reference fit keep keeps its aspect"
        for name, size, times in (("a", "900x300", "3.0"), ("b", "1000x400", "2.5"), ("c", "3000x300", "10.0"))] + [
        "reference 'd' is only 100x100, enlarged 5.1 times to the model's 512x512: the run sees the resize's blur; "
        "give a larger image"]  # 128x128 is 4 times: not said


def test_keep_takes_the_first_aspect_at_the_native_area_and_crops_the_others_to_it():
    (w, h), boxes = reference_boxes([(900, 300), (300, 600), (1200, 400)], "keep", 512, 64)
    assert w % 64 == 0 and h % 64 == 0
    assert (w, h) == (960, 320)  # 3:1 exactly, at 1.17 x 512² (of the short sides near 296 px)
    for box, (iw, ih) in zip(boxes, [(900, 300), (300, 600), (1200, 400)], strict=True):
        left, top, right, bottom = box
        assert abs((right - left) / (bottom - top) - w / h) < 0.02  # no image stretched
        assert left == (iw - right) or left == iw - right - 1  # centred
        assert top == (ih - bottom) or top == ih - bottom - 1
    assert boxes[0][1:4:2] == (0, 300) and boxes[0][2] - boxes[0][0] > 800  # the first loses only rounding
    assert boxes[1][0] == 0 and boxes[1][2] == 300  # a tall image keeps its width and loses height


@pytest.mark.parametrize("size", [(1500, 1000), (600, 400), (768, 401), (2000, 100), (100000, 1)])
def test_kept_sizes_come_close_to_the_aspect_whichever_way_up(size):
    """A sized-up aspect near 1.5 picks 576x384 (exact), not 640x384; a tall image gets the wide one's sides
    swapped; an extreme aspect is cut at 64:1 (one 64-pixel short side), so the area stays about native²."""
    w, h = kept_size(size, 512, 64)
    assert kept_size(size[::-1], 512, 64) == (h, w)
    aspect = min(size[0] / size[1], 64)
    assert abs(w / h / aspect - 1) < 0.05 and 0.7 < w * h / 512 ** 2 < 1.3
    assert kept_size((1500, 1000), 512, 64) == (576, 384)


def test_every_preset_squashes_by_default_as_the_papers_code():
    assert {p.reference_fit for p in PRESETS.values()} == {REFERENCE_FITS[0]} == {"squash"}


def _wide(tmp_path, name="wide.png", size=(240, 80)):
    rng = np.random.default_rng(0)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_keep_reaches_the_engine_and_the_result_records_it(tiny_sd15, tmp_path, monkeypatch):
    seen = []
    real = tiny_sd15.encode
    monkeypatch.setattr(tiny_sd15, "encode", lambda x, *a, **k: (seen.append(tuple(x.shape)), real(x, *a, **k))[1])
    kw = dict(model=tiny_sd15, steps=2, size=64, progress=False)
    squashed = ad.texture_synthesis(_wide(tmp_path), **kw)[0]
    kept = ad.texture_synthesis(_wide(tmp_path), reference_fit="keep", **kw)[0]
    side, multiple = tiny_sd15.native_size, tiny_sd15.latent_multiple
    assert seen[0] == (1, 3, side, side)
    _, _, h, w = seen[1]
    assert w % multiple == 0 and h % multiple == 0 and w / h > 2  # a 3:1 texture stays wide
    assert json.loads(kept.info["parameters"])["reference_fit"] == "keep"
    assert json.loads(squashed.info["parameters"])["reference_fit"] == "squash"


def test_an_unknown_fit_is_one_line_naming_the_choices(tiny_sd15, data_dir):
    with pytest.raises(UserError, match="reference fit must be one of squash, keep"):
        ad.style_transfer(data_dir / "horse.jpg", data_dir / "wood-rings.jpg", model=tiny_sd15,
                          reference_fit="stretch", progress=False)


def test_masked_synthesis_crops_each_label_map_with_its_texture(tiny_sd15, tmp_path, monkeypatch):
    """A 3:1 texture whose label map (drawn at half size) marks its middle third: cut and resized alike."""
    from attndistill.tasks import textures

    texture = _wide(tmp_path)
    labels = np.zeros((40, 120, 3), dtype=np.uint8)
    labels[:, 40:80] = (255, 0, 0)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    target = np.zeros((64, 64, 3), dtype=np.uint8)
    target[:, 32:] = (255, 0, 0)
    Image.fromarray(target).save(tmp_path / "target.png")
    seen = {}
    real = textures.sample_label_init

    def spy(pixels, ids, *args, **kwargs):
        seen.update(pixels=pixels, ids=ids)
        return real(pixels, ids, *args, **kwargs)

    monkeypatch.setattr(textures, "sample_label_init", spy)
    out = textures.masked_texture_synthesis(texture, tmp_path / "labels.png", tmp_path / "target.png",
                                            model=tiny_sd15, steps=1, size=64, reference_fit="keep", progress=False)
    _, _, h, w = seen["pixels"].shape
    assert seen["ids"].shape == (1, h, w) and w / h > 2
    (_, _), [(left, _, right, _)] = reference_boxes([(240, 80)], "keep", tiny_sd15.native_size,
                                                    tiny_sd15.latent_multiple)
    red = (seen["ids"][0] != seen["ids"][0, 0, 0]).float().mean(0)  # per column: 1 where red (the corner is black)
    columns = red.nonzero().squeeze(1)
    start, end = ((px - left) / (right - left) * w for px in (80, 160))  # texture pixels 80-160 are red
    assert red[columns].min() == 1 and abs(columns[0] - start) <= 1 and abs(columns[-1] + 1 - end) <= 1
    assert json.loads(out[0].info["parameters"])["reference_fit"] == "keep"


def test_vae_tuning_takes_the_gradient_of_the_mean_one_image_at_a_time(tiny_sd15, monkeypatch):
    """Two images, one decoder backward each: the gradient of the mean loss of both in one batch.

    Plain SGD (lr 1) in place of Adam, whose first step turns the float noise of the biases before each
    GroupNorm (their true gradient is zero) into full steps."""
    monkeypatch.setattr(torch.optim, "Adam", torch.optim.SGD)
    images = torch.rand(2, 3, 32, 32)
    tuned = vae_tuning.tune_decoder(tiny_sd15.vae, images, steps=1, lr=1.0)
    ref = copy.deepcopy(tiny_sd15.vae).float().requires_grad_(False)
    x = images * 2 - 1
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean
    ref.decoder.requires_grad_(True)
    (ref.decode(z).sample - x).abs().mean().backward()
    for tuned_p, p in zip(tuned.decoder.parameters(), ref.decoder.parameters(), strict=True):
        torch.testing.assert_close(tuned_p, p - p.grad, atol=1e-6, rtol=0)


def test_vae_tuning_fits_every_reference(tiny_sd15, data_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(vae_tuning, "tune_decoder",
                        lambda vae, images, **kw: (seen.update(shape=images.shape), copy.copy(vae))[1])
    vae = ad.finetune_vae([data_dir / "wood-rings.jpg", data_dir / "horse.jpg"], model=tiny_sd15, steps=1)
    assert seen["shape"] == (2, 3, tiny_sd15.native_size, tiny_sd15.native_size)
    assert [n.rsplit("/", 1)[-1] for n in vae.attndistill_parameters["reference"]] == ["wood-rings.jpg", "horse.jpg"]
    assert vae.attndistill_parameters["reference_fit"] == "squash"


def test_masked_synthesis_names_the_colours_a_kept_crop_cuts_away(tiny_sd15, tmp_path):
    """With 'keep' the second texture is cut to the first's square: its only green region, at the left
    edge, is gone. One line names the colour, the maps and the way out (squash)."""
    from attndistill.tasks.textures import masked_texture_synthesis

    red, green = (255, 0, 0), (0, 255, 0)
    Image.new("RGB", (64, 64), red).save(tmp_path / "r1.png")
    strip = np.zeros((60, 240, 3), dtype=np.uint8)
    strip[:] = red
    strip[:, :50] = green
    Image.fromarray(strip).save(tmp_path / "r2.png")
    target = np.zeros((64, 64, 3), dtype=np.uint8)
    target[:] = red
    target[:, 32:] = green
    Image.fromarray(target).save(tmp_path / "target.png")
    textures = [_wide(tmp_path, "t1.png", (64, 64)), _wide(tmp_path, "t2.png", (240, 60))]
    with pytest.raises(UserError, match=r"#00ff00 of '.*target.png' keep no region in .*r1.png.*r2.png.* once cut "
                                        r"to the first texture's aspect .* or use reference fit squash"):
        masked_texture_synthesis(textures, [tmp_path / "r1.png", tmp_path / "r2.png"], tmp_path / "target.png",
                                 model=tiny_sd15, steps=1, size=64, reference_fit="keep", progress=False)


def test_keep_names_a_reference_that_loses_most_of_itself(caplog):
    sizes, names = [(1000, 250), (600, 150), (500, 500)], ["a.png", "b.png", "c.png"]
    with caplog.at_level(logging.WARNING, logger="attndistill.images"):
        reference_boxes(sizes, "keep", 512, 64, names=names)  # checks (batch dry-runs, label maps): silent
        assert not caplog.text
        reference_boxes(sizes, "keep", 512, 64, names=names, warn=True)  # where a run encodes them: once
    assert "reference 'c.png' keeps 25% of itself (500x125 of 500x500 px) once cut to the first reference's" \
        in caplog.text
    assert "b.png" not in caplog.text and "a.png" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attndistill.images"):  # alone: only keep's own limit cuts it
        reference_boxes([(4000, 16)], "keep", 512, 64, names=["strip.png"], warn=True)
    assert "reference 'strip.png' keeps 26% of itself (1024x16 of 4000x16 px) once cut to the most elongated " \
           "aspect reference fit 'keep' allows" in caplog.text and "first reference" not in caplog.text


def test_masked_synthesis_names_a_texture_that_loses_most_of_itself(tiny_sd15, tmp_path, caplog):
    """Masked synthesis encodes its cropped textures itself (not through encode_references): it warns too, once."""
    from attndistill.tasks.textures import masked_texture_synthesis

    textures = [_wide(tmp_path, "t1.png", (240, 60)), _wide(tmp_path, "t2.png", (64, 64))]
    for name, size, colour in (("r1.png", (240, 60), "red"), ("r2.png", (64, 64), "blue"),
                               ("target.png", (64, 64), "red")):
        Image.new("RGB", size, colour).save(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="attndistill.images"):
        masked_texture_synthesis(textures, [tmp_path / "r1.png", tmp_path / "r2.png"], tmp_path / "target.png",
                                 model=tiny_sd15, steps=1, size=64, reference_fit="keep", progress=False)
    assert caplog.text.count("t2.png' keeps 25% of itself") == 1 and "t1.png" not in caplog.text


def test_keep_refuses_a_reference_it_would_cut_to_a_sliver():
    with pytest.raises(UserError, match=r"reference 'thin.png' keeps only 1x20 px once cut to the first reference's "
                                        r"aspect .* or use reference fit squash"):
        reference_boxes([(20, 4000), (4000, 20)], "keep", 512, 64, names=["tall.png", "thin.png"])
    assert reference_boxes([(20, 4000), (4000, 20)], "squash", 512, 64, names=["tall.png", "thin.png"])


@pytest.mark.parametrize("task", ["texture_sampling", "expand_texture"])
def test_a_cropped_texture_is_named_once_also_when_vae_star_fits_it(tiny_sd15, tmp_path, caplog, monkeypatch, task):
    """VAE* crops the references as the run does: the run's warning is the only one."""
    from attndistill.tasks import generate, textures

    monkeypatch.setattr(vae_tuning, "tune_decoder", lambda vae, images01, **kw: vae)  # the crop is what counts
    refs = [_wide(tmp_path, "t1.png", (240, 60)), _wide(tmp_path, "t2.png", (64, 64))]
    options = {"model": tiny_sd15, "steps": 1, "iters": 0, "reference_fit": "keep", "tune_vae": True,
               "progress": False}
    with caplog.at_level(logging.WARNING, logger="attndistill.images"):
        if task == "texture_sampling":
            generate.texture_sampling(refs, size=64, **options)
        else:
            textures.expand_texture(refs, size=(96, 64), view=8, decode_tile=8, **options)
    assert caplog.text.count("t2.png' keeps 25% of itself") == 1
