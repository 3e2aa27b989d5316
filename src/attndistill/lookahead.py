"""Reference and content features of upcoming timesteps, several timesteps per UNet call (Algorithm 1).

In optimisation mode the reference and content latents never change, only the
timestep does, and their features do not depend on the target. One batched
UNet call with per-sample timesteps therefore computes them for the next few
timesteps at once. On a GPU a batch of 8-16 costs little more than a batch of
one, so the per-step reference call all but disappears. On a CPU a batch costs
its size, so there it is off (``PerfOptions.lookahead_batch = 1``).
"""

from __future__ import annotations

import torch

from .engine import Distiller, Reference, select_rows
from .features import LayerFeatures
from .losses import concat_references

#: Features of one timestep: the reference (concatenated keys/values) and the content queries (or None).
StepFeatures = tuple[Reference, list[torch.Tensor] | None]


class ReferenceLookahead:
    """Features of ``(ref_latents, t_i)`` and ``(content_latents, t_i)`` for step ``i``, computed in chunks.

    ``batch`` bounds the rows of one UNet call: a chunk covers ``batch // (R + C)`` timesteps for R
    reference and C content latents (at least one).
    """

    def __init__(self, distiller: Distiller, timesteps: torch.Tensor, ref_latents: torch.Tensor,
                 content_latents: torch.Tensor | None, batch: int) -> None:
        self.distiller = distiller
        self.timesteps = timesteps
        self.ref, self.content = ref_latents, content_latents
        rows = ref_latents.shape[0] + (content_latents.shape[0] if content_latents is not None else 0)
        self.chunk = max(1, batch // rows)
        self.start = 0
        self.ahead: list[StepFeatures] = []

    def at(self, step: int) -> StepFeatures:
        """The features of step ``step`` (computing the chunk that starts there when needed)."""
        if not self.start <= step < self.start + len(self.ahead):
            self.start, self.ahead = step, self._compute(self.timesteps[step:step + self.chunk])
        return self.ahead[step - self.start]

    def _compute(self, ts: torch.Tensor) -> list[StepFeatures]:
        n, r = len(ts), self.ref.shape[0]
        content = self.content
        with torch.no_grad():
            if content is not None and content.shape[-2:] == self.ref.shape[-2:]:
                # step-major rows: [ref_0, content_0, ref_1, content_1, ...], one call
                both = torch.cat([self.ref, content.to(self.ref.dtype)])
                feats = self._features(both, ts)
                per = both.shape[0]
                ref_rows = [[select_rows(f, j * per, j * per + r) for f in feats] for j in range(n)]
                content_rows = [[select_rows(f, j * per + r, (j + 1) * per) for f in feats] for j in range(n)]
            else:
                feats = self._features(self.ref, ts)
                ref_rows = [[select_rows(f, j * r, (j + 1) * r) for f in feats] for j in range(n)]
                content_rows = [None] * n
                if content is not None:
                    c = content.shape[0]
                    cfeats = self._features(content, ts)
                    content_rows = [[select_rows(f, j * c, (j + 1) * c) for f in cfeats] for j in range(n)]
        return [(Reference([concat_references(f.k) for f in ref], [concat_references(f.v) for f in ref]),
                 None if cq is None else [f.q for f in cq]) for ref, cq in zip(ref_rows, content_rows, strict=True)]

    def _features(self, latents: torch.Tensor, ts: torch.Tensor) -> list[LayerFeatures]:
        """Features of ``latents`` repeated for every timestep of ``ts`` (per-sample timesteps)."""
        rows = latents.shape[0]
        return self.distiller.features(latents.repeat(len(ts), 1, 1, 1), ts.repeat_interleave(rows))

