"""The GroupNorms of ``channels_last_norms`` and ``compiled_norms`` compute what ``nn.GroupNorm`` does, in the
input's layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attndistill.model.group_norm import ChannelsLastGroupNorm, CompiledGroupNorm, TimeEmbeddingSiLU, swap_group_norms


@pytest.fixture(autouse=True)
def _plain_cpp():
    """The compiled norm's C++ kernels (inductor, CPU) without SIMD: fewer kernel variants to build on 2 cores."""
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield


def _norm(dtype=torch.float32, affine=True):
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 64, eps=1e-6, affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    return norm


def _input(dtype=torch.float32, layout=torch.channels_last):
    # a mean well away from zero: the variance formula must not lose it
    x = torch.randn(3, 64, 9, 7, generator=torch.Generator().manual_seed(1)) * 2 + 3
    return x.to(dtype).contiguous(memory_format=layout).requires_grad_()


@pytest.mark.parametrize("affine", [True, False])
def test_output_and_gradients_equal_pytorchs_group_norm(affine):
    norm = _norm(affine=affine)
    x = _input()
    ours, theirs = ChannelsLastGroupNorm.sharing(norm)(x), norm(x)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    grad = torch.randn_like(theirs)
    inputs = (x, norm.weight, norm.bias) if affine else (x,)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", [ChannelsLastGroupNorm, CompiledGroupNorm])
def test_bfloat16_is_as_close_to_float32_as_pytorchs(kind, aot_eager):
    """The program's float32 statistics (traced; its Triton kernels are checked on a GPU: gpu_checks.py)."""
    norm = _norm(torch.bfloat16)
    x = _input(torch.bfloat16)
    exact = F.group_norm(x.detach().float(), 8, norm.weight.detach().float(), norm.bias.detach().float(), 1e-6)
    ours, theirs = kind.sharing(norm)(x), norm(x)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() <= (theirs.float() - exact).abs().max()


def test_other_layouts_take_pytorchs_own_path():
    norm = _norm()
    x = _input(layout=torch.contiguous_format)
    out = ChannelsLastGroupNorm.sharing(norm)(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, norm(x), atol=0, rtol=0)


def test_swap_shares_the_parameters_and_reverts():
    model = nn.Sequential(nn.Conv2d(4, 64, 1), nn.GroupNorm(8, 64), nn.Sequential(nn.SiLU(), nn.GroupNorm(4, 64)))
    keys = list(model.state_dict())
    originals = [m for m in model.modules() if type(m) is nn.GroupNorm]
    swap_group_norms(model, "nhwc")
    swapped = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [type(m) for m in swapped] == [ChannelsLastGroupNorm] * 2
    assert all(a.weight is b.weight and a.bias is b.bias for a, b in zip(swapped, originals, strict=True))
    assert list(model.state_dict()) == keys
    swap_group_norms(model, None)
    assert [m for m in model.modules() if isinstance(m, nn.GroupNorm)] == originals


def test_parameters_of_another_dtype_take_pytorchs_own_path():
    """Norms kept in float32 beside a bfloat16 input go PyTorch's way (its CUDA GroupNorm refuses the mix)."""
    norm = _norm()
    x = _input(torch.bfloat16)
    out = ChannelsLastGroupNorm.sharing(norm)(x)
    torch.testing.assert_close(out, F.group_norm(x, 8, norm.weight, norm.bias, norm.eps), atol=0, rtol=0)


def test_swapping_back_keeps_parameters_loaded_while_swapped():
    model = nn.Sequential(nn.Conv2d(4, 64, 1), nn.GroupNorm(8, 64))
    swap_group_norms(model, "nhwc")
    loaded = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(loaded, assign=True)  # new Parameter objects, not copies into the old ones
    swap_group_norms(model, None)
    assert type(model[1]) is nn.GroupNorm and bool((model[1].weight == 0.5).all())


@pytest.mark.parametrize("layout,silu", [(torch.channels_last, True), (torch.contiguous_format, False)])
def test_compiled_norm_equals_pytorchs_group_norm_then_silu(layout, silu):
    norm = _norm()
    x = _input(layout=layout)
    ours = CompiledGroupNorm.sharing(norm, silu=silu)(x)
    theirs = F.silu(norm(x)) if silu else norm(x)
    assert ours.stride() == theirs.stride()  # the input's layout, no copy to another
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    grad = torch.randn_like(theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0],
                               atol=1e-4, rtol=1e-5)


def test_compiled_norms_take_each_resnet_blocks_silu_and_revert(aot_eager):
    """In a ResNet block the SiLU after each norm joins the norm's program; the block computes the same
    (traced: the C++ kernels are the test above's)."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=16, groups=8)
    keys, parts = list(block.state_dict()), list(block.children())
    x, temb = torch.randn(2, 32, 6, 6, requires_grad=True), torch.randn(2, 16)
    before = block(x, temb)
    swap_group_norms(block, "compiled")
    assert type(block.norm1) is type(block.norm2) is CompiledGroupNorm and block.norm1.silu and block.norm2.silu
    assert type(block.nonlinearity) is TimeEmbeddingSiLU and block.time_emb_proj is parts[2]
    assert list(block.state_dict()) == keys
    after = block(x, temb)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    grad = torch.randn_like(before)
    torch.testing.assert_close(torch.autograd.grad(after, x, grad)[0], torch.autograd.grad(before, x, grad)[0],
                               atol=1e-4, rtol=1e-5)
    swap_group_norms(block, "nhwc")  # another kind: the block first gets its own parts back
    assert type(block.nonlinearity) is nn.SiLU and type(block.norm1) is ChannelsLastGroupNorm
    swap_group_norms(block, None)
    assert list(block.children()) == parts


class _Adapter(nn.Module):
    """What a LoRA does to a linear layer: ``base(x) + up(down(x))`` on the same input."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.down, self.up = base, nn.Linear(base.in_features, 4), nn.Linear(4, base.out_features)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_an_adapter_added_to_the_time_embedding_while_swapped_sees_what_it_would_unswapped(aot_eager):
    """A LoRA wrapping ``time_emb_proj`` after the swap gets the activated time embedding, as without it."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8)
    x, temb = torch.randn(2, 32, 6, 6), torch.randn(2, 16)
    swap_group_norms(block, "compiled")
    block.time_emb_proj = _Adapter(block.time_emb_proj)
    swapped = block(x, temb)
    swap_group_norms(block, None)
    torch.testing.assert_close(swapped, block(x, temb), atol=1e-5, rtol=0)
