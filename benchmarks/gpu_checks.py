"""Checks of CUDA-only code paths that the CPU tests cannot reach (about 30 s on an H100/H200, plus the
compiled norms' compilation).

Prints one JSON line per check; ``ok`` is false where a result is off or a call failed.

    python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attndistill.core.stepper import StaticCall  # noqa: E402
from attndistill.model.group_norm import ChannelsLastGroupNorm, CompiledGroupNorm  # noqa: E402

DEVICE = "cuda"
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _bf16_norm(channels: int = 320) -> nn.GroupNorm:
    torch.manual_seed(0)
    norm = nn.GroupNorm(32, channels, eps=1e-5).to(DEVICE, torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def _against_pytorch(ours_norm, silu: bool) -> dict:
    """Output and input gradient of a swapped norm (then SiLU) against PyTorch's, bf16, frozen parameters."""
    norm = _bf16_norm()
    act = F.silu if silu else (lambda t: t)
    x = _nhwc(torch.randn(2, 320, 64, 64, device=DEVICE) * 2 + 3).to(torch.bfloat16).requires_grad_()
    ours, theirs = ours_norm(norm)(x), act(norm(x))
    grad = torch.randn_like(theirs)
    (gx_ours,), (gx_theirs,) = torch.autograd.grad(ours, x, grad), torch.autograd.grad(theirs, x, grad)
    exact = act(F.group_norm(x.detach().float(), 32, norm.weight.float(), norm.bias.float(), 1e-5))
    out_err = (ours.float() - exact).abs().max().item()
    theirs_err = (theirs.float() - exact).abs().max().item()
    grad_diff = (gx_ours.float() - gx_theirs.float()).abs().max().item()
    scale = gx_theirs.float().abs().max().item()
    return {"ok": out_err <= theirs_err * 1.01 + 1e-3 and grad_diff <= 0.02 * scale,
            "nhwc_output": ours.is_contiguous(memory_format=torch.channels_last),
            "output_error_vs_fp32": out_err, "pytorch_output_error_vs_fp32": theirs_err,
            "grad_diff": grad_diff, "grad_max": scale}


@check
def group_norm_matches_pytorch_in_bf16():
    """The NHWC GroupNorm (``channels_last_norms``) against PyTorch's."""
    return _against_pytorch(ChannelsLastGroupNorm.sharing, silu=False)


@check
def compiled_norm_with_silu_matches_pytorch_in_bf16():
    """The compiled GroupNorm + SiLU (``compiled_norms``, Triton kernels) against PyTorch's norm then SiLU."""
    return _against_pytorch(lambda norm: CompiledGroupNorm.sharing(norm, silu=True), silu=True)


@check
def norm_timings():
    """Forward + backward of GroupNorm + SiLU at SD 1.5's batch-1 shapes (bf16, NHWC), ms per call:
    PyTorch's, the NHWC norm's, and the compiled program's (``compiled_norms``)."""
    rows = {}
    for channels, side in ((320, 64), (640, 32), (1280, 16)):
        norm = _bf16_norm(channels)
        x = _nhwc(torch.randn(1, channels, side, side, device=DEVICE)).to(torch.bfloat16).requires_grad_()
        grad = _nhwc(torch.randn_like(x))
        ways = {"pytorch": lambda t, n=norm: F.silu(n(t)),
                "nhwc": lambda t, n=ChannelsLastGroupNorm.sharing(norm): F.silu(n(t)),
                "compiled": CompiledGroupNorm.sharing(norm, silu=True)}
        for name, fn in ways.items():
            for _ in range(3):  # compile, warm up
                torch.autograd.grad(fn(x), x, grad)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                torch.autograd.grad(fn(x), x, grad)
            end.record()
            torch.cuda.synchronize()
            rows[f"{name}_{channels}x{side}"] = round(start.elapsed_time(end) / 50, 4)
    return {"ok": True, "ms": rows}


def _captured_like_eager(swap) -> dict:
    """Forward and backward through a swapped norm replayed from a graph equal the eager call."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, padding=1)).to(DEVICE, torch.bfloat16)
    net = net.to(memory_format=torch.channels_last).requires_grad_(False)
    swap(net)
    x = _nhwc(torch.randn(4, 64, 32, 32, device=DEVICE, dtype=torch.bfloat16)).requires_grad_()

    def step():
        x.grad = None
        net(x).float().square().mean().backward()
        return x.grad

    eager = step().clone()
    graphed = StaticCall(step, capture=True, grad=True)  # its warm-up compiles, before the capture
    replayed = graphed().clone()
    diff, scale = (replayed.float() - eager.float()).abs().max().item(), eager.float().abs().max().item()
    return {"ok": diff <= 0.02 * scale, "max_diff": diff, "grad_max": scale}


@check
def group_norm_captures_in_a_cuda_graph():
    def swap(net):
        net[1] = ChannelsLastGroupNorm.sharing(net[1])

    return _captured_like_eager(swap)


@check
def compiled_norm_captures_in_a_cuda_graph():
    def swap(net):
        net[1], net[2] = CompiledGroupNorm.sharing(net[1], silu=True), nn.Identity()

    return _captured_like_eager(swap)


@check
def mixed_dtype_norms_behave_as_pytorchs():
    """Float32 parameters on a bfloat16 input take PyTorch's own path: the swap changes nothing there (run 7:
    torch 2.11's CUDA GroupNorm refuses the mix already in its forward, swapped or not)."""
    norm = nn.GroupNorm(8, 64).to(DEVICE)
    x = _nhwc(torch.randn(2, 64, 8, 8, device=DEVICE)).to(torch.bfloat16)

    def outcome(module):
        try:
            return module(x).float()
        except RuntimeError as exc:
            return str(exc)

    ours, theirs = outcome(ChannelsLastGroupNorm.sharing(norm)), outcome(norm)
    same = ours == theirs if isinstance(ours, str) or isinstance(theirs, str) else bool(torch.equal(ours, theirs))
    return {"ok": same, "pytorch": theirs if isinstance(theirs, str) else "runs"}


@check
def a_graph_survives_another_graphs_destruction():
    """Graphs on their own streams (StaticCall) keep their cuBLAS workspace when another graph goes
    (pytorch/pytorch issue 193402: graphs sharing a capture stream lose it)."""
    a = torch.randn(4096, 1024, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device=DEVICE, dtype=torch.bfloat16)
    first, second = StaticCall(lambda: a @ w, capture=True, grad=False), StaticCall(lambda: a @ w, capture=True,
                                                                                    grad=False)
    del first
    torch.cuda.empty_cache()
    junk = [torch.full((64 << 20,), 7, device=DEVICE, dtype=torch.uint8) for _ in range(8)]  # reuse freed memory
    for _ in range(3):
        out = second()
    torch.cuda.synchronize()
    del junk
    expected = (a @ w).float()
    diff = (out.float() - expected).abs().max().item()
    return {"ok": diff <= 0.01 * expected.abs().max().item(), "max_diff": diff}


def main() -> None:
    print(json.dumps({"torch": torch.__version__, "card": torch.cuda.get_device_name()}), flush=True)
    for fn in CHECKS:
        try:
            row = fn()
        except Exception as exc:  # report and go on: each check stands alone
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-800:]}
        print(json.dumps({"check": fn.__name__, **row}), flush=True)


if __name__ == "__main__":
    main()
