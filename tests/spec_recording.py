"""The attention recorder the spec tests share: every ``attn1`` keeps Q, K, V and O in call order.

Written from ALGORITHM.md §1 with plain diffusers, not the library's feature capture, so that the spec
tests (``test_spec_*.py``) compare the library with an independent reading of the spec.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class Record:
    """Self-attention that keeps Q, K, V (after the head split) and O (before ``to_out``) in call order."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise AssertionError("attn1 is expected to be plain self-attention on (B, N, C) tokens")
        b, n, _ = hidden_states.shape

        def heads(x):
            return x.view(b, n, attn.heads, -1).transpose(1, 2)

        q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        # softmax(Q K^T / sqrt(d)) V with the kernel of diffusers' own processor: the UNet's output is unchanged
        o = F.scaled_dot_product_attention(q, k, v)
        self.sink.append((q, k, v, o))
        return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, n, -1)))


@contextmanager
def recording(unet):
    """Every ``attn1`` records into the yielded list; the original processors come back afterwards."""
    sink: list = []
    attn1 = [m for name, m in unet.named_modules() if name.endswith("attn1") and isinstance(m, Attention)]
    saved = [m.processor for m in attn1]
    for m in attn1:
        m.set_processor(Record(sink))
    try:
        yield sink
    finally:
        for m, p in zip(attn1, saved, strict=True):
            m.set_processor(p)
