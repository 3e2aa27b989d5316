"""Every performance switch keeps results: fast path == plain path (fp32, tiny model, CPU).

CUDA graphs need a GPU: their equality is checked by ``benchmarks/bench.py --compare``.
A note on tolerances: all switches give the same loss and gradient to float rounding (1e-7),
but Adam normalises gradients per element and the L1 losses have kinks, so over many steps
rounding differences grow; the latent comparisons therefore use schedules of a few dozen steps.
Content-initialised runs start on the content L1's kink; the engine gives targets that equal their
content latent an exactly-zero content term there, so the batch layout cannot pick its sign at the
first step. Later steps can still cross a kink by chance, which is why these checks use fixed seeds.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

import attndistill as ad
from attndistill.core.engine import Distiller
from attndistill.core.optimize import optimize_latents
from attndistill.model.perf import PerfOptions


@pytest.fixture
def model(tiny_sd15):
    yield tiny_sd15
    tiny_sd15.short_of_memory = False  # set by the out-of-memory remedy of some tests
    tiny_sd15.set_perf(PerfOptions())


@pytest.fixture
def model64(tiny_sd15_fp64):
    """The tiny model's UNet and VAE in float64 (the latents stay float32): see conftest's ``tiny_sd15_fp64``.
    The one-step loss and gradient of the same switches are compared in float32."""
    yield tiny_sd15_fp64
    tiny_sd15_fp64.set_perf(PerfOptions())


def _run(model, perf, init, z_ref, z_c, steps=30, iters=1):
    model.set_perf(perf)
    return optimize_latents(Distiller(model, content_weight=0.25), init, z_ref, content_latents=z_c, steps=steps,
                            iters=iters, lr=0.05, progress=False)


def _loss_and_gradient(d: Distiller, z_ref, z_c, z0) -> tuple[float, torch.Tensor]:
    """The loss of ``z0`` at t = 500 against (z_ref, z_c), and its gradient; the content term must take part."""
    with d:
        d.begin_timestep(torch.tensor(500), z_ref, z_c)
        z = z0.clone().requires_grad_(True)
        loss = d.loss(z)
        loss.backward()
        assert d.last_parts["content"].item() > 0
    return loss.item(), z.grad


def _assert_same_loss_and_gradient(first: tuple[float, torch.Tensor], second: tuple[float, torch.Tensor]) -> None:
    assert abs(first[0] - second[0]) < 1e-6
    torch.testing.assert_close(first[1], second[1], atol=1e-7, rtol=1e-5)


def test_one_batched_call_gives_the_same_loss_and_gradient(model):
    z_ref, z_c, z0 = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _assert_same_loss_and_gradient(*(_loss_and_gradient(Distiller(model, content_weight=0.25, fused=fused),
                                                         z_ref, z_c, z0) for fused in (False, True)))


def test_fused_switch_keeps_the_optimised_latent_and_image(model64):
    z_ref, z_c, init = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model64, PerfOptions.plain(), init, z_ref, z_c)
    fast = _run(model64, PerfOptions(fused=True, early_exit=False), init, z_ref, z_c)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(model64.decode(fast), model64.decode(plain), atol=1e-4, rtol=0)


def test_early_exit_is_exact(model):
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model, PerfOptions.plain(), z_c, z_ref, z_c, steps=10, iters=2)
    fast = _run(model, PerfOptions(fused=False, early_exit=True), z_c, z_ref, z_c, steps=10, iters=2)
    assert torch.equal(fast, plain)


def test_default_cpu_fast_path_gives_the_same_style_transfer_image(model, data_dir):
    images = {}
    for name, perf in (("plain", PerfOptions.plain()), ("fast", PerfOptions())):
        model.set_perf(perf)
        img = ad.style_transfer(data_dir / "horse.jpg", data_dir / "watercolor-cat.jpg", model=model, steps=10,
                                size=64, progress=False)
        images[name] = np.asarray(img, np.float32) / 255
    assert np.abs(images["fast"] - images["plain"]).max() <= 1e-4


def test_fused_texture_synthesis_gives_the_same_image(model, data_dir):
    images = {}
    for name, perf in (("plain", PerfOptions.plain()), ("fast", PerfOptions(fused=True))):
        model.set_perf(perf)
        img = ad.texture_synthesis(data_dir / "wood-rings.jpg", model=model, steps=10, size=64, progress=False)[0]
        images[name] = np.asarray(img, np.float32) / 255
    assert np.abs(images["fast"] - images["plain"]).max() <= 1e-4


def test_batched_targets_equal_one_by_one(model64):
    """Several targets of one reference optimised in one batch == each optimised alone."""
    model64.set_perf(PerfOptions.plain())
    z_ref, contents = torch.randn(1, 4, 8, 8), torch.randn(3, 4, 8, 8)
    batched = _run(model64, PerfOptions.plain(), contents, z_ref, contents, steps=10)
    for i in range(3):
        single = _run(model64, PerfOptions.plain(), contents[i:i + 1], z_ref, contents[i:i + 1], steps=10)
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-4, rtol=0)


def test_channels_last_keeps_the_optimised_latent_and_image(model64):
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model64, PerfOptions.plain(), z_c, z_ref, z_c)
    nhwc = _run(model64, replace(PerfOptions.plain(), channels_last=True), z_c, z_ref, z_c)
    assert model64.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(model64.decode(nhwc), model64.decode(plain), atol=1e-4, rtol=0)
    model64.set_perf(PerfOptions())
    assert model64.unet.conv_in.weight.is_contiguous()


def test_perf_switches_apply_and_revert(model):
    model.set_perf(PerfOptions(gradient_checkpointing=True, vae_tiling=True, attention_slicing=True))
    assert model.unet.is_gradient_checkpointing and model.vae.use_tiling
    assert any(type(p).__name__.startswith("Sliced") for p in model.unet.attn_processors.values())
    sample = model.vae.config.sample_size  # the tiny VAE's 64 px, under the 512 px tiles real VAEs get
    assert model.vae.tile_sample_min_size == min(sample, 512)
    model.set_perf(PerfOptions())
    assert not model.unet.is_gradient_checkpointing and not model.vae.use_tiling
    assert not any(type(p).__name__.startswith("Sliced") for p in model.unet.attn_processors.values())


def test_every_switch_that_changes_pixels_is_recorded():
    """What a result records under ``perf``: each switch whose kernels or batch shapes differ; the rest only
    move work in time or memory (graphs replay the same kernels, offload moves weights)."""
    from dataclasses import fields

    from attndistill.model.perf import PIXEL_SWITCHES, pixel_switches

    same_pixels = {"early_exit", "cuda_graphs", "lookahead_overlap", "gradient_checkpointing", "cpu_offload",
                   "offload_text_encoders"}
    assert set(PIXEL_SWITCHES) == {f.name for f in fields(PerfOptions)} - same_pixels
    assert pixel_switches(PerfOptions(lookahead_batch=4, vae_tiling=True)) == {"lookahead_batch": 4, "vae_tiling": True}
    assert pixel_switches(PerfOptions()) == {}


def test_vae_tiling_tiles_images_of_the_vae_s_own_sample_size(model, monkeypatch):
    """diffusers tiles only images larger than the VAE's sample size (SDXL's 1024²): tiles are capped."""
    import attndistill.model.perf as perf

    sample = model.vae.config.sample_size
    monkeypatch.setattr(perf, "VAE_TILE_PIXELS", sample // 2)
    tiled, tiled_decode = [], type(model.vae).tiled_decode
    monkeypatch.setattr(model.vae, "tiled_decode",
                        lambda z, **kw: tiled.append(z.shape) or tiled_decode(model.vae, z, **kw))
    z = torch.randn(1, 4, sample // model.vae_scale_factor, sample // model.vae_scale_factor)
    model.set_perf(PerfOptions(vae_tiling=True))
    assert model.vae.tile_sample_min_size == sample // 2
    image = model.decode(z)
    assert tiled and image.shape == (1, 3, sample, sample) and bool(image.isfinite().all())
    model.set_perf(PerfOptions())
    assert model.vae.tile_sample_min_size == sample and not model.vae.use_tiling


@pytest.mark.parametrize("graphs", [True, False])
def test_a_vae_call_out_of_memory_beside_cached_graphs_runs_again_without_them(model, monkeypatch, graphs):
    """SDXL's decode at 1024² peaks above the graphs' pools, which sit idle while it runs."""
    decode, calls, released = type(model.vae).decode, [], []

    def short_of_memory(z, **kwargs):
        calls.append(len(model.graphs))
        if model.graphs:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return decode(model.vae, z, **kwargs)

    monkeypatch.setattr(model.vae, "decode", short_of_memory)
    monkeypatch.setattr(type(model), "release_graphs", lambda self: released.append(1) or self.graphs.clear())
    if graphs:
        model.graphs[("stepper", "a shape")] = object()
    image = model.decode(torch.randn(1, 4, 8, 8))
    assert image.shape == (1, 3, 64, 64) and calls == ([1, 0] if graphs else [0]) and len(released) == graphs
    with pytest.raises(torch.cuda.OutOfMemoryError):  # still out of memory once they are dropped: the error stands
        model.graphs[("stepper", "a shape")] = object()
        monkeypatch.setattr(type(model), "release_graphs", lambda self: None)
        model.decode(torch.randn(1, 4, 8, 8))


def test_style_transfer_batch_returns_one_image_per_content(model, data_dir):
    import json

    contents = [data_dir / "horse.jpg", data_dir / "golden-gate.jpg"]
    images = ad.style_transfer_batch(contents, data_dir / "watercolor-cat.jpg", model=model, steps=2, size=64,
                                     progress=False)
    assert [img.size for img in images] == [(64, 64)] * 2
    assert [json.loads(img.info["parameters"])["content"] for img in images] == [str(c) for c in contents]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_style_transfer_batch_says_which_contents_it_stretches_to_the_firsts_aspect(model, data_dir, tmp_path,
                                                                                    caplog):
    """A single run says when its content is stretched; a batch stretched its later contents silently."""
    from PIL import Image

    wide = Image.open(data_dir / "horse.jpg").convert("RGB").resize((128, 64))
    wide.save(tmp_path / "wide.png")
    with caplog.at_level("WARNING", logger="attndistill"):
        images = ad.style_transfer_batch([data_dir / "horse.jpg", data_dir / "golden-gate.jpg", tmp_path / "wide.png",
                                          wide], data_dir / "watercolor-cat.jpg", model=model, steps=1, size=64,
                                         progress=False)
    assert [img.size for img in images] == [(64, 64)] * 4
    said = [r.getMessage() for r in caplog.records if "another aspect than the batch's first" in r.getMessage()]
    assert said == [f"content image {name} is 128x64, another aspect than the batch's first (768x754): it is "
                    "stretched 2.0 times to 64x64; optimise it in a batch of its own aspect to keep it"
                    for name in (f"'{tmp_path / 'wide.png'}'", "number 4")]  # golden-gate: about the same aspect
    caplog.clear()
    with caplog.at_level("WARNING", logger="attndistill"):  # a size of the wide one's aspect: the square is
        ad.style_transfer_batch([data_dir / "horse.jpg", wide], data_dir / "watercolor-cat.jpg", model=model, steps=1,
                                size=(128, 64), progress=False)  # stretched (said), the wide one is not
    assert not [r for r in caplog.records if "another aspect than the batch's first" in r.getMessage()]
    assert [r for r in caplog.records if "the size asked for is 128x64, another aspect" in r.getMessage()]


def test_style_transfer_batch_tiles_and_tunes_the_decoder_as_single_runs_do(tiny_sd15, data_dir, monkeypatch):
    """tile and tune_vae in a batch: one decoder tuned for all of it, results as one-by-one runs give them."""
    import json

    from attndistill.tasks import vae_tuning

    tunings = []
    real = vae_tuning.tune_decoder
    monkeypatch.setattr(vae_tuning, "tune_decoder",  # 3 steps instead of 75: the same mechanics, sooner
                        lambda *a, **kw: tunings.append(1) or real(*a, **{**kw, "steps": 3}))
    contents, style = [data_dir / "horse.jpg", data_dir / "golden-gate.jpg"], data_dir / "watercolor-cat.jpg"
    run = dict(model=tiny_sd15, steps=2, size=64, tile="x", tune_vae=True, progress=False)
    batched = ad.style_transfer_batch(contents, style, **run)
    assert len(tunings) == 1
    alone = [ad.style_transfer(c, style, **run) for c in contents]
    for a, b in zip(batched, alone, strict=True):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= 2
        recorded = json.loads(a.info["parameters"])
        assert (recorded["tile"], recorded["tune_vae"]) == ("x", True)


class _CountFeatureCalls:
    """Counts the Distiller's UNet feature calls and their batch sizes."""

    def __init__(self, monkeypatch):
        self.batches: list[int] = []
        original = Distiller.features

        def features(distiller, latents, t, **kwargs):
            self.batches.append(latents.shape[0])
            return original(distiller, latents, t, **kwargs)

        monkeypatch.setattr(Distiller, "features", features)


