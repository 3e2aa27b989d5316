"""Masked (controllable) texture synthesis: labels from colour maps, no attention across labels, label-wise init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import attndistill as ad
from attndistill.core import engine
from attndistill.core.engine import Distiller
from attndistill.core.features import discover_self_attention_layers
from attndistill.core.losses import ideal_attention
from attndistill.tasks import textures
from attndistill.tasks.textures import label_maps, masked_texture_synthesis, sample_label_init

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _map(size, regions):
    """A flat-colour label map (w, h) with ``regions``: [(box (x0, y0, x1, y1) in 0..1, colour)]."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    for (x0, y0, x1, y1), colour in regions:
        arr[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = colour
    return Image.fromarray(arr)


@pytest.fixture
def maps(tmp_path, data_dir):
    ref = Image.open(data_dir / "wood-rings.jpg")
    ref_labels = _map(ref.size, [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), BLUE)])  # left | right
    target = _map((128, 64), [((0, 0, 1, 0.5), BLUE), ((0, 0.5, 1, 1), RED)])  # top / bottom, non-square
    ref_labels.save(tmp_path / "ref-labels.png")
    target.save(tmp_path / "target-labels.png")
    return data_dir / "wood-rings.jpg", tmp_path / "ref-labels.png", tmp_path / "target-labels.png"


def test_colours_become_shared_labels():
    a = _map((8, 4), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), BLUE)])
    b = _map((4, 4), [((0, 0, 1, 1), BLUE)])
    (ma, mb), colours = label_maps([a, b], ["a", "b"])
    assert colours == ["#0000ff", "#ff0000"]
    assert ma[0, 0] == 1 and ma[0, -1] == 0 and (mb == 0).all()


def test_a_photo_is_not_a_label_map(data_dir):
    with pytest.raises(ad.UserError, match=r"'horse.jpg' has \d+ colours, \d+ of them with no flat area \(lines "
                                           r"and specks, as smoothing and JPEG leave\); a label map needs flat "
                                           r"colours"):
        label_maps([Image.open(data_dir / "horse.jpg")], ["horse.jpg"])


