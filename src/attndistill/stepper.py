"""Adam iterations on a latent: the inner loop of both algorithms, eager or as one CUDA graph.

Eager: a persistent Adam over a leaf tensor. Graphed (CUDA only): the whole
iteration (the UNet calls for reference, content and target, the loss, the
backward pass and a capturable Adam step) is captured once into a CUDA graph
and replayed; a UNet call at batch 1-3 is bound by kernel-launch overhead,
which a replay removes. Both run the same arithmetic.
"""

from __future__ import annotations

import torch


class EagerStepper:
    """``iters`` Adam steps of ``distiller.loss`` on latents of a fixed shape."""

    def __init__(self, distiller, shape: tuple[int, ...], lr: float) -> None:
        self.distiller = distiller
        self.z = torch.zeros(shape, device=distiller.model.device, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.z], lr=lr)

    def reset_state(self) -> None:
        """Forget Adam's moments: the same as a new optimiser (Algorithm 2 resets it every step)."""
        self.optimizer.state.clear()

    def run(self, z: torch.Tensor, t, ref: torch.Tensor, content: torch.Tensor | None,
            iters: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            if z.data_ptr() != self.z.data_ptr():
                self.z.copy_(z)
        self.distiller.begin_timestep(t, ref, content)
        losses = []
        with torch.enable_grad():
            for _ in range(iters):
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(self._adam_step())
        return self.z.detach(), losses

    def _adam_step(self) -> torch.Tensor:
        """Loss, backward, Adam step; returns the loss (detached, on the device)."""
        loss = self.distiller.loss(self.z)
        # the loss is a mean over the batch; scaling by B gives each target the gradient it
        # would get alone, so batching targets does not change their results (Adam's eps aside)
        (loss * self.z.shape[0]).backward()
        self.optimizer.step()
        return loss.detach()


class GraphedStepper(EagerStepper):
    """One AD iteration captured as a CUDA graph over static buffers (shapes fixed at construction)."""

    def __init__(self, distiller, shape: tuple[int, ...], lr: float, ref_shape: tuple[int, ...],
                 content_shape: tuple[int, ...] | None, warmup: int = 3) -> None:
        device = distiller.model.device
        self.distiller = distiller
        self.z = torch.zeros(shape, device=device, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.z], lr=lr, capturable=True)
        self.t = torch.full((), 500, device=device, dtype=torch.long)
        self.ref = torch.randn(ref_shape, device=device)
        self.content = torch.randn(content_shape, device=device) if content_shape else None
        with torch.no_grad():
            self.z.copy_(torch.randn(shape, device=device))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.enable_grad():
            for _ in range(warmup):  # allocator and lazy state (masks, Adam moments) settle here
                self._iteration()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph), torch.enable_grad():
            self.loss = self._iteration()
        self.reset_state()

    def _iteration(self) -> torch.Tensor:
        self.distiller.begin_timestep(self.t, self.ref, self.content)
        return self._adam_step()

    def reset_state(self) -> None:
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def run(self, z, t, ref, content, iters):
        with torch.no_grad():
            if z.data_ptr() != self.z.data_ptr():
                self.z.copy_(z)
            self.t.copy_(torch.as_tensor(t, device=self.t.device).reshape(()))
            self.ref.copy_(ref)
            if self.content is not None:
                self.content.copy_(content)
        losses = []
        for _ in range(iters):
            self.graph.replay()
            losses.append(self.loss.clone())
        return self.z.detach(), losses
