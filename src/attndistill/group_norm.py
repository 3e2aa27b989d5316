"""GroupNorm that reads and writes NHWC memory (the ``channels_last_norms`` switch).

PyTorch's CUDA GroupNorm takes NCHW only: with the UNet in channels-last it copies every input to NCHW,
hands back NCHW, and the next convolution copies that back to NHWC; the backward copies again. Run 6
(benchmarks/RESULTS.md) found these copies the largest kernel of texture expansion (case e) and of batched
transfers (case g). Here the statistics are reduced straight from NHWC memory (in float32) and one
multiply-add writes NHWC output; the backward is PyTorch's own GroupNorm backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ChannelsLastGroupNorm(nn.GroupNorm):
    """An ``nn.GroupNorm`` that keeps channels-last inputs channels-last (others go the usual way)."""

    @classmethod
    def sharing(cls, norm: nn.GroupNorm) -> ChannelsLastGroupNorm:
        """A replacement for ``norm`` with the same parameters (same names, same tensors)."""
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        new.__dict__["original"] = norm  # not a submodule: the state dict keeps its keys
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # parameters of another dtype (norms kept in float32) go the usual way: PyTorch's own CUDA GroupNorm
        # refuses that mix (torch 2.11, run 7's checks), and a swap should not change whether a model runs
        same_dtype = self.weight is None or self.weight.dtype == x.dtype
        if same_dtype and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return _GroupNormNHWC.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def swap_group_norms(module: nn.Module, on: bool) -> None:
    """Put :class:`ChannelsLastGroupNorm` in place of each ``nn.GroupNorm`` of ``module`` (``on``), or back."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if on and type(child) is nn.GroupNorm:
                setattr(parent, name, ChannelsLastGroupNorm.sharing(child))
            elif not on and type(child) is ChannelsLastGroupNorm:
                original = child.original  # given the parameters as they are now (a load may have replaced them)
                original.weight, original.bias = child.weight, child.bias
                setattr(parent, name, original)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, H*W, groups, C/groups)``: a view of an NHWC tensor's memory, one group per third index."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n, h * w, groups, c // groups)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        grouped = _grouped(x, groups)
        count = grouped.shape[1] * grouped.shape[3]
        # float32 statistics read from x as it is (no float copy of x); E[x^2] - E[x]^2 in float32 loses
        # precision only where a group's mean is thousands of times its spread
        mean = grouped.mean(dim=(1, 3), keepdim=True, dtype=torch.float32)
        mean_square = torch.linalg.vector_norm(grouped, dim=(1, 3), keepdim=True, dtype=torch.float32)
        mean_square = mean_square.square_().div_(count)
        rstd = (mean_square - mean.square()).clamp_(min=0).add_(eps).rsqrt_()
        scale = rstd if weight is None else rstd * weight.float().view(1, 1, groups, -1)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.float().view(1, 1, groups, -1)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(shift, grouped, scale, out=_grouped(out, groups))  # computed in float32, stored as x's dtype
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        mask = list(ctx.needs_input_grad[:3])  # statistics in the dtype PyTorch's own forward hands its backward
        dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x.contiguous(), mean.view(n, ctx.groups).to(x.dtype),
            rstd.view(n, ctx.groups).to(x.dtype), weight, n, c, h * w, ctx.groups, mask)
        return dx, dweight, dbias, None, None
