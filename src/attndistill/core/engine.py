"""The AD engine: UNet features of latents at a timestep, and the loss of a target latent.

One :class:`Distiller` serves every task. Per timestep it takes the reference
(and optional content) latents, computes their features once under no-grad,
and then scores any number of target latents against them::

    with Distiller(model, layers=(10, 11, 12, 13, 14, 15), content_weight=0.25) as ad:
        ad.begin_timestep(t, z_ref, z_content)
        loss = ad.loss(z)          # z requires grad
        loss.backward()

On a GPU the reference and content latents go through the UNet in one no-grad
call. The target goes on its own, replayed as a CUDA graph (the default), so the
reference rows are not carried through the backward pass; without graphs a GPU
is launch-bound and all three share one batched call (``fused``). On a CPU,
where a batch costs its full size, every call goes separately.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..checks import non_negative, positive
from ..errors import NonFiniteError, UnmatchedLabels, UserError, is_out_of_memory, precision_advice
from ..model.compiling import static_program
from ..model.models import Conditioning, DiffusionModel
from .features import (
    LayerFeatures,
    StopForward,
    capture,
    chunk_rows,
    default_layers,
    discover_self_attention_layers,
    feed_forward_chunks,
)
from .losses import ad_loss, concat_references, content_loss, label_mask, resize_labels
from .stepper import EagerStepper, StaticReference, StaticStepper, Stepper

log = logging.getLogger(__name__)

#: Captured graphs of each kind (iterations, denoising calls) kept per model.
MAX_CACHED_GRAPHS = 4


@dataclass
class Reference:
    """Reference keys/values per layer, all references concatenated: each (1, h, R*N, d)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def parse_layers(spec: str | Sequence[int] | None, model: DiffusionModel) -> tuple[int, ...]:
    """``"10-15"``, ``"10,11,12"``, a sequence, or None (the last six) -> validated layer positions."""
    count = len(discover_self_attention_layers(model.unet))
    if count == 0:
        raise UserError("this model's UNet has no self-attention layers, whose features Attention Distillation "
                        "transfers; use a Stable Diffusion model such as SD 1.5 or SDXL")
    if spec is None or isinstance(spec, str) and spec == "":
        if count < 6 and not getattr(model.unet, "_attndistill_told_layers", False):
            model.unet._attndistill_told_layers = True  # once a model, not once a job of a batch
            log.warning("this model's UNet has only %d self-attention layers; all of them are used instead of the "
                        "last six", count)
        return default_layers(model.unet)
    if not isinstance(spec, str | bytes) and callable(getattr(spec, "tolist", None)):
        spec = spec.tolist()  # a NumPy array or a tensor of layer numbers
    if isinstance(spec, str):
        check_layer_text(spec)
        layers: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            if hi and int(hi) >= count:  # checked before expanding: '0-2000000000' is a typo
                raise _no_such_layers(part.strip(), count)
            layers.extend(range(int(lo), int(hi or lo) + 1))
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes) and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in spec):
        layers = [int(i) for i in spec]
    else:
        raise UserError(f"layers must be a range like \"10-15\", a list like \"10,11,12\" or a list of whole "
                        f"numbers, not {spec!r}")
    bad = [i for i in layers if not 0 <= i < count][:8]  # a few are enough to see what went wrong
    if bad or not layers:
        raise _no_such_layers(bad or "(none)", count)
    return tuple(sorted(set(layers)))


def check_layer_text(spec: object) -> None:
    """The syntax of a ``layers`` text ("10-15", "10,11,12"), checked before any model loads.

    Whether the layers exist needs the model (:func:`parse_layers`); a typo should not wait for a download.
    """
    if not isinstance(spec, str) or spec == "":
        return
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UserError(f"layers '{spec}' is not understood; use a range like 10-15 or a list like 10,11,12")
        if match[2] is not None and int(match[2]) < int(match[1]):
            raise UserError(f"layers '{part.strip()}' is an empty range; write the lower layer first "
                            f"({int(match[2])}-{int(match[1])})")


def _no_such_layers(what: object, count: int) -> UserError:
    return UserError(f"layers {what} do not exist in this model; it has self-attention layers 0-{count - 1} "
                     f"(default: the last six, {max(0, count - 6)}-{count - 1})")


