"""Adam iterations on a latent: the inner loop of both algorithms, eager or over static buffers.

Eager: a persistent Adam over a leaf tensor; the distiller computes the
reference features with the first loss of a timestep and keeps them for the
other iterations.

Static (CUDA graphs): two programs over fixed buffers. The *reference* program
(reference and content features of a timestep) runs once per timestep and is
shared by every stepper with the same reference shape, so the view batches of
MultiDiffusion pay for it once. The *iteration* program (target features,
loss, backward, capturable Adam step) runs ``iters`` times. On CUDA each is
captured once and replayed: a UNet call at batch 1-3 is bound by kernel-launch
overhead, which a replay removes. Without capture the same programs are called
directly, which is how the CPU tests check them against the eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


def warmup_values(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Gaussian values for a static buffer's warm-up calls, overwritten before any real one: drawn from a generator
    of their own, so a run neither needs nor moves torch's global random state."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)


class StaticCall:
    """``fn()`` over static buffers: captured as a CUDA graph and replayed, or (``capture=False``) called.

    Each graph is captured on a stream of its own (the one its warm-up ran on), not on the capture stream
    PyTorch shares between graphs: cuBLAS keeps one workspace per stream, whose address a graph bakes in,
    and newer PyTorch frees a stream's workspace when a graph captured on it is destroyed, which would
    pull it from under every other graph of that stream when the model's cache drops one.
    """

    def __init__(self, fn: Callable, *, capture: bool, grad: bool, warmup: int = 2) -> None:
        self.fn, self.grad, self.graph = fn, grad, None
        self.out = None
        if not capture:
            return
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), torch.set_grad_enabled(grad):
            for _ in range(warmup):  # allocator, lazy state (masks, Adam moments) and compilation settle here
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream), torch.set_grad_enabled(grad):
            self.out = fn()

    def __call__(self):
        if self.graph is None:
            with torch.set_grad_enabled(self.grad):
                self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


class LatentAdam:
    """A latent and the Adam over it, one AD iteration (loss, backward, Adam step) at a time.

    ``capturable``: Adam's state stays on the device, so that a CUDA graph can capture the step.
    """

    def __init__(self, distiller, shape: tuple[int, ...], lr: float, *, capturable: bool = False) -> None:
        self.distiller = distiller
        self.z = torch.zeros(shape, device=distiller.model.device, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.z], lr=lr, capturable=capturable)

    def reset(self) -> None:
        """Forget Adam's moments, the same as a new optimiser (Algorithm 2 resets it every step). Zeroed in
        place, not dropped: a captured step reads and writes these addresses."""
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def load(self, z: torch.Tensor) -> None:
        with torch.no_grad():
            if z.data_ptr() != self.z.data_ptr():
                self.z.copy_(z)

    def step(self) -> torch.Tensor:
        """Loss, backward, Adam step; returns the loss (detached, on the device)."""
        # a fresh gradient each time: inside a captured graph the backward writes it, never accumulates
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.distiller.loss(self.z)
        # the loss is a mean over the batch; scaling by B gives each target the gradient it
        # would get alone, so batching targets does not change their results (Adam's eps aside)
        (loss * self.z.shape[0]).backward()
        if self.distiller.update_mask is not None:  # Adam leaves an element whose gradient is always 0 as it is
            self.z.grad.mul_(self.distiller.update_mask)
        self.optimizer.step()
        return loss.detach()


class EagerStepper:
    """``iters`` Adam steps of ``distiller.loss`` on latents of a fixed shape."""

    def __init__(self, distiller, shape: tuple[int, ...], lr: float) -> None:
        self.distiller = distiller
        self.adam = LatentAdam(distiller, shape, lr)

    def reset_state(self) -> None:
        self.adam.reset()

    def run(self, z: torch.Tensor, t, ref: torch.Tensor, content: torch.Tensor | None, iters: int,
            reference_key: Hashable | None = None, features: tuple | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``iters`` Adam steps from ``z``; ``reference_key``: see :meth:`Distiller.begin_timestep`;
        ``features``: (reference, content queries) computed ahead, used instead of computing them here."""
        self.adam.load(z)
        self.distiller.begin_timestep(t, ref, content, key=reference_key, features=features)
        with torch.enable_grad():
            losses = [self.adam.step() for _ in range(iters)]
        return self.adam.z.detach(), losses