def test_static_buffer_path_equals_eager_optimisation(model):
    """The CUDA-graph code path (static buffers, reference program + iteration program), run uncaptured."""
    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    model.set_perf(PerfOptions())
    runs = [optimize_latents(Distiller(model, content_weight=0.25, static=static), z_c, z_ref, content_latents=z_c,
                             steps=10, iters=2, lr=0.05, progress=False) for static in (False, True)]
    torch.testing.assert_close(runs[1], runs[0], atol=1e-6, rtol=0)


def test_static_sampling_computes_the_reference_once_per_timestep(model, monkeypatch):
    from attndistill.core.sampling import sample

    z_ref, init = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    cond = model.null_condition()
    results, calls = [], []
    counter = _CountFeatureCalls(monkeypatch)
    for static in (False, True):
        counter.batches = []
        results.append(sample(Distiller(model, static=static), init, z_ref, cond=cond, steps=3, iters=3, lr=0.05,
                              generator=torch.Generator().manual_seed(7), progress=False))
        calls.append(len(counter.batches))
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)
    assert calls == [3 * (1 + 3)] * 2  # per timestep: one reference call, then one target call per iteration


@pytest.mark.parametrize("static", [False, True])
def test_view_batches_share_their_timesteps_reference(model, monkeypatch, static):
    """MultiDiffusion: one reference feature call per timestep, however many view batches."""
    from attndistill.core.multidiffusion import multidiffusion

    scheduler = model.ddim_scheduler(2)
    init = torch.randn(1, 4, 8, 14, generator=torch.Generator().manual_seed(1))
    counter = _CountFeatureCalls(monkeypatch)
    out = multidiffusion(Distiller(model, static=static), init, torch.randn(1, 4, 8, 8), scheduler=scheduler,
                         cond=model.null_condition(), iters=2, lr=0.05, view=8, stride=3, view_batch=2,
                         generator=torch.Generator().manual_seed(7), progress=False)
    assert out.isfinite().all()
    # 3 views in batches of 2 and 1: per timestep 1 reference call + 2 iterations x 2 batches
    assert counter.batches == [1, 2, 2, 1, 1] * 2