def check_timestep(t: object, model: DiffusionModel) -> None:
    """A timestep a caller gives: one number from 0 to the model's training timesteps (a device tensor's value is
    not read: that would wait for the GPU at every step)."""
    total = model.scheduler_config.num_train_timesteps
    if torch.is_tensor(t):
        if t.numel() != 1:
            raise UserError(f"the timestep must be one number, not a tensor of shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            return
        t = t.item()
    if not isinstance(t, numbers.Real) or isinstance(t, bool):
        raise UserError(f"the timestep must be a number in 0..{total}, not a {type(t).__name__}")
    if not 0 <= t <= total:  # DDIM's steps_offset makes 1000 of 1000 steps' first timestep
        raise UserError(f"timestep {t} is outside the model's range 0..{total}")


def check_latents(what: str, z: object, model: DiffusionModel) -> None:
    """Latents a caller gives: a (B, C, h, w) tensor with the UNet's channels (:meth:`DiffusionModel.encode`'s)."""
    channels = model.unet.config.in_channels
    if not torch.is_tensor(z):
        raise UserError(f"{what} must be a torch tensor (B, {channels}, h, w), such as model.encode() gives, not a "
                        f"{type(z).__name__}")
    if z.ndim != 4 or z.shape[1] != channels or 0 in z.shape:
        raise UserError(f"{what} must have the shape (B, {channels}, h, w), such as model.encode() gives, not "
                        f"{tuple(z.shape)}")
    if not z.is_floating_point():
        raise UserError(f"{what} must be floating point, such as model.encode() gives, not {z.dtype}")


#: Why a Distiller's optimisation cannot run where the caller turned autograd's inference mode on.
INFERENCE_MODE = ("the AD loss is differentiated with respect to the latents, which torch.inference_mode forbids; "
                  "call it outside inference mode (inside one: with torch.inference_mode(False): ...)")


class Distiller:
    """Features and losses of Attention Distillation on one model (ALGORITHM.md §1-2).

    layers: self-attention positions (default the last six); attention_scale: ``a``;
    content_weight: ``lambda``; ref_labels / target_labels: integer label maps (R, H, W) and
    (1 or B, H, W) for masked AD; fused: reference, content and target in one UNet call (default: on
    CUDA without graphs). ``static=True`` runs the CUDA-graph code path without capturing (tests on CPU).
    ``update_mask``: (1 or B, 1, h, w) of 0 and 1 at the latent's size; the optimisation changes the latent
    only where it is 1 (a restyled region; the loss still sees the whole image). ``condition_size``:
    (h, w) pixels of the null conditioning (SDXL's ``add_time_ids`` carry a size); None: the size of the
    latents each run optimises (:meth:`condition_on`), as ALGORITHM.md §1 asks; a loop of one's own gets, in each
    ``with`` block, that of the first latents it gives :meth:`loss` or :meth:`features` (or of the reference).

    Inside ``with distiller:`` every UNet call records the chosen layers and, with ``early_exit`` (the
    default), stops after the last of them: a call of one's own that needs the UNet's output (a denoising
    step of Algorithm 2) goes inside ``with distiller.paused():``.
    """

    def __init__(self, model: DiffusionModel, *, layers: str | Sequence[int] | None = None,
                 attention_scale: float = 1.0, content_weight: float = 0.0, ref_labels: torch.Tensor | None = None,
                 target_labels: torch.Tensor | None = None, fused: bool | None = None,
                 cuda_graphs: bool | None = None, early_exit: bool | None = None,
                 condition_size: tuple[int, int] | None = None, static: bool | None = None,
                 update_mask: torch.Tensor | None = None) -> None:
        if not hasattr(model, "unet") or not hasattr(model, "perf"):
            raise UserError(f"Distiller needs a model loaded with attndistill.load_model, not a {type(model).__name__}")
        if next(model.unet.parameters()).is_inference():
            raise UserError("the model's weights were made inside torch.inference_mode(), which forbids the gradients "
                            "AD needs; make them outside it (attndistill.load_model does so itself)")
        self.model = model
        self.layers = parse_layers(layers, model)  # the numbering is discovered once per UNet, so this is cheap
        # as the tasks check them: a negative or NaN weight dropped the content term silently
        self.attention_scale = positive("attention scale", attention_scale)
        self.content_weight = non_negative("content weight", content_weight)
        self.ref_labels = ref_labels
        self.target_labels = target_labels
        # float32 on the device: a buffer the captured iteration reads (the latent's gradient is float32)
        self._update_mask = None if update_mask is None else update_mask.to(model.device, torch.float32)
        on_cuda = model.device.type == "cuda"
        perf = model.perf
        cuda_graphs = perf.cuda_graphs if cuda_graphs is None else cuda_graphs
        fused = perf.fused if fused is None else fused
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        # Without graphs a GPU is launch-bound: one batched call wins. With graphs the launches are gone
        # and arithmetic counts: split calls skip the backward pass through the reference rows.
        self.fused = (on_cuda and not self.cuda_graphs) if fused is None else fused
        self.batch_references = on_cuda  # reference + content in one no-grad call (CPU: batch costs its size)
        self.early_exit = perf.early_exit if early_exit is None else early_exit
        self.static = self.cuda_graphs if static is None else static
        self._steppers: dict[tuple, Stepper] = {}
        self.condition_size = condition_size
        self._condition_given = condition_size is not None
        self._conditioned = self._condition_given  # on the output size, by a run or by the first loss()
        self.null: Conditioning = model.null_condition(condition_size)
        self.store = None
        self._ctx = None
        self._masks: dict[tuple, torch.Tensor] = {}  # per (tokens, target hw, reference hw)
        self._pending: tuple | None = None
        self._reference_key = None
        self._references: dict[tuple, StaticReference] = {}  # this run's own static programs (not cached)
        self.reference: Reference | None = None
        self.content_queries: list[torch.Tensor] | None = None
        self.last_parts: dict[str, torch.Tensor] = {}

    @property
    def update_mask(self) -> torch.Tensor | None:
        """The latent cells the optimisation may change (None: all); fixed, as captured graphs read it."""
        return self._update_mask

    # -- capture lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> Distiller:
        self._blocks = [m for m in self.model.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
        self._ctx = capture(self.model.unet, self.layers, early_exit=self.early_exit)
        self.store = self._ctx.__enter__()
        return self

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """For a UNet call of one's own inside ``with distiller:`` (a denoising step): it records nothing and runs
        to the end, its output what it is without the distiller."""
        if self.store is None:
            raise UserError("Distiller.paused() pauses the recording of a 'with distiller:' block; call it inside one")
        return self.store.paused()

    def __exit__(self, *exc) -> None:
        try:
            self._ctx.__exit__(*exc)
        finally:
            self.store = None
            self._steppers.clear()  # this run's steppers; captured graphs stay cached on the model
            self._references.clear()
            self._conditioned = self._condition_given  # the next block's latents choose its own null

    def adam_steps(self, z: torch.Tensor, t: torch.Tensor, ref_latents: torch.Tensor,
                   content_latents: torch.Tensor | None, *, iters: int, lr: float,
                   fresh: bool, reference_key: object = None,
                   features: tuple[Reference, list[torch.Tensor] | None] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``iters`` Adam steps of the loss on ``z`` at ``t``; returns (latents, losses before each step).

        ``fresh=False`` keeps one optimiser across calls (Algorithm 1), ``fresh=True`` resets its state
        first (Algorithm 2). Losses stay on the device; reading them is the caller's sync point.
        ``reference_key``: see :meth:`begin_timestep`. ``features``: this timestep's reference and
        content features computed ahead (:mod:`attndistill.core.lookahead`) instead of here.
        """
        if torch.is_inference_mode_enabled():
            raise UserError(INFERENCE_MODE)
        content_latents = self.used_content(content_latents)
        if not self._conditioned:  # a loop of one's own: the output size's null, before any stepper is made for it
            self.condition_on(z.shape[-2:])
        key = (tuple(z.shape), tuple(ref_latents.shape),
               None if content_latents is None else tuple(content_latents.shape), lr)
        stepper = self._steppers.get(key)
        if stepper is None:
            stepper = self._new_stepper(key, lr, fed=features)
            self._steppers[key] = stepper
            stepper.reset_state()  # a graph from an earlier run still holds that run's moments
        elif fresh:
            stepper.reset_state()
        try:
            return stepper.run(z, t, ref_latents, content_latents, iters, reference_key, features)
        except RuntimeError as exc:  # Adam's step beyond float range: the same failure as a NaN
            if "overflow" not in str(exc):
                raise
            raise NonFiniteError(f"the latent overflowed at timestep {int(t)}; lower --lr"
                                 f"{precision_advice(self.model.dtype)}") from None

    def condition_on(self, latent_hw: Sequence[int]) -> None:
        """Take the null conditioning of the output size (latents of ``latent_hw``), unless a ``condition_size``
        was given. Each algorithm calls it before its first feature call. Only SDXL's null depends on the size
        (its ``add_time_ids``); without this a direct caller at 768x512 got features conditioned on 1024x1024.
        """
        self._conditioned = True
        if self._condition_given or getattr(self.model, "kind", None) != "sdxl":
            return
        f = self.model.vae_scale_factor
        size = (int(latent_hw[0]) * f, int(latent_hw[1]) * f)
        if size != self.condition_size:
            self.condition_size, self.null = size, self.model.null_condition(size)

    def _new_stepper(self, key, lr: float, *, fed: tuple | None = None) -> Stepper:
        """A stepper for ``key``; ``fed``: the first features of a run that brings each timestep's own
        (look-ahead), whose reference program then needs buffers but no graph (:class:`StaticReference`)."""
        z_shape, ref_shape, content_shape, _ = key
        if not self.static:
            return EagerStepper(self, z_shape, lr)
        if not self.cuda_graphs:
            reference_key = key[1:3] + (fed is not None,)
            reference = self._references.get(reference_key)
            if reference is None:
                reference = self._references[reference_key] = StaticReference(self, ref_shape, content_shape,
                                                                              capture=False, fed=fed)
            return StaticStepper(self, z_shape, lr, reference, capture=False)
        # graphs replay without Python, so one captured for the same settings serves later runs too
        settings = (self.layers, self.attention_scale, self.early_exit, self.condition_size, fed is not None)
        graph_key = ("stepper",) + key + settings + (self.content_weight,)
        cacheable = self.target_labels is None and self.update_mask is None  # a run's own labels or mask
        graphs = self.model.graphs
        if cacheable and graph_key in graphs:
            return graphs[graph_key]
        # graphs this run does not use (other shapes, earlier jobs): what dropping them can give back
        mine = {id(s) for s in self._steppers.values()} | {id(s.reference) for s in self._steppers.values()
                                                           if hasattr(s, "reference")}
        others = sum(id(g) not in mine for g in graphs.values())
        failure = None
        try:
            start = time.perf_counter()
            reference_key = ("reference", ref_shape, content_shape) + settings
            reference = graphs.get(reference_key, self._references.get(reference_key))
            if reference is None:  # kept for later runs only beside a stepper that is kept (evict_graphs)
                reference = StaticReference(self, ref_shape, content_shape, capture=True, fed=fed)
                (graphs if cacheable else self._references)[reference_key] = reference
            stepper = StaticStepper(self, z_shape, lr, reference, capture=True)
            torch.cuda.synchronize(self.model.device)
            stats = self.model.stats
            stats["graph_capture_s"] = stats.get("graph_capture_s", 0.0) + time.perf_counter() - start
            stats["graphs_captured"] = stats.get("graphs_captured", 0) + 1
        except Exception as exc:  # capture can fail on exotic setups: fall back, loudly
            failure = (is_out_of_memory(exc), f"{type(exc).__name__}: {exc}")
        if failure is not None:  # handled here, not in the except: its traceback holds the failed capture's memory
            reference = stepper = None
            remedy = self._memory_remedy(others) if failure[0] else None
            if remedy:
                log.warning("out of memory capturing a CUDA graph; %s and trying again", remedy)
                return self._new_stepper(key, lr, fed=fed)
            log.warning("CUDA graph capture failed (%s); continuing without CUDA graphs", failure[1])
            self.cuda_graphs = self.static = False
            return EagerStepper(self, z_shape, lr)
        if cacheable:
            graphs[graph_key] = stepper
            evict_graphs(graphs, "stepper")
        return stepper

    def _memory_remedy(self, others: int) -> str | None:
        """Make room for a capture that ran out of memory; what was done, or None when nothing is left to try.

        First the cached graphs of other shapes go (their pools hold memory nothing else can use), then
        gradient checkpointing comes on where it was automatic (an iteration's graph keeps 3-8x less, by
        benchmarks/graph_memory.py). Each is done once, so the retries end.
        """
        if others:
            self.model.release_graphs()
            return f"dropped {others} cached graphs of other shapes"
        if self.model.checkpoint_to_fit():
            self.model.release_graphs()
            return "turned gradient checkpointing on (--gradient-checkpointing asks for it from the start)"
        return None

    # -- features --------------------------------------------------------------------------------------

    def features(self, latents: torch.Tensor, t: torch.Tensor | int, *,
                 keep: Callable[[LayerFeatures], object] | None = None) -> list:
        """Features of ``latents`` (B, 4, h, w) at timestep ``t`` with the null conditioning.

        Gradients flow when the caller is in grad mode and ``latents`` requires grad. ``keep``: what to
        keep of each layer as it is recorded (default: its :class:`LayerFeatures`); the rest is freed
        while the forward goes on. A no-grad call of many rows runs its feed-forward layers a few rows
        at a time (:func:`~attndistill.core.features.chunk_rows`; ``PerfOptions.feed_forward_chunks``).
        """
        if self.store is None:
            raise RuntimeError("use the Distiller as a context manager: with Distiller(model) as ad: ...")
        if not self._conditioned:  # a loop of one's own that asks for features (or a reference) first
            self.condition_on(latents.shape[-2:])
        self.store.clear()
        try:
            self.store.keep = keep
            b = latents.shape[0]
            chunked = self.model.perf.feed_forward_chunks and not torch.is_grad_enabled()
            rows = chunk_rows(b, latents.shape[-2] * latents.shape[-1]) if chunked else b
            chunks = feed_forward_chunks(self._blocks, rows) if rows < b else contextlib.nullcontext()
            with chunks, contextlib.suppress(StopForward):  # the rest of the UNet is not needed
                if self.model.perf.compiled_calls and not torch.is_grad_enabled() and torch.is_tensor(t):
                    static_program(Distiller._record, "the feature call (--compiled-calls)")(self, latents, t)
                else:
                    self.model.predict(latents, t, self.null)
            return self.store.take()
        finally:
            self.store.keep = None
            self.store.clear()

    def _record(self, latents: torch.Tensor, t: torch.Tensor) -> None:
        """A UNet call for what the capture processors record, its output dropped: the program of
        ``compiled_calls``, in which the UNet's tail after the last recorded layer is dead code."""
        self.model.predict(latents, t, self.null)

    def used_content(self, content_latents: torch.Tensor | None) -> torch.Tensor | None:
        """``content_latents`` where the content loss uses them (``lambda > 0``), else None: no call computes
        content features that nothing reads."""
        return content_latents if self.content_weight > 0 else None

    def begin_timestep(self, t: torch.Tensor | int, ref_latents: torch.Tensor,
                       content_latents: torch.Tensor | None = None, *, key: object = None,
                       features: tuple[Reference, list[torch.Tensor] | None] | None = None) -> None:
        """Set the timestep and the (already noised, if sampling) reference/content latents to score against.

        ``key``: a caller's token for these inputs (e.g. one ``object()`` per timestep). Called again
        with the same key, the features computed for it are kept (MultiDiffusion's view batches
        share their timestep's reference). ``features``: their (reference, content queries),
        computed ahead elsewhere (:mod:`attndistill.core.lookahead`).
        """
        check_timestep(t, self.model)
        check_latents("reference latents", ref_latents, self.model)
        if content_latents is not None:
            check_latents("content latents", content_latents, self.model)
        self._pending = (t, ref_latents, self.used_content(content_latents))
        if features is not None:
            self.reference, self.content_queries = features
        elif key is None or key != self._reference_key:
            self.reference = None
            self.content_queries = None
        self._reference_key = key

    def set_reference_state(self, pending: tuple, reference: Reference,
                            content_queries: list[torch.Tensor] | None) -> None:
        """Adopt inputs and features computed elsewhere (a static reference program)."""
        self._pending, self.reference, self.content_queries = pending, reference, content_queries

    def compute_reference(self) -> None:
        """Reference (and content) features of the current timestep, under no-grad, in their own call(s).

        Each call keeps what the loss uses: the reference rows' keys and values, the content rows'
        queries (views: under CUDA graphs a copy would cost kernels in every replay).
        """
        t, z_ref, z_c = self._pending
        r = z_ref.shape[0]
        with torch.no_grad():
            if z_c is not None and self.batch_references and z_c.shape[-2:] == z_ref.shape[-2:]:
                # reference and content share one no-grad call
                kept = self.features(torch.cat([z_ref, z_c.to(z_ref.dtype)]), t,
                                     keep=lambda f: (f.k[:r], f.v[:r], f.q[r:]))
                self._set_reference([k for k, _, _ in kept], [v for _, v, _ in kept], [q for _, _, q in kept])
                return
            kept = self.features(z_ref, t, keep=lambda f: (f.k, f.v))
            queries = self.features(z_c, t, keep=lambda f: f.q) if z_c is not None else None
        self._set_reference([k for k, _ in kept], [v for _, v in kept], queries)

    def _set_reference(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                       content_queries: list[torch.Tensor] | None) -> None:
        """Adopt the reference rows' keys and values (R, h, N, d) and the content rows' queries, per layer."""
        self.reference = Reference([concat_references(k.detach()) for k in keys],
                                   [concat_references(v.detach()) for v in values])
        self.content_queries = [q.detach() for q in content_queries] if content_queries is not None else None

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        """Total loss ``L_AD + lambda * L_content`` of target latents ``z`` (B, 4, h, w) at the current timestep."""
        if self._pending is None:
            raise RuntimeError("call begin_timestep() before loss()")
        t, z_ref, z_c = self._pending
        check_latents("target latents", z, self.model)
        if z.requires_grad and torch.is_inference_mode_enabled():
            raise UserError(INFERENCE_MODE)
        if z_c is not None and z_c.shape[-2:] != z.shape[-2:]:
            raise UserError(f"content latents of {z_c.shape[-2]}x{z_c.shape[-1]} do not match target latents of "
                            f"{z.shape[-2]}x{z.shape[-1]}; the content loss compares them cell by cell")
        if z_c is not None and z_c.shape[0] not in (1, z.shape[0]):
            raise UserError(f"{z_c.shape[0]} content latents for {z.shape[0]} target latents; give one content for "
                            "all targets or one for each")
        if not self._conditioned and self.reference is None:  # a loop of one's own: the output size's null
            self.condition_on(z.shape[-2:])
        if self.reference is None and self.fused:
            # one batched call; a reference of another size than the target gets its own (no-grad) call
            same_size = z_ref.shape[-2:] == z.shape[-2:]
            ref_feats = None
            if not same_size:
                with torch.no_grad():
                    ref_feats = self.features(z_ref, t, keep=lambda f: (f.k, f.v))
            parts = ([z_ref.detach()] if same_size else []) + ([z_c.detach()] if z_c is not None else []) + [z]
            feats = self.features(torch.cat([p.to(z.dtype) for p in parts]), t)
            r, c = (z_ref.shape[0] if same_size else 0), (z_c.shape[0] if z_c is not None else 0)
            keys_values = ref_feats or [(f.k[:r], f.v[:r]) for f in feats]
            self._set_reference([k for k, _ in keys_values], [v for _, v in keys_values],
                                [f.q[r:r + c] for f in feats] if z_c is not None else None)
            target = [select_rows(f, r + c, None) for f in feats]
        else:
            if self.reference is None:
                self.compute_reference()
            if self._compiles_loss():
                return static_program(Distiller._target_loss, "the AD loss and its backward (--compiled-loss)")(self, z)
            target = self.features(z, t)
        return self._loss(target, z, z_ref.shape[-2:])

    def _compiles_loss(self) -> bool:
        """Whether :meth:`loss` runs as one compiled program (``PerfOptions.compiled_loss``): for gradients of
        the target, with a timestep tensor (an int would be compiled in, a program per step), without label
        masks (their lookup raises on unmatched labels, which a program cannot)."""
        return (self.model.perf.compiled_loss and torch.is_grad_enabled() and self.target_labels is None
                and torch.is_tensor(self._pending[0]))

    def _target_loss(self, z: torch.Tensor) -> torch.Tensor:
        """The target's features and loss in one go: the program of ``compiled_loss``."""
        t, z_ref, _ = self._pending
        self.store.clear()
        self._record(z, t)  # inside a program the forward runs whole, its tail dead code
        return self._loss(self.store.take(), z, z_ref.shape[-2:])

    def _loss(self, target: list[LayerFeatures], z: torch.Tensor, ref_hw) -> torch.Tensor:
        masks = self._layer_masks(target, z.shape[-2:], ref_hw) if self.target_labels is not None else None
        ad = ad_loss([f.o for f in target], [f.q for f in target], self.reference.keys, self.reference.values,
                     scale=self.attention_scale, masks=masks)
        total = ad
        parts = {"ad": ad}
        if self.content_queries is not None:
            c = content_loss([f.q for f in target], self.content_queries, weights=self._off_content(z))
            parts["content"] = c
            total = ad + self.content_weight * c
        # detached: a part holding its autograd graph would keep the graph (and the latent's gradient
        # accumulator from the warm-up stream) alive into a CUDA graph capture
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return total

    def _off_content(self, z: torch.Tensor) -> torch.Tensor | None:
        """(B,) 0 for targets that *are* their content latent, else 1; None when no target is.

        There the content term and its gradient are exactly zero (L1's kink, subgradient 0), but two
        UNet calls in different batch layouts round differently and would pick a random subgradient
        sign that Adam's first step turns into a visible difference. Checked on the device, no sync.
        """
        z_c = self._pending[2]
        if z_c is None or z_c.shape[-2:] != z.shape[-2:]:
            return None
        same = (z.detach() == z_c.to(z.dtype)).flatten(1).all(dim=1)  # (B,) or (1,) broadcast
        return (~same).to(torch.float32).expand(z.shape[0])

    def _layer_masks(self, target: list[LayerFeatures], target_hw, ref_hw) -> list[torch.Tensor]:
        """Label masks per layer, at each layer's own token grid (non-square grids included); cached."""
        masks, unmatched = [], []
        for f in target:
            n_t = f.q.shape[2]
            key = (n_t, tuple(target_hw), tuple(ref_hw))
            if key not in self._masks:
                t_grid, r_grid = _layer_grids(n_t, tuple(target_hw), tuple(ref_hw))
                t_lab = resize_labels(self.target_labels.to(f.q.device), t_grid).flatten(-2)  # (1 or B, N)
                r_lab = resize_labels(self.ref_labels.to(f.q.device), r_grid).reshape(-1)  # (R*N_r,)
                try:
                    self._masks[key] = label_mask(t_lab, r_lab)
                except UnmatchedLabels as exc:
                    unmatched.append((exc.labels, r_grid))
                    continue
            masks.append(self._masks[key])
        if unmatched:  # named at the coarsest grid that loses one: regions made that large pass every layer at once
            labels = sorted({label for found, _ in unmatched for label in found})
            raise UnmatchedLabels(labels, min((grid for _, grid in unmatched), key=lambda g: g[0] * g[1]))
        return masks


def _layer_grids(n_t: int, target_hw: tuple[int, int], ref_hw: tuple[int, int]):
    """Token grids (h, w) of target and reference at the UNet depth where the target has ``n_t`` tokens."""
    (h, w), (rh, rw) = target_hw, ref_hw
    while h * w > n_t:
        h, w = (h + 1) // 2, (w + 1) // 2  # each down block halves, rounding up
        rh, rw = (rh + 1) // 2, (rw + 1) // 2
    if h * w != n_t:
        raise RuntimeError(f"cannot place {n_t} tokens on a latent of {target_hw}")
    return (h, w), (rh, rw)


def select_rows(f: LayerFeatures, start: int, stop: int | None) -> LayerFeatures:
    """Rows ``start:stop`` of every feature tensor (batch axis)."""
    return LayerFeatures(f.q[start:stop], f.k[start:stop], f.v[start:stop], f.o[start:stop])


def evict_graphs(graphs: dict, kind: str, keep: int = MAX_CACHED_GRAPHS) -> None:
    """Drop the oldest cached graphs of ``kind`` ("stepper", "predict") beyond ``keep``, and reference
    graphs no cached stepper uses: each holds its activations' memory, and a long-lived process (web UI,
    batch runner) meets many shapes."""
    same = [k for k in graphs if k[0] == kind]
    for k in same[:max(0, len(same) - keep)]:
        del graphs[k]
    used = {id(graphs[k].reference) for k in graphs if k[0] == "stepper"}
    for k in [k for k in graphs if k[0] == "reference" and id(graphs[k]) not in used]:
        del graphs[k]
