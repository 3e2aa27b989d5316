"""``mask``: restyle a region of the content only (beyond the paper; attndistill.tasks.regions)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import attndistill as ad
from attndistill.core.engine import Distiller
from attndistill.core.optimize import optimize_latents
from attndistill.errors import UserError
from attndistill.model.perf import PerfOptions
from attndistill.tasks.regions import load_mask, update_mask


@pytest.fixture
def left_half(tmp_path, data_dir):
    """White over the left half of horse.jpg (768x754), black elsewhere."""
    w, h = Image.open(data_dir / "horse.jpg").size
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "mask.png"


@pytest.mark.parametrize("static", [False, True])
def test_the_latent_changes_inside_the_mask_only(tiny_sd15, static):
    """Eager and CUDA-graph code paths (the latter uncaptured): cells outside keep their start exactly."""
    tiny_sd15.set_perf(PerfOptions())
    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    region = torch.zeros(1, 1, 8, 8)
    region[..., :, :3] = 1
    z = optimize_latents(Distiller(tiny_sd15, content_weight=0.25, update_mask=region, static=static), z_c, z_ref,
                         content_latents=z_c, steps=4, iters=2, lr=0.05, progress=False)
    assert torch.equal(z[..., 3:], z_c[..., 3:])
    assert (z[..., :3] - z_c[..., :3]).abs().amin(dim=(0, 1, 2)).gt(0).all()  # every column inside moved


def test_cells_follow_the_mask_at_the_latents_size():
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 20, 32))  # cells 0-1 wholly white; cell 2 (16-24 px) half white, which is not more
    cells = update_mask(mask, (64, 32), 8, "m.png")
    assert cells.shape == (1, 1, 4, 8) and cells[0, 0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(UserError, match="mask 'm.png' marks no region of at least 8x8 px of the 64x32 result"):
        update_mask(Image.new("L", (64, 32), 0), (64, 32), 8, "m.png")


def test_style_transfer_keeps_the_content_outside_the_mask(tiny_sd15, data_dir, left_half):
    kw = dict(model=tiny_sd15, steps=2, size=128, progress=False)
    out = ad.style_transfer(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", mask=left_half, **kw)
    content = Image.open(data_dir / "horse.jpg").convert("RGB").resize(out.size, Image.Resampling.LANCZOS)
    a, b = np.asarray(out, np.float32), np.asarray(content, np.float32)
    w = out.width
    assert np.array_equal(a[:, w // 2 + 6:], b[:, w // 2 + 6:])  # past the feathered edge
    assert np.abs(a[:, : w // 2 - 6] - b[:, : w // 2 - 6]).mean() > 5  # restyled
    assert json.loads(out.info["parameters"])["mask"] == str(left_half)


def test_mask_errors_name_the_mask_and_the_fix(tiny_sd15, data_dir, tmp_path, left_half):
    run = dict(model=tiny_sd15, steps=1, size=64, progress=False)
    Image.new("L", (300, 100), 255).save(tmp_path / "wide.png")
    with pytest.raises(UserError, match=r"mask '.*wide.png' is 300x100 but the structure image is 768x754; paint"):
        ad.appearance_transfer(data_dir / "horse.jpg", data_dir / "wood-rings.jpg", mask=tmp_path / "wide.png", **run)
    with pytest.raises(UserError, match="a mask keeps the content outside it, which does not tile"):
        ad.appearance_transfer(data_dir / "horse.jpg", data_dir / "wood-rings.jpg", mask=left_half, tile="x", **run)


def test_the_cli_takes_a_mask_and_info_job_reruns_it(tiny_sd15_dir, data_dir, tmp_path, left_half):
    from typer.testing import CliRunner

    from attndistill.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    first = invoke("style", data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", "--mask", left_half,
                   "--steps", "1", "--size", "64", "-m", tiny_sd15_dir, "-o", tmp_path / "first.png", "-q")
    assert first.exit_code == 0, first.output
    line = json.loads(invoke("info", tmp_path / "first.png", "--job").stdout)
    assert line["mask"] == str(left_half)
    (tmp_path / "jobs.jsonl").write_text(json.dumps({**line, "output": "rerun.png"}) + "\n")
    assert invoke("batch", tmp_path / "jobs.jsonl", "--out", tmp_path / "out", "-q").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "first.png")),
                          np.asarray(Image.open(tmp_path / "out" / "rerun.png")))
    tiled = invoke("style", data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", "--mask", left_half,
                   "--tile", "x", "-m", tmp_path / "no-such-model", "-o", tmp_path / "t.png", "-q")
    assert tiled.exit_code == 2 and "does not tile" in tiled.output  # before the model loads


def test_transparent_keeps_as_black_does_and_a_mask_with_no_white_is_refused(tmp_path, caplog):
    """White strokes on a transparent layer (a paint program's export) mean what they show, without the warning
    other inputs get that their transparent pixels are taken on white (the opposite of what a mask does)."""
    content = Image.new("RGB", (80, 40))
    strokes = Image.new("RGBA", (80, 40), (255, 255, 255, 0))  # white, but transparent
    strokes.paste((255, 255, 255, 255), (0, 0, 40, 40))
    grey = Image.new("L", (80, 40), 0)
    grey.paste(255, (0, 0, 40, 40))
    strokes.save(tmp_path / "strokes.png")
    assert np.array_equal(np.asarray(load_mask(tmp_path / "strokes.png", content)), np.asarray(grey))
    assert np.array_equal(np.asarray(load_mask(strokes, content)), np.asarray(grey))
    assert "transparent" not in caplog.text
    Image.new("RGBA", (80, 40), (255, 255, 255, 0)).save(tmp_path / "clear.png")
    with pytest.raises(UserError, match=r"mask '.*clear.png' has no white; paint the part to restyle white"):
        load_mask(tmp_path / "clear.png", content)


def test_a_batch_dry_run_refuses_what_the_task_would(tmp_path, data_dir, tiny_sd15_dir, left_half):
    from attndistill.batch.runner import dry_run

    Image.new("L", (768, 754), 0).save(tmp_path / "black.png")
    lines = [{"task": "style", "content": str(data_dir / "horse.jpg"), "style": str(data_dir / "wood-rings.jpg"),
              "mask": str(mask), **extra, "model": str(tiny_sd15_dir)}
             for mask, extra in ((tmp_path / "black.png", {}), (left_half, {"tile": "x"}), (left_half, {}))]
    lines.append({"task": "texture", "reference": [str(data_dir / "wood-rings.jpg")] * 2, "model": str(tiny_sd15_dir),
                  "ref_labels": [str(left_half)], "target_labels": str(left_half)})  # masked: one map for two
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    lines = []
    assert dry_run(tmp_path / "jobs.jsonl", tmp_path / "out", log=lines.append) == 3
    text = "\n".join(lines)
    assert "has no white" in text and "does not tile" in text and "1 ready" in text
    assert "2 texture image(s) but 1 reference label map(s)" in text


def test_grey_is_white_from_half_up_in_the_cells_and_the_paste_alike():
    """A soft brush gives no ghost: the paste takes the result fully where the latent cells changed."""
    content = Image.new("RGB", (64, 32))
    mask = Image.new("L", (64, 32), 127)
    mask.paste(128, (0, 0, 32, 32))
    kept = load_mask(mask, content)
    assert set(np.unique(np.asarray(kept)).tolist()) == {0, 255} and np.asarray(kept)[:, :32].min() == 255
    with pytest.raises(UserError, match="has no white"):
        load_mask(Image.new("L", (64, 32), 127), content)


def test_a_mask_at_the_full_size_of_a_photo_over_the_pixel_limit_is_taken(tmp_path, monkeypatch):
    """A JPEG over the pixel limit decodes smaller; its mask, painted at the photo's full size, is taken up to
    twice the limit (Pillow's own hard limit), in the task and in the checks before loading. The pixel limit
    is scaled down here so that the test images stay small."""
    from attndistill import images
    from attndistill.batch.check import Validator

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    mask = Image.new("L", (150, 100))  # 15,000 pixels: over the limit, under twice it
    mask.paste(255, (0, 0, 75, 100))
    mask.save(tmp_path / "mask.png")
    taken = load_mask(tmp_path / "mask.png", Image.new("RGB", (75, 50)))
    assert taken.size == (150, 100) and np.asarray(taken)[:, :75].min() == 255
    with pytest.raises(UserError, match="declares too many pixels"):  # any other image of that size: refused
        images.load_image(tmp_path / "mask.png", what="content image")
    validator = Validator(tmp_path / "out")
    validator._image(str(tmp_path / "mask.png"), "mask")


def test_a_mask_painted_over_a_very_wide_content_is_taken(tmp_path):
    """The painter never shrinks the content below 64 px a side, and a pixel of rounding passes the aspect check."""
    from attndistill.webui.fields import content_to_paint_on, painted_mask

    Image.new("RGB", (2000, 60), (90, 90, 90)).save(tmp_path / "strip.png")
    surface = content_to_paint_on(str(tmp_path / "strip.png"))
    layer = surface["layers"][0]
    assert min(layer.size) >= 60 and abs(layer.width / layer.height - 2000 / 60) < 0.5
    layer.paste((255, 255, 255, 255), (0, 0, layer.width // 2, layer.height))
    kept = painted_mask(surface, tmp_path)
    assert load_mask(kept, Image.open(tmp_path / "strip.png")) is not None


def test_an_in_memory_mask_keeps_its_transparency_as_it_is_shown(tmp_path):
    """An image handed to the API is taken as it is (as load_image takes it), EXIF tag or not."""
    mask = Image.new("RGBA", (64, 32), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate a quarter turn" in the file's tag
    mask.save(tmp_path / "turned.png", exif=exif)
    kept = load_mask(Image.open(tmp_path / "turned.png"), Image.new("RGB", (64, 32)))
    assert np.asarray(kept).mean() == pytest.approx(127.5)


def test_a_batch_with_masks_matches_its_one_by_one_runs_and_batches_in_the_runner(tiny_sd15, tiny_sd15_dir, data_dir,
                                                                                  tmp_path, left_half):
    """One mask per content (None: all of it): each batched result keeps its own content outside its own mask."""
    contents = [data_dir / "horse.jpg", data_dir / "golden-gate.jpg"]
    run = dict(model=tiny_sd15, steps=2, size=64, progress=False)
    style = data_dir / "watercolor-cat.jpg"
    batched = ad.style_transfer_batch(contents, style, masks=[left_half, None], **run)
    alone = [ad.style_transfer(contents[0], style, mask=left_half, **run), ad.style_transfer(contents[1], style, **run)]
    for a, b in zip(batched, alone, strict=True):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= 2
    content = np.asarray(Image.open(contents[0]).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(batched[0])[:, 32 + 6:], content[:, 32 + 6:])
    assert [json.loads(img.info["parameters"]).get("mask") for img in batched] == [str(left_half), None]
    with pytest.raises(UserError, match="masks has 1 entry for 2 content images"):
        ad.style_transfer_batch(contents, style, masks=[left_half], **run)
    with pytest.raises(UserError, match="masks takes a list .* in the contents' order"):  # not the dict's keys
        ad.style_transfer_batch(contents, style, masks={str(c): left_half for c in contents}, **run)

    from attndistill.batch.runner import _batches, read_jobs

    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps({"task": "style", "content": str(c), "style": str(style), "size": "64x64",
                                             "steps": 2, **m}) + "\n"
                                 for c, m in zip(contents, [{"mask": str(left_half)}, {}], strict=True)))
    assert [len(chunk) for chunk in _batches(read_jobs(jobs_file, out_dir=tmp_path / "out"), 8)] == [2]
