"""Algorithm 1 (ALGORITHM.md §1-3) written again from the spec alone, compared with the library.

The reference below uses only diffusers and PyTorch: its own attention processor on every ``attn1``,
its own losses, label masks, DDIM timesteps and Adam loop. Two correct implementations of the spec
must give the same latents on the same fp32 model.

Whole runs are compared, and they are sensitive: L1 has a kink at 0 and Adam's first steps are
about ``lr * sign(grad)``, so an element sitting on a kink can turn rounding noise into a visible
difference. The cases below are well conditioned (their reference moves by ~1e-5 when the input
moves by 1e-6); a failure reports that number, so an ill-conditioned case is told apart from a bug.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from spec_recording import recording

from attndistill.core.engine import Distiller
from attndistill.core.optimize import optimize_latents

TOL = 1e-4


def _grid(n, hw):
    """Token grid of a layer with ``n`` tokens for an (h, w) latent (each down block halves, rounding up)."""
    h, w = hw
    while h * w > n:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert h * w == n, (n, hw)
    return h, w


def _resize(labels, size):
    """(M, H, W) integer labels -> (M, h*w), nearest neighbour."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long().flatten(1)


class SpecAD:
    """Features, losses and the Algorithm 1 loop of ALGORITHM.md on a loaded model's UNet."""

    def __init__(self, model, layers=None):
        self.model = model
        with torch.no_grad():
            self.null = model.pipe.encode_prompt([""], model.device, 1, False)[0]  # empty prompt, no CFG
            self.count = len(self.run(torch.zeros(1, 4, 8, 8), 999, layers=None))  # numbering by running
        self.layers = tuple(range(self.count - 6, self.count)) if layers is None else tuple(layers)

    def run(self, z, t, layers=()):
        """One UNet call ``eps(z, t, null)``: (q, k, v, o) of ``layers`` (default the chosen ones; None: all)."""
        with recording(self.model.unet) as sink:
            self.model.unet(z, torch.tensor(int(t)), encoder_hidden_states=self.null.expand(z.shape[0], -1, -1),
                            return_dict=False)  # the noise prediction is discarded
        layers = self.layers if layers == () else range(len(sink)) if layers is None else layers
        return [sink[i] for i in layers]

    def targets(self, t, z_r, z_c, lam):
        """Per layer: reference keys/values, all references' tokens concatenated; content queries (or None)."""
        with torch.no_grad():
            per_ref = [self.run(z_r[i:i + 1], t) for i in range(z_r.shape[0])]  # one call per reference
            keys = [torch.cat([ref[li][1] for ref in per_ref], dim=2) for li in range(len(self.layers))]
            values = [torch.cat([ref[li][2] for ref in per_ref], dim=2) for li in range(len(self.layers))]
            content = [f[0] for f in self.run(z_c, t)] if lam else None
        return keys, values, content

    def masks(self, z, z_r, ref_labels, target_labels):
        """Per layer (B or 1, 1, N, N_r): target token i may attend reference token j iff their labels agree."""
        out = []
        for (q, *_), (k, *_) in zip(self.run(z.detach(), 999), self.run(z_r[:1], 999), strict=True):
            tl = _resize(target_labels, _grid(q.shape[2], z.shape[-2:]))
            rl = _resize(ref_labels, _grid(k.shape[2], z_r.shape[-2:])).reshape(1, -1)  # references in order
            if not set(tl.unique().tolist()) <= set(rl.unique().tolist()):
                raise ValueError("a target label has no reference token")
            out.append((tl[:, :, None] == rl[:, None, :])[:, None])
        return out

    def loss(self, z, t, keys, values, content, *, lam, a=1.0, masks=None):
        """``L = sum_l mean|O - sg(ideal)| + lam * sum_l mean|Q - sg(Q_c)|`` of the features of (z, t)."""
        total = 0.0
        for li, (q, _, _, o) in enumerate(self.run(z, t)):
            with torch.no_grad():  # softmax((a Q) K_r^T / sqrt(d)) V_r, masked where labels differ
                b = q.shape[0]
                ideal = F.scaled_dot_product_attention(a * q, keys[li].expand(b, -1, -1, -1),
                                                       values[li].expand(b, -1, -1, -1),
                                                       attn_mask=None if masks is None else masks[li])
            total = total + (o - ideal).abs().mean()
            if lam:
                total = total + lam * (q - content[li]).abs().mean()
        return total

    def optimise(self, init, z_r, z_c, *, steps, iters, lr, lam, a=1.0, ref_labels=None, target_labels=None):
        """ALGORITHM.md §3 steps 3-5: one Adam for the whole run, ``iters`` steps per DDIM timestep."""
        sched = DDIMScheduler.from_config(self.model.pipe.scheduler.config)
        sched.set_timesteps(steps)
        masks = None if ref_labels is None else self.masks(init, z_r, ref_labels, target_labels)
        z = init.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for t in sorted((int(t) for t in sched.timesteps), reverse=True):
            keys, values, content = self.targets(t, z_r, z_c, lam)  # clean latents, no noise
            for _ in range(iters):
                opt.zero_grad()
                self.loss(z, t, keys, values, content, lam=lam, a=a, masks=masks).backward()
                opt.step()
        return z.detach()