def test_compile_switch_keeps_the_optimised_latent_and_image(model, dynamo_eager):
    """``compile``: torch.compile of the ResNet/feed-forward blocks gives the plain path's result."""
    from attndistill.model.perf import COMPILED_BLOCKS

    limit_before = torch._dynamo.config.recompile_limit
    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)  # one shape: Dynamo traces each block less often
    plain = _run(model, PerfOptions.plain(), z_c, z_ref, z_c, steps=2)
    compiled = _run(model, replace(PerfOptions.plain(), compile=True), z_c, z_ref, z_c, steps=2)
    blocks = [m for m in model.unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert torch._dynamo.config.recompile_limit == limit_before  # raised inside the blocks' calls only
    torch.testing.assert_close(compiled, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.decode(compiled), model.decode(plain), atol=1e-4, rtol=0)
    model.set_perf(PerfOptions())
    assert all(m._compiled_call_impl is None for m in blocks)


@pytest.mark.parametrize("static", [False, True])
def test_lookahead_computes_several_timesteps_per_call_with_the_same_result(model64, monkeypatch, static):
    """``lookahead_batch``: reference and content features of upcoming timesteps in one call, same latent."""
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    results, calls = [], []
    counter = _CountFeatureCalls(monkeypatch)
    for batch in (1, 6, 5):
        model64.set_perf(replace(PerfOptions(), lookahead_batch=batch))
        counter.batches = []
        results.append(optimize_latents(Distiller(model64, content_weight=0.25, static=static), z_c, z_ref,
                                        content_latents=z_c, steps=5, iters=2, lr=0.05, progress=False))
        calls.append(counter.batches)
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)
    assert calls[0] == [2, 1, 1, 1] * 5  # per step on a CPU: references, content, then 2 target iterations
    assert calls[2] == calls[0]  # 5 rows hold one step of 3: each step computes its own, as without look-ahead
    # 6 rows = 2 timesteps of (2 references + 1 content) per call: 3 look-ahead calls for 5 steps
    assert [b for b in calls[1] if b != 1] == [6, 6, 3]
    assert calls[1].count(1) == 5 * 2  # only the targets' own calls remain, one per iteration


def test_automatic_speed_switches_are_on_for_cuda_only_and_look_ahead_fits_the_latent_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = PerfOptions()
    assert not auto.uses_channels_last(cpu) and auto.uses_channels_last(cuda)
    assert not replace(auto, channels_last=False).uses_channels_last(cuda)
    assert replace(auto, channels_last=True).uses_channels_last(cpu)
    assert auto.lookahead_rows(cpu, 64 * 64, 2) == 0
    assert auto.lookahead_rows(cuda, 64 * 64, 2) == 16  # SD 1.5 at 512²: 8 steps of reference + content
    assert auto.lookahead_rows(cuda, 128 * 128, 1) == 4  # SDXL at 1024²: 4 steps per call
    assert auto.lookahead_rows(cuda, 128 * 128, 3) == 0  # a call would hold one step: none
    assert auto.lookahead_rows(cuda, 64 * 64, 1, auto=False) == 0  # MultiDiffusion: off unless asked for
    assert replace(auto, lookahead_batch=4).lookahead_rows(cuda, 64 * 64, 1, auto=False) == 4
    assert replace(auto, lookahead_batch=16).lookahead_rows(cuda, 64 * 64, 9) == 0  # 8 contents + the style
    assert replace(auto, lookahead_batch=6).lookahead_rows(cpu, 64 * 64, 3) == 6
    assert PerfOptions.plain().lookahead_rows(cuda, 64 * 64, 1) == 0