def _grid(cells: int, side: int = 4) -> Image.Image:
    """A flat map of ``cells`` distinct colours in squares of ``side`` pixels: a segmentation's many classes."""
    cols = 20
    arr = np.full(((cells + cols - 1) // cols * side, cols * side, 3), (0, 1, 7), np.uint8)  # spare: cell 0's
    for i in range(cells):
        r, c = divmod(i, cols)
        arr[r * side:(r + 1) * side, c * side:(c + 1) * side] = (i % 256, i // 256 * 40 + 1, 7)
    return Image.fromarray(arr)


def test_a_flat_map_may_have_many_labels_but_not_a_photo_s_count():
    """More than 32 colours is no sign of smoothing when each is a region (a segmentation's classes); the cap is
    on labels, and a smoothed map is told apart by its colours that only line region edges."""
    maps, colours = label_maps([_grid(40)], ["classes.png"])
    assert len(colours) == 40 and len(np.unique(maps[0])) == 40
    assert len(label_maps([_grid(textures.MAX_LABELS)], ["m"])[1]) == textures.MAX_LABELS
    with pytest.raises(ad.UserError, match=f"'many.png' has {textures.MAX_LABELS + 1} colours, more than the "
                                           f"{textures.MAX_LABELS} labels a map may have"):
        label_maps([_grid(textures.MAX_LABELS + 1)], ["many.png"])
    big = Image.new("RGB", (512, 512), RED)  # three regions with round edges, drawn 8x and scaled down smoothly
    ImageDraw.Draw(big).ellipse((40, 40, 300, 300), fill=GREEN)
    ImageDraw.Draw(big).ellipse((200, 220, 480, 500), fill=BLUE)
    with pytest.raises(ad.UserError, match=r"'smooth.png' has \d+ colours, \d+ of them with no flat area"):
        label_maps([big.resize((64, 64), Image.BOX)], ["smooth.png"])


def test_edge_only_colours_are_lines_not_regions():
    code = np.zeros((9, 9), np.int64)
    code[:, 4] = 1      # a one-pixel line: no pixel with four equal neighbours
    code[0:3, 6:9] = 2  # a 3x3 square in the corner: its middle pixel is interior
    code[8, 0:4] = 3    # a line along the border
    assert textures.edge_only_colours(code) == {1, 3}


def test_init_draws_pixels_only_from_the_matching_region():
    g = torch.Generator().manual_seed(0)
    ref_ids = torch.zeros(1, 16, 16, dtype=torch.long)
    ref_ids[:, :, 8:] = 1
    ref_pixels = torch.rand(1, 3, 16, 16, generator=g)  # every pixel distinct
    target_ids = torch.zeros(6, 10, dtype=torch.long)
    target_ids[3:] = 1
    out = sample_label_init(ref_pixels, ref_ids, target_ids, num=2, generator=g)  # (2, 3, 6, 10)
    assert out.shape == (2, 3, 6, 10)
    for label in (0, 1):
        allowed = {tuple(p) for p in ref_pixels[0].permute(1, 2, 0)[ref_ids[0] == label].tolist()}
        got = [tuple(p) for p in out.permute(0, 2, 3, 1)[:, target_ids == label].reshape(-1, 3).tolist()]
        assert set(got) <= allowed
        assert len(set(got)) > 10  # random draws, not one repeated pixel
    assert not torch.equal(out[0], out[1])


def test_masked_attention_never_crosses_labels_on_a_non_square_canvas(tiny_sd15, monkeypatch):
    side, (h, w) = 16, (8, 16)  # reference latent 16x16, target latent 8x16
    ref_ids = torch.zeros(1, side * 8, side * 8, dtype=torch.long)
    ref_ids[..., side * 4:] = 1  # reference: left 0 | right 1
    target_ids = torch.zeros(1, h * 8, w * 8, dtype=torch.long)
    target_ids[:, h * 4:] = 1  # target: top 0 / bottom 1
    seen = {}
    real_ad_loss = engine.ad_loss

    def spy(outputs, queries, keys, values, *, scale, masks):
        seen.update(queries=queries, keys=keys, masks=masks)
        return real_ad_loss(outputs, queries, keys, values, scale=scale, masks=masks)

    monkeypatch.setattr(engine, "ad_loss", spy)
    with torch.no_grad(), Distiller(tiny_sd15, ref_labels=ref_ids, target_labels=target_ids) as d:
        d.begin_timestep(torch.tensor(400), torch.randn(1, 4, side, side))
        d.loss(torch.randn(1, 4, h, w))
    grids = set()
    for q, k, mask in zip(seen["queries"], seen["keys"], seen["masks"], strict=True):
        n_t, n_r = q.shape[2], k.shape[2]
        lh = int((n_t // 2) ** 0.5)
        t_grid, r_side = (lh, 2 * lh), int(n_r ** 0.5)
        grids.add(t_grid)
        # labels at this layer's grids, computed here independently of the engine
        t_lab = F.interpolate(target_ids[None].float(), size=t_grid, mode="nearest-exact").long().reshape(-1)
        r_lab = F.interpolate(ref_ids[None].float(), size=(r_side, r_side), mode="nearest-exact").long().reshape(-1)
        onehot = F.one_hot(r_lab, 2).float()[None, None].expand(1, q.shape[1], -1, -1)  # (1, heads, N_r, 2)
        # the ideal output with one-hot values is the attention mass on each label
        mass = ideal_attention(q, k, onehot, mask=mask)  # (1, heads, N_t, 2)
        expected = F.one_hot(t_lab, 2).float()[None, None].expand_as(mass)
        torch.testing.assert_close(mass, expected, rtol=0, atol=1e-5)
        unmasked = ideal_attention(q, k, onehot)
        assert (unmasked - expected).abs().max() > 0.1  # without the mask attention does cross labels
    assert len(grids) >= 2  # several layer resolutions, all non-square


def test_masked_synthesis_on_a_non_square_canvas(tiny_sd15, maps, monkeypatch):
    ref, ref_labels, target_labels = maps
    seen = {}
    real = textures.optimize_latents

    def spy(distiller, init, ref_latents, **kw):
        seen.update(init=init, content=kw["content_latents"], weight=distiller.content_weight)
        return real(distiller, init, ref_latents, **kw)

    monkeypatch.setattr(textures, "optimize_latents", spy)
    out = masked_texture_synthesis(ref, ref_labels, target_labels, model=tiny_sd15, steps=2, size=(128, 64),
                                   progress=False)
    assert [o.size for o in out] == [(128, 64)]
    assert seen["content"] is seen["init"] and seen["weight"] == 0.15  # content loss on the initialisation
    params = json.loads(out[0].info["parameters"])
    assert params["task"] == "texture-masked" and params["content_weight"] == 0.15


def test_target_label_missing_from_reference_is_a_clear_error(tiny_sd15, maps, tmp_path):
    ref, ref_labels, _ = maps
    _map((64, 64), [((0, 0, 1, 0.5), RED), ((0, 0.5, 1, 1), GREEN)]).save(tmp_path / "green.png")
    with pytest.raises(ad.UserError, match="#00ff00"):
        masked_texture_synthesis(ref, ref_labels, tmp_path / "green.png", model=tiny_sd15, steps=1, progress=False)


def test_a_small_label_map_may_be_a_pixel_off_its_textures_aspect(tmp_path):
    """A 60x17 map over a 1000x290 texture is as close as 60 pixels get (17.4 rounds to 17), and 17x60 over
    290x1000: accepted."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (1000, 290), (90, 60, 30)).save(tmp_path / "wide.png")
    _map((60, 17), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), GREEN)]).save(tmp_path / "small-labels.png")
    _map((60, 17), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), GREEN)]).save(tmp_path / "target.png")
    check_label_maps(tmp_path / "wide.png", tmp_path / "small-labels.png", tmp_path / "target.png")
    for name, size in (("tall.png", (290, 1000)), ("tall-labels.png", (17, 60)), ("tall-target.png", (17, 60))):
        (Image.new("RGB", size, (90, 60, 30)) if name == "tall.png"
         else _map(size, [((0, 0, 1, 0.5), RED), ((0, 0.5, 1, 1), GREEN)])).save(tmp_path / name)  # turned
    check_label_maps(tmp_path / "tall.png", tmp_path / "tall-labels.png", tmp_path / "tall-target.png")
    _map((60, 19), [((0, 0, 1, 1), RED)]).save(tmp_path / "off.png")
    with pytest.raises(ad.UserError, match="draw the label map over the texture"):
        check_label_maps(tmp_path / "wide.png", tmp_path / "off.png", tmp_path / "target.png")


def test_a_size_of_another_aspect_than_the_target_map_is_refused(tmp_path):
    """The layout follows the target map: a (width, height) of another aspect would stretch it silently."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (64, 64), (90, 60, 30)).save(tmp_path / "texture.png")
    _map((64, 64), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), GREEN)]).save(tmp_path / "ref.png")
    _map((96, 64), [((0, 0, 1, 1), RED)]).save(tmp_path / "target.png")
    args = tmp_path / "texture.png", tmp_path / "ref.png", tmp_path / "target.png"
    for size in (None, 96, (96, 64), (767, 512)):  # long side, or the map's aspect to a pixel
        check_label_maps(*args, size=size)
    with pytest.raises(ad.UserError, match=r"target label map '.*target\.png' is 96x64 but the size asked for is "
                                           r"64x64, another aspect, which would stretch its layout"):
        check_label_maps(*args, size=(64, 64))


def test_16_bit_label_maps_keep_their_ids_apart(tmp_path):
    """Segmentation tools write label ids 0, 1, 2 as 16-bit pixels: each id is a region of its own, not a
    brightness that 8 bits round to black. Maps of one colour only are refused by name."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (64, 64), (90, 60, 30)).save(tmp_path / "texture.png")
    ids = np.zeros((64, 64), np.uint16)
    ids[:, 32:], ids[:32, :32] = 1, 2
    Image.fromarray(ids).save(tmp_path / "ref.png")
    target = np.zeros((32, 32), np.uint16)
    target[8:24, 8:24] = 1
    Image.fromarray(target).save(tmp_path / "target.png")
    assert Image.open(tmp_path / "ref.png").mode.startswith("I")
    _, _, maps, colours, _ = check_label_maps(tmp_path / "texture.png", tmp_path / "ref.png", tmp_path / "target.png")
    assert colours == ["#000000", "#000001", "#000002"]
    assert np.array_equal(maps[0], ids) and np.array_equal(maps[1], target)
    _map((64, 64), [((0, 0, 1, 1), RED)]).save(tmp_path / "red.png")
    with pytest.raises(ad.UserError, match=r"have one colour only, #ff0000; masked synthesis needs two regions"):
        check_label_maps(tmp_path / "texture.png", tmp_path / "red.png", tmp_path / "red.png")


def test_jpeg_label_maps_are_named_when_their_colours_do_not_match(tmp_path):
    """JPEG's compression adds colours no reference map has: the error says so, not only which colours."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (32, 32), (90, 60, 30)).save(tmp_path / "texture.png")
    _map((32, 32), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), GREEN)]).save(tmp_path / "ref.jpg", quality=70)
    _map((32, 32), [((0, 0, 1, 0.5), GREEN), ((0, 0.5, 1, 1), RED)]).save(tmp_path / "target.png", format="JPEG",
                                                                          quality=70)  # a JPEG by another name
    with pytest.raises(ad.UserError, match=r"that no reference label map has;.*ref\.jpg.*target\.png' are JPEG, "
                                           r"whose compression adds colours: save label maps as PNG"):
        check_label_maps(tmp_path / "texture.png", tmp_path / "ref.jpg", tmp_path / "target.png")


