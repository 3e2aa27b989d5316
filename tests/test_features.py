"""Feature capture and layer discovery."""

from __future__ import annotations

import pytest
import torch

from attndistill.core.features import capture, default_layers, discover_self_attention_layers
from attndistill.testing import full_size_unet


def _unet_out(model, z, t):
    return model.predict(z, t, model.null_condition())


def test_capture_output_equals_default_processor(tiny_sd15):
    model = tiny_sd15
    z = torch.randn(2, 4, 16, 24)
    t = torch.tensor(500)
    with torch.no_grad():
        plain = _unet_out(model, z, t)
        layers = range(len(discover_self_attention_layers(model.unet)))
        with capture(model.unet, layers) as store:
            captured = _unet_out(model, z, t)
            feats = store.take()
    assert torch.equal(plain, captured)  # exactly, fp32
    assert len(feats) == len(layers)
    for f in feats:
        b, h, n, d = f.q.shape
        assert b == 2 and f.k.shape == f.v.shape == f.o.shape == (b, h, n, d)
        ref = torch.softmax(f.q @ f.k.transpose(-1, -2) / d**0.5, dim=-1) @ f.v
        torch.testing.assert_close(f.o, ref, atol=1e-5, rtol=1e-5)


def test_capture_restores_processors_even_on_error(tiny_sd15):
    unet = tiny_sd15.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"), capture(unet, [0, 1]):
        raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_capture_rejects_unknown_layers(tiny_sd15):
    with pytest.raises(ValueError, match="do not exist"), capture(tiny_sd15.unet, [99]):
        pass


def test_tiny_models_layer_counts(tiny_sd15, tiny_sdxl):
    assert len(discover_self_attention_layers(tiny_sd15.unet)) == 7
    assert default_layers(tiny_sd15.unet) == (1, 2, 3, 4, 5, 6)
    names = discover_self_attention_layers(tiny_sd15.unet)
    assert all(n.endswith("attn1.processor") for n in names)


@pytest.mark.parametrize("config, count, last_six", [
    ("sd15-unet.json", 16, tuple(range(10, 16))),
    ("sdxl-unet.json", 70, tuple(range(64, 70))),
])
def test_full_size_layer_discovery_on_meta(configs_dir, config, count, last_six):
    unet = full_size_unet(configs_dir / config, device="meta")
    names = discover_self_attention_layers(unet)
    assert len(names) == count
    assert default_layers(unet) == last_six
    assert next(unet.parameters()).is_meta  # nothing allocated
    # call order: down blocks, then mid, then up
    assert names[0].startswith("down_blocks") and names[-1].startswith("up_blocks")


def test_a_call_keeping_part_of_each_layer_lets_the_rest_go_during_the_forward(tiny_sd15):
    """``Distiller.features(keep=...)``: what a layer's ``keep`` drops is freed before the forward ends,
    so a no-grad call over many rows never holds every row's queries, keys, values and outputs at once."""
    import gc
    import weakref

    from attndistill.core.engine import Distiller

    dropped: list[weakref.ref] = []
    alive_at_each_layer: list[int] = []

    def keep(f):
        gc.collect()
        alive_at_each_layer.append(sum(r() is not None for r in dropped))
        dropped.extend(weakref.ref(x) for x in (f.q, f.v, f.o))
        return f.k.clone()

    with Distiller(tiny_sd15) as distiller, torch.no_grad():
        keys = distiller.features(torch.randn(3, 4, 8, 8), torch.tensor(500), keep=keep)
        full = distiller.features(torch.randn(3, 4, 8, 8), torch.tensor(500))
    assert len(keys) == len(distiller.layers) and all(k.shape[0] == 3 for k in keys)
    assert alive_at_each_layer == [0] * len(keys)  # the earlier layers' dropped tensors were already freed
    assert all(isinstance(f.o, torch.Tensor) for f in full)  # without keep: every layer's four tensors