def latents(seed, batch, side=8):
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))


def assert_matches(lib, ours, spec, init, z_r, z_c, **kw):
    """``lib`` within TOL of ``ours``; on failure, say how far the reference itself moves for a 1e-6 nudge."""
    diff = (lib - ours).abs().max().item()
    if diff > TOL:
        nudge = 1e-6 * torch.randn(init.shape, generator=torch.Generator().manual_seed(99))
        moved = z_c is not None and torch.equal(z_c, init)
        again = spec.optimise(init + nudge, z_r, z_c + nudge if moved else z_c, **kw)
        pytest.fail(f"library departs from the spec by {diff:.3g}; the reference moves "
                    f"{(again - ours).abs().max().item():.3g} for a 1e-6 nudge of its input "
                    "(a similar number means an ill-conditioned case, not a bug)")


@pytest.fixture(scope="module")
def spec(tiny_sd15):
    return SpecAD(tiny_sd15)


def test_recording_keeps_the_unet_output(tiny_sd15, spec):
    """The reference's processor must be exact, or its features, not the library's, could be off."""
    z = latents(1, 1)
    with torch.no_grad():
        plain = tiny_sd15.unet(z, 500, encoder_hidden_states=spec.null, return_dict=False)[0]
        with recording(tiny_sd15.unet) as sink:
            recorded = tiny_sd15.unet(z, 500, encoder_hidden_states=spec.null, return_dict=False)[0]
    assert spec.count == len(sink) == 7  # the tiny SD 1.5: down 2, mid 1, up 4
    assert spec.layers == (1, 2, 3, 4, 5, 6)
    assert torch.equal(recorded, plain)


def test_style_transfer_matches_spec(tiny_sd15, spec):
    """Content init, lambda 0.25, one Adam step per timestep, the default (last six) layers."""
    z_c, z_r = latents(2, 1), latents(12, 1)
    kw = dict(steps=4, iters=1, lr=0.05, lam=0.25)
    ours = spec.optimise(z_c, z_r, z_c, **kw)
    lib = optimize_latents(Distiller(tiny_sd15, content_weight=0.25), init=z_c, ref_latents=z_r,
                           content_latents=z_c, steps=4, iters=1, lr=0.05, progress=False)
    assert (ours - z_c).abs().max() > 0.1  # the run did move the latent
    assert_matches(lib, ours, spec, z_c, z_r, z_c, **kw)


def test_texture_two_references_matches_spec(tiny_sd15, spec):
    """Random init, lambda 0, two Adam steps per timestep; the target attends to both references' tokens."""
    init, z_r = latents(21, 1), latents(31, 2)
    kw = dict(steps=3, iters=2, lr=0.05, lam=0.0)
    ours = spec.optimise(init, z_r, None, **kw)
    only_first = spec.optimise(init, z_r[:1], None, **kw)
    lib = optimize_latents(Distiller(tiny_sd15), init=init, ref_latents=z_r, steps=3, iters=2, lr=0.05,
                           progress=False)
    assert (ours - only_first).abs().max() > 1e-3  # the second reference matters
    assert_matches(lib, ours, spec, init, z_r, None, **kw)


