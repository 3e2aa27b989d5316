"""Attention features: find the self-attention layers and record Q, K, V, O.

Hooks go through diffusers attention processors (``set_attn_processor``),
never through a patched ``forward``; the originals come back in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import UserError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


@dataclass
class LayerFeatures:
    """Features of one self-attention layer for one UNet call; each (B, heads, N, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # softmax(Q K^T / sqrt(d)) V, before to_out


class StopForward(UserError):
    """Raised after the last chosen layer when the rest of the UNet is not needed; caught by the Distiller's own
    calls. One that reaches a caller came from a UNet call of the caller's own inside ``with distiller:``."""

    def __init__(self) -> None:
        super().__init__("a UNet call inside 'with Distiller(...)' records features and stops after the last "
                         "recorded layer; make a call of your own (a denoising step) inside 'with distiller.paused():'")


@dataclass
class FeatureStore:
    """Where capture processors put what they see during one UNet call."""

    layers: tuple[int, ...]  # positions (in call order) of the recorded layers
    early_exit: bool = False  # stop the forward after the last recorded layer
    active: bool = True  # False: processors behave exactly like the default one and record nothing
    # what to keep of each layer as it is recorded (None: all four tensors). A no-grad call keeping only
    # what it uses lets the rest go while the forward goes on: 16 look-ahead rows of SD 1.5 record
    # about 720 MiB of queries, keys, values and outputs, of which a step uses its reference rows'
    # keys and values and its content rows' queries
    keep: Callable[[LayerFeatures], object] | None = None
    features: dict[int, object] = field(default_factory=dict)

    def clear(self) -> None:
        self.features = {}

    def take(self) -> list:
        """The recorded layers in order (what ``keep`` made of them), then clear."""
        missing = [i for i in self.layers if i not in self.features]
        if missing:
            raise RuntimeError(f"self-attention layers {missing} were not called during the UNet forward")
        out = [self.features[i] for i in self.layers]
        self.clear()
        return out

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run UNet calls that must not record (e.g. the denoising call) and must run to the end."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


class CaptureProcessor:
    """``AttnProcessor2_0`` that also records Q, K, V and the attention output.

    It computes exactly what the default processor computes (same ops, same
    order), so the UNet's output does not change while it is installed.
    """

    def __init__(self, store: FeatureStore, position: int, last: bool) -> None:
        self.store = store
        self.position = position
        self.last = last

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)  # (B, heads, N, d)
        if self.store.active:
            recorded = LayerFeatures(query, key, value, out)
            keep = self.store.keep
            self.store.features[self.position] = recorded if keep is None else keep(recorded)
            # a compiled program drops the rest of the UNet as dead code instead (nothing of it is returned)
            if self.last and self.store.early_exit and not torch.compiler.is_compiling():
                raise StopForward

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


#: Latent pixels of one feed-forward chunk in a no-grad feature call: 4 rows of SD 1.5's 64x64 latents,
#: 1 of SDXL's 128x128. Without a backward to keep activations for, a call's peak is its largest
#: transient, the feed-forward's (GEGLU widens each token eightfold); in chunks, a 16-row look-ahead
#: call of SD 1.5 at 512² peaked at 801 MiB instead of 1,251 (benchmarks/lookahead_memory.py).
FEED_FORWARD_CHUNK_PIXELS = 4 * 64 * 64


def chunk_rows(rows: int, latent_pixels: int) -> int:
    """Rows per feed-forward chunk: the largest divisor of ``rows`` holding at most
    :data:`FEED_FORWARD_CHUNK_PIXELS` of latent (at least one row)."""
    fits = max(1, FEED_FORWARD_CHUNK_PIXELS // latent_pixels)
    return max(d for d in range(1, min(rows, fits) + 1) if rows % d == 0)


@contextmanager
def feed_forward_chunks(blocks: Sequence, rows: int) -> Iterator[None]:
    """The transformer ``blocks``' feed-forward layers in chunks of ``rows`` batch rows inside the
    ``with`` block (diffusers' ``set_chunk_feed_forward``): the same arithmetic per row, a fraction of
    the transient memory. A chunking the caller had set up comes back afterwards."""
    before = [(getattr(block, "_chunk_size", None), getattr(block, "_chunk_dim", 0)) for block in blocks]
    for block in blocks:
        block.set_chunk_feed_forward(rows, dim=0)
    try:
        yield
    finally:
        for block, (size, dim) in zip(blocks, before, strict=True):
            block.set_chunk_feed_forward(size, dim=dim)


class _CallOrderProcessor:
    """Delegates to the original processor and notes which self-attention layers run, in order."""

    def __init__(self, name: str, inner, calls: list[str]) -> None:
        self.name, self.inner, self.calls = name, inner, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None and self.name not in self.calls:
            self.calls.append(self.name)
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def _dummy_inputs(unet, device, dtype, latent: int = 8) -> tuple[tuple, dict]:
    """A minimal forward input for any UNet2DConditionModel (SDXL's added conditioning included)."""
    cfg = unet.config
    z = torch.zeros(1, cfg.in_channels, latent, latent, device=device, dtype=dtype)
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    kwargs = {"encoder_hidden_states": torch.zeros(1, 4, cross, device=device, dtype=dtype)}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, text_dim, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(1, 6, device=device, dtype=dtype)}
    return (z, torch.tensor([1], device=device)), kwargs


def discover_self_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of the UNet's self-attention layers in the order one forward calls them.

    Found by running the model (on a tiny latent; also works on the ``meta`` device), not
    from a per-checkpoint table. Cached on the UNet object.
    """
    cached = getattr(unet, "_attndistill_self_attention", None)
    if cached is not None:
        return list(cached)
    originals = unet.attn_processors
    calls: list[str] = []
    param = next(unet.parameters())
    latent = 2 ** (len(unet.config.down_block_types) - 1)
    args, kwargs = _dummy_inputs(unet, param.device, param.dtype, latent=max(latent, 2))
    unet.set_attn_processor({n: _CallOrderProcessor(n, p, calls) for n, p in originals.items()})
    try:
        # compiled parts (``compile``, ``compiled_norms``) run as written: programs for this one-off
        # shape would be compiled for nothing
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            unet(*args, **kwargs)
    finally:
        unet.set_attn_processor(originals)
    unet._attndistill_self_attention = tuple(calls)
    return calls


def default_layers(unet: UNet2DConditionModel, count: int = 6) -> tuple[int, ...]:
    """The last ``count`` self-attention layers (SD 1.5: 10-15, SDXL: 64-69)."""
    n = len(discover_self_attention_layers(unet))
    return tuple(range(max(0, n - count), n))


@contextmanager
def capture(unet: UNet2DConditionModel, layers: Sequence[int], *, early_exit: bool = False) -> Iterator[FeatureStore]:
    """Install capture processors on the chosen self-attention layers for the ``with`` block.

    ``layers`` are positions in call order (see :func:`discover_self_attention_layers`).
    The original processors are restored even when the block raises.
    """
    names = discover_self_attention_layers(unet)
    layers = tuple(layers)
    bad = [i for i in layers if not 0 <= i < len(names)]
    if bad or not layers:
        raise ValueError(f"layers {bad or '(none)'} do not exist; this UNet has self-attention layers "
                         f"0-{len(names) - 1}")
    store = FeatureStore(layers=layers, early_exit=early_exit)
    originals = unet.attn_processors
    procs = dict(originals)
    last = max(layers)
    for i in layers:
        procs[names[i]] = CaptureProcessor(store, i, last=(i == last))
    unet.set_attn_processor(procs)
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)