def test_feed_forward_chunks_come_back_as_the_caller_set_them(tiny_sd15):
    from attndistill.core.features import feed_forward_chunks

    blocks = [m for m in tiny_sd15.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    ff = blocks[0].ff
    seen: list[tuple[int, ...]] = []
    hook = ff.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    blocks[0].set_chunk_feed_forward(32, dim=1)  # a user's own chunking: 32 tokens at a time
    try:
        with torch.no_grad():
            with feed_forward_chunks(blocks, 1):
                tiny_sd15.predict(torch.randn(2, 4, 8, 8), torch.tensor(500), tiny_sd15.null_condition())
            inside, seen[:] = list(seen), []
            tiny_sd15.predict(torch.randn(2, 4, 8, 8), torch.tensor(500), tiny_sd15.null_condition())
    finally:
        blocks[0].set_chunk_feed_forward(None, dim=0)
        hook.remove()
    assert inside == [(1, 64), (1, 64)]  # one row at a time inside
    assert seen == [(2, 32), (2, 32)]  # the user's chunks afterwards


def test_a_denoising_call_of_ones_own_runs_whole_inside_paused(tiny_sd15):
    """A custom Algorithm 2 loop calls the UNet inside the block: without paused() it stops after the last
    recorded layer (early exit), which now says so; inside paused() it gives the UNet's own output."""
    from attndistill import Distiller, UserError

    z, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        plain = _unet_out(tiny_sd15, z, t)
        with Distiller(tiny_sd15) as distiller:
            with pytest.raises(UserError, match=r"make a call of your own \(a denoising step\) inside 'with "
                                                r"distiller.paused\(\):'"):
                _unet_out(tiny_sd15, z, t)
            with distiller.paused():
                paused = _unet_out(tiny_sd15, z, t)
    assert torch.equal(paused, plain)
    with pytest.raises(UserError, match="call it inside one"):
        Distiller(tiny_sd15).paused()


def test_a_loop_of_ones_own_is_checked_and_conditioned_on_its_latents_size(tiny_sdxl):
    """SDXL's null conditioning carries the output size (ALGORITHM.md §1): the README's loop took the native
    size's; and a timestep or latents a UNet cannot take ended deep inside it."""
    from attndistill import Distiller, UserError

    gen = torch.Generator().manual_seed(0)
    z_ref, z = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 12, generator=gen)
    losses = []
    for explicit in (False, True):
        with Distiller(tiny_sdxl, layers="0-1") as distiller:
            if explicit:
                distiller.condition_on(z.shape[-2:])  # what every task does
            distiller.begin_timestep(500, z_ref)
            losses.append(float(distiller.loss(z)))
    assert losses[0] == losses[1]
    for static in (False, True):  # Adam steps of one's own too, on the CUDA-graph code path as well (uncaptured)
        runs = []
        for explicit in (False, True):
            with Distiller(tiny_sdxl, layers="0-1", static=static) as distiller:
                if explicit:
                    distiller.condition_on(z.shape[-2:])
                runs.append(distiller.adam_steps(z, tiny_sdxl.timestep(500), z_ref, None, iters=2, lr=0.05,
                                                 fresh=True)[0])
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with Distiller(tiny_sdxl, layers="0-1", content_weight=0.5) as distiller:
        for t, message in (("500", "the timestep must be a number in 0..1000, not a str"),
                           (1001, r"timestep 1001 is outside the model's range 0..1000"),
                           (-3, "timestep -3 is outside"), (torch.tensor([1, 2]), "must be one number")):
            with pytest.raises(UserError, match=message):
                distiller.begin_timestep(t, z_ref)
        with pytest.raises(UserError, match=r"reference latents must have the shape \(B, 4, h, w\).* not "
                                            r"\(1, 3, 8, 8\)"):
            distiller.begin_timestep(500, torch.zeros(1, 3, 8, 8))
        with pytest.raises(UserError, match="content latents must be a torch tensor .* not a ndarray"):
            distiller.begin_timestep(500, z_ref, z.numpy())
        # what a helper found raising raw errors deep inside (a reshape of 0 elements, max() of an empty list)
        with pytest.raises(UserError, match=r"reference latents must have the shape .* not \(0, 4, 8, 8\)"):
            distiller.begin_timestep(500, torch.zeros(0, 4, 8, 8))
        with pytest.raises(UserError, match="reference latents must be floating point, .* not torch.int64"):
            distiller.begin_timestep(500, torch.zeros(1, 4, 8, 8, dtype=torch.long))
        distiller.begin_timestep(500, z_ref, torch.zeros(1, 4, 8, 8))
        with pytest.raises(UserError, match="content latents of 8x8 do not match target latents of 8x12"):
            distiller.loss(z)