class StaticReference:
    """Reference (and content) features of one timestep, computed from static input buffers.

    ``update`` recomputes them unless the caller's key says the inputs are those of the last run.
    ``fed``: the first features of a run whose every timestep brings its own (look-ahead). Then there
    is no program to capture: the features are copied into fixed buffers, which is all the iteration
    program needs, and no graph pool holds a reference call's memory.
    """

    def __init__(self, distiller, ref_shape: tuple[int, ...], content_shape: tuple[int, ...] | None, *,
                 capture: bool, fed: tuple | None = None) -> None:
        device = distiller.model.device
        self.t = torch.full((), 500, device=device, dtype=torch.long)
        self.ref = warmup_values(ref_shape, device)
        self.content = warmup_values(content_shape, device) if content_shape else None
        self.key: Hashable | None = None
        self.owner = distiller
        self.fed = fed is not None
        self.call = StaticCall(self._compute, capture=capture and not self.fed, grad=False, warmup=1)
        if self.fed:
            reference, queries = fed
            keys, values = [k.clone() for k in reference.keys], [v.clone() for v in reference.values]
            self.call.out = (type(reference)(keys, values), None if queries is None else [q.clone() for q in queries])
        elif capture:
            self.call()  # a captured graph's outputs hold values only after a replay

    def _compute(self):
        d = self.owner
        d.begin_timestep(self.t, self.ref, self.content)
        d.compute_reference()
        return d.reference, d.content_queries

    def update(self, distiller, t, ref: torch.Tensor, content: torch.Tensor | None,
               key: Hashable | None = None) -> None:
        """Features of (t, ref, content) for ``distiller``; skipped when ``key`` matches the last run's."""
        if key is None or key != self.key:
            with torch.no_grad():
                self.t.copy_(torch.as_tensor(t, device=self.t.device).reshape(()))
                self.ref.copy_(ref)
                if self.content is not None:
                    self.content.copy_(content)
            self.owner = distiller
            if self.fed:  # no program of its own: computed eagerly into the buffers the iteration reads
                with torch.no_grad():
                    self._copy_in(self._compute())
            else:
                self.call()
            self.key = key
        self.activate(distiller)

    def load(self, distiller, t, content: torch.Tensor | None, features: tuple) -> None:
        """Adopt features computed elsewhere (look-ahead) for timestep ``t``: copied into the static outputs."""
        with torch.no_grad():
            self.t.copy_(torch.as_tensor(t, device=self.t.device).reshape(()))
            if self.content is not None:
                self.content.copy_(content)
            if self.call.graph is None and not self.fed:
                self.call.out = features
            else:  # the iteration graph reads these addresses
                self._copy_in(features)
        self.key = None  # what the program computed last is no longer in its outputs
        self.activate(distiller)

    def _copy_in(self, features: tuple) -> None:
        (ref, queries), (new_ref, new_queries) = self.call.out, features
        for dst, src in zip(ref.keys + ref.values + (queries or []),
                            new_ref.keys + new_ref.values + (new_queries or []), strict=True):
            dst.copy_(src)

    def activate(self, distiller) -> None:
        """Point ``distiller`` at these features: what a target iteration reads (nothing before a first run)."""
        if self.call.out is not None:
            distiller.set_reference_state((self.t, self.ref, self.content), *self.call.out)


class StaticStepper:
    """AD iterations over static buffers (shapes fixed at construction): a CUDA graph when ``capture``."""

    def __init__(self, distiller, shape: tuple[int, ...], lr: float, reference: StaticReference, *,
                 capture: bool, warmup: int = 3) -> None:
        self.distiller = distiller
        self.reference = reference
        self.adam = LatentAdam(distiller, shape, lr, capturable=capture)
        with torch.no_grad():
            self.adam.z.copy_(warmup_values(shape, self.adam.z.device))
        reference.activate(distiller)
        self.iteration = StaticCall(self.adam.step, capture=capture, grad=True, warmup=warmup)
        self.adam.reset()

    def reset_state(self) -> None:
        self.adam.reset()

    def run(self, z: torch.Tensor, t: torch.Tensor, ref: torch.Tensor, content: torch.Tensor | None, iters: int,
            reference_key: Hashable | None = None, features: tuple | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.adam.load(z)
        if features is not None:
            self.reference.load(self.distiller, t, content, features)
        else:
            self.reference.update(self.distiller, t, ref, content, reference_key)
        losses = [self.iteration().clone() for _ in range(iters)]  # a replay overwrites its output
        return self.adam.z.detach(), losses


#: What :meth:`Distiller._new_stepper` makes: the same ``run`` and ``reset_state``, eager or static.
Stepper = EagerStepper | StaticStepper
