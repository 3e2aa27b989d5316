"""The losses of Attention Distillation as pure functions (ALGORITHM.md §2).

No model imports: tensors in, scalar out. Shapes use B targets, R reference
images, h heads, N tokens, d channels per head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UnmatchedLabels


def concat_references(x: torch.Tensor) -> torch.Tensor:
    """Keys or values of R reference images (R, h, N, d) -> one reference (1, h, R*N, d).

    Every target then attends to the tokens of all references at once.
    """
    r, h, n, d = x.shape
    return x.transpose(0, 1).reshape(1, h, r * n, d)  # (1, h, R*N, d), reference-major tokens


def ideal_attention(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, *, scale: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax((scale * Q) K_r^T / sqrt(d)) V_r``: what the target's attention should output.

    q: (B, h, N, d); k_ref, v_ref: (1 or B, h, N_r, d), broadcast without copies; mask: bool,
    True where attending is allowed, broadcastable to (B, h, N, N_r). Returns (B, h, N, d).
    """
    b = q.shape[0]
    k_ref = k_ref.expand(b, -1, -1, -1)
    v_ref = v_ref.expand(b, -1, -1, -1)
    return F.scaled_dot_product_attention(q, k_ref.to(q.dtype), v_ref.to(q.dtype), attn_mask=mask,
                                          scale=scale / q.shape[-1] ** 0.5)


def ad_loss(outputs: Sequence[torch.Tensor], queries: Sequence[torch.Tensor], ref_keys: Sequence[torch.Tensor],
            ref_values: Sequence[torch.Tensor], *, scale: float = 1.0,
            masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``L_AD = sum_l mean|O_l - stopgrad(ideal_l)|`` over the chosen layers.

    outputs, queries: per layer (B, h, N, d) of the target; ref_keys, ref_values: per layer
    (1 or B, h, N_r, d). The ideal output is computed without gradient.
    """
    masks = masks if masks is not None else [None] * len(outputs)
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for o, q, k, v, m in zip(outputs, queries, ref_keys, ref_values, masks, strict=True):
        with torch.no_grad():
            ideal = ideal_attention(q.detach(), k, v, scale=scale, mask=m)
        total = total + F.l1_loss(o.float(), ideal.float())
    return total


def content_loss(queries: Sequence[torch.Tensor], content_queries: Sequence[torch.Tensor], *,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``L_content = sum_l mean|Q_l - stopgrad(Q_c,l)|``; content queries (1 or B, h, N, d) broadcast.

    ``weights`` (B,) scales each target's term (the mean over the batch of per-target means equals
    the plain mean, as every target has the same number of elements).
    """
    total = queries[0].new_zeros((), dtype=torch.float32)
    for q, qc in zip(queries, content_queries, strict=True):
        per_target = (q.float() - qc.detach().float().expand_as(q)).abs().mean(dim=(1, 2, 3))  # (B,)
        if weights is not None:
            per_target = per_target * weights
        total = total + per_target.mean()
    return total


def resize_labels(labels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Integer label maps (..., H, W) -> (..., h, w), nearest neighbour: labels never blend. Each output cell takes
    the label at its centre (``nearest-exact``, as Pillow samples); ``nearest`` would take its top-left pixel and
    move every region boundary by half a cell (8 pixels on the 32x32 token grid of SD 1.5's layers 10-12)."""
    x = labels.reshape(-1, 1, *labels.shape[-2:]).float()
    return F.interpolate(x, size=hw, mode="nearest-exact").round().long().reshape(*labels.shape[:-2], *hw)


def label_mask(target_labels: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, N, N_r): target token i may attend reference token j iff labels match.

    target_labels: (B, N) or (N,) integer labels; ref_labels: (N_r,). Raises if a target token's label
    has no reference token, which would otherwise make its softmax row NaN.
    """
    if target_labels.dim() == 1:
        target_labels = target_labels[None]
    mask = target_labels[:, :, None] == ref_labels[None, None, :]  # (B, N, N_r)
    orphan = ~mask.any(dim=-1)
    if orphan.any():
        raise UnmatchedLabels(sorted(set(target_labels[orphan].tolist())))
    return mask[:, None]  # (B, 1, N, N_r)