def test_layer_set_and_scale_match_spec(tiny_sd15):
    """A non-default layer set and attention scale ``a`` change the numbers the same way on both sides."""
    layers = (0, 2, 5)
    spec = SpecAD(tiny_sd15, layers=layers)
    z_c, z_r = latents(5, 1), latents(6, 1)
    kw = dict(steps=3, iters=1, lr=0.05, lam=0.25, a=1.5)
    ours = spec.optimise(z_c, z_r, z_c, **kw)
    lib = optimize_latents(Distiller(tiny_sd15, layers=layers, attention_scale=1.5, content_weight=0.25),
                           init=z_c, ref_latents=z_r, content_latents=z_c, steps=3, iters=1, lr=0.05,
                           progress=False)
    assert_matches(lib, ours, spec, z_c, z_r, z_c, **kw)


def test_batch_loss_and_gradient_match_spec(tiny_sd15, spec):
    """Two targets, two references, one content latent broadcast: the loss of §2 and its gradient.

    Compared per loss evaluation, not over a run: the library's Adam loop backpropagates B times the
    batch loss so that each target moves as if alone, which only Adam's eps can see.
    """
    z, z_r, z_c = latents(41, 2), latents(42, 2), latents(43, 1)
    t = 667
    keys, values, content = spec.targets(t, z_r, z_c, 0.25)
    ours_z = z.clone().requires_grad_(True)
    ours = spec.loss(ours_z, t, keys, values, content, lam=0.25)
    ours.backward()
    with Distiller(tiny_sd15, content_weight=0.25) as ad:
        ad.begin_timestep(tiny_sd15.timestep(t), z_r, z_c)
        lib_z = z.clone().requires_grad_(True)
        lib = ad.loss(lib_z)
        lib.backward()
    assert abs(lib.item() - ours.item()) <= 1e-6 * ours.item()
    assert (lib_z.grad - ours_z.grad).abs().max() <= 1e-6 * ours_z.grad.abs().max()


def _blocks(side, pattern):
    """A label map made of constant blocks: any flavour of nearest resizing keeps it the same."""
    pattern = torch.tensor(pattern)
    return pattern.repeat_interleave(side // pattern.shape[0], 0).repeat_interleave(side // pattern.shape[1], 1)


#: reference label maps (as 4x4 blocks) of one and of two references; the second reference's map differs
#: from the first, so that keys matched with the other reference's labels would change the result
MASKED_REFERENCES = {
    "one": [[[0, 1, 1, 2], [0, 1, 1, 2], [2, 2, 0, 0], [1, 1, 0, 0]]],
    "two": [[[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]],
            [[2, 2, 2, 0], [2, 2, 2, 0], [0, 0, 2, 2], [0, 0, 2, 2]]],
}


@pytest.mark.parametrize("refs", list(MASKED_REFERENCES))
def test_masked_texture_matches_spec(tiny_sd15, spec, refs):
    """Masked AD: target tokens attend only reference tokens of their label, at every layer's token grid;
    with several references, each reference's tokens carry the labels of its own map."""
    side = 16  # latents; blocks of 4 stay whole down to the middle layer's 4x4 grid
    ref_labels = torch.stack([_blocks(side, blocks) for blocks in MASKED_REFERENCES[refs]])
    target_labels = _blocks(side, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 1]])[None]
    z_c, z_r = latents(12, 1, side), latents(62, ref_labels.shape[0], side)
    kw = dict(steps=3, iters=1, lr=0.05, lam=0.15)
    ours = spec.optimise(z_c, z_r, z_c, ref_labels=ref_labels, target_labels=target_labels, **kw)
    unmasked = spec.optimise(z_c, z_r, z_c, **kw)
    lib = optimize_latents(Distiller(tiny_sd15, content_weight=0.15, ref_labels=ref_labels,
                                     target_labels=target_labels),
                           init=z_c, ref_latents=z_r, content_latents=z_c, steps=3, iters=1, lr=0.05,
                           progress=False)
    assert (ours - unmasked).abs().max() > 1e-2  # the mask matters here
    assert_matches(lib, ours, spec, z_c, z_r, z_c, ref_labels=ref_labels, target_labels=target_labels, **kw)


def test_unmatched_target_label_is_an_error(tiny_sd15):
    """§2: a target label missing from the reference is an error, never a silent NaN."""
    ref_labels = torch.zeros(1, 8, 8, dtype=torch.long)
    target_labels = _blocks(8, [[0, 1], [0, 0]])[None]
    z = latents(51, 1)
    with pytest.raises(ValueError):
        optimize_latents(Distiller(tiny_sd15, ref_labels=ref_labels, target_labels=target_labels), init=z,
                         ref_latents=latents(52, 1), steps=1, iters=1, lr=0.05, progress=False)
