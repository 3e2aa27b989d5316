"""The UNet's GroupNorms in other implementations: the ``channels_last_norms`` and ``compiled_norms`` switches.

PyTorch's CUDA GroupNorm takes NCHW only: with the UNet in channels-last it copies every input to NCHW,
hands back NCHW, and the next convolution copies that back to NHWC; the backward copies again. Run 6
(benchmarks/RESULTS.md) found these copies the largest kernel of texture expansion (case e) and of batched
transfers (case g).

- ``nhwc`` (:class:`ChannelsLastGroupNorm`): the statistics are reduced straight from NHWC memory (in
  float32) and one multiply-add writes NHWC output; the backward is PyTorch's own GroupNorm backward.
- ``compiled`` (:class:`CompiledGroupNorm`): the norm is one small ``torch.compile`` program whose
  kernels read and write the input's layout, forward and backward; in each ResNet block the SiLU that
  follows a norm joins its program (:class:`TimeEmbeddingSiLU` keeps the time embedding's). The program
  has no parameter shapes of its own, so a whole UNet compiles a handful of programs (grad or not, batch
  1 or more, SiLU or not, NCHW or NHWC), not one per block shape as ``compile`` does.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from .compiling import compiled

#: What :func:`swap_group_norms` can put in place of the UNet's ``nn.GroupNorm``s.
NORM_KINDS = ("nhwc", "compiled")


class _SharedNorm(nn.GroupNorm):
    """Stands in for an ``nn.GroupNorm``, with its parameters (same names, same tensors)."""

    @classmethod
    def sharing(cls, norm: nn.GroupNorm):
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        new.__dict__["original"] = norm  # not a submodule: the state dict keeps its keys
        return new

    def _own_dtype(self, x: torch.Tensor) -> bool:
        # parameters of another dtype (norms kept in float32) go the usual way: PyTorch's own CUDA GroupNorm
        # refuses that mix (torch 2.11, run 7's checks), and a swap should not change whether a model runs
        return self.weight is None or self.weight.dtype == x.dtype


class ChannelsLastGroupNorm(_SharedNorm):
    """An ``nn.GroupNorm`` that keeps channels-last inputs channels-last (others go the usual way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._own_dtype(x) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and not x.is_contiguous():
            return _GroupNormNHWC.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class CompiledGroupNorm(_SharedNorm):
    """An ``nn.GroupNorm`` (then a SiLU, where ``silu``) as one compiled program, in the input's layout."""

    silu = False

    @classmethod
    def sharing(cls, norm: nn.GroupNorm, silu: bool = False) -> CompiledGroupNorm:
        new = super().sharing(norm)
        new.silu = silu
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._own_dtype(x):
            out = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(out) if self.silu else out
        # frozen parameters go in as plain tensors: a parameter's shape would be compiled in, one
        # program per channel count
        weight, bias = (p if p is None or p.requires_grad else p.detach() for p in (self.weight, self.bias))
        return _program()(x, weight, bias, self.num_groups, self.eps, self.silu)


class TimeEmbeddingSiLU(nn.SiLU):
    """A ResNet block's SiLU once its norms apply it (``compiled``): it still acts on the time embedding
    (2-D), and lets the feature maps (which its norms have already activated) through.

    The block's time-embedding layer stays as it is, so adapters that wrap it (LoRA) see what they
    would see unswapped.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.dim() == 2 else x


def swap_group_norms(module: nn.Module, kind: str | None) -> None:
    """Put norms of ``kind`` (:data:`NORM_KINDS`) in place of each ``nn.GroupNorm`` of ``module``, or
    (``None``) the original norms back, with the parameters they have now (a load may have replaced them)."""
    if kind not in (None, *NORM_KINDS):
        raise ValueError(f"unknown norm kind {kind!r}")
    if _kind_of(module) == kind:
        return
    _restore(module)
    if kind == "compiled":
        for block in module.modules():
            _fuse_silu(block)
    replacement = CompiledGroupNorm if kind == "compiled" else ChannelsLastGroupNorm
    for parent in list(module.modules()) if kind else ():
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                setattr(parent, name, replacement.sharing(child))


def _kind_of(module: nn.Module) -> str | None:
    kinds = {type(m) for m in module.modules()}
    return "compiled" if CompiledGroupNorm in kinds else "nhwc" if ChannelsLastGroupNorm in kinds else None


def _fuse_silu(block: nn.Module) -> None:
    """A diffusers ResNet block's ``norm -> SiLU`` pairs as norms that apply the SiLU themselves.

    Only the plain block (SiLU, time embedding added before ``norm2``): elsewhere something comes between
    a norm and its SiLU.
    """
    if type(block).__name__ != "ResnetBlock2D" or getattr(block, "time_embedding_norm", None) != "default":
        return
    if type(block.nonlinearity) is not nn.SiLU or type(block.norm1) is not nn.GroupNorm \
            or type(block.norm2) is not nn.GroupNorm:
        return
    block.norm1 = CompiledGroupNorm.sharing(block.norm1, silu=True)
    block.norm2 = CompiledGroupNorm.sharing(block.norm2, silu=True)
    block.__dict__["original_nonlinearity"] = block.nonlinearity
    block.nonlinearity = TimeEmbeddingSiLU()


def _restore(module: nn.Module) -> None:
    for parent in list(module.modules()):
        if "original_nonlinearity" in parent.__dict__:
            parent.nonlinearity = parent.__dict__.pop("original_nonlinearity")
        for name, child in list(parent.named_children()):
            if isinstance(child, _SharedNorm):
                original = child.original
                original.weight, original.bias = child.weight, child.bias
                setattr(parent, name, original)


def _group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                eps: float, silu: bool) -> torch.Tensor:
    """``group_norm`` (then ``silu``) with float32 statistics and arithmetic, in a form the compiler fuses.

    Splitting the channel axis is a view in any layout, so nothing here asks for NCHW memory.
    """
    grouped = x.unflatten(1, (groups, -1)).float()
    var, mean = torch.var_mean(grouped, dim=tuple(range(2, grouped.dim())), correction=0, keepdim=True)
    out = ((grouped - mean) * torch.rsqrt(var + eps)).flatten(1, 2)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.float().view(shape)
    if bias is not None:
        out = out + bias.float().view(shape)
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


@functools.cache
def _program():
    return compiled(_group_norm)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, H*W, groups, C/groups)``: a view of an NHWC tensor's memory, one group per third index."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n, h * w, groups, c // groups)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        grouped = _grouped(x, groups)
        count = grouped.shape[1] * grouped.shape[3]
        # float32 statistics (float64 for a float64 x) read from x as it is (no float copy of x); E[x^2] - E[x]^2
        # in float32 loses precision only where a group's mean is thousands of times its spread
        stats = torch.promote_types(x.dtype, torch.float32)
        mean = grouped.mean(dim=(1, 3), keepdim=True, dtype=stats)
        mean_square = torch.linalg.vector_norm(grouped, dim=(1, 3), keepdim=True, dtype=stats)
        mean_square = mean_square.square_().div_(count)
        rstd = (mean_square - mean.square()).clamp_(min=0).add_(eps).rsqrt_()
        scale = rstd if weight is None else rstd * weight.to(stats).view(1, 1, groups, -1)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(stats).view(1, 1, groups, -1)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(shift, grouped, scale, out=_grouped(out, groups))  # in the statistics' dtype, stored as x's
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