def test_anti_aliased_edges_are_named_when_their_colours_do_not_match(tmp_path):
    """A map drawn with smoothing has blends of two colours along its region edges: the error says so."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (64, 64), (90, 60, 30)).save(tmp_path / "texture.png")
    _map((64, 64), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), GREEN)]).save(tmp_path / "ref.png")
    target = np.asarray(_map((64, 64), [((0, 0, 1, 0.5), GREEN), ((0, 0.5, 1, 1), RED)])).copy()
    target[31] = (np.asarray(RED) + np.asarray(GREEN)) // 2  # one row of edge blend: 1.6% of the map
    Image.fromarray(target).save(tmp_path / "target.png")
    with pytest.raises(ad.UserError, match=r"uses colour\(s\) #7f7f00 .* they cover only 1\.6% of it, in lines "
                                           r"and specks with no flat area, as the blends of a map drawn or resized "
                                           r"with smoothing do"):
        check_label_maps(tmp_path / "texture.png", tmp_path / "ref.png", tmp_path / "target.png")


def test_a_small_region_missing_from_the_reference_is_named_as_a_region(tmp_path):
    """A deliberate region is no edge blend, however small: the hint says to paint it in a reference map."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (64, 64), (90, 60, 30)).save(tmp_path / "texture.png")
    _map((64, 64), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), GREEN)]).save(tmp_path / "ref.png")
    _map((100, 100), [((0, 0, 1, 1), RED), ((0.4, 0.4, 0.55, 0.55), BLUE)]).save(tmp_path / "target.png")
    with pytest.raises(ad.UserError, match=r"uses colour\(s\) #0000ff .* they are regions \(2\.2% of the map\): "
                                           r"paint a region of each in a reference label map"):
        check_label_maps(tmp_path / "texture.png", tmp_path / "ref.png", tmp_path / "target.png")