def test_a_look_ahead_call_out_of_memory_goes_on_with_half_the_steps(model, monkeypatch):
    """Same features, each step's inputs made once and in order, and the smaller calls for the rest of the run."""
    from attndistill.core.lookahead import ReferenceLookahead

    model.set_perf(PerfOptions.plain())
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    steps = [900, 800, 700, 600, 500, 400, 300]
    counter = _CountFeatureCalls(monkeypatch)
    out, made, limit = {}, {}, {}
    features = ReferenceLookahead._features
    for fits in (12, 6):  # rows a call may have before it "runs out of memory"
        counter.batches, made[fits] = [], []

        def short_of_memory(self, inputs, n, fits=fits):
            if 3 * len(inputs) > fits:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return features(self, inputs, n)

        monkeypatch.setattr(ReferenceLookahead, "_features", short_of_memory)

        def inputs(i, fits=fits):
            made[fits].append(i)
            return steps[i], z_ref, z_c

        with Distiller(model, content_weight=0.25) as distiller:
            ahead = ReferenceLookahead(distiller, range(7), inputs, 12, pad=True)
            out[fits] = [ahead.at(i) for i in range(7)]
            limit[fits] = ahead.batch
        made[fits, "calls"] = counter.batches
    assert made[12, "calls"] == [12, 12] and made[6, "calls"] == [6, 6, 6, 6]  # the last ones filled up
    assert made[12] == made[6] == list(range(7))
    assert limit == {12: 12, 6: 6}  # 4 steps of 3 rows a call, then 2 once 4 did not fit
    for fitted, whole in zip(out[6], out[12], strict=True):
        assert fitted.t == whole.t
        for a, b in zip(fitted.features[0].keys + fitted.features[0].values + fitted.features[1],
                        whole.features[0].keys + whole.features[0].values + whole.features[1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with Distiller(model, content_weight=0.25) as distiller:  # one step a call that does not fit: the error stands
        monkeypatch.setattr(ReferenceLookahead, "_features", lambda *args: (_ for _ in ()).throw(
            torch.cuda.OutOfMemoryError("CUDA out of memory")))
        with pytest.raises(torch.cuda.OutOfMemoryError):
            ReferenceLookahead(distiller, range(2), lambda i: (steps[i], z_ref, z_c), 3).at(0)


def test_lookahead_pads_the_last_call_to_the_size_of_the_others_and_drops_the_copies(model, monkeypatch):
    """One batch shape per run (GPUs pay a set-up per new shape); the real steps' features are unchanged."""
    from attndistill.core.lookahead import ReferenceLookahead

    model.set_perf(PerfOptions.plain())
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    steps = [900, 700, 500, 300, 100]
    counter = _CountFeatureCalls(monkeypatch)
    seen, out = {}, {}
    for pad in (False, True):
        counter.batches = []
        distiller = Distiller(model, content_weight=0.25)
        with distiller:
            ahead = ReferenceLookahead(distiller, range(5), lambda i: (steps[i], z_ref, z_c), 6, pad=pad)
            out[pad] = [ahead.at(i) for i in range(5)]
        seen[pad] = counter.batches
    assert seen == {False: [6, 6, 3], True: [6, 6, 6]}  # 2 steps of 3 rows a call; the last one filled up
    for plain, padded in zip(out[False], out[True], strict=True):
        assert padded.t == plain.t
        reference, queries = padded.features
        for a, b in zip(reference.keys + reference.values + queries,
                        plain.features[0].keys + plain.features[0].values + plain.features[1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ReferenceLookahead(Distiller(model), range(2), None, 4).pad is False  # CPU: no set-up to save
    for ahead in out[True]:  # each step keeps only its own rows, not views of the whole call's features
        reference, queries = ahead.features
        for x in reference.keys + reference.values + queries:
            assert x.untyped_storage().nbytes() == x.numel() * x.element_size()


@pytest.mark.parametrize("task", ["optimise", "sample"])
def test_lookahead_overlap_issues_the_next_call_early_and_keeps_the_result(model, monkeypatch, task):
    """``lookahead_overlap``: the next call is made when the current one is taken (on a second CUDA
    stream on GPUs; here right away), so the UNet calls come in another order; results and noise do not."""
    from attndistill.core.sampling import sample

    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    results, calls = [], []
    counter = _CountFeatureCalls(monkeypatch)
    for overlap in (False, True):
        model.set_perf(replace(PerfOptions(), lookahead_batch=4, lookahead_overlap=overlap))
        counter.batches = []
        distiller = Distiller(model, content_weight=0.25)
        if task == "optimise":
            results.append(optimize_latents(distiller, z_c, z_ref, content_latents=z_c, steps=5, iters=2, lr=0.05,
                                            progress=False))
        else:
            results.append(sample(distiller, z_c.clone(), z_ref, cond=model.null_condition(), steps=5, iters=2,
                                  lr=0.05, adain=True, content_latents=z_c,
                                  generator=torch.Generator().manual_seed(7), progress=False))
        calls.append(counter.batches)
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)
    target = [1, 1]  # the target's two iterations (the denoising call records no features)
    # 4 rows = 2 steps of (reference + content) per call, 5 steps: calls of 4, 4 and 2 rows
    assert calls[0] == [4] + target * 2 + [4] + target * 2 + [2] + target
    assert calls[1] == [4, 4] + target * 2 + [2] + target * 2 + target  # each call one chunk early


def test_lookahead_with_a_reference_of_another_size(model64):
    z_ref, z_c = torch.randn(1, 4, 12, 8), torch.randn(1, 4, 8, 8)
    results = []
    for batch in (1, 4):
        model64.set_perf(replace(PerfOptions(), lookahead_batch=batch))
        results.append(optimize_latents(Distiller(model64, content_weight=0.25), z_c, z_ref, content_latents=z_c,
                                        steps=4, iters=1, lr=0.05, progress=False))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_lookahead_in_sampling_draws_the_same_noise_and_gives_the_same_result(model, monkeypatch, static):
    """Algorithm 2: noised references (and content) of upcoming steps drawn in order, features in one call."""
    from attndistill.core.sampling import sample

    z_ref, z_c, init = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    cond = model.null_condition()
    results, calls = [], []
    counter = _CountFeatureCalls(monkeypatch)
    for batch in (1, 4):
        model.set_perf(replace(PerfOptions(), lookahead_batch=batch))
        counter.batches = []
        results.append(sample(Distiller(model, content_weight=0.2, static=static), init, z_ref, cond=cond, steps=4,
                              iters=2, lr=0.05, adain=True, content_latents=z_c,
                              generator=torch.Generator().manual_seed(7), progress=False))
        calls.append(counter.batches)
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)
    assert calls[0] == [1, 1, 1, 1] * 4  # per step on a CPU: reference, content, 2 target iterations
    assert calls[1] == [4, 1, 1, 1, 1, 4, 1, 1, 1, 1]  # 2 steps of (reference + content) per call


def test_lookahead_in_multidiffusion_gives_the_same_canvas(model64):
    from attndistill.core.multidiffusion import multidiffusion

    init = torch.randn(1, 4, 8, 14, generator=torch.Generator().manual_seed(1))
    z_ref = torch.randn(1, 4, 8, 8)
    results = []
    for batch in (1, 2):
        model64.set_perf(replace(PerfOptions(), lookahead_batch=batch))
        results.append(multidiffusion(Distiller(model64), init, z_ref, scheduler=model64.ddim_scheduler(3),
                                      cond=model64.null_condition(), iters=2, lr=0.05, view=8, stride=3, view_batch=2,
                                      adain=True, generator=torch.Generator().manual_seed(7), progress=False))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)


def test_graph_cache_keeps_a_bounded_number_of_each_kind():
    """A long-lived process meets many shapes: old graphs go, and so do references no stepper uses."""
    from types import SimpleNamespace

    from attndistill.core.engine import MAX_CACHED_GRAPHS, evict_graphs

    shared = object()
    graphs = {("reference", 0): shared, ("reference", 1): object()}
    for i in range(MAX_CACHED_GRAPHS + 2):
        graphs[("stepper", i)] = SimpleNamespace(reference=shared)
        graphs[("predict", i)] = object()
    evict_graphs(graphs, "stepper")
    evict_graphs(graphs, "predict")
    assert [k[1] for k in graphs if k[0] == "stepper"] == list(range(2, MAX_CACHED_GRAPHS + 2))
    assert [k[1] for k in graphs if k[0] == "predict"] == list(range(2, MAX_CACHED_GRAPHS + 2))
    assert [k for k in graphs if k[0] == "reference"] == [("reference", 0)]


def test_lookahead_runs_the_feed_forward_layers_in_chunks_with_the_same_features(model, monkeypatch):
    """A look-ahead call is no-grad and many rows wide: its feed-forward layers (the largest transient)
    run a few rows at a time through diffusers' chunking, only inside the call, with the same features."""
    from attndistill.core import features as feature_module
    from attndistill.core.features import chunk_rows
    from attndistill.core.lookahead import ReferenceLookahead

    assert [chunk_rows(16, 64 * 64), chunk_rows(16, 128 * 128), chunk_rows(6, 64 * 64), chunk_rows(7, 64 * 64),
            chunk_rows(16, 32 * 32)] == [4, 1, 3, 1, 16]
    model.set_perf(replace(PerfOptions.plain(), feed_forward_chunks=True))
    Distiller(model)  # a model's first Distiller finds its attention layers by a probe call of one row: not here
    ff = next(m.ff for m in model.unet.modules() if hasattr(m, "set_chunk_feed_forward"))
    seen: list[int] = []
    hook = ff.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    features = {}
    try:
        for pixels in (10**9, 2 * 8 * 8):  # one chunk; chunks of 2 rows of 8x8 latents
            monkeypatch.setattr(feature_module, "FEED_FORWARD_CHUNK_PIXELS", pixels)
            seen.clear()
            with Distiller(model, content_weight=0.25) as distiller:
                ahead = ReferenceLookahead(distiller, range(3), lambda i: (900 - 300 * i, z_ref, z_c), 6)
                features[pixels] = [ahead.at(i).features for i in range(3)]
                chunks = list(seen)
                distiller.features(torch.randn(6, 4, 8, 8).requires_grad_(), torch.tensor(500))  # grad: whole
                grad_call = seen[len(chunks):]
                model.set_perf(PerfOptions.plain())  # the plain path (feed_forward_chunks=False): whole too
                seen.clear()
                with torch.no_grad():
                    distiller.features(torch.randn(6, 4, 8, 8), torch.tensor(500))
                plain_call = list(seen)
                model.set_perf(replace(PerfOptions.plain(), feed_forward_chunks=True))
            assert grad_call == [6] and plain_call == [6]
            assert chunks == ([6] if pixels > 10**6 else [2, 2, 2])
    finally:
        hook.remove()
    for (ref_a, q_a), (ref_b, q_b) in zip(features[10**9], features[2 * 8 * 8], strict=True):
        for a, b in zip(ref_a.keys + ref_a.values + q_a, ref_b.keys + ref_b.values + q_b, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # float32 rounding: 1.3e-6 seen


@pytest.mark.parametrize("switch", ["gradient_checkpointing", "attention_slicing"])
@pytest.mark.parametrize("early_exit", [False, True])
def test_memory_switches_keep_the_optimised_latent_and_image(model64, switch, early_exit):
    """Recomputing activations in the backward pass, or attention in slices, changes no result, also
    where the forward stops after the last captured layer (inside a checkpointed block)."""
    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model64, PerfOptions.plain(), z_c, z_ref, z_c, steps=10, iters=2)
    lean = _run(model64, replace(PerfOptions.plain(), early_exit=early_exit, **{switch: True}), z_c, z_ref, z_c,
                steps=10, iters=2)
    torch.testing.assert_close(lean, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(model64.decode(lean), model64.decode(plain), atol=1e-4, rtol=0)


def test_channels_last_norms_keep_the_optimised_latent_and_image(model64):
    """``channels_last_norms``: the UNet's GroupNorms in NHWC give the same latent and image."""
    from attndistill.model.group_norm import ChannelsLastGroupNorm

    def count(kind):
        return sum(type(m) is kind for m in model64.unet.modules())

    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    nhwc = replace(PerfOptions.plain(), channels_last=True)
    before = _run(model64, nhwc, z_c, z_ref, z_c)
    norms = count(torch.nn.GroupNorm)
    model64.set_perf(replace(nhwc, channels_last_norms=True))
    assert norms > 0 and count(ChannelsLastGroupNorm) == norms and count(torch.nn.GroupNorm) == 0
    layouts = []  # whether each norm call met NHWC memory, so took the new path
    for m in model64.unet.modules():
        if type(m) is ChannelsLastGroupNorm:
            m.register_forward_hook(lambda _m, args, _out: layouts.append(
                args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    after = _run(model64, replace(nhwc, channels_last_norms=True), z_c, z_ref, z_c)
    assert layouts and all(layouts)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    torch.testing.assert_close(model64.decode(after), model64.decode(before), atol=1e-4, rtol=0)
    model64.set_perf(replace(nhwc, channels_last_norms=True, compile=True))  # compile fuses its own norms
    assert count(ChannelsLastGroupNorm) == 0 and count(torch.nn.GroupNorm) == norms
    model64.set_perf(PerfOptions(channels_last_norms=True))  # on the CPU channels-last is off by default
    assert count(ChannelsLastGroupNorm) == 0


def test_compiled_norms_keep_the_optimised_latent_and_image(model64, aot_eager):
    """``compiled_norms``: GroupNorms (+ SiLU) as compiled programs give the same latent and image."""
    from attndistill.model.group_norm import CompiledGroupNorm

    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    nhwc = replace(PerfOptions.plain(), channels_last=True)
    before = _run(model64, nhwc, z_c, z_ref, z_c, steps=10)
    norms = sum(type(m) is torch.nn.GroupNorm for m in model64.unet.modules())
    after = _run(model64, replace(nhwc, compiled_norms=True), z_c, z_ref, z_c, steps=10)
    assert sum(type(m) is CompiledGroupNorm for m in model64.unet.modules()) == norms > 0
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    torch.testing.assert_close(model64.decode(after), model64.decode(before), atol=1e-4, rtol=0)
    model64.set_perf(replace(nhwc, compiled_norms=True, compile=True))  # compile fuses its own norms
    assert sum(type(m) is torch.nn.GroupNorm for m in model64.unet.modules()) == norms
    model64.set_perf(PerfOptions())


def test_layer_discovery_compiles_nothing(model, aot_eager):
    """Discovery runs the UNet once on a tiny latent: no compiled program is made for that shape."""
    from torch._dynamo.utils import counters

    from attndistill.core.features import discover_self_attention_layers

    model.set_perf(replace(PerfOptions.plain(), compiled_norms=True))
    before = counters["stats"]["unique_graphs"]
    vars(model.unet).pop("_attndistill_self_attention", None)  # found again, not from the cache
    assert len(discover_self_attention_layers(model.unet)) > 0
    assert counters["stats"]["unique_graphs"] == before
    model.set_perf(PerfOptions())


@pytest.mark.parametrize("failures,earlier,checkpointing,attempts_made,released_after", [
    (1, True, None, 2, [1]),  # the cached graphs go, and the second try fits
    (2, True, None, 3, [1, 0]),  # then checkpointing comes on (automatic), and the third fits
    (3, True, None, 3, [1, 0]),  # nothing left to try: eager
    (2, True, False, 2, [1]),  # checkpointing asked off: left off
    (1, False, None, 2, [0]),  # nothing cached: checkpointing first
    (1, False, False, 1, []),  # nothing at all to try: eager
])
def test_out_of_memory_in_graph_capture_makes_room_then_falls_back(model, monkeypatch, failures, earlier,
                                                                   checkpointing, attempts_made, released_after):
    """A capture that runs out of memory drops the cached graphs of other shapes (their pools hold memory
    nothing else can use), then turns automatic gradient checkpointing on, trying again after each; with
    nothing left to try it falls back to the eager path."""
    import attndistill.core.engine as engine
    from attndistill.core.stepper import EagerStepper

    attempts, released = [], []

    class Reference:
        def __init__(self, *args, **kwargs):
            attempts.append("reference")
            if attempts.count("reference") <= failures:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class Stepper:
        def __init__(self, distiller, shape, lr, reference, **kwargs):
            attempts.append("stepper")
            self.reference = reference

    def release_graphs(self):
        released.append(len(self.graphs))
        self.graphs.clear()

    model.set_perf(PerfOptions(gradient_checkpointing=checkpointing))
    monkeypatch.setattr(engine, "StaticReference", Reference)
    monkeypatch.setattr(engine, "StaticStepper", Stepper)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(type(model), "release_graphs", release_graphs)
    if earlier:
        model.graphs[("predict", "another shape")] = object()
    distiller = Distiller(model)
    distiller.cuda_graphs = distiller.static = True  # the capture path, without a GPU
    stepper = distiller._new_stepper(((1, 4, 8, 8), (1, 4, 8, 8), None, 0.05), 0.05)
    assert attempts.count("reference") == attempts_made and released == released_after
    fits = failures < attempts_made
    assert isinstance(stepper, Stepper) if fits else (type(stepper) is EagerStepper and not distiller.cuda_graphs)
    turned_on = checkpointing is None and attempts_made > 1 + earlier
    assert model.perf.gradient_checkpointing is turned_on
    assert bool(getattr(model.unet, "is_gradient_checkpointing", False)) is turned_on


def test_checkpointing_turned_on_mid_run_keeps_the_running_distiller_s_hooks(model):
    """The remedy for a capture out of memory changes the UNet's checkpointing flag only: a whole set_perf would
    put attention slicing's processors in place of the capture processors the running Distiller installed."""
    model.set_perf(PerfOptions(attention_slicing=True))
    z_ref, z = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with Distiller(model) as d:
        before = {type(p).__name__ for p in model.unet.attn_processors.values()}
        assert model.checkpoint_to_fit() and model.unet.is_gradient_checkpointing
        assert {type(p).__name__ for p in model.unet.attn_processors.values()} == before
        d.begin_timestep(torch.tensor(500), z_ref, None)
        d.compute_reference()
        z = z.requires_grad_()
        d.loss(z).backward()
        assert z.grad is not None and bool(z.grad.isfinite().all())
    assert not model.checkpoint_to_fit()  # once: on already
    model.set_perf(PerfOptions())  # automatic again, and still on: this model ran short of memory
    assert model.perf.gradient_checkpointing and model.short_of_memory


def test_a_reference_fed_by_look_ahead_has_buffers_but_no_program_of_its_own(model):
    """With look-ahead every timestep brings its features: the reference program is not captured (no graph
    pool holds a reference call's memory); its buffers keep their addresses, which the iteration graph reads."""
    from attndistill.core.stepper import StaticReference

    z_ref, z_c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with Distiller(model, content_weight=0.25) as d:
        def features(t, content):
            d.begin_timestep(t, z_ref, content)
            d.compute_reference()
            return d.reference, d.content_queries

        first, second = features(900, z_c), features(500, z_c * 2)
        program = StaticReference(d, tuple(z_ref.shape), tuple(z_c.shape), capture=True, fed=first)  # no GPU needed
        assert program.fed and program.call.graph is None
        buffers = program.call.out[0].keys + program.call.out[0].values + program.call.out[1]
        addresses = [b.data_ptr() for b in buffers]
        assert all(b.data_ptr() != f.data_ptr() for b, f in zip(buffers, first[0].keys + first[0].values + first[1],
                                                                  strict=True))
        program.load(d, 500, z_c * 2, second)
        for b, f in zip(buffers, second[0].keys + second[0].values + second[1], strict=True):
            torch.testing.assert_close(b, f, atol=0, rtol=0)
        program.update(d, 900, z_ref, z_c)  # a step without look-ahead: computed into the same buffers
        for b, f in zip(buffers, first[0].keys + first[0].values + first[1], strict=True):
            torch.testing.assert_close(b, f, atol=1e-6, rtol=0)
        assert [b.data_ptr() for b in program.call.out[0].keys + program.call.out[0].values
                + program.call.out[1]] == addresses
        assert d.reference.keys[0].data_ptr() == addresses[0]  # what the iteration reads


def test_static_path_takes_references_of_another_size_masked_and_in_views(model):
    """A reference latent of another size than the target's (a kept aspect, SDXL's native size beside
    64-latent views): the CUDA-graph code path, run uncaptured, gives the eager result, label masks included."""
    from attndistill.core.multidiffusion import multidiffusion

    z_ref, z_c = torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 8)
    ref_labels = torch.zeros(1, 8, 16, dtype=torch.long)
    ref_labels[..., 8:] = 1
    target_labels = torch.zeros(1, 8, 8, dtype=torch.long)
    target_labels[..., 4:] = 1
    model.set_perf(PerfOptions())
    masked = [optimize_latents(Distiller(model, content_weight=0.15, ref_labels=ref_labels,
                                         target_labels=target_labels, static=static),
                               z_c, z_ref, content_latents=z_c, steps=4, iters=2, lr=0.05, progress=False)
              for static in (False, True)]
    torch.testing.assert_close(masked[1], masked[0], atol=1e-6, rtol=0)
    init = torch.randn(1, 4, 8, 14, generator=torch.Generator().manual_seed(1))
    views = [multidiffusion(Distiller(model, static=static), init, z_ref, scheduler=model.ddim_scheduler(2),
                            cond=model.null_condition(), iters=2, lr=0.05, view=8, stride=3, view_batch=2,
                            generator=torch.Generator().manual_seed(7), progress=False) for static in (False, True)]
    torch.testing.assert_close(views[1], views[0], atol=1e-6, rtol=0)


def test_a_masked_run_keeps_no_graph_for_later_runs(model, monkeypatch):
    """Graphs of a run with its own label maps or mask are not cached, its reference graph neither: a long-lived
    process (web UI, batch) running them at many sizes would otherwise pile up their memory pools."""
    from attndistill.core import engine

    class Fake:
        def __init__(self, distiller, *shapes, reference=None, **kwargs):
            self.reference = reference

    monkeypatch.setattr(engine, "StaticReference", lambda *args, **kwargs: Fake(None))
    monkeypatch.setattr(engine, "StaticStepper", lambda d, shape, lr, reference, **kw: Fake(d, reference=reference))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    key = ((1, 4, 8, 8), (1, 4, 8, 8), None, 0.05)
    for mask, cached in ((torch.ones(1, 1, 8, 8), 0), (None, 3)):  # unmasked: the reference and two steppers
        model.graphs.clear()
        distiller = Distiller(model, update_mask=mask)
        distiller.cuda_graphs = distiller.static = True  # the capture path, without a GPU
        first = distiller._new_stepper(key, 0.05)
        second = distiller._new_stepper(key[:3] + (0.1,), 0.1)  # another lr: the same reference program
        assert first.reference is second.reference and len(model.graphs) == cached
    model.graphs.clear()


@pytest.mark.parametrize("early_exit,content_weight,checkpointing", [(True, 0.25, False), (False, 0.0, True)])
def test_compiled_loss_gives_the_same_loss_and_gradient_in_one_program(model, aot_eager, early_exit, content_weight,
                                                                        checkpointing):
    """``compiled_loss``: the target's forward and loss as one program give the eager loss and gradient;
    one program serves every timestep and later runs (no recompile), and masked AD stays uncompiled. With
    gradient checkpointing the features recorded inside recomputed blocks must not split the program into
    one per block (SDXL on small cards checkpoints by default)."""
    from torch._dynamo.utils import counters

    z_ref, z_c, z0 = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)

    def loss_and_grad(perf, t, **kwargs):
        model.set_perf(perf)
        with Distiller(model, content_weight=content_weight, **kwargs) as d:
            d.begin_timestep(torch.tensor(t), z_ref, z_c)
            z = z0.clone().requires_grad_(True)
            loss = d.loss(z)
            loss.backward()
            return loss.detach(), z.grad, d.last_parts

    plain = replace(PerfOptions.plain(), early_exit=early_exit, gradient_checkpointing=checkpointing)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for t in (700, 300):
        eager = loss_and_grad(plain, t)
        program = loss_and_grad(replace(plain, compiled_loss=True), t)
        torch.testing.assert_close(program[0], eager[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(program[1], eager[1], atol=1e-6, rtol=1e-5)
        assert program[2].keys() == eager[2].keys()
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one program: no graph break, no recompile
    assert sum(counters["graph_break"].values()) == breaks
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    masked = loss_and_grad(replace(plain, compiled_loss=True), 500, ref_labels=labels.expand(2, -1, -1),
                           target_labels=labels)
    assert torch.isfinite(masked[0]) and counters["stats"]["unique_graphs"] - graphs == 1


def test_compiled_loss_keeps_the_optimised_latent_and_image(model, dynamo_eager):
    """``compiled_loss`` in Algorithm 1, eager and over static buffers (the CUDA-graph path, uncaptured). Traced
    by Dynamo and run as traced: the program's gradient through AOT autograd (inductor's) is the one-program
    test's, which takes one trace where whole runs take several."""
    from torch._dynamo.utils import counters

    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = _run(model, PerfOptions.plain(), z_c, z_ref, z_c, steps=6)
    graphs = counters["stats"]["unique_graphs"]
    program = _run(model, replace(PerfOptions.plain(), compiled_loss=True), z_c, z_ref, z_c, steps=6)
    assert counters["stats"]["unique_graphs"] > graphs  # the loss did run as a program
    torch.testing.assert_close(program, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.decode(program), model.decode(plain), atol=1e-4, rtol=0)
    made = counters["stats"]["unique_graphs"]
    static = optimize_latents(Distiller(model, content_weight=0.25, static=True), z_c, z_ref, content_latents=z_c,
                              steps=6, iters=1, lr=0.05, progress=False)
    torch.testing.assert_close(static, plain, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == made  # the same program over static buffers: no second compile


def test_compiled_loss_and_calls_keep_sampling_and_multidiffusion(model, dynamo_eager):
    """``compiled_loss`` and ``compiled_calls`` (feature and denoising calls) in Algorithm 2 (static buffers, a
    fresh Adam each step) and in MultiDiffusion's views give the uncompiled latents (views of one at a time,
    which reuse the sampler's programs: each new shape costs a trace). Run as Dynamo traced them, as in
    ``test_compiled_loss_keeps_the_optimised_latent_and_image``."""
    from attndistill.core.multidiffusion import multidiffusion
    from attndistill.core.sampling import sample
    from attndistill.model.compiling import static_program

    z_ref, init, canvas = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 14)
    results = []
    for compiled in (False, True):
        model.set_perf(replace(PerfOptions(), compiled_loss=compiled, compiled_calls=compiled))
        sampled = sample(Distiller(model, static=True), init, z_ref, cond=model.null_condition(), steps=3, iters=2,
                         lr=0.05, adain=True, generator=torch.Generator().manual_seed(7), progress=False)
        expanded = multidiffusion(Distiller(model), canvas, z_ref, scheduler=model.ddim_scheduler(2),
                                  cond=model.null_condition(), iters=2, lr=0.05, view=8, stride=3, view_batch=1,
                                  generator=torch.Generator().manual_seed(7), progress=False)
        results.append((sampled, expanded))
        # the feature calls', the loss's and the denoising calls' programs (the last is what only sampling makes)
        assert static_program.cache_info().currsize == (3 if compiled else 0)
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_a_compiled_program_says_when_it_compiles_once_per_shape(model, untraced, caplog):
    """The first call of a whole-UNet program with new shapes compiles for minutes on a GPU while the progress
    bar stands still: it says so (INFO, which the CLI shows), once per shape, not at every step."""
    z_ref = torch.randn(1, 4, 8, 8)
    model.set_perf(replace(PerfOptions(), compiled_loss=True))
    with caplog.at_level(logging.INFO, logger="attndistill"):
        for side in (8, 8, 16):
            z = torch.randn(1, 4, side, side)
            optimize_latents(Distiller(model), z, z_ref, steps=3, iters=1, lr=0.05, progress=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling")]
    assert [line.split(":")[0] for line in said] == [
        "compiling the AD loss and its backward (--compiled-loss) for latents of 1×4×8×8",
        "compiling the AD loss and its backward (--compiled-loss) for latents of 1×4×16×16"]


def test_compiled_loss_fills_multidiffusions_last_view_batch_up_to_one_program(model64, dynamo_eager):
    """With ``compiled_loss``, views of 3 in batches of 2 run as 2 and 2 (a copy dropped), not 2 and 1: one
    program for the run instead of one per batch shape (minutes each on a GPU), and the same canvas."""
    from torch._dynamo.utils import counters

    from attndistill.core.multidiffusion import multidiffusion

    z_ref, canvas = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 14)
    results, programs = [], []
    for compiled in (False, True):
        model64.set_perf(replace(PerfOptions(), compiled_loss=compiled))
        graphs = counters["stats"]["unique_graphs"]
        results.append(multidiffusion(Distiller(model64), canvas, z_ref, scheduler=model64.ddim_scheduler(2),
                                      cond=model64.null_condition(), iters=2, lr=0.05, view=8, stride=3, view_batch=2,
                                      generator=torch.Generator().manual_seed(7), progress=False))
        programs.append(counters["stats"]["unique_graphs"] - graphs)
    assert programs == [0, 1]
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_compiled_calls_keep_the_result_in_one_program_per_call_shape(model, dynamo_eager, monkeypatch, static):
    """``compiled_calls``: the no-grad feature calls as programs give the uncompiled latent. Look-ahead calls
    are filled up to one shape (the last one too), so a run makes one program for them: 5 steps in calls of 2."""
    from torch._dynamo.utils import counters

    z_ref, z_c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    counter = _CountFeatureCalls(monkeypatch)
    results, calls = [], []
    for compiled_calls in (False, True):
        model.set_perf(replace(PerfOptions(), lookahead_batch=6, compiled_calls=compiled_calls))
        counter.batches = []
        graphs = counters["stats"]["unique_graphs"]
        results.append(optimize_latents(Distiller(model, content_weight=0.25, static=static), z_c, z_ref,
                                        content_latents=z_c, steps=5, iters=2, lr=0.05, progress=False))
        calls.append([b for b in counter.batches if b != 1])
    assert counters["stats"]["unique_graphs"] - graphs == 1  # the look-ahead calls' program
    assert calls == [[6, 6, 3], [6, 6, 6]]
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("refs", [1, 2])
def test_reference_and_content_in_one_call_give_the_same_loss_gradient_and_latent(model, model64, refs):
    """The no-grad call that computes reference keys/values and content queries together (on CUDA by default)
    equals two calls of their own: one loss and gradient eagerly (float32), and a run over static buffers (the
    UNet in float64: see ``model64``)."""
    z_ref, z_c, z0 = torch.randn(refs, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    model.set_perf(PerfOptions(fused=False))
    model64.set_perf(PerfOptions(fused=False))
    results, latents = [], []
    for together in (False, True):
        eager, static = Distiller(model, content_weight=0.25), Distiller(model64, content_weight=0.25, static=True)
        eager.batch_references = static.batch_references = together
        results.append(_loss_and_gradient(eager, z_ref, z_c, z0))
        latents.append(optimize_latents(static, z0, z_ref, content_latents=z_c, steps=5, iters=2, lr=0.05,
                                        progress=False))
    _assert_same_loss_and_gradient(*results)
    torch.testing.assert_close(latents[0], latents[1], atol=1e-4, rtol=0)
    assert (latents[0] - z0).abs().max() > 1e-2