def test_a_greyscale_target_map_against_colour_reference_maps_is_named_so(tmp_path):
    """A red/blue target map saved in greyscale (mode L) read as two grey regions the references lack."""
    from attndistill.tasks.textures import check_label_maps

    Image.new("RGB", (64, 64), (90, 60, 30)).save(tmp_path / "texture.png")
    _map((64, 64), [((0, 0, 0.5, 1), RED), ((0.5, 0, 1, 1), BLUE)]).save(tmp_path / "ref.png")
    _map((64, 64), [((0, 0, 1, 0.5), BLUE), ((0, 0.5, 1, 1), RED)]).convert("L").save(tmp_path / "target.png")
    with pytest.raises(ad.UserError, match=r"the target map is greyscale and the reference label maps are in colour: "
                                           r"save the maps in the same colours$"):
        check_label_maps(tmp_path / "texture.png", tmp_path / "ref.png", tmp_path / "target.png")


def test_label_map_must_match_the_reference(tiny_sd15, maps, tmp_path):
    ref, _, target_labels = maps
    _map((64, 200), [((0, 0, 1, 1), RED)]).save(tmp_path / "tall.png")
    with pytest.raises(ad.UserError, match="draw the label map over the texture"):
        masked_texture_synthesis(ref, tmp_path / "tall.png", target_labels, model=tiny_sd15, steps=1,
                                 progress=False)
    with pytest.raises(ad.UserError, match="one reference label map per texture image"):
        masked_texture_synthesis([ref, ref], [tmp_path / "tall.png"], target_labels, model=tiny_sd15, steps=1,
                                 progress=False)


def test_sdxl_masked_features_use_the_output_size(tiny_sdxl, maps):
    ref, ref_labels, target_labels = maps
    discover_self_attention_layers(tiny_sdxl.unet)  # its probe call runs once per model, with zeros
    time_ids = []
    handle = tiny_sdxl.unet.register_forward_pre_hook(
        lambda m, a, kw: time_ids.append(kw["added_cond_kwargs"]["time_ids"][0].tolist()), with_kwargs=True)
    try:
        masked_texture_synthesis(ref, ref_labels, target_labels, model=tiny_sdxl, steps=1, size=(128, 64),
                                 progress=False)
    finally:
        handle.remove()
    assert time_ids and all(ids == [64, 128, 0, 0, 64, 128] for ids in time_ids)  # (h, w) of the output


def test_a_region_too_thin_for_a_token_grid_names_its_colour_and_the_files(tiny_sd15, maps, tmp_path):
    """A reference region that survives at pixel level but not at a coarser layer's token grid: the error names
    the colour, the label maps and the grid, not internal label numbers; it comes at the first step."""
    ref, _, target_labels = maps
    width = Image.open(ref).width
    _map(Image.open(ref).size, [((0, 0, 1, 1), RED), ((0.27, 0, 0.30, 1), BLUE)]).save(tmp_path / "stripe.png")
    with pytest.raises(ad.UserError, match=r"colour\(s\) #0000ff of '.*target-labels.png' keep no region in "
                                           r"'.*stripe.png' once resized to the model's \d+x\d+ token grid") as err:
        masked_texture_synthesis(ref, tmp_path / "stripe.png", target_labels, model=tiny_sd15, steps=1,
                                 size=(128, 64), progress=False)
    assert "[" not in str(err.value) and width > 0


def test_a_region_too_thin_for_several_layers_is_named_at_the_coarsest_grid_at_once(tiny_sd15, maps, tmp_path):
    """The advice (how wide to make the region) comes from the coarsest grid that loses it, not the first layer
    called: made that wide, a region passes every layer, instead of failing again at the next coarser one."""
    ref, _, target_labels = maps
    _map(Image.open(ref).size, [((0, 0, 1, 1), RED), ((0.27, 0, 0.28, 1), BLUE)]).save(tmp_path / "stripe.png")
    said = {}
    for layers in ([2], [1, 2]):  # the tiny UNet's middle layer (its coarsest grid), then a finer one called first
        with pytest.raises(ad.UserError, match="token grid") as err:
            masked_texture_synthesis(ref, tmp_path / "stripe.png", target_labels, model=tiny_sd15, steps=1,
                                     size=(128, 64), layers=layers, progress=False)
        said[len(layers)] = str(err.value)
    assert said[2] == said[1]


def test_masked_synthesis_follows_its_seed_and_tiles(tiny_sd15, maps, monkeypatch):
    seen = []

    def spy(distiller, init, ref_latents, **kw):
        seen.append((init.clone(), len(tiny_sd15.unet.conv_in._forward_pre_hooks)))
        return init

    monkeypatch.setattr(textures, "optimize_latents", spy)
    for seed, tile in ((1, None), (1, None), (2, None), (1, "xy")):
        out = masked_texture_synthesis(*maps, model=tiny_sd15, seed=seed, tile=tile, size=64,
                                       progress=False)[0]
        assert json.loads(out.info["parameters"])["seed"] == seed
    (first, plain), (again, _), (other, _), (tiled_init, tiled) = seen
    assert torch.equal(first, again) and not torch.equal(first, other)  # the init's label sampling is seeded
    assert plain == 0 and tiled == 1  # circular padding during the run only when asked
    assert torch.equal(first, tiled_init)


def test_a_label_map_with_transparent_pixels_is_refused(tmp_path):
    """Put on white as other images are, a see-through region read as a white region the map never drew."""
    from attndistill.images import load_image

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")  # RGBA, every pixel opaque: fine
    assert load_image(tmp_path / "opaque.png", what="target label map", labels=True).getpixel((0, 0)) == RED
    rgba[:20, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with pytest.raises(ad.UserError, match=rf"target label map '{tmp_path / 'holes.png'}' has transparent pixels "
                                           r"\(31\.2% of it\); a label map needs an opaque colour in every pixel"):
        load_image(tmp_path / "holes.png", what="target label map", labels=True)
    assert load_image(tmp_path / "holes.png", what="content image").getpixel((0, 0)) == (255, 255, 255)
